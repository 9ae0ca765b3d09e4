//! The controller end to end, without Kubernetes: real gateway pods on a
//! real Redis, real WebSocket clients behind a small load balancer that
//! skips pods whose /readyz is not 200, a steady stream of messages, and
//! the controller's reconciler driving the fleet through a fake API server
//! (kube-rs's mock-service pattern) and the fleet registry in Redis.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use common::kube_api::FakeApi;
use common::redis::{Pod, RedisServer};
use wsfleet::config::ScaleMode;
use wsfleet::controller::decide::{RebalancePolicy, ScalePolicy};
use wsfleet::controller::metrics::ControllerMetrics;
use wsfleet::controller::reconcile::{Reconciler, Settings};
use wsfleet::protocol::Offset;

/// Pods flags: a 3 s lease makes the pods read orders and report every
/// second; short drains and jitter keep the test quick.
const POD_FLAGS: &[&str] = &[
    "--session-lease-s",
    "3",
    "--drain-s",
    "3",
    "--reconnect-jitter-ms",
    "300",
    "--heartbeat-s",
    "600",
];

/// Round-robin over the pods whose /readyz answers 200.
struct LoadBalancer {
    pods: RwLock<Vec<String>>,
    next: AtomicUsize,
}

impl LoadBalancer {
    async fn pick(&self) -> String {
        for _ in 0..200 {
            let pods = self.pods.read().expect("lb").clone();
            for _ in 0..pods.len() {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % pods.len();
                let addr = &pods[i];
                if let Ok(r) = common::http()
                    .get(format!("http://{addr}/readyz"))
                    .send()
                    .await
                    && r.status().as_u16() == 200
                {
                    return addr.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no ready pod behind the load balancer");
    }
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Offsets handed to the application (deduped), in arrival order.
    delivered: Vec<Offset>,
    duplicates: usize,
    /// (pod address, when) of every 1012 close.
    restarts: Vec<(String, Instant)>,
    /// Close codes other than 1012.
    other_closes: Vec<u16>,
}

/// A client that keeps its session alive: resumes with `last` wherever
/// the load balancer sends it, after the announced `after_ms`.
async fn client(
    session: String,
    lb: Arc<LoadBalancer>,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let mut last: Option<Offset> = None;
    while !stop.is_cancelled() {
        let addr = lb.pick().await;
        let query = match &last {
            Some(o) => format!("session={session}&last={o}"),
            None => format!("session={session}"),
        };
        let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws?{query}")).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut after_ms = 0;
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = ws.close(None).await;
                    return;
                }
                next = ws.next() => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                    match frame["type"].as_str() {
                        Some("message") => {
                            let offset: Offset = frame["offset"]
                                .as_str()
                                .expect("offset")
                                .parse()
                                .expect("offset parses");
                            let mut s = seen.lock().expect("seen");
                            if last.is_some_and(|l| offset <= l) {
                                s.duplicates += 1;
                            } else {
                                s.delivered.push(offset);
                                last = Some(offset);
                            }
                        }
                        Some("reconnect") => after_ms = frame["after_ms"].as_u64().unwrap_or(0),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    let mut s = seen.lock().expect("seen");
                    if code == 1012 {
                        s.restarts.push((addr.clone(), Instant::now()));
                    } else {
                        s.other_closes.push(code);
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
    }
}

/// Connections per pod address, from the pods' own fleet view.
async fn spread(pods: &[Pod]) -> BTreeMap<String, usize> {
    let (status, fleet) = common::get_json(&pods[0].http("/v1/fleet")).await;
    assert_eq!(status, 200, "{fleet}");
    let by_name: HashMap<String, usize> = fleet["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap_or_default().to_string(),
                p["connections"].as_u64().unwrap_or(0) as usize,
            )
        })
        .collect();
    pods.iter()
        .map(|p| (p.name.clone(), by_name.get(&p.name).copied().unwrap_or(0)))
        .collect()
}

struct Fleet {
    _redis: RedisServer,
    pods: Vec<Pod>,
    seen: HashMap<String, Arc<Mutex<Seen>>>,
    accepted: Arc<Mutex<HashMap<String, Vec<Offset>>>>,
    stop_clients: CancellationToken,
    stop_sending: CancellationToken,
    sender: tokio::task::JoinHandle<()>,
    redis_url: String,
}

/// `full` pods with `sessions` clients spread over them, then `empty`
/// more pods, and a sender posting to every session in turn.
async fn fleet(full: usize, empty: usize, sessions: usize) -> Fleet {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut pods = Vec::new();
    for i in 0..full {
        pods.push(Pod::start(&format!("gw-{i}"), &url, POD_FLAGS).await);
    }
    let lb = Arc::new(LoadBalancer {
        pods: RwLock::new(pods.iter().map(|p| p.addr.clone()).collect()),
        next: AtomicUsize::new(0),
    });
    let stop_clients = CancellationToken::new();
    let mut seen = HashMap::new();
    for n in 0..sessions {
        let session = format!("s{n}");
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.insert(session.clone(), s.clone());
        tokio::spawn(client(session, lb.clone(), s, stop_clients.clone()));
    }
    common::eventually("every client connected", || {
        let pods = &pods;
        async move { spread(pods).await.values().sum::<usize>() == sessions }
    })
    .await;
    for i in full..full + empty {
        let pod = Pod::start(&format!("gw-{i}"), &url, POD_FLAGS).await;
        // Reconnects from now on may go to it.
        lb.pods.write().expect("lb").push(pod.addr.clone());
        pods.push(pod);
    }
    let accepted: Arc<Mutex<HashMap<String, Vec<Offset>>>> = Default::default();
    let stop_sending = CancellationToken::new();
    let sender = {
        let accepted = accepted.clone();
        let stop = stop_sending.clone();
        let base = pods[0].http("");
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                let session = format!("s{}", n % sessions);
                let (status, body) =
                    common::post_to_session(&base, &session, json!({"n": n})).await;
                assert_eq!(status, 202, "{body}");
                let offset: Offset = body["offset"]
                    .as_str()
                    .expect("offset")
                    .parse()
                    .expect("offset");
                accepted
                    .lock()
                    .expect("accepted")
                    .entry(session)
                    .or_default()
                    .push(offset);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    Fleet {
        _redis: redis,
        pods,
        seen,
        accepted,
        stop_clients,
        stop_sending,
        sender,
        redis_url: url,
    }
}

/// The controller's reconciler over the fake API and the fleet's Redis.
async fn reconciler(
    fleet: &Fleet,
    mode: ScaleMode,
    scale: ScalePolicy,
    rebalance: Option<RebalancePolicy>,
    replicas: i32,
) -> (Reconciler, FakeApi, ControllerMetrics) {
    let settings = Settings {
        mode,
        scale,
        rebalance,
        drain_timeout_ms: 20_000,
        order_latency_ms: 2_500,
    };
    let pods = fleet.pods.iter().map(|p| p.name.clone()).collect();
    common::kube_api::reconciler(&fleet.redis_url, pods, settings, replicas).await
}

/// Stops the traffic and checks every client got every accepted message
/// of its session exactly once, in order, and was never closed with
/// anything but 1012.
async fn assert_nothing_lost(fleet: Fleet) {
    fleet.stop_sending.cancel();
    fleet.sender.await.expect("sender");
    let accepted = fleet.accepted.lock().expect("accepted").clone();
    assert!(
        accepted.values().map(Vec::len).sum::<usize>() > 100,
        "traffic flowed"
    );
    common::eventually("every accepted message delivered", || {
        let accepted = &accepted;
        let seen = &fleet.seen;
        async move {
            accepted.iter().all(|(session, offsets)| {
                seen[session].lock().expect("seen").delivered.len() >= offsets.len()
            })
        }
    })
    .await;
    for (session, offsets) in &accepted {
        let s = fleet.seen[session].lock().expect("seen");
        assert_eq!(
            &s.delivered, offsets,
            "session {session}: delivered != accepted"
        );
        assert!(
            s.other_closes.is_empty(),
            "session {session}: closes {:?}",
            s.other_closes
        );
    }
    fleet.stop_clients.cancel();
}

/// Max number of 1012 closes from one pod inside any `window`.
fn busiest_window(restarts: &[(String, Instant)], pod: &str, window: Duration) -> usize {
    let mut times: Vec<Instant> = restarts
        .iter()
        .filter(|(p, _)| p == pod)
        .map(|(_, t)| *t)
        .collect();
    times.sort();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t - times[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_scale_out_the_rebalancer_evens_the_fleet_out_without_losing_anything() {
    // 3 pods with 20 connections each, then an empty fourth: average 15,
    // each full pod 5 over it.
    let fleet = fleet(3, 1, 60).await;
    let per_s = 2;
    let policy = RebalancePolicy {
        tolerance: 0.1,
        per_pod_per_s: per_s,
        fleet_fraction_per_min: 1.0,
        // An order may ask for up to 2/s x 3 s = 6: more than one
        // second's worth, so the pod's own rate limit is what the burst
        // check below sees.
        interval_ms: 3_000,
    };
    let scale = common::kube_api::immediate_scaling(100);
    let (mut controller, api, metrics) =
        reconciler(&fleet, ScaleMode::Metrics, scale, Some(policy), 4).await;
    let start = Instant::now();
    // Reports lag closes by up to a second: a spread counts once it adds
    // up to the number of sessions.
    let balanced = |spread: &BTreeMap<String, usize>| {
        spread.values().all(|&n| (13..=16).contains(&n)) && spread.values().sum::<usize>() == 60
    };
    let mut last_spread = BTreeMap::new();
    let mut saw_shedding = false;
    while start.elapsed() < Duration::from_secs(60) {
        let _ = controller.tick().await;
        // A shedding pod is out of the load balancer: /readyz 503 `shedding`.
        for pod in &fleet.pods[..3] {
            let (status, ready) = common::get_json(&pod.http("/readyz")).await;
            saw_shedding |= status == 503 && ready["reason"] == "shedding";
        }
        last_spread = spread(&fleet.pods).await;
        if balanced(&last_spread) && start.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        balanced(&last_spread),
        "not balanced within 60 s: {last_spread:?}"
    );
    assert!(
        saw_shedding,
        "no full pod ever answered /readyz 503 shedding"
    );
    assert_eq!(last_spread.values().sum::<usize>(), 60, "{last_spread:?}");

    // Bounded: no pod shed faster than its rate, none more than its excess
    // plus a round's worth.
    let restarts: Vec<(String, Instant)> = fleet
        .seen
        .values()
        .flat_map(|s| s.lock().expect("seen").restarts.clone())
        .collect();
    for pod in &fleet.pods[..3] {
        let from_pod = restarts.iter().filter(|(p, _)| p == &pod.addr).count();
        assert!((3..=9).contains(&from_pod), "{} shed {from_pod}", pod.name);
        let burst = busiest_window(&restarts, &pod.addr, Duration::from_millis(900));
        assert!(
            burst <= per_s as usize,
            "{} shed {burst} inside 0.9 s",
            pod.name
        );
    }
    assert!(
        restarts.iter().all(|(p, _)| p != &fleet.pods[3].addr),
        "the empty pod shed nothing"
    );
    let text = metrics.render();
    assert!(
        common::metric(&text, "wsfleet_controller_shed_orders_total") >= 3.0,
        "{text}"
    );
    assert_eq!(common::metric(&text, "wsfleet_controller_leader"), 1.0);
    // Rebalancing writes nothing to Kubernetes but its Events and Lease.
    for call in api.calls() {
        assert!(
            call.path.contains("/leases") || call.path.contains("/events") || call.method == "GET",
            "unexpected API call {call:?}"
        );
    }
    assert!(
        api.calls()
            .iter()
            .any(|c| c.path.contains("/events") && c.body["reason"] == "Rebalancing")
    );
    assert_nothing_lost(fleet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_drains_the_emptiest_pod_first_then_lowers_replicas() {
    // 3 pods, 30 connections: a target of 20 per pod wants 2 pods.
    let fleet = fleet(3, 0, 30).await;
    let scale = common::kube_api::immediate_scaling(20);
    let (mut controller, api, _) = reconciler(&fleet, ScaleMode::Scale, scale, None, 3).await;
    let before = spread(&fleet.pods).await;
    let start = Instant::now();
    while api.replicas() != 2 && start.elapsed() < Duration::from_secs(40) {
        let _ = controller.tick().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        api.replicas(),
        2,
        "replicas lowered; calls: {:?}",
        api.calls()
    );
    let calls = api.calls();
    let costs: Vec<&common::kube_api::Call> = calls
        .iter()
        .filter(|c| c.method == "PATCH" && c.path.contains("/pods/"))
        .collect();
    assert_eq!(costs.len(), 1, "{costs:?}");
    let victim = costs[0]
        .path
        .rsplit('/')
        .next()
        .expect("pod name")
        .to_string();
    let emptiest = before
        .iter()
        .min_by_key(|(name, n)| (**n, (*name).clone()))
        .expect("pods")
        .0;
    assert_eq!(&victim, emptiest, "the emptiest pod goes ({before:?})");
    assert_eq!(
        costs[0].body["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
        "-1000"
    );
    // The cost was written before replicas went down, and the drain
    // finished before that.
    let cost_at = calls
        .iter()
        .position(|c| c.path.contains("/pods/"))
        .expect("cost");
    let scale_at = calls
        .iter()
        .position(|c| c.method == "PATCH" && c.path.ends_with("/scale"))
        .expect("scale patch");
    assert!(cost_at < scale_at);
    // Reports lag closes by up to a second.
    let mut after = spread(&fleet.pods).await;
    for _ in 0..50 {
        if after.values().sum::<usize>() == 30 && after[&victim] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = spread(&fleet.pods).await;
    }
    assert_eq!(after[&victim], 0, "victim drained: {after:?}");
    assert_eq!(after.values().sum::<usize>(), 30, "{after:?}");
    let reasons: Vec<&str> = calls
        .iter()
        .filter(|c| c.path.contains("/events"))
        .filter_map(|c| c.body["reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"DrainStarted") && reasons.contains(&"ScaledDown"),
        "{reasons:?}"
    );
    let (status, ready) = common::get_json(
        &fleet
            .pods
            .iter()
            .find(|p| p.name == victim)
            .expect("victim")
            .http("/readyz"),
    )
    .await;
    assert_eq!((status, ready["reason"].as_str()), (503, Some("draining")));
    assert_nothing_lost(fleet).await;
}
