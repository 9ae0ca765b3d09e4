//! `wsfleet controller`: sizes, drains and rebalances the fleet on
//! Kubernetes (docs/controller.md).
//!
//! * [`decide`]    - every decision as a pure function (replicas, victims,
//!   shedding orders, leadership), table-tested
//! * [`reconcile`] - one tick: read pods and reports, decide, act
//! * [`k8s`]       - every Kubernetes API call (scale, annotations, Events)
//!   and the RBAC they need
//! * [`lease`]     - leader election over a `coordination.k8s.io/v1` Lease
//! * [`http`]      - `/metrics`, `/healthz`, `/readyz`, `/fleet` (KEDA)
//! * [`metrics`]   - the controller's Prometheus metrics
//!
//! Pods report themselves through the fleet registry in Redis; orders
//! (shed N connections, drain) go back the same way
//! ([`crate::bus::redis::FleetRegistry`]).

pub mod decide;
pub mod http;
pub mod k8s;
pub mod lease;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod reconcile;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::bus::BusError;
use crate::bus::redis::{FleetRegistry, Target};
use crate::config::{ConfigError, ControllerConfig};
use decide::{RebalancePolicy, ScalePolicy};
use k8s::{Cluster, PodView};
use lease::Elector;
use metrics::ControllerMetrics;
use reconcile::{FleetView, Reconciler, Settings};

/// Why a tick (or the start) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {call}: {}", source.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "no answer".into()))]
    Kube {
        call: &'static str,
        source: Option<kube::Error>,
    },
    #[error("lease: {0}")]
    Lease(String),
    #[error("the fleet registry in Redis: {0}")]
    Redis(BusError),
    #[error("the pod list has not synced yet")]
    PodsNotSynced,
    #[error("lost leadership mid-tick; stopped before writing")]
    LostLeadership,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl Error {
    /// `Error::kube("get scale")` as a `map_err` argument.
    pub fn kube(call: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube {
            call,
            source: Some(source),
        }
    }

    /// The `stage` label of `wsfleet_controller_reconcile_errors_total`.
    pub fn stage(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Lease(_) => "lease",
            Error::Redis(_) => "redis",
            Error::PodsNotSynced => "pods",
            Error::LostLeadership => "leadership",
            Error::Config(_) | Error::Bind { .. } => "config",
        }
    }
}

/// The gateway pods as Kubernetes lists them; `None` until the first
/// complete list arrived (an empty fleet and an unknown one differ).
pub trait PodSource: Send + Sync {
    fn current(&self) -> Option<Vec<PodView>>;
}

/// Pods from a reflector's cache (production).
pub struct ReflectedPods {
    store: Store<Pod>,
    /// Set once the first complete list is in the store.
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl PodSource for ReflectedPods {
    fn current(&self) -> Option<Vec<PodView>> {
        self.ready
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| {
                let mut pods: Vec<PodView> = self
                    .store
                    .state()
                    .iter()
                    .filter_map(|p| PodView::from_pod(p))
                    .collect();
                pods.sort_by(|a, b| a.name.cmp(&b.name));
                pods
            })
    }
}

/// Starts a reflector of the pods matching `selector`; it runs until
/// `shutdown`, restarting its watch with backoff after errors.
pub fn reflect_pods(api: Api<Pod>, selector: &str, shutdown: CancellationToken) -> ReflectedPods {
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().labels(selector)),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(async move {
        tokio::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                next = stream.next() => match next {
                    None => break,
                    Some(Err(e)) => tracing::warn!(error = %e, "pod watch error (retrying)"),
                    Some(Ok(_)) => {}
                },
            }
        }
    });
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reader, flag) = (store.clone(), ready.clone());
    tokio::spawn(async move {
        if reader.wait_until_ready().await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
    });
    ReflectedPods { store, ready }
}

/// Decided once from the flags.
pub fn settings(config: &ControllerConfig) -> Settings {
    let interval_ms = config.interval_s * 1000;
    Settings {
        mode: config.mode,
        scale: ScalePolicy {
            target_per_pod: config.target_connections,
            headroom: config.headroom,
            min_replicas: config.min_replicas,
            max_replicas: config.max_replicas,
            scale_up_after_ms: config.scale_up_after_s * 1000,
            scale_down_window_ms: config.scale_down_window_s * 1000,
            scale_down_step: config.scale_down_step,
            scale_down_every_ms: config.scale_down_every_s * 1000,
            tolerance: config.scale_tolerance,
        },
        rebalance: config.rebalance.then_some(RebalancePolicy {
            tolerance: config.rebalance_tolerance,
            per_pod_per_s: config.shed_per_pod_per_s,
            fleet_fraction_per_min: config.shed_fleet_fraction_per_min,
            interval_ms,
        }),
        drain_timeout_ms: config.drain_timeout_s * 1000,
        // Pods read orders every lease/3 (10 s with the default 30 s
        // lease) and report as often: two of those periods.
        order_latency_ms: 20_000,
    }
}

