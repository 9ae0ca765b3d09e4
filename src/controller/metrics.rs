//! The controller's own Prometheus metrics (its `/metrics`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Clone)]
pub struct ControllerMetrics {
    registry: Registry,
    /// Connections on pods that reported.
    pub fleet_connections: IntGauge,
    /// Connections per reporting pod.
    pub pod_connections: IntGaugeVec,
    /// Pods by state: `serving`, `draining`, `shedding`, `unknown`.
    pub pods: IntGaugeVec,
    /// Replicas the load asks for (what KEDA or an HPA should aim at).
    pub desired_replicas: IntGauge,
    /// The Deployment's replicas as last read.
    pub replicas: IntGauge,
    /// 1 while this replica holds the Lease and may act.
    pub leader: IntGauge,
    /// Replica changes written, by direction (`up`, `down`).
    pub scale_actions: IntCounterVec,
    /// Scale-downs started (victims told to drain).
    pub drains_started: IntCounter,
    /// Ticks that decided not to scale, by reason.
    pub holds: IntCounterVec,
    /// Shedding orders sent.
    pub shed_orders: IntCounter,
    /// Connections the orders asked pods to shed.
    pub connections_shed: IntCounter,
    /// Ticks where the fleet was not rebalanced, by reason.
    pub rebalance_skips: IntCounterVec,
    /// Reconcile failures, by stage (`lease`, `pods`, `redis`, `kube`).
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        crate::telemetry::metrics::register_process_metrics(&registry);
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("gauge");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("gauge vec");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("counter vec");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "wsfleet_controller_reconcile_duration_seconds",
                "Time one reconciliation took",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("histogram");
        registry
            .register(Box::new(reconcile_duration.clone()))
            .expect("register");
        let this = Self {
            fleet_connections: gauge(
                "wsfleet_controller_fleet_connections",
                "Connections on the gateway pods that reported",
            ),
            pod_connections: gauge_vec(
                "wsfleet_controller_pod_connections",
                "Connections per reporting gateway pod",
                &["pod"],
            ),
            pods: gauge_vec(
                "wsfleet_controller_pods",
                "Gateway pods by state (serving, draining, shedding, unknown)",
                &["state"],
            ),
            desired_replicas: gauge(
                "wsfleet_controller_desired_replicas",
                "Replicas the load asks for",
            ),
            replicas: gauge(
                "wsfleet_controller_replicas",
                "Replicas of the gateway Deployment as last read",
            ),
            leader: gauge(
                "wsfleet_controller_leader",
                "1 while this replica leads and may act",
            ),
            scale_actions: counter_vec(
                "wsfleet_controller_scale_actions_total",
                "Replica changes written, by direction",
                &["direction"],
            ),
            drains_started: counter(
                "wsfleet_controller_drains_started_total",
                "Scale-downs started: victims told to drain",
            ),
            holds: counter_vec(
                "wsfleet_controller_scale_holds_total",
                "Ticks that did not scale, by reason",
                &["reason"],
            ),
            shed_orders: counter(
                "wsfleet_controller_shed_orders_total",
                "Shedding orders sent to pods",
            ),
            connections_shed: counter(
                "wsfleet_controller_connections_shed_total",
                "Connections the shedding orders asked for",
            ),
            rebalance_skips: counter_vec(
                "wsfleet_controller_rebalance_skips_total",
                "Ticks without rebalancing, by reason",
                &["reason"],
            ),
            reconcile_errors: counter_vec(
                "wsfleet_controller_reconcile_errors_total",
                "Failed reconciliations, by stage",
                &["stage"],
            ),
            reconcile_duration,
            registry,
        };
        // Zeros from the start for every label value the code uses, so
        // dashboards show "none yet" rather than "no data".
        for direction in ["up", "down"] {
            this.scale_actions.with_label_values(&[direction]);
        }
        for reason in [
            "steady",
            "waiting_to_scale_up",
            "stabilizing",
            "unknown_pods",
            "no_data",
            "no_victims",
        ] {
            this.holds.with_label_values(&[reason]);
        }
        for reason in [
            "balanced",
            "unknown_pods",
            "busy",
            "budget_spent",
            "no_room",
            "too_few",
        ] {
            this.rebalance_skips.with_label_values(&[reason]);
        }
        for stage in ["lease", "pods", "redis", "kube", "leadership"] {
            this.reconcile_errors.with_label_values(&[stage]);
        }
        this
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_controller_exports_its_process_metrics() {
        let text = ControllerMetrics::new().render();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_threads ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(name)), "{name}\n{text}");
        }
    }
}
