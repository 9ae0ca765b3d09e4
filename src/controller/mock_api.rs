//! Test fixture: kube-rs's mock-service pattern. A `tower-test` pair
//! stands in for the API server; each test spawns the code under test,
//! then takes its requests one by one, asserts them and answers with real
//! k8s-openapi objects (or a `Status` error).

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

pub type ApiHandle = Handle<Request<Body>, Response<Body>>;

pub fn client() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "fleet"), handle)
}

/// One request as the API server saw it.
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub content_type: Option<String>,
    pub body: Value,
}

/// Takes the next request and answers it with `status` and `answer`.
pub async fn expect(handle: &mut ApiHandle, status: u16, answer: Value) -> Seen {
    let (request, respond) =
        tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request())
            .await
            .expect("a request within 5 s")
            .expect("the client is alive");
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON request body")
    };
    let response = Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&answer).expect("answer")))
        .expect("response");
    respond.send_response(response);
    Seen {
        method,
        uri,
        content_type,
        body,
    }
}

/// A Kubernetes `Status` failure body.
pub fn status(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} (mock)"), "reason": reason, "code": code
    })
}

/// A Scale object with `replicas`.
pub fn scale(replicas: i32) -> Value {
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": "wsfleet", "namespace": "fleet"},
        "spec": {"replicas": replicas}, "status": {"replicas": replicas}
    })
}

/// A Pod named `name` (what a patch answers).
pub fn pod(name: &str) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": "fleet"}})
}

/// A Lease held by `holder`, renewed at `renew` (RFC 3339).
pub fn lease(holder: &str, renew: &str, version: &str) -> Value {
    json!({
        "kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
        "metadata": {"name": "wsfleet-controller", "namespace": "fleet", "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "acquireTime": renew, "renewTime": renew, "leaseTransitions": 0}
    })
}

/// Echoes an Event back (what a create answers).
pub fn event() -> Value {
    json!({"kind": "Event", "apiVersion": "events.k8s.io/v1",
           "metadata": {"name": "e1", "namespace": "fleet"}, "eventTime": "2026-01-01T00:00:00.000000Z"})
}
