//! Connections to Redis (one server or a Redis Cluster) behind one type,
//! with a timeout, a latency histogram and an error counter on every call,
//! and the one place that decides what a failed call means ([`classify`]).

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::bus::BusError;
use crate::telemetry::Metrics;

/// A multiplexed connection that reconnects by itself.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    /// One URL, or the seed nodes of a cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// PEM of a CA to trust for `rediss://` instead of the public roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl Target {
    /// Opens a connection whose commands time out after `response_timeout`.
    /// A single server connects lazily, so a pod starts (not ready) while
    /// Redis is down; a cluster needs its topology and connects now.
    pub async fn connect(&self, response_timeout: Duration) -> RedisResult<Conn> {
        if self.cluster {
            let client =
                redis::cluster::ClusterClient::builder(self.urls.iter().map(String::as_str))
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(response_timeout)
                    .retries(2)
                    .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let url = self.urls.first().map(String::as_str).unwrap_or_default();
            let client = match &self.ca_pem {
                Some(ca) => redis::Client::build_with_tls(url, self.certificates(ca))?,
                None => redis::Client::open(url)?,
            };
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(response_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
                client, config,
            )?))
        }
    }
}

impl Target {
    fn certificates(&self, ca: &[u8]) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.to_vec()),
        }
    }
}

/// What a failed call leaves behind, which decides the error the caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// A read, or a write whose outcome the caller never reports as
    /// "stored" (claims, renewals, acknowledgements): a timeout is plain
    /// unavailability.
    Plain,
    /// An append the client is told about: once the command is on the
    /// wire, a missing reply leaves it possibly stored (outcome unknown).
    Append,
}

/// The message every refusal caused by Redis's memory limit carries, in
/// HTTP bodies, `error` frames and `/readyz`.
pub const OUT_OF_MEMORY: &str = "Redis is out of memory (maxmemory reached, noeviction): \
     new messages are refused until memory frees; raise Redis maxmemory or lower \
     --retention-messages / --retention-s";

/// Why a Redis call failed, as the bus reports it.
///
/// * `-OOM` (Redis at `maxmemory` under `noeviction`) is [`BusError::Full`]:
///   nothing was stored, and the message says which limit was hit.
/// * A timeout of an [`Effect::Append`] is [`BusError::Timeout`]: the
///   command may have run (retry with the same idempotency key).
/// * Anything else is [`BusError::Unavailable`]: refused before running
///   (connection refused, server error) or a timeout of a plain call.
pub fn classify(command: &str, effect: Effect, failure: Failure<'_>) -> BusError {
    match failure {
        Failure::Redis(e) if is_out_of_memory(e) => BusError::Full(OUT_OF_MEMORY.to_string()),
        Failure::Redis(e) if effect == Effect::Append && e.is_timeout() => {
            BusError::Timeout(format!("redis {command}: no reply in time ({e})"))
        }
        Failure::Redis(e) => BusError::Unavailable(format!("redis {command}: {e}")),
        Failure::Deadline(limit) if effect == Effect::Append => {
            BusError::Timeout(format!("redis {command}: no reply within {limit:?}"))
        }
        Failure::Deadline(limit) => {
            BusError::Unavailable(format!("redis {command}: timed out after {limit:?}"))
        }
    }
}

/// How a call failed: Redis (or the client library) said so, or our own
/// deadline passed first.
#[derive(Debug, Clone, Copy)]
pub enum Failure<'a> {
    Redis(&'a redis::RedisError),
    Deadline(Duration),
}

/// `-OOM command not allowed when used memory > 'maxmemory'`, also when a
/// script's write hit it (the script error keeps the code).
pub fn is_out_of_memory(e: &redis::RedisError) -> bool {
    let in_pipeline = || {
        e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "OOM"))
    };
    e.code() == Some("OOM") || in_pipeline() || e.to_string().contains("OOM command not allowed")
}

/// The Redis bus's own metrics.
#[derive(Clone)]
pub struct BusMetrics {
    pub command_duration: HistogramVec,
    pub errors: IntCounterVec,
    pub reconnects: IntCounter,
    pub routed: IntCounterVec,
    pub pending: IntGauge,
    /// Writes Redis refused with `-OOM`.
    pub oom_refusals: IntCounter,
    /// 1 from the first `-OOM` until a probe write succeeds again (set by
    /// the bus, which probes).
    pub out_of_memory: IntGauge,
    /// Appends whose outcome is unknown (reply timed out after sending).
    pub outcome_unknown: IntCounter,
    /// Ownership events: `claimed`, `superseded_locally`, `renew_taken`,
    /// `renew_restored`, `renew_lost`.
    pub ownership: IntCounterVec,
    /// WAIT rounds by outcome (`acked`, `short`, `failed`).
    pub replica_waits: IntCounterVec,
}

