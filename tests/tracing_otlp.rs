//! Traces across the Redis hop, exported over OTLP/HTTP to a real receiver.
//!
//! The receiver below is a plain HTTP server that decodes what the pods
//! export with the OTLP protobuf types (`opentelemetry-proto`), as a
//! collector would. Two pods share one Redis; a backend POSTs through pod A
//! with its own `traceparent`, the message is written to a socket on pod B,
//! and one trace must show both: the HTTP span on A as a child of the
//! caller's span, the socket write on B as a child of A's routing hop. A
//! channel message fans out on B in a span *linked* to A's append.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;

use common::redis::{Pod, RedisServer, eventually_within};

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
    /// (trace id, span id) of every link.
    links: Vec<(String, String)>,
    /// Names of the span's events (the log messages inside it).
    events: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

type Received = Arc<Mutex<Vec<Exported>>>;

async fn receive(State(received): State<Received>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut out = received.lock().expect("receiver lock");
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(Exported {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect(),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    events: span.events.iter().map(|e| e.name.clone()).collect(),
                });
            }
        }
    }
    StatusCode::OK
}

/// A collector on a free loopback port; returns its base URL.
async fn start_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("receiver address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), received)
}

fn find(received: &Received, service: &str, name: &str, trace_id: &str) -> Option<Exported> {
    received
        .lock()
        .expect("receiver lock")
        .iter()
        .find(|s| s.service == service && s.name == name && s.trace_id == trace_id)
        .cloned()
}

async fn wait_for(received: &Received, service: &str, name: &str, trace_id: &str) -> Exported {
    let mut found = None;
    eventually_within(
        Duration::from_secs(15),
        &format!("span {name} of trace {trace_id} from {service}"),
        || {
            found = find(received, service, name, trace_id);
            let ok = found.is_some();
            async move { ok }
        },
    )
    .await;
    found.expect("found")
}

async fn traced_pod(name: &str, redis: &RedisServer, collector: &str, flags: &[&str]) -> Pod {
    let mut extra = vec!["--insecure-api"];
    extra.extend_from_slice(flags);
    Pod::start_with_env(
        name,
        &redis.url(),
        &extra,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector),
            ("OTEL_SERVICE_NAME", name),
            // Export within a tenth of a second rather than five.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
}

async fn post_traced(url: &str, traceparent: &str, data: serde_json::Value) -> serde_json::Value {
    let response = common::http()
        .post(url)
        .header("traceparent", traceparent)
        .json(&json!({ "data": data }))
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("JSON answer");
    assert_eq!(status, 202, "POST {url}: {body}");
    body
}

