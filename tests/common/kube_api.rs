//! A fake Kubernetes API server for end-to-end controller tests: kube-rs's
//! mock-service pattern (a `tower-test` pair) with a task that answers
//! every request the controller makes from a little state, and records
//! them for the test to assert on.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// One request the controller made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
}

#[derive(Default)]
pub struct ApiState {
    pub replicas: i32,
    pub calls: Vec<Call>,
    lease: Option<Value>,
    lease_version: u64,
    /// (method, path fragment, status): the next matching request fails.
    failures: Vec<(String, String, u16)>,
    /// (method, path fragment, delay): the next matching request is
    /// answered only after the delay (a slow API server).
    delays: Vec<(String, String, std::time::Duration)>,
}

#[derive(Clone)]
pub struct FakeApi {
    pub state: Arc<Mutex<ApiState>>,
}

impl FakeApi {
    /// A client whose API server is this fake; the Deployment starts with
    /// `replicas`.
    pub fn start(replicas: i32) -> (Client, FakeApi) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi {
            state: Arc::new(Mutex::new(ApiState {
                replicas,
                ..Default::default()
            })),
        };
        let state = api.state.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let method = request.method().to_string();
                let path = request.uri().path().to_string();
                let bytes = request
                    .into_body()
                    .collect_bytes()
                    .await
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let delay = {
                    let mut s = state.lock().expect("fake api state");
                    s.delays
                        .iter()
                        .position(|(m, f, _)| *m == method && path.contains(f.as_str()))
                        .map(|i| s.delays.remove(i).2)
                };
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                let (status, answer) = answer(&state, &method, &path, &body);
                state
                    .lock()
                    .expect("fake api state")
                    .calls
                    .push(Call { method, path, body });
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap_or_default()))
                    .expect("response");
                respond.send_response(response);
            }
        });
        (Client::new(service, "fleet"), api)
    }

    /// The next `method` request whose path contains `fragment` answers
    /// `status` (a Kubernetes Status error).
    pub fn delay_next(&self, method: &str, fragment: &str, delay: std::time::Duration) {
        self.state.lock().expect("fake api state").delays.push((
            method.into(),
            fragment.into(),
            delay,
        ));
    }

    pub fn fail_next(&self, method: &str, fragment: &str, status: u16) {
        self.state.lock().expect("fake api state").failures.push((
            method.into(),
            fragment.into(),
            status,
        ));
    }

    /// Someone else holds the Lease, renewed just now.
    pub fn lease_held_by(&self, holder: &str) {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut s = self.state.lock().expect("fake api state");
        s.lease_version += 1;
        s.lease = Some(json!({
            "kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
            "metadata": {"name": "wsfleet-controller", "namespace": "fleet",
                         "resourceVersion": s.lease_version.to_string()},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "acquireTime": now, "renewTime": now, "leaseTransitions": 0}
        }));
    }

    /// Requests that change something (not GETs).
    pub fn writes(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method != "GET")
            .collect()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().expect("fake api state").calls.clone()
    }

    pub fn replicas(&self) -> i32 {
        self.state.lock().expect("fake api state").replicas
    }
}

fn answer(state: &Mutex<ApiState>, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let mut s = state.lock().expect("fake api state");
    if let Some(i) = s
        .failures
        .iter()
        .position(|(m, fragment, _)| m == method && path.contains(fragment.as_str()))
    {
        let (_, _, status) = s.failures.remove(i);
        return (
            status,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                   "message":"injected (fake)","reason":"Injected","code":status}),
        );
    }
    let scale = |r: i32| {
        json!({"kind":"Scale","apiVersion":"autoscaling/v1",
               "metadata":{"name":"wsfleet","namespace":"fleet"},
               "spec":{"replicas":r},"status":{"replicas":r}})
    };
    if path.ends_with("/deployments/wsfleet/scale") {
        if method == "PATCH"
            && let Some(r) = body["spec"]["replicas"].as_i64()
        {
            s.replicas = r as i32;
        }
        return (200, scale(s.replicas));
    }
    if path.contains("/leases") {
        return match method {
            "GET" => match &s.lease {
                Some(l) => (200, l.clone()),
                None => (404, not_found()),
            },
            _ => {
                s.lease_version += 1;
                let mut lease = body.clone();
                lease["metadata"]["resourceVersion"] = json!(s.lease_version.to_string());
                s.lease = Some(lease.clone());
                (if method == "POST" { 201 } else { 200 }, lease)
            }
        };
    }
    if path.contains("/pods/") && method == "PATCH" {
        let name = path.rsplit('/').next().unwrap_or("pod");
        return (
            200,
            json!({"kind":"Pod","apiVersion":"v1","metadata":{"name":name,"namespace":"fleet"}}),
        );
    }
    if path.contains("/events") {
        let mut event = body.clone();
        event["metadata"]["name"] = json!("e");
        return (201, event);
    }
    (404, not_found())
}