impl BusMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let r = metrics.registry();
        let this = Self {
            command_duration: HistogramVec::new(
                HistogramOpts::new(
                    "wsfleet_bus_command_duration_seconds",
                    "Redis call latency, by command or script",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0, 5.0,
                ]),
                &["command"],
            )
            .expect("histogram"),
            errors: IntCounterVec::new(
                Opts::new(
                    "wsfleet_bus_errors_total",
                    "Redis calls that failed or timed out",
                ),
                &["command"],
            )
            .expect("counter"),
            reconnects: IntCounter::new(
                "wsfleet_bus_reconnects_total",
                "Times the inbox reader had to reconnect or recreate its group",
            )
            .expect("counter"),
            routed: IntCounterVec::new(
                Opts::new(
                    "wsfleet_bus_routed_total",
                    "Entries routed between pods, by kind and direction",
                ),
                &["kind", "direction"],
            )
            .expect("counter"),
            pending: IntGauge::new(
                "wsfleet_bus_pending_entries",
                "Entries of this pod's inbox read but not acknowledged",
            )
            .expect("gauge"),
            oom_refusals: IntCounter::new(
                "wsfleet_bus_oom_total",
                "Writes Redis refused with -OOM (maxmemory reached under noeviction)",
            )
            .expect("counter"),
            out_of_memory: IntGauge::new(
                "wsfleet_bus_out_of_memory",
                "1 while Redis refuses writes for lack of memory (from the first -OOM until a probe write succeeds)",
            )
            .expect("gauge"),
            outcome_unknown: IntCounter::new(
                "wsfleet_bus_outcome_unknown_total",
                "Appends answered 504: sent, but no reply in time (may be stored)",
            )
            .expect("counter"),
            ownership: IntCounterVec::new(
                Opts::new(
                    "wsfleet_bus_ownership_events_total",
                    "Session ownership events: claimed, superseded_locally, renew_taken, renew_restored, renew_lost (the fence of a late instance), swept (records of dead instances removed), instance_swept",
                ),
                &["event"],
            )
            .expect("counter"),
            replica_waits: IntCounterVec::new(
                Opts::new(
                    "wsfleet_bus_replica_waits_total",
                    "WAIT rounds for --redis-wait-replicas, by outcome (acked, short, failed)",
                ),
                &["outcome"],
            )
            .expect("counter"),
        };
        for c in [
            Box::new(this.command_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(this.errors.clone()),
            Box::new(this.reconnects.clone()),
            Box::new(this.routed.clone()),
            Box::new(this.pending.clone()),
            Box::new(this.oom_refusals.clone()),
            Box::new(this.out_of_memory.clone()),
            Box::new(this.outcome_unknown.clone()),
            Box::new(this.ownership.clone()),
            Box::new(this.replica_waits.clone()),
        ] {
            if let Err(e) = r.register(c) {
                tracing::error!(error = %e, "registering a bus metric failed");
            }
        }
        // Zeros from the start for the known label values, so dashboards
        // and `rate` see the series before its first event.
        for kind in ["session", "channel"] {
            for direction in ["in", "out"] {
                this.routed.with_label_values(&[kind, direction]);
            }
        }
        this
    }

    /// Runs one Redis call with a deadline, timing it and counting failures.
    pub async fn call<T>(
        &self,
        command: &'static str,
        limit: Duration,
        effect: Effect,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, BusError> {
        // The error series of a command exists (at 0) as soon as its
        // latency series does: operators see "no errors", not "no data".
        let errors = self.errors.with_label_values(&[command]);
        let started = Instant::now();
        let outcome = tokio::time::timeout(limit, call).await;
        self.command_duration
            .with_label_values(&[command])
            .observe(started.elapsed().as_secs_f64());
        let error = match outcome {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => classify(command, effect, Failure::Redis(&e)),
            Err(_) => classify(command, effect, Failure::Deadline(limit)),
        };
        errors.inc();
        match &error {
            BusError::Full(_) => self.oom_refusals.inc(),
            BusError::Timeout(why) => {
                self.outcome_unknown.inc();
                tracing::warn!(command, why, "append outcome unknown");
            }
            BusError::Unavailable(_) => {}
        }
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(code: &str, detail: &str) -> redis::RedisError {
        redis::RedisError::from((redis::ErrorKind::Extension, "", format!("{code} {detail}")))
    }

    fn io_error(kind: std::io::ErrorKind) -> redis::RedisError {
        std::io::Error::new(kind, "test").into()
    }

    #[test]
    fn what_a_failure_means_depends_on_whether_the_append_may_have_run() {
        let timed_out = io_error(std::io::ErrorKind::TimedOut);
        let refused = io_error(std::io::ErrorKind::ConnectionRefused);
        let oom = server_error(
            "OOM",
            "command not allowed when used memory > 'maxmemory'. script: abc",
        );
        let deadline = Failure::Deadline(Duration::from_millis(5));
        let cases: &[(Effect, Failure<'_>, &str)] = &[
            (Effect::Append, Failure::Redis(&timed_out), "timeout"),
            (Effect::Append, deadline, "timeout"),
            (Effect::Append, Failure::Redis(&refused), "unavailable"),
            (Effect::Append, Failure::Redis(&oom), "full"),
            (Effect::Plain, Failure::Redis(&timed_out), "unavailable"),
            (Effect::Plain, deadline, "unavailable"),
            (Effect::Plain, Failure::Redis(&refused), "unavailable"),
            (Effect::Plain, Failure::Redis(&oom), "full"),
        ];
        for (effect, failure, want) in cases {
            let got = match classify("append", *effect, *failure) {
                BusError::Timeout(_) => "timeout",
                BusError::Unavailable(_) => "unavailable",
                BusError::Full(m) => {
                    assert!(m.contains("out of memory"), "{m}");
                    "full"
                }
            };
            assert_eq!(got, *want, "{effect:?} {failure:?}");
        }
    }
}