#[tokio::test]
async fn one_trace_follows_a_message_from_the_post_on_one_pod_to_the_socket_on_another() {
    let (collector, received) = start_receiver().await;
    let redis = RedisServer::start().await;
    let pod_a = traced_pod("pod-a", &redis, &collector, &[]).await;
    let pod_b = traced_pod("pod-b", &redis, &collector, &[]).await;
    // Routes in a second step, as with Redis Cluster or a replica wait.
    let pod_c = traced_pod(
        "pod-c",
        &redis,
        &collector,
        &["--redis-route-in-script", "false"],
    )
    .await;

    // A direct message: POST on A, socket on B.
    let (mut client, welcome) = pod_b.session("s-traced").await;
    assert_eq!(welcome["pod"], "pod-b");
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let accepted = post_traced(
        &pod_a.http("/v1/sessions/s-traced/messages"),
        &format!("00-{caller_trace}-{caller_span}-01"),
        json!("hello"),
    )
    .await;
    let message = client.recv_json().await;
    assert_eq!(message["data"], "hello");
    assert_eq!(message["offset"], accepted["offset"]);

    let http = wait_for(&received, "pod-a", "http.send", caller_trace).await;
    assert_eq!(
        http.parent, caller_span,
        "the HTTP span is the caller's child"
    );
    assert_eq!(http.attributes["session"], "s-traced");
    assert_eq!(http.attributes["http.response.status_code"], "202");
    let append = wait_for(&received, "pod-a", "append", caller_trace).await;
    assert_eq!(append.parent, http.span_id);
    assert_eq!(append.attributes["log"], "session");
    let deliver = wait_for(&received, "pod-b", "deliver", caller_trace).await;
    assert_eq!(
        deliver.parent, append.span_id,
        "the socket write on pod B is a child of pod A's append, whose script wrote B's inbox"
    );
    assert_eq!(deliver.attributes["session"], "s-traced");
    assert_eq!(
        deliver.attributes["offset"],
        accepted["offset"].as_str().expect("offset")
    );
    assert_eq!(deliver.attributes["live"], "true");

    // Through pod C, which routes in a step of its own: the socket write
    // on B is a child of that hop.
    let hop_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let accepted = post_traced(
        &pod_c.http("/v1/sessions/s-traced/messages"),
        &format!("00-{hop_trace}-{caller_span}-01"),
        json!("again"),
    )
    .await;
    assert_eq!(client.recv_json().await["offset"], accepted["offset"]);
    let http = wait_for(&received, "pod-c", "http.send", hop_trace).await;
    let route = wait_for(&received, "pod-c", "route", hop_trace).await;
    assert_eq!(route.parent, http.span_id);
    assert_eq!(route.attributes["pod"], "pod-b");
    let deliver = wait_for(&received, "pod-b", "deliver", hop_trace).await;
    assert_eq!(
        deliver.parent, route.span_id,
        "the socket write on pod B is a child of pod C's hop to it"
    );
    assert_eq!(
        deliver.attributes["offset"],
        accepted["offset"].as_str().expect("offset")
    );

    // A channel message: the fan-out on B links to the append on A.
    let mut subscriber = pod_b.connect("session=s-sub").await;
    let _welcome = subscriber.recv_json().await;
    let ack = subscriber
        .request(json!({"type": "subscribe", "channel": "c-traced"}), 1)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let publish_trace = "0af7651916cd43dd8448eb211c80319c";
    let published = post_traced(
        &pod_a.http("/v1/channels/c-traced/messages"),
        &format!("00-{publish_trace}-b7ad6b7169203331-01"),
        json!({"n": 1}),
    )
    .await;
    let message = subscriber.recv_json().await;
    assert_eq!(message["offset"], published["offset"]);
    let http = wait_for(&received, "pod-a", "http.publish", publish_trace).await;
    assert_eq!(http.parent, "b7ad6b7169203331");
    assert_eq!(http.attributes["channel"], "c-traced");
    let append = wait_for(&received, "pod-a", "append", publish_trace).await;
    assert_eq!(append.parent, http.span_id);
    let mut fanout = None;
    eventually_within(
        Duration::from_secs(15),
        "a fan-out span on pod-b linked to pod-a's append",
        || {
            fanout = received
                .lock()
                .expect("receiver lock")
                .iter()
                .find(|s| {
                    s.service == "pod-b"
                        && s.name == "fanout"
                        && s.links
                            .contains(&(publish_trace.to_string(), append.span_id.clone()))
                })
                .cloned();
            let ok = fanout.is_some();
            async move { ok }
        },
    )
    .await;
    let fanout = fanout.expect("found");
    assert_ne!(
        fanout.trace_id, publish_trace,
        "the fan-out is linked, not a child: it starts its own trace"
    );
    assert_eq!(fanout.attributes["channel"], "c-traced");

    // A connection's opening is traced too, resume included.
    let (_resumed, welcome) = pod_a
        .session(&format!(
            "s-traced&last={}",
            accepted["offset"].as_str().expect("offset")
        ))
        .await;
    assert_eq!(welcome["resumed"], true, "{welcome}");
    let mut connect = None;
    eventually_within(
        Duration::from_secs(15),
        "a ws.connect span with resume=true and its replay",
        || {
            let spans = received.lock().expect("receiver lock");
            connect = spans
                .iter()
                .find(|s| {
                    s.service == "pod-a"
                        && s.name == "ws.connect"
                        && s.attributes.get("resume").map(String::as_str) == Some("true")
                })
                .cloned();
            let replay = connect.as_ref().is_some_and(|c| {
                spans.iter().any(|s| {
                    s.name == "replay" && s.parent == c.span_id && s.trace_id == c.trace_id
                })
            });
            async move { replay }
        },
    )
    .await;
    assert_eq!(connect.expect("found").attributes["session"], "s-traced");
}