fn not_found() -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
           "message":"not found (fake)","reason":"NotFound","code":404})
}

/// The pods Kubernetes would list: all alive, none annotated.
pub struct FixedPods(pub Vec<String>);

impl wsfleet::controller::PodSource for FixedPods {
    fn current(&self) -> Option<Vec<wsfleet::controller::k8s::PodView>> {
        Some(
            self.0
                .iter()
                .map(|name| wsfleet::controller::k8s::PodView {
                    name: name.clone(),
                    alive: true,
                    deletion_cost: None,
                })
                .collect(),
        )
    }
}

/// Scaling that acts at once: no delays, windows or step intervals.
pub fn immediate_scaling(target_per_pod: usize) -> wsfleet::controller::decide::ScalePolicy {
    wsfleet::controller::decide::ScalePolicy {
        target_per_pod,
        headroom: 0.0,
        min_replicas: 1,
        max_replicas: 10,
        scale_up_after_ms: 0,
        scale_down_window_ms: 0,
        scale_down_step: 1,
        scale_down_every_ms: 0,
        tolerance: 0.1,
    }
}

/// A controller (identity `ctl-0`) over a fake API whose Deployment has
/// `replicas`, the fleet registry at `redis_url`, and `pods`.
pub async fn reconciler(
    redis_url: &str,
    pods: Vec<String>,
    settings: wsfleet::controller::reconcile::Settings,
    replicas: i32,
) -> (
    wsfleet::controller::reconcile::Reconciler,
    FakeApi,
    wsfleet::controller::metrics::ControllerMetrics,
) {
    reconciler_with_lease(redis_url, pods, settings, replicas, 15_000).await
}

/// [`reconciler`] with a Lease of `lease_ms`.
pub async fn reconciler_with_lease(
    redis_url: &str,
    pods: Vec<String>,
    settings: wsfleet::controller::reconcile::Settings,
    replicas: i32,
    lease_ms: u64,
) -> (
    wsfleet::controller::reconcile::Reconciler,
    FakeApi,
    wsfleet::controller::metrics::ControllerMetrics,
) {
    use wsfleet::bus::redis::{FleetRegistry, Target};
    use wsfleet::controller::k8s::Cluster;
    use wsfleet::controller::lease::Elector;
    use wsfleet::controller::metrics::ControllerMetrics;
    use wsfleet::controller::reconcile::{FleetView, Reconciler};

    let (client, api) = FakeApi::start(replicas);
    let registry = FleetRegistry::connect(
        Target {
            urls: vec![redis_url.to_string()],
            cluster: false,
            ca_pem: None,
        },
        std::time::Duration::from_secs(2),
    )
    .await
    .expect("registry");
    let elector = Elector::new(
        kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "fleet"),
        "wsfleet-controller",
        "ctl-0",
        lease_ms,
    );
    let metrics = ControllerMetrics::new();
    let reconciler = Reconciler::new(
        settings,
        Cluster::new(client, "fleet", "wsfleet", "ctl-0"),
        registry,
        elector,
        Arc::new(FixedPods(pods)),
        metrics.clone(),
        Arc::new(std::sync::RwLock::new(FleetView::default())),
    );
    (reconciler, api, metrics)
}

/// Writes a pod's report to the fleet registry the way its upkeep does.
pub async fn report(redis: &super::redis::RedisServer, pod: &str, connections: usize) {
    let expires = wsfleet::bus::now_ms() + 60_000;
    let entry = json!({
        "status": {"pod": pod, "connections": connections, "capacity": 10_000,
                   "draining": false, "shedding": false},
        "expires_ms": expires,
    });
    redis
        .cli(&["HSET", "wsf:fleet", pod, &entry.to_string()])
        .await;
}
