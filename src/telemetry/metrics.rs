//! Prometheus metrics of one pod, registered in a registry of their own so
//! that several servers in one test process do not share counters.
//!
//! Gauges miss what happens between scrapes, so every gauge that moves with
//! traffic has opened/closed counters beside it.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric wsfleet exports, by name.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Most connections this pod accepts.
    pub capacity: IntGauge,
    /// 1 while draining.
    pub draining: IntGauge,
    pub connections_opened: IntCounter,
    /// By close code (`1000`, `4409`, ..., `none` when the peer vanished).
    pub connections_closed: IntCounterVec,
    /// Handshakes refused before the upgrade, by reason.
    pub handshakes_rejected: IntCounterVec,
    /// Client frames by `type` (`invalid` when unparsable).
    pub frames_in: IntCounterVec,
    /// Server frames by `type`.
    pub frames_out: IntCounterVec,
    /// Messages made durable, by kind (`session`, `channel`).
    pub messages_accepted: IntCounterVec,
    /// Messages of `POST /v1/messages` batches, by `result`.
    pub batch_messages: IntCounterVec,
    /// Messages written to a socket, by kind.
    pub messages_delivered: IntCounterVec,
    /// Connections closed because their outbound queue was full.
    pub queue_overflows: IntCounter,
    /// Connection tasks that panicked or failed (closed with 1011).
    pub task_failures: IntCounter,
    /// Log entries dropped by retention.
    pub retention_trims: IntCounter,
    /// From the upgrade request to the welcome frame being written.
    pub handshake_duration: Histogram,
    /// From acceptance to the live write on the socket (replays excluded).
    pub delivery_latency: HistogramVec,
    /// HTTP API requests by route and status.
    pub http_requests: IntCounterVec,
    /// Upstream events by sink (`webhook`, `stream`) and outcome.
    pub upstream_events: IntCounterVec,
    /// Shutdowns that exited with work left (`connections` still open after
    /// the 1001 closes, `webhook` events abandoned after the flush window).
    pub shutdown_incomplete: IntCounterVec,
    /// Inbound frames dropped by the per-connection rate limit.
    pub frames_rate_limited: IntCounter,
    /// `refresh` frames by result (`ok`, `unauthorized`, `forbidden`, `bad_request`).
    pub token_refreshes: IntCounterVec,
    /// Connections closed (1008) because their token expired without a refresh.
    pub token_expiries: IntCounter,
    /// Replays that reported a gap, by log kind (`session`, `channel`).
    pub replay_gaps: IntCounterVec,
    /// Live deliveries that found a hole (or a resync notice) and read the log.
    pub holes_filled: IntCounter,
    /// Hole fills that could not read the log and are retried after
    /// `--delivery-repair-ms` instead of delivering past the hole.
    pub fill_retries: IntCounter,
    /// Embedded mode: estimated heap bytes of retained messages, keys and
    /// entries (what `--max-retained-bytes` bounds).
    pub retained_bytes: IntGauge,
    /// Messages refused because a memory limit was reached, by limit.
    pub bus_refusals: IntCounterVec,
    /// 1 while a shedding order from the controller runs.
    pub shedding: IntGauge,
    /// Controller orders taken, by action (`shed`, `drain`).
    pub orders: IntCounterVec,
    /// Connections asked to reconnect elsewhere by a shedding order.
    pub connections_shed: IntCounter,
    /// From the upgrade request to the end of the close, observed once per
    /// connection when it ends.
    pub connection_duration: Histogram,
    /// WebSocket payload bytes read from clients (text, binary, control).
    pub received_bytes: IntCounter,
    /// WebSocket payload bytes written to clients (text, control, close).
    pub sent_bytes: IntCounter,
    /// Connections that opened with `?last=` (a resume), welcomed.
    pub resumes: IntCounter,
    /// Messages written by a replay rather than live (resume after `last`,
    /// `subscribe` with `since`; live hole fills count as live), by kind.
    pub messages_replayed: IntCounterVec,
    /// Deliveries still waiting in a connection's outbound queue each time
    /// the connection takes one: weighted by messages, so it shows the
    /// queueing a message sees (overflow at `--outbound-queue`).
    pub queue_depth: Histogram,
}

