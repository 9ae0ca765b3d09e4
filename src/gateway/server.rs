//! The accept loop and the pod's life: bind, serve, drain, exit.
//!
//! HTTP/1 connections are served by hyper directly (rather than
//! `axum::serve`) for two reasons: a header read timeout bounds how long a
//! client may take to send its upgrade request, and every connection task is
//! tracked so that shutdown waits for all of them, upgraded WebSockets
//! included (tokio-rs/axum#3003).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::{AppState, router};
use crate::auth::Authenticator;
use crate::bus::memory::{MemoryBus, MemoryLimits};
use crate::bus::redis::{RedisBus, RedisOptions, Target};
use crate::bus::{Bus, Retention};
use crate::config::{ConfigError, ServeConfig};
use crate::pod::LocalPod;
use crate::telemetry::Metrics;
use crate::upstream::Upstream;

/// Extra time after the drain window for the last closes and HTTP requests.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long connections still open after the drain window (and its grace)
/// get to send their 1001 close and their disconnect event.
const SHUTDOWN_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long queued webhook events get, once the last connection is gone,
/// to be delivered (retries included) before the process exits without them.
const WEBHOOK_FLUSH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the Redis bus: {0}")]
    Bus(#[from] crate::bus::BusError),
}

/// A bound, ready-to-run gateway pod.
pub struct Gateway {
    listener: TcpListener,
    state: Arc<AppState>,
    /// Stops the accept loop, idle HTTP connections and background tasks.
    shutdown: CancellationToken,
}

