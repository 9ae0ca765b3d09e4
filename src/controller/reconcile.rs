//! One reconciliation: read the fleet, decide (pure, `decide.rs`), act.
//!
//! Reading never needs leadership; every write does, and is preceded by a
//! fresh [`Elector::may_act`] check, so a replica that lost the Lease in
//! the middle of a tick stops before its next write. Missing data stops
//! actions, never triggers them (trap 18): without the pods' reports the
//! tick ends before any decision.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use super::decide::{
    self, Balanced, DrainProgress, FleetPod, HoldReason, RebalancePolicy, Report, ScaleDecision,
    ScaleMemory, ScalePolicy, ShedHistory, Totals, VICTIM_DELETION_COST,
};
use super::k8s::{Cluster, PodView};
use super::lease::{Elector, Leadership};
use super::metrics::ControllerMetrics;
use super::{Error, PodSource};
use crate::bus::now_ms;
use crate::bus::redis::FleetRegistry;
use crate::config::ScaleMode;
use crate::pod::{Order, OrderAction};

/// What the controller was told to do, decided once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: ScaleMode,
    pub scale: ScalePolicy,
    /// `None`: rebalancing is off.
    pub rebalance: Option<RebalancePolicy>,
    pub drain_timeout_ms: u64,
    /// How long a pod reads and reports an order (its upkeep period, at
    /// most): an order is "in flight" until then plus its own duration.
    pub order_latency_ms: u64,
}

/// The fleet as the last tick saw it: `/fleet` and `/readyz` answer from it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetView {
    /// ms since the epoch of the last tick that read the whole fleet.
    pub updated_ms: u64,
    pub connections: usize,
    pub pods: usize,
    pub unknown_pods: usize,
    pub desired_replicas: u32,
    pub replicas: Option<u32>,
    pub leader: bool,
}

/// A scale-down in progress: victims drain, then replicas go down.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScaleDown {
    from: u32,
    to: u32,
    victims: Vec<String>,
    started_ms: u64,
}

pub struct Reconciler {
    settings: Settings,
    cluster: Cluster,
    registry: FleetRegistry,
    elector: Elector,
    pods: Arc<dyn PodSource>,
    metrics: ControllerMetrics,
    view: Arc<RwLock<FleetView>>,
    memory: ScaleMemory,
    history: ShedHistory,
    scale_down: Option<ScaleDown>,
    /// Pods with an order we sent that may not show in their report yet,
    /// until when.
    in_flight: HashMap<String, u64>,
    /// Makes order ids unique within this process (with its identity and
    /// the time, across processes).
    orders_sent: u64,
}