/// Metric construction only fails on invalid names or duplicate
/// registration, both programming errors caught by the first test run.
fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "registering a metric failed");
    }
    metric
}

macro_rules! counter {
    ($reg:expr, $name:literal, $help:literal) => {
        register($reg, IntCounter::new($name, $help).expect($name))
    };
    ($reg:expr, $name:literal, $help:literal, $labels:expr) => {
        register(
            $reg,
            IntCounterVec::new(Opts::new($name, $help), $labels).expect($name),
        )
    };
}

/// Connection lifetimes from 1 s to a day.
const DURATION_BUCKETS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0,
];

/// Outbound queue depths: powers of two up to the largest sane
/// `--outbound-queue` (overflows are counted apart).
const DEPTH_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("histogram"),
    )
}

/// CPU seconds, resident memory, open fds and threads of this process
/// (`process_*`), read from /proc at each scrape, so free on the hot path.
pub fn register_process_metrics(registry: &Registry) {
    #[cfg(target_os = "linux")]
    if let Err(e) = registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    )) {
        tracing::error!(error = %e, "registering the process metrics failed");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
}

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Label values known up front, exported as zeros from the start: a series
/// that only appears with its first event leaves dashboard panels empty and
/// makes `rate`/`increase` miss that first event.
const KINDS: &[&str] = &["session", "channel"];
const CLOSE_CODES: &[&str] = &[
    "1000", "1001", "1008", "1011", "1012", "1013", "4409", "none",
];
const REJECT_REASONS: &[&str] = &[
    "unauthorized",
    "forbidden",
    "origin",
    "capacity",
    "draining",
    "bad_request",
    "not_websocket",
    "upgrade",
    "websocket",
];
const ORDER_ACTIONS: &[&str] = &["shed", "drain"];

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self::unset();
        for kind in KINDS {
            metrics.messages_accepted.with_label_values(&[kind]);
            metrics.messages_delivered.with_label_values(&[kind]);
            metrics.messages_replayed.with_label_values(&[kind]);
            metrics.replay_gaps.with_label_values(&[kind]);
            metrics.delivery_latency.with_label_values(&[kind]);
        }
        for code in CLOSE_CODES {
            metrics.connections_closed.with_label_values(&[code]);
        }
        for reason in REJECT_REASONS {
            metrics.handshakes_rejected.with_label_values(&[reason]);
        }
        for result in ["accepted", "refused"] {
            metrics.batch_messages.with_label_values(&[result]);
        }
        for action in ORDER_ACTIONS {
            metrics.orders.with_label_values(&[action]);
        }
        metrics
    }

    fn unset() -> Self {
        let registry = Registry::new();
        register_process_metrics(&registry);
        let r = &registry;
        let gauge = |name: &str, help: &str| register(r, IntGauge::new(name, help).expect("gauge"));
        Self {
            connections: gauge("wsfleet_connections", "Open WebSocket connections"),
            capacity: gauge(
                "wsfleet_capacity",
                "Most WebSocket connections this pod accepts",
            ),
            draining: gauge("wsfleet_draining", "1 while the pod drains"),
            shedding: gauge(
                "wsfleet_shedding",
                "1 while the pod sheds connections for the controller",
            ),
            orders: counter!(
                r,
                "wsfleet_orders_total",
                "Orders taken from the controller, by action",
                &["action"]
            ),
            connections_shed: counter!(
                r,
                "wsfleet_connections_shed_total",
                "Connections asked to reconnect elsewhere by a shedding order"
            ),
            connections_opened: counter!(
                r,
                "wsfleet_connections_opened_total",
                "WebSocket connections opened"
            ),
            connections_closed: counter!(
                r,
                "wsfleet_connections_closed_total",
                "WebSocket connections closed, by close code",
                &["code"]
            ),
            handshakes_rejected: counter!(
                r,
                "wsfleet_handshakes_rejected_total",
                "Upgrade requests refused, by reason",
                &["reason"]
            ),
            frames_in: counter!(
                r,
                "wsfleet_frames_in_total",
                "Client frames received, by type",
                &["type"]
            ),
            frames_out: counter!(
                r,
                "wsfleet_frames_out_total",
                "Server frames sent, by type",
                &["type"]
            ),
            messages_accepted: counter!(
                r,
                "wsfleet_messages_accepted_total",
                "Messages made durable, by kind",
                &["kind"]
            ),
            batch_messages: counter!(
                r,
                "wsfleet_batch_messages_total",
                "Messages of POST /v1/messages batches, by result (accepted, refused)",
                &["result"]
            ),
            messages_delivered: counter!(
                r,
                "wsfleet_messages_delivered_total",
                "Messages written to sockets, by kind",
                &["kind"]
            ),
            queue_overflows: counter!(
                r,
                "wsfleet_queue_overflows_total",
                "Connections closed 1013 because their outbound queue overflowed"
            ),
            task_failures: counter!(
                r,
                "wsfleet_task_failures_total",
                "Connection tasks that panicked or failed (closed 1011)"
            ),
            retention_trims: counter!(
                r,
                "wsfleet_retention_trims_total",
                "Log entries dropped by retention"
            ),
            handshake_duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "wsfleet_handshake_duration_seconds",
                        "Upgrade request to welcome frame written",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .expect("handshake histogram"),
            ),
            delivery_latency: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "wsfleet_delivery_latency_seconds",
                        "Message accepted to written on the socket, live deliveries",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["kind"],
                )
                .expect("delivery histogram"),
            ),
            http_requests: counter!(
                r,
                "wsfleet_http_requests_total",
                "HTTP API requests, by route and status",
                &["route", "status"]
            ),
            upstream_events: counter!(
                r,
                "wsfleet_upstream_events_total",
                "Upstream events, by sink and outcome",
                &["sink", "outcome"]
            ),
            shutdown_incomplete: counter!(
                r,
                "wsfleet_shutdown_incomplete_total",
                "Shutdowns that exited with connections open or webhook events undelivered",
                &["what"]
            ),
            frames_rate_limited: counter!(
                r,
                "wsfleet_frames_rate_limited_total",
                "Inbound frames dropped by the per-connection rate limit"
            ),
            token_refreshes: counter!(
                r,
                "wsfleet_token_refreshes_total",
                "refresh frames, by result",
                &["result"]
            ),
            token_expiries: counter!(
                r,
                "wsfleet_token_expiries_total",
                "Connections closed 1008 because their token expired without a refresh"
            ),
            replay_gaps: counter!(
                r,
                "wsfleet_replay_gaps_total",
                "Replays (welcome or subscribe with since) that reported a gap, by log kind",
                &["kind"]
            ),
            holes_filled: counter!(
                r,
                "wsfleet_holes_filled_total",
                "Live deliveries that found a hole or a resync notice and read the log"
            ),
            fill_retries: counter!(
                r,
                "wsfleet_fill_retries_total",
                "Hole fills whose log read failed, retried after --delivery-repair-ms"
            ),
            retained_bytes: gauge(
                "wsfleet_retained_bytes",
                "Embedded mode: estimated heap bytes of retained messages (bounded by --max-retained-bytes)",
            ),
            bus_refusals: counter!(
                r,
                "wsfleet_bus_refusals_total",
                "Messages refused because a memory limit was reached, by limit",
                &["limit"]
            ),
            connection_duration: histogram(
                r,
                "wsfleet_connection_duration_seconds",
                "WebSocket connection lifetime, upgrade request to close, observed at close",
                DURATION_BUCKETS,
            ),
            received_bytes: counter!(
                r,
                "wsfleet_websocket_received_bytes_total",
                "WebSocket payload bytes received from clients"
            ),
            sent_bytes: counter!(
                r,
                "wsfleet_websocket_sent_bytes_total",
                "WebSocket payload bytes sent to clients"
            ),
            resumes: counter!(
                r,
                "wsfleet_resumes_total",
                "Connections welcomed that resumed a session with last"
            ),
            messages_replayed: counter!(
                r,
                "wsfleet_messages_replayed_total",
                "Messages written by a replay (resume with last, subscribe with since), by kind",
                &["kind"]
            ),
            queue_depth: histogram(
                r,
                "wsfleet_queue_depth",
                "Deliveries still queued for a connection each time it takes one",
                DEPTH_BUCKETS,
            ),
            registry,
        }
    }

    /// The registry, for subsystems (the Redis bus) that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