impl Gateway {
    /// Validates the config, builds the bus and binds the listener.
    pub async fn bind(config: ServeConfig) -> Result<Self, StartError> {
        config.validate()?;
        let auth = Authenticator::from_config(&config)?;
        let listener = listen(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let pod = Arc::new(LocalPod::new(
            config.resolved_pod_name(),
            config.max_connections,
        ));
        metrics.capacity.set(pod.capacity as i64);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let retention = Retention {
            max_messages: config.retention_messages,
            max_age_ms: config.retention_s.saturating_mul(1000),
        };
        let (bus, bus_stream): (Arc<dyn Bus>, bool) = match &config.redis_url {
            None => {
                let limits = MemoryLimits {
                    max_retained_bytes: config.max_retained_bytes,
                    max_log_bytes: config.max_log_bytes,
                };
                let memory = Arc::new(MemoryBus::new(
                    pod.clone(),
                    retention,
                    limits,
                    metrics.clone(),
                ));
                memory.spawn_sweeper(shutdown.clone());
                (memory, false)
            }
            Some(url) => {
                let ca_pem = match &config.redis_ca_file {
                    None => None,
                    Some(path) => {
                        Some(std::fs::read(path).map_err(|source| ConfigError::File {
                            what: "--redis-ca-file",
                            path: path.clone(),
                            source,
                        })?)
                    }
                };
                let options = RedisOptions {
                    target: Target {
                        urls: url
                            .0
                            .split(',')
                            .map(|u| u.trim().to_string())
                            .filter(|u| !u.is_empty())
                            .collect(),
                        cluster: config.redis_cluster,
                        ca_pem,
                    },
                    lease: Duration::from_secs(config.session_lease_s),
                    retention,
                    upstream_stream: config.upstream_stream.clone(),
                    timeout: Duration::from_millis(config.redis_timeout_ms),
                    wait_replicas: config.redis_wait_replicas,
                    route_in_script: config.redis_route_in_script,
                    delivery_repair: Duration::from_millis(config.delivery_repair_ms),
                    upstream_max_age: Duration::from_secs(config.upstream_max_age_s),
                    reconnect_jitter_ms: config.reconnect_jitter_ms,
                    max_message_bytes: config.max_frame_bytes,
                };
                let redis = RedisBus::connect(options, pod.clone(), metrics.clone()).await?;
                redis.spawn_background(&tracker, shutdown.clone());
                (redis, true)
            }
        };
        let upstream = Upstream::new(
            &pod.name,
            bus.clone(),
            bus_stream,
            config.webhook_url.clone(),
            metrics.clone(),
            &tracker,
        );
        let state = Arc::new(AppState {
            config,
            pod,
            bus,
            metrics,
            auth,
            upstream,
            tracker,
            next_conn_id: AtomicU64::new(1),
        });
        Ok(Self {
            listener,
            state,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `signal` resolves, then drains and returns.
    pub async fn run(self, signal: impl Future<Output = ()>) {
        let Gateway {
            listener,
            state,
            shutdown,
        } = self;
        let app = router(state.clone());
        let header_timeout = Duration::from_secs(state.config.handshake_timeout_s);
        tracing::info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            pod = %state.pod.name,
            mode = if state.config.redis_url.is_some() { "cluster" } else { "embedded" },
            "wsfleet serving"
        );
        let accept = tokio::spawn(accept_loop(
            listener,
            app,
            state.tracker.clone(),
            shutdown.clone(),
            header_timeout,
        ));
        state
            .tracker
            .spawn(super::control::run(state.clone(), shutdown.clone()));
        signal.await;
        drain(&state).await;
        close_leftovers(&state).await;
        shutdown.cancel();
        let _ = accept.await;
        // Connections are gone, so no new event can be queued: what is
        // queued is delivered before the process exits.
        if !state.upstream.finish(WEBHOOK_FLUSH).await {
            state
                .metrics
                .shutdown_incomplete
                .with_label_values(&["webhook"])
                .inc();
        }
        state.tracker.close();
        if tokio::time::timeout(DRAIN_GRACE, state.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(left = state.tracker.len(), "tasks still running at exit");
        }
        tracing::info!("wsfleet stopped");
    }
}

/// Binds with a deep accept backlog: a burst of reconnecting clients (a
/// drained pod's, say) should wait in the kernel's queue, not retransmit SYNs
/// (the kernel caps it at net.core.somaxconn).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    const BACKLOG: u32 = 8192;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Turns readiness off, lets every connection leave at its own moment
/// within the drain window, and waits for them (or the window's end).
async fn drain(state: &AppState) {
    let window = Duration::from_secs(state.config.drain_s);
    tracing::info!(
        connections = state.pod.connections(),
        window_s = window.as_secs(),
        "draining"
    );
    state.pod.start_draining();
    state.metrics.draining.set(1);
    let deadline = Instant::now() + window + DRAIN_GRACE;
    while state.pod.connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(left = state.pod.connections(), "drain finished");
}

/// Closes every connection the drain window did not see off with 1001
/// (going away), as the protocol promises, instead of letting the exit cut
/// them without a close frame. Waits briefly for their tasks to finish,
/// which also queues their disconnect events before the webhook flush.
async fn close_leftovers(state: &AppState) {
    if state.pod.connections() == 0 {
        return;
    }
    let asked = state
        .bus
        .close_local_connections(crate::protocol::close::CloseReason::Shutdown);
    tracing::info!(
        connections = state.pod.connections(),
        asked,
        "drain window over: closing the rest with 1001"
    );
    let deadline = Instant::now() + SHUTDOWN_CLOSE_GRACE;
    while state.pod.connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = state.pod.connections();
    if left > 0 {
        state
            .metrics
            .shutdown_incomplete
            .with_label_values(&["connections"])
            .inc();
        tracing::warn!(left, "connections still open at exit");
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    header_timeout: Duration,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let http = Arc::new(http);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or a connection reset before we got
                // to it: log, breathe, keep accepting.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // The peer as the socket saw it: the `/v1/*` gate trusts this, never
        // a header (X-Forwarded-For and friends are the client's to forge).
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            },
        ));
        let (http, shutdown) = (http.clone(), shutdown.clone());
        tracker.spawn(async move {
            let conn = http
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_GRACE, conn).await;
                }
            }
        });
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