/// An embedded `wsfleet serve` child exporting to `collector`, with `env`;
/// returns it (killed on drop, with its log dir) and its address.
async fn spawn_embedded(
    collector: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, common::redis::TempDir, String) {
    let dir = common::redis::TempDir::new("embedded-otlp");
    let log = std::fs::File::create(dir.path().join("wsfleet.log")).expect("log file");
    let addr = format!("127.0.0.1:{}", common::redis::free_port());
    let child = tokio::process::Command::new(common::redis::WSFLEET_BIN)
        .args(["serve", "--listen", &addr, "--pod-name", "solo"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("WSFLEET_REDIS_URL")
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsfleet serve");
    let health = format!("http://{addr}/healthz");
    eventually_within(Duration::from_secs(10), "embedded /healthz", || {
        let health = health.clone();
        async move { common::http().get(&health).send().await.is_ok() }
    })
    .await;
    (child, dir, addr)
}

/// Embedded mode (no Redis): the same spans in one process, the socket
/// write a child of the append.
#[tokio::test]
async fn embedded_mode_traces_the_post_the_append_and_the_socket_write() {
    let (collector, received) = start_receiver().await;
    let (mut child, _dir, addr) = spawn_embedded(&collector, &[]).await;

    let mut client = common::Client::connect(&format!("ws://{addr}/ws?session=solo-1")).await;
    assert_eq!(client.recv_json().await["type"], "welcome");
    let trace = "11111111111111111111111111111111";
    let accepted = post_traced(
        &format!("http://{addr}/v1/sessions/solo-1/messages"),
        &format!("00-{trace}-2222222222222222-01"),
        json!(7),
    )
    .await;
    assert_eq!(client.recv_json().await["offset"], accepted["offset"]);

    // No OTEL_SERVICE_NAME: the service is called wsfleet.
    let http = wait_for(&received, "wsfleet", "http.send", trace).await;
    assert_eq!(http.parent, "2222222222222222");
    let append = wait_for(&received, "wsfleet", "append", trace).await;
    assert_eq!(append.parent, http.span_id);
    let deliver = wait_for(&received, "wsfleet", "deliver", trace).await;
    assert_eq!(deliver.parent, append.span_id);
    assert_eq!(deliver.attributes["session"], "solo-1");
    let _ = child.start_kill();
}

/// The controller's tick, through the same layer and exporter the binary
/// installs (here for this test's thread only), against a fake Kubernetes
/// API and a real Redis: one `reconcile` span per tick, with its decisions
/// as events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_reconcile_is_a_span_with_its_decisions_as_events() {
    use opentelemetry_otlp::WithExportConfig;
    use tracing_subscriber::prelude::*;
    use wsfleet::config::ScaleMode;
    use wsfleet::controller::reconcile::Settings;

    let (collector, received) = start_receiver().await;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{collector}/v1/traces"))
        .build()
        .expect("exporter");
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("ctl")
                .build(),
        )
        .build();
    let subscriber = tracing_subscriber::registry().with(
        wsfleet::telemetry::otel::layer(&provider).with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(wsfleet::telemetry::otel::TARGET, tracing::Level::TRACE)
                .with_target("wsfleet", tracing::Level::INFO),
        ),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    let redis = RedisServer::start().await;
    for (pod, connections) in [("a", 900), ("b", 0)] {
        common::kube_api::report(&redis, pod, connections).await;
    }
    let settings = Settings {
        mode: ScaleMode::Scale,
        scale: common::kube_api::immediate_scaling(100),
        rebalance: None,
        drain_timeout_ms: 10_000,
        order_latency_ms: 1_000,
    };
    let (mut ctl, api, _) =
        common::kube_api::reconciler(&redis.url(), vec!["a".into(), "b".into()], settings, 2).await;
    ctl.tick().await.expect("tick");
    assert_eq!(api.replicas(), 9, "the tick scaled up");
    let _ = provider.force_flush();

    let mut reconcile = None;
    eventually_within(
        Duration::from_secs(15),
        "an exported reconcile span",
        || {
            reconcile = received
                .lock()
                .expect("receiver lock")
                .iter()
                .find(|s| s.service == "ctl" && s.name == "reconcile")
                .cloned();
            let ok = reconcile.is_some();
            async move { ok }
        },
    )
    .await;
    let reconcile = reconcile.expect("found");
    assert_eq!(reconcile.parent, "", "a tick starts its own trace");
    assert_eq!(reconcile.attributes["leading"], "true");
    assert_eq!(reconcile.attributes["pods"], "2");
    assert!(
        reconcile.events.iter().any(|e| e == "scaled up"),
        "the decision is an event of the span: {:?}",
        reconcile.events
    );
    let _ = provider.shutdown();
}