/// Runs the controller until `shutdown`: the HTTP endpoints at once, then
/// a tick every interval.
pub async fn run(
    config: ControllerConfig,
    client: Client,
    pods: Arc<dyn PodSource>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let namespace = config
        .namespace
        .clone()
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
        })
        .unwrap_or_else(|| client.default_namespace().to_string());
    let identity = config.resolved_identity();
    let ca_pem = match &config.redis_ca_file {
        None => None,
        Some(path) => Some(std::fs::read(path).map_err(|source| ConfigError::File {
            what: "--redis-ca-file",
            path: path.clone(),
            source,
        })?),
    };
    let target = Target {
        urls: vec![config.redis_url.0.clone()],
        cluster: false,
        ca_pem,
    };
    let registry = FleetRegistry::connect(target, Duration::from_millis(config.redis_timeout_ms))
        .await
        .map_err(Error::Redis)?;
    let metrics = ControllerMetrics::new();
    let view = Arc::new(RwLock::new(FleetView::default()));
    let interval = Duration::from_secs(config.interval_s);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let app = http::router(http::HttpState {
        metrics: metrics.clone(),
        view: view.clone(),
        fresh_for_ms: interval.as_millis() as u64 * 3,
    });
    let served = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { served.cancelled().await })
            .await;
    });

    let cluster = Cluster::new(client.clone(), &namespace, &config.deployment, &identity);
    let elector = Elector::new(
        Api::<Lease>::namespaced(client, &namespace),
        &config.lease_name,
        &identity,
        config.lease_s * 1000,
    );
    tracing::info!(
        namespace = %namespace,
        deployment = %config.deployment,
        mode = ?config.mode,
        identity = %identity,
        "wsfleet controller running"
    );
    let mut reconciler = Reconciler::new(
        settings(&config),
        cluster,
        registry,
        elector,
        pods,
        metrics,
        view,
    );
    let mut tick = tokio::time::interval(interval.min(Duration::from_secs(config.lease_s / 3 + 1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let _ = reconciler.tick().await;
    }
    tracing::info!("wsfleet controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mock_api::{self, expect};
    use super::*;
    use serde_json::json;

    fn pod_list(version: &str, names: &[&str]) -> serde_json::Value {
        json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": version},
            "items": names.iter().map(|n| json!({
                "metadata": {"name": n, "namespace": "fleet", "resourceVersion": version},
                "status": {"phase": "Running"}
            })).collect::<Vec<_>>()
        })
    }

    #[tokio::test]
    async fn the_pod_reflector_lists_watches_and_relists_after_the_watch_fails() {
        let (client, mut api) = mock_api::client();
        let shutdown = CancellationToken::new();
        let pods = reflect_pods(
            Api::namespaced(client, "fleet"),
            "app.kubernetes.io/component=gateway",
            shutdown.clone(),
        );
        assert!(pods.current().is_none(), "unknown before the first list");

        let list = expect(&mut api, 200, pod_list("10", &["gw-a"])).await;
        assert!(
            list.uri.starts_with("/api/v1/namespaces/fleet/pods?"),
            "{}",
            list.uri
        );
        assert!(
            list.uri
                .contains("labelSelector=app.kubernetes.io%2Fcomponent%3Dgateway"),
            "{}",
            list.uri
        );
        // What the API server sends when the watch's resourceVersion is too
        // old: a 200 stream whose event is an ERROR with code 410.
        let expired = json!({"type": "ERROR", "object": mock_api::status(410, "Expired")});
        let watch = expect(&mut api, 200, expired).await;
        assert!(watch.uri.contains("watch=true"), "{}", watch.uri);
        assert!(watch.uri.contains("resourceVersion=10"), "{}", watch.uri);
        let mut seen = None;
        for _ in 0..100 {
            seen = pods.current();
            if seen.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let names: Vec<String> = seen
            .expect("ready after the first list")
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["gw-a"]);

        // 410 Gone: the watcher lists again (after its backoff) and sees
        // the new pod.
        let relist = expect(&mut api, 200, pod_list("20", &["gw-a", "gw-b"])).await;
        assert!(
            !relist.uri.contains("watch=true"),
            "a relist: {}",
            relist.uri
        );
        let mut names = Vec::new();
        for _ in 0..100 {
            names = pods
                .current()
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.name)
                .collect();
            if names.len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(names, ["gw-a", "gw-b"]);
        shutdown.cancel();
    }
}