impl Reconciler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        cluster: Cluster,
        registry: FleetRegistry,
        elector: Elector,
        pods: Arc<dyn PodSource>,
        metrics: ControllerMetrics,
        view: Arc<RwLock<FleetView>>,
    ) -> Self {
        Self {
            settings,
            cluster,
            registry,
            elector,
            pods,
            metrics,
            view,
            memory: ScaleMemory::default(),
            history: ShedHistory::default(),
            scale_down: None,
            in_flight: HashMap::new(),
            orders_sent: 0,
        }
    }

    /// One tick. Errors are counted by stage and end the tick; the next
    /// tick starts from a fresh read.
    /// Exported as a trace span (`reconcile`); its decisions (scaled up,
    /// draining victims, rebalancing) are events inside it.
    #[tracing::instrument(target = "wsfleet_trace", name = "reconcile", skip_all, fields(leading = tracing::field::Empty, pods = tracing::field::Empty, error = tracing::field::Empty))]
    pub async fn tick(&mut self) -> Result<(), Error> {
        let timer = self.metrics.reconcile_duration.start_timer();
        let result = self.reconcile().await;
        timer.observe_duration();
        if let Err(e) = &result {
            self.metrics
                .reconcile_errors
                .with_label_values(&[e.stage()])
                .inc();
            tracing::Span::current().record("error", e.stage());
            tracing::warn!(error = %e, "reconcile failed");
        }
        result
    }

    async fn reconcile(&mut self) -> Result<(), Error> {
        let leadership = self.elector.tick(now_ms()).await;
        let leading = matches!(leadership, Ok(Leadership::Leader));
        if !leading {
            // A new leader starts from what it reads, not from our plans.
            self.scale_down = None;
        }
        self.metrics.leader.set(leading as i64);
        tracing::Span::current().record("leading", leading);
        let pods = self.pods.current().ok_or(Error::PodsNotSynced)?;
        tracing::Span::current().record("pods", pods.len());
        let reports = self.registry.reports().await.map_err(Error::Redis)?;
        let now = now_ms();
        self.in_flight.retain(|_, until| *until > now);
        let fleet = join(&pods, &reports, &self.in_flight);
        let totals = decide::totals(&fleet);
        let desired = self.settings.scale.desired(totals);
        let replicas = self.cluster.replicas().await.ok();
        self.observe(&fleet, totals, desired, replicas, leading, now);
        leadership?;
        if !leading {
            return Ok(());
        }

        if self.settings.mode == ScaleMode::Scale {
            let current = replicas.ok_or(Error::Kube {
                call: "get scale",
                source: None,
            })?;
            self.autoscale(&fleet, totals, current).await?;
        }
        if self.scale_down.is_none() {
            if let Some(policy) = self.settings.rebalance.clone() {
                self.rebalance(&policy, &fleet).await?;
            }
            self.clean_up_deletion_costs(&pods).await?;
        }
        Ok(())
    }

    fn observe(
        &self,
        fleet: &[FleetPod],
        totals: Totals,
        desired: u32,
        replicas: Option<u32>,
        leader: bool,
        now: u64,
    ) {
        let m = &self.metrics;
        m.fleet_connections.set(totals.connections as i64);
        m.desired_replicas.set(desired as i64);
        if let Some(r) = replicas {
            m.replicas.set(r as i64);
        }
        m.pod_connections.reset();
        let mut states: HashMap<&str, i64> = HashMap::from([
            ("serving", 0),
            ("draining", 0),
            ("shedding", 0),
            ("unknown", 0),
        ]);
        for pod in fleet.iter().filter(|p| p.alive) {
            let state = match &pod.report {
                None => "unknown",
                Some(r) if r.draining => "draining",
                Some(r) if r.shedding => "shedding",
                Some(_) => "serving",
            };
            *states.entry(state).or_default() += 1;
            if let Some(r) = &pod.report {
                m.pod_connections
                    .with_label_values(&[pod.name.as_str()])
                    .set(r.connections as i64);
            }
        }
        for (state, n) in states {
            m.pods.with_label_values(&[state]).set(n);
        }
        let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
        *view = FleetView {
            updated_ms: now,
            connections: totals.connections,
            pods: totals.pods,
            unknown_pods: totals.unknown,
            desired_replicas: desired,
            replicas,
            leader,
        };
    }

    /// Refuses a write once leadership may have passed to someone else.
    fn guard(&self) -> Result<(), Error> {
        if self.elector.may_act(now_ms()) {
            Ok(())
        } else {
            Err(Error::LostLeadership)
        }
    }

    async fn autoscale(
        &mut self,
        fleet: &[FleetPod],
        totals: Totals,
        current: u32,
    ) -> Result<(), Error> {
        let now = now_ms();
        if let Some(down) = self.scale_down.clone() {
            match decide::drain_progress(
                fleet,
                &down.victims,
                down.started_ms,
                self.settings.drain_timeout_ms,
                now,
            ) {
                DrainProgress::Waiting { connections } => {
                    tracing::debug!(connections, "victims still draining");
                }
                DrainProgress::Done { timed_out } => {
                    self.guard()?;
                    self.cluster.set_replicas(down.to).await?;
                    self.memory.scaled_down(now);
                    self.scale_down = None;
                    self.metrics
                        .scale_actions
                        .with_label_values(&["down"])
                        .inc();
                    tracing::info!(from = down.from, to = down.to, timed_out, "scaled down");
                    self.cluster
                        .event(
                            timed_out,
                            "ScaledDown",
                            "Scale",
                            format!(
                                "replicas {} -> {} after draining {}{}",
                                down.from,
                                down.to,
                                down.victims.join(", "),
                                if timed_out { " (drain timed out)" } else { "" }
                            ),
                        )
                        .await;
                }
            }
            return Ok(());
        }
        match self
            .memory
            .decide(&self.settings.scale, totals, current, now)
        {
            ScaleDecision::Up { from, to } => {
                self.guard()?;
                self.cluster.set_replicas(to).await?;
                self.metrics.scale_actions.with_label_values(&["up"]).inc();
                tracing::info!(from, to, connections = totals.connections, "scaled up");
                self.cluster
                    .event(
                        false,
                        "ScaledUp",
                        "Scale",
                        format!(
                            "replicas {from} -> {to} for {} connections",
                            totals.connections
                        ),
                    )
                    .await;
            }
            ScaleDecision::Down { from, to } => {
                let victims = decide::victims(fleet, from, to);
                if victims.is_empty() {
                    self.metrics.holds.with_label_values(&["no_victims"]).inc();
                    return Ok(());
                }
                let to = from.saturating_sub(victims.len() as u32);
                for victim in &victims {
                    self.guard()?;
                    self.cluster
                        .set_deletion_cost(victim, Some(VICTIM_DELETION_COST))
                        .await?;
                    let order = self.order(OrderAction::Drain);
                    self.registry
                        .send_order(victim, &order)
                        .await
                        .map_err(Error::Redis)?;
                }
                self.metrics.drains_started.inc();
                tracing::info!(from, to, victims = ?victims, "scale-down: draining victims");
                self.cluster
                    .event(
                        false,
                        "DrainStarted",
                        "Drain",
                        format!("scale-down {from} -> {to}: draining {}", victims.join(", ")),
                    )
                    .await;
                self.scale_down = Some(ScaleDown {
                    from,
                    to,
                    victims,
                    started_ms: now,
                });
            }
            ScaleDecision::Hold(reason) => {
                self.metrics
                    .holds
                    .with_label_values(&[reason.as_str()])
                    .inc();
                if matches!(reason, HoldReason::UnknownPods | HoldReason::NoData) {
                    tracing::info!(
                        reason = reason.as_str(),
                        "not scaling: pods without reports"
                    );
                }
            }
        }
        Ok(())
    }

    async fn rebalance(
        &mut self,
        policy: &RebalancePolicy,
        fleet: &[FleetPod],
    ) -> Result<(), Error> {
        let now = now_ms();
        let orders = match decide::rebalance(policy, fleet, &mut self.history, now) {
            Ok(orders) => orders,
            Err(reason) => {
                self.metrics
                    .rebalance_skips
                    .with_label_values(&[balanced_str(reason)])
                    .inc();
                return Ok(());
            }
        };
        let mut summary = Vec::new();
        for shed in &orders {
            self.guard()?;
            let order = self.order(OrderAction::Shed {
                count: shed.count,
                per_s: shed.per_s,
            });
            self.registry
                .send_order(&shed.pod, &order)
                .await
                .map_err(Error::Redis)?;
            let runs_ms = (shed.count as u64 * 1000).div_ceil(shed.per_s.max(1) as u64);
            self.in_flight.insert(
                shed.pod.clone(),
                now + runs_ms + self.settings.order_latency_ms,
            );
            self.metrics.shed_orders.inc();
            self.metrics.connections_shed.inc_by(shed.count as u64);
            summary.push(format!("{} sheds {}", shed.pod, shed.count));
        }
        if !summary.is_empty() {
            tracing::info!(orders = ?summary, "rebalancing");
            self.cluster
                .event(false, "Rebalancing", "Shed", summary.join(", "))
                .await;
        }
        Ok(())
    }

    /// Deletion costs are written only around a scale-down: outside one,
    /// any of ours left on a living pod (a scale-down that was interrupted,
    /// a leader that died mid-way) is removed.
    async fn clean_up_deletion_costs(&mut self, pods: &[PodView]) -> Result<(), Error> {
        let ours = VICTIM_DELETION_COST.to_string();
        for pod in pods
            .iter()
            .filter(|p| p.alive && p.deletion_cost.as_deref() == Some(ours.as_str()))
        {
            self.guard()?;
            self.cluster.set_deletion_cost(&pod.name, None).await?;
            tracing::info!(pod = %pod.name, "removed a leftover deletion cost");
        }
        Ok(())
    }

    fn order(&mut self, action: OrderAction) -> Order {
        self.orders_sent += 1;
        let issued_ms = now_ms();
        Order {
            id: format!(
                "{}-{issued_ms}-{}",
                self.elector.identity(),
                self.orders_sent
            ),
            issued_ms,
            action,
        }
    }
}

/// Kubernetes' pods joined with the pods' own reports. An order still in
/// flight counts as shedding, so no pod is ordered twice before it shows.
fn join(
    pods: &[PodView],
    reports: &HashMap<String, crate::bus::redis::PodReport>,
    in_flight: &HashMap<String, u64>,
) -> Vec<FleetPod> {
    pods.iter()
        .map(|p| FleetPod {
            name: p.name.clone(),
            alive: p.alive,
            report: reports.get(&p.name).map(|r| Report {
                connections: r.status.connections,
                capacity: r.status.capacity,
                draining: r.status.draining,
                shedding: r.status.shedding || in_flight.contains_key(&p.name),
            }),
        })
        .collect()
}

fn balanced_str(reason: Balanced) -> &'static str {
    match reason {
        Balanced::Yes => "balanced",
        Balanced::UnknownPods => "unknown_pods",
        Balanced::Busy => "busy",
        Balanced::BudgetSpent => "budget_spent",
        Balanced::NoRoom => "no_room",
        Balanced::TooFew => "too_few",
    }
}