/// A malformed `traceparent` is ignored: the request is accepted and its
/// span starts a trace of its own.
#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace_and_the_request_still_works() {
    let (collector, received) = start_receiver().await;
    let (_child, _dir, addr) = spawn_embedded(&collector, &[]).await;
    let accepted = post_traced(
        &format!("http://{addr}/v1/sessions/solo-bad/messages"),
        "00-not-a-trace-01",
        json!(1),
    )
    .await;
    assert!(accepted["offset"].is_string(), "{accepted}");
    let mut span = None;
    eventually_within(
        Duration::from_secs(15),
        "the http.send span of solo-bad",
        || {
            span = received
                .lock()
                .expect("receiver lock")
                .iter()
                .find(|s| {
                    s.name == "http.send"
                        && s.attributes.get("session").map(String::as_str) == Some("solo-bad")
                })
                .cloned();
            let ok = span.is_some();
            async move { ok }
        },
    )
    .await;
    let span = span.expect("found");
    assert_eq!(span.parent, "", "no parent from a malformed header");
    assert_eq!(span.trace_id.len(), 32);
}

/// OTEL_TRACES_SAMPLER is honoured: with `parentbased_always_off`, only a
/// request whose caller sampled its trace is traced.
#[tokio::test]
async fn the_standard_sampler_variable_decides_what_is_exported() {
    let (collector, received) = start_receiver().await;
    let (_child, _dir, addr) = spawn_embedded(
        &collector,
        &[("OTEL_TRACES_SAMPLER", "parentbased_always_off")],
    )
    .await;
    let url = format!("http://{addr}/v1/sessions/solo-sampled/messages");
    // First without a caller trace (a root: not sampled), then with a
    // sampled one. The batch processor exports in order, so once the
    // second is in, the first would be too.
    let (code, _) = common::post_json(&url, json!({"data": 1}), &[]).await;
    assert_eq!(code, 202);
    let sampled = "33333333333333333333333333333333";
    post_traced(&url, &format!("00-{sampled}-4444444444444444-01"), json!(2)).await;
    let http = wait_for(&received, "wsfleet", "http.send", sampled).await;
    assert_eq!(http.parent, "4444444444444444");
    let roots: Vec<Exported> = received
        .lock()
        .expect("receiver lock")
        .iter()
        .filter(|s| s.name == "http.send" && s.parent.is_empty())
        .cloned()
        .collect();
    assert!(
        roots.is_empty(),
        "an unsampled root was exported: {roots:?}"
    );
}
