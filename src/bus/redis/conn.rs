//! Connections to Redis (one server or a Redis Cluster) behind one type,
//! with a timeout, a latency histogram and an error counter on every call.

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

/// The Redis bus's own metrics.
#[derive(Clone)]
pub struct BusMetrics {
    pub command_duration: HistogramVec,
    pub errors: IntCounterVec,
    pub reconnects: IntCounter,
    pub routed: IntCounterVec,
    pub pending: IntGauge,
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
        };
        for c in [
            Box::new(this.command_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(this.errors.clone()),
            Box::new(this.reconnects.clone()),
            Box::new(this.routed.clone()),
            Box::new(this.pending.clone()),
        ] {
            if let Err(e) = r.register(c) {
                tracing::error!(error = %e, "registering a bus metric failed");
            }
        }
        this
    }

    /// Runs one Redis call with a deadline, timing it and counting failures.
    pub async fn call<T>(
        &self,
        command: &'static str,
        limit: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, BusError> {
        let started = Instant::now();
        let outcome = tokio::time::timeout(limit, call).await;
        self.command_duration
            .with_label_values(&[command])
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.errors.with_label_values(&[command]).inc();
                Err(BusError::Unavailable(format!("redis {command}: {e}")))
            }
            Err(_) => {
                self.errors.with_label_values(&[command]).inc();
                Err(BusError::Unavailable(format!(
                    "redis {command}: timed out after {limit:?}"
                )))
            }
        }
    }
}
