//! Cluster mode under the three faults of issue 3, with real processes:
//! a pod killed with SIGKILL while messages flow to its sessions, Redis
//! stopping and coming back (with and without persistence), and a rolling
//! restart under traffic. The invariant checked after each: every message
//! accepted with 202 reaches its session exactly once after dedupe by
//! offset, in order.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::{Pod, RedisOptions, RedisServer, eventually_within, offset_key};
use common::{Client, get_json, post_json};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// These tests measure timing on a 2-core machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------ helpers

/// The pods that clients and the sender may use right now (`127.0.0.1:PORT`).
#[derive(Clone, Default)]
struct Live(Arc<Mutex<Vec<String>>>);

impl Live {
    fn new(pods: &[&Pod]) -> Live {
        Live(Arc::new(Mutex::new(
            pods.iter().map(|p| p.addr.clone()).collect(),
        )))
    }
    fn list(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn add(&self, pod: &Pod) {
        self.0.lock().unwrap().push(pod.addr.clone());
    }
    fn remove(&self, pod: &Pod) {
        self.0.lock().unwrap().retain(|a| a != &pod.addr);
    }
    /// The `n`-th live pod other than `avoid` when there is one.
    fn pick(&self, avoid: &str, n: usize) -> String {
        let all = self.list();
        assert!(!all.is_empty(), "no live pod left");
        let others: Vec<&String> = all.iter().filter(|a| a.as_str() != avoid).collect();
        if others.is_empty() {
            all[n % all.len()].clone()
        } else {
            others[n % others.len()].clone()
        }
    }
}

/// What one resuming client saw.
#[derive(Default, Debug)]
struct Tally {
    /// Offsets processed, after dedupe (an offset not above the last processed one is a duplicate).
    processed: Vec<String>,
    duplicates: usize,
    /// Welcomes received (1 = never reconnected).
    connections: usize,
    /// How each connection ended: "1012", "dropped", ...
    ends: Vec<String>,
    /// Longest time from losing a connection to the next welcome.
    worst_reconnect: Duration,
    /// Welcomes that reported a gap, or anything else surprising.
    problems: Vec<String>,
}

type Tallies = Arc<Mutex<HashMap<String, Tally>>>;

/// A client that stays connected as an application would: it dedupes by
/// offset and, whenever its connection ends, reconnects to a live pod with
/// `last` = the last offset it processed (after `after_ms` on `reconnect`).
fn spawn_client(
    session: String,
    first_pod: String,
    live: Live,
    stop: CancellationToken,
    tallies: Tallies,
    seed: usize,
) -> JoinHandle<()> {
    tallies
        .lock()
        .unwrap()
        .insert(session.clone(), Tally::default());
    tokio::spawn(async move {
        let mut target = first_pod;
        let mut last: Option<String> = None;
        let mut lost_at: Option<Instant> = None;
        let mut attempt = seed;
        while !stop.is_cancelled() {
            let query = match &last {
                Some(l) => format!("session={session}&last={l}"),
                None => format!("session={session}"),
            };
            let url = format!("ws://{target}/ws?{query}");
            let connected =
                tokio::time::timeout(Duration::from_secs(5), Client::try_connect(&url)).await;
            let Ok(Ok(mut client)) = connected else {
                attempt += 1;
                target = live.pick(&target, attempt);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut after_ms = 0;
            let mut welcomed = false;
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    next = tokio::time::timeout(Duration::from_secs(60), client.ws.next()) => next,
                };
                let Ok(next) = next else {
                    tallies
                        .lock()
                        .unwrap()
                        .get_mut(&session)
                        .unwrap()
                        .problems
                        .push(format!(
                            "nothing for 60 s on {target}; giving the connection up"
                        ));
                    break;
                };
                let mut guard = tallies.lock().unwrap();
                let tally = guard.get_mut(&session).unwrap();
                match next {
                    Some(Ok(Message::Text(text))) => {
                        let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                        match frame["type"].as_str() {
                            Some("welcome") => {
                                welcomed = true;
                                tally.connections += 1;
                                if let Some(at) = lost_at.take() {
                                    tally.worst_reconnect = tally.worst_reconnect.max(at.elapsed());
                                }
                                if frame["gap"] != false {
                                    tally.problems.push(format!("welcome with a gap: {frame}"));
                                }
                            }
                            Some("message") => {
                                let offset = frame["offset"].as_str().expect("offset").to_string();
                                let fresh = last
                                    .as_deref()
                                    .is_none_or(|l| offset_key(&offset) > offset_key(l));
                                if fresh {
                                    tally.processed.push(offset.clone());
                                    last = Some(offset);
                                } else {
                                    tally.duplicates += 1;
                                }
                            }
                            Some("reconnect") => {
                                after_ms = frame["after_ms"].as_u64().unwrap_or(0).min(3000);
                            }
                            _ => tally.problems.push(format!("unexpected frame {frame}")),
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        tally
                            .ends
                            .push(frame.map_or("1005".into(), |f| u16::from(f.code).to_string()));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        tally.ends.push("dropped".into());
                        // Back off like a real client: messages accepted
                        // meanwhile can only come back from the log.
                        after_ms = 300;
                        break;
                    }
                }
            }
            if !welcomed {
                tallies
                    .lock()
                    .unwrap()
                    .get_mut(&session)
                    .unwrap()
                    .problems
                    .push(format!("connection to {target} ended before its welcome"));
            }
            lost_at.get_or_insert_with(Instant::now);
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            attempt += 1;
            target = live.pick(&target, attempt);
        }
    })
}

/// Offsets accepted (202) per session, in the order the sender got them.
type Accepted = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// POSTs sequence-numbered messages round-robin over `sessions` through the
/// live pods, one at a time, every `interval`, until `rounds` rounds are
/// done or `stop` fires. A failed POST is retried through another pod with
/// the same `Idempotency-Key`, so every message ends accepted exactly once.
fn spawn_sender(
    sessions: Vec<String>,
    rounds: usize,
    interval: Duration,
    via: Live,
    stop: CancellationToken,
    accepted: Accepted,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .expect("http client");
        let mut sent = 0;
        let mut n = 0;
        for round in 0..rounds {
            for s in &sessions {
                if stop.is_cancelled() {
                    return sent;
                }
                let key = format!("{s}-{round}");
                let body = json!({"data": {"s": s, "n": round}});
                let deadline = Instant::now() + Duration::from_secs(20);
                let offset = loop {
                    let pods = via.list();
                    n += 1;
                    let url = format!("http://{}/v1/sessions/{s}/messages", pods[n % pods.len()]);
                    let resp = http
                        .post(&url)
                        .header("Idempotency-Key", &key)
                        .json(&body)
                        .send()
                        .await;
                    if let Ok(r) = resp
                        && r.status().as_u16() == 202
                    {
                        let b: Value = r.json().await.expect("202 body");
                        break b["offset"].as_str().expect("offset").to_string();
                    }
                    assert!(
                        Instant::now() < deadline,
                        "message {key} not accepted by any live pod within 20 s"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                accepted
                    .lock()
                    .unwrap()
                    .entry(s.clone())
                    .or_default()
                    .push(offset);
                sent += 1;
                tokio::time::sleep(interval).await;
            }
        }
        sent
    })
}

/// Waits until every client processed its last accepted offset, then
/// checks exactly-once-after-dedupe, in order, for every session.
async fn assert_every_accepted_message_arrived_once_in_order(
    accepted: &Accepted,
    tallies: &Tallies,
    within: Duration,
) {
    let caught_up = || {
        let accepted = accepted.lock().unwrap();
        let tallies = tallies.lock().unwrap();
        tallies.iter().all(|(s, t)| {
            accepted
                .get(s)
                .and_then(|a| a.last())
                .is_none_or(|want| t.processed.last() == Some(want))
        })
    };
    let deadline = Instant::now() + within;
    while !caught_up() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = accepted.lock().unwrap();
    let tallies = tallies.lock().unwrap();
    let mut failures = Vec::new();
    let mut total = 0;
    for (s, tally) in tallies.iter() {
        let want = accepted.get(s).cloned().unwrap_or_default();
        total += want.len();
        if tally.processed != want {
            let missing: Vec<&String> = want
                .iter()
                .filter(|o| !tally.processed.contains(o))
                .collect();
            let extra: Vec<&String> = tally
                .processed
                .iter()
                .filter(|o| !want.contains(o))
                .collect();
            failures.push(format!(
                "{s}: accepted {} processed {} missing {missing:?} unexpected {extra:?} \
                 (ends {:?}, connections {})",
                want.len(),
                tally.processed.len(),
                tally.ends,
                tally.connections
            ));
        }
        if !tally.problems.is_empty() {
            failures.push(format!("{s}: {:?}", tally.problems));
        }
    }
    let duplicates: usize = tallies.values().map(|t| t.duplicates).sum();
    let reconnects: usize = tallies
        .values()
        .map(|t| t.connections.saturating_sub(1))
        .sum();
    let worst = tallies
        .values()
        .map(|t| t.worst_reconnect)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} sessions, {total} messages accepted, {duplicates} duplicates dropped, \
         {reconnects} reconnects, slowest reconnect {worst:?}",
        tallies.len()
    );
    assert!(total > 0, "nothing was accepted at all");
    assert!(
        failures.is_empty(),
        "{} of {} sessions broke exactly-once-in-order ({total} accepted):\n{}",
        failures.len(),
        tallies.len(),
        failures.join("\n")
    );
}

fn status_and_code(resp: &(u16, Value)) -> (u16, String) {
    (
        resp.0,
        resp.1["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

async fn readyz(pod: &Pod) -> u16 {
    match common::http().get(pod.http("/readyz")).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

// ------------------------------------------------------------ a. kill -9

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_killed_with_sigkill_loses_no_accepted_message() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let flags = ["--session-lease-s", "30"];
    let mut victim = Pod::start("kill-0", &redis.url(), &flags).await;
    let p1 = Pod::start("kill-1", &redis.url(), &flags).await;
    let p2 = Pod::start("kill-2", &redis.url(), &flags).await;
    let pods = [&victim, &p1, &p2];
    let live = Live::new(&pods);
    let stop = CancellationToken::new();
    let tallies: Tallies = Default::default();
    let sessions: Vec<String> = (0..45).map(|i| format!("k{i}")).collect();
    let mut clients = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        clients.push(spawn_client(
            s.clone(),
            pods[i % 3].addr.clone(),
            live.clone(),
            stop.clone(),
            tallies.clone(),
            i,
        ));
    }
    eventually_within(Duration::from_secs(15), "every client is welcomed", || {
        let t = tallies.clone();
        async move { t.lock().unwrap().values().all(|t| t.connections == 1) }
    })
    .await;

    // The sender only goes through the pods that survive.
    let accepted: Accepted = Default::default();
    let sender = spawn_sender(
        sessions.clone(),
        8,
        Duration::from_millis(8),
        Live::new(&[&p1, &p2]),
        stop.clone(),
        accepted.clone(),
    );
    eventually_within(
        Duration::from_secs(20),
        "a third of the messages are accepted",
        || {
            let a = accepted.clone();
            async move { a.lock().unwrap().values().map(Vec::len).sum::<usize>() >= 120 }
        },
    )
    .await;
    live.remove(&victim);
    victim.kill9().await;
    let sent = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("the sender finishes")
        .expect("sender task");
    assert_eq!(sent, 8 * sessions.len());

    assert_every_accepted_message_arrived_once_in_order(
        &accepted,
        &tallies,
        Duration::from_secs(20),
    )
    .await;
    stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    let tallies = tallies.lock().unwrap();
    for (i, s) in sessions.iter().enumerate() {
        let t = &tallies[s];
        if i % 3 == 0 {
            assert!(t.connections >= 2, "{s} was on the killed pod: {t:?}");
            // Claimed at once: no waiting for the 30 s lease of the dead pod.
            assert!(
                t.worst_reconnect < Duration::from_secs(5),
                "{s} took {:?} to reconnect after the kill",
                t.worst_reconnect
            );
        } else {
            assert_eq!(
                t.connections, 1,
                "{s} was on a surviving pod and must not have been disconnected: {t:?}"
            );
        }
    }
}

// ------------------------------------------------------ b. Redis outage

/// Both pods on one Redis; `sa` on A, `sb` on B, a subscriber of `ch` on
/// each pod.
struct OutageSetup {
    a: Pod,
    b: Pod,
    sa: Client,
    sb: Client,
    sub_a: Client,
    sub_b: Client,
    /// What `sb` and the channel subscribers processed before the outage.
    sb_last: String,
    ch_last: String,
}

async fn outage_setup(redis: &RedisServer, flags: &[&str], tag: &str) -> OutageSetup {
    let a = Pod::start(&format!("{tag}-a"), &redis.url(), flags).await;
    let b = Pod::start(&format!("{tag}-b"), &redis.url(), flags).await;
    let (sa, _) = a.session("sa").await;
    let (mut sb, _) = b.session("sb").await;
    let (mut sub_a, _) = a.session("sub-a").await;
    let (mut sub_b, _) = b.session("sub-b").await;
    for c in [&mut sub_a, &mut sub_b] {
        let ack = c
            .request(json!({"type":"subscribe","channel":"ch"}), 1)
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    // Cross-pod delivery works before the outage.
    let (status, body) = a.post_session("sb", json!("before")).await;
    assert_eq!(status, 202, "{body}");
    let msg = sb.recv_json().await;
    assert_eq!(msg["data"], "before");
    let sb_last = msg["offset"].as_str().expect("offset").to_string();
    let (status, body) = a.post_channel("ch", json!("before")).await;
    assert_eq!(status, 202);
    for c in [&mut sub_a, &mut sub_b] {
        assert_eq!(c.recv_json().await["data"], "before");
    }
    OutageSetup {
        a,
        b,
        sa,
        sb,
        sub_a,
        sub_b,
        sb_last,
        ch_last: body["offset"].as_str().expect("offset").to_string(),
    }
}

/// Redis came back empty: no record proves who owns what any more, so every
/// connection is asked to reconnect (`reconnect` + 1012) and claims again;
/// a resume whose history went with the data says `gap: true`.
async fn reconnect_after_wipe(setup: &mut OutageSetup) {
    for (name, client) in [
        ("sa", &mut setup.sa),
        ("sb", &mut setup.sb),
        ("sub-a", &mut setup.sub_a),
        ("sub-b", &mut setup.sub_b),
    ] {
        let (frames, ended) =
            tokio::time::timeout(Duration::from_secs(20), client.recv_until_end())
                .await
                .unwrap_or_else(|_| panic!("{name} was not asked to reconnect"));
        assert_eq!(ended, common::Ended::Closed(1012), "{name}: {frames:?}");
        assert!(
            frames.iter().any(|f| f["type"] == "reconnect"),
            "{name}: no reconnect frame in {frames:?}"
        );
    }
    setup.sa = setup.a.session("sa").await.0;
    let (sb, welcome) = setup.b.session(&format!("sb&last={}", setup.sb_last)).await;
    assert_eq!(
        welcome["gap"], true,
        "sb's log was lost with Redis: {welcome}"
    );
    setup.sb = sb;
    let since = setup.ch_last.clone();
    for (pod, name, slot) in [
        (&setup.a, "sub-a", &mut setup.sub_a),
        (&setup.b, "sub-b", &mut setup.sub_b),
    ] {
        let (mut client, _) = pod.session(name).await;
        let ack = client
            .request(json!({"type":"subscribe","channel":"ch","since":since}), 1)
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        *slot = client;
    }
}

/// While Redis is down: connections stay open and answer `ping`, POSTs and
/// `send` frames get `unavailable`, `/readyz` turns 503. Takes at least `hold`.
async fn check_during_outage(setup: &mut OutageSetup, hold: Duration) {
    let started = Instant::now();
    eventually_within(
        Duration::from_secs(15),
        "/readyz 503 on both pods",
        || async { readyz(&setup.a).await == 503 && readyz(&setup.b).await == 503 },
    )
    .await;
    let (status, body) = get_json(&setup.a.http("/readyz")).await;
    assert_eq!(status, 503);
    assert_eq!(body["ready"], false, "{body}");
    for (pod, path) in [
        (&setup.a, "/v1/sessions/sb/messages"),
        (&setup.b, "/v1/sessions/sa/messages"),
        (&setup.b, "/v1/channels/ch/messages"),
    ] {
        let resp = tokio::time::timeout(
            Duration::from_secs(15),
            post_json(&pod.http(path), json!({"data": "during"}), &[]),
        )
        .await
        .unwrap_or_else(|_| panic!("POST {path} on {} hung while Redis is down", pod.name));
        assert_eq!(
            status_and_code(&resp),
            (503, "unavailable".into()),
            "POST {path} on {} while Redis is down: {}",
            pod.name,
            resp.1
        );
        assert!(resp.1["error"]["message"].is_string(), "{}", resp.1);
    }
    let reply = setup
        .sa
        .request(json!({"type":"send","session":"sb","data":"during"}), 7)
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let reply = setup
        .sub_b
        .request(json!({"type":"publish","channel":"ch","data":"during"}), 8)
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    // Keep it down for a while, pinging: the pods answer without Redis.
    while started.elapsed() < hold {
        for c in [
            &mut setup.sa,
            &mut setup.sb,
            &mut setup.sub_a,
            &mut setup.sub_b,
        ] {
            c.assert_alive().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads direct or channel messages until one carries `data`; frames whose
/// data is a string starting with "probe" are skipped (late probes).
async fn recv_data(client: &mut Client, data: &Value) -> Value {
    loop {
        let msg = client.recv_json().await;
        if msg["type"] == "message" && msg["data"].as_str().is_some_and(|d| d.starts_with("probe"))
        {
            continue;
        }
        assert_eq!(&msg["data"], data, "{msg}");
        return msg;
    }
}

/// Posts probes through `post` until `client` receives one (or `within` passes).
async fn probe_until_delivered<F, Fut>(client: &mut Client, within: Duration, what: &str, post: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let deadline = Instant::now() + within;
    let mut n = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "{what}: nothing delivered within {within:?} after Redis came back"
        );
        n += 1;
        let _ = post(format!("probe-{n}")).await;
        let got = tokio::time::timeout(Duration::from_millis(700), async {
            loop {
                let msg = client.recv_json().await;
                if msg["type"] == "message" {
                    return msg;
                }
            }
        })
        .await;
        if got.is_ok() {
            eprintln!(
                "{what}: delivering again after {n} probe(s), {:?}",
                within - deadline.saturating_duration_since(Instant::now())
            );
            return;
        }
    }
}

/// After Redis is back: ready again, POSTs accepted, delivered across pods
/// to sessions and channel subscribers, over the very same connections
/// (after a wipe: over the connections that reconnected).
async fn check_after_outage(setup: &mut OutageSetup, strict: bool) {
    eventually_within(
        Duration::from_secs(20),
        "/readyz 200 on both pods again",
        || async { readyz(&setup.a).await == 200 && readyz(&setup.b).await == 200 },
    )
    .await;
    let (a, b) = (&setup.a, &setup.b);
    if !strict {
        // Everything in Redis was lost: delivery must come back by itself.
        probe_until_delivered(
            &mut setup.sb,
            Duration::from_secs(20),
            "direct A to a session on B",
            |d| a.post_session("sb", json!(d)),
        )
        .await;
        probe_until_delivered(
            &mut setup.sa,
            Duration::from_secs(20),
            "direct B to a session on A",
            |d| b.post_session("sa", json!(d)),
        )
        .await;
        probe_until_delivered(
            &mut setup.sub_b,
            Duration::from_secs(20),
            "channel A to a subscriber on B",
            |d| a.post_channel("ch", json!(d)),
        )
        .await;
        probe_until_delivered(
            &mut setup.sub_a,
            Duration::from_secs(20),
            "channel B to a subscriber on A",
            |d| b.post_channel("ch", json!(d)),
        )
        .await;
    }
    // From now on every accepted message arrives, in order.
    let mut direct = Vec::new();
    let mut published = Vec::new();
    let http = common::http().clone();
    for i in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(20);
        for (list, url) in [
            (&mut direct, a.http("/v1/sessions/sb/messages")),
            (&mut published, b.http("/v1/channels/ch/messages")),
        ] {
            loop {
                let resp = http
                    .post(&url)
                    .json(&json!({"data": format!("after-{i}")}))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                if let Ok(r) = resp
                    && r.status().as_u16() == 202
                {
                    let body: Value = r.json().await.expect("json");
                    list.push(body["offset"].as_str().expect("offset").to_string());
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "POST {url} not accepted within 20 s of Redis coming back"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for (i, offset) in direct.iter().enumerate() {
        let msg = recv_data(&mut setup.sb, &json!(format!("after-{i}"))).await;
        assert_eq!(msg["offset"].as_str(), Some(offset.as_str()));
    }
    for sub in [&mut setup.sub_a, &mut setup.sub_b] {
        for (i, offset) in published.iter().enumerate() {
            let msg = recv_data(sub, &json!(format!("after-{i}"))).await;
            assert_eq!(msg["channel"], "ch");
            assert_eq!(msg["offset"].as_str(), Some(offset.as_str()));
        }
    }
    // A `send` frame from A to B works again too.
    let ack = setup
        .sa
        .request(json!({"type":"send","session":"sb","data":"sent-after"}), 9)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let msg = recv_data(&mut setup.sb, &json!("sent-after")).await;
    assert_eq!(msg["from"], "sa");
    // No pod restarted.
    assert!(setup.a.is_running() && setup.b.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_redis_outage_with_persistence_keeps_connections_and_recovers() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(RedisOptions {
        persistent: true,
        ..Default::default()
    })
    .await;
    let mut setup = outage_setup(&redis, &[], "out").await;
    // Accepted before the outage for a session that is not connected.
    let mut kept = Vec::new();
    for i in 0..3 {
        let (status, body) = setup.b.post_session("offline", json!(i)).await;
        assert_eq!(status, 202);
        kept.push(body["offset"].clone());
    }
    redis.stop().await;
    check_during_outage(&mut setup, Duration::from_secs(4)).await;
    redis.restart().await;
    check_after_outage(&mut setup, true).await;
    // What was accepted before the outage survived it.
    let (mut offline, welcome) = setup.a.session("offline").await;
    assert_eq!(welcome["gap"], false);
    for (i, offset) in kept.iter().enumerate() {
        let msg = offline.recv_json().await;
        assert_eq!(msg["data"], json!(i), "{msg}");
        assert_eq!(&msg["offset"], offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_redis_restart_without_persistence_resumes_cross_pod_delivery() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start().await;
    let mut setup = outage_setup(&redis, &["--session-lease-s", "6"], "wipe").await;
    redis.stop().await;
    check_during_outage(&mut setup, Duration::from_secs(3)).await;
    redis.restart().await;
    assert_eq!(
        redis.cli(&["dbsize"]).await.trim(),
        "0",
        "the restarted Redis must start empty for this test to mean anything"
    );
    reconnect_after_wipe(&mut setup).await;
    check_after_outage(&mut setup, false).await;
    // Ownership was re-created too: a lookup from the other pod finds it.
    let lookup = setup.b.http("/v1/sessions/sa");
    eventually_within(
        Duration::from_secs(15),
        "sa is owned by wipe-a again",
        || async { get_json(&lookup).await.1["pod"] == "wipe-a" },
    )
    .await;
}

// ------------------------------------------------- c. rolling restart

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_rolling_restart_under_traffic_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let flags = ["--drain-s", "2", "--reconnect-jitter-ms", "300"];
    let mut old = Vec::new();
    for i in 0..3 {
        old.push(Pod::start(&format!("roll-{i}"), &redis.url(), &flags).await);
    }
    let live = Live::new(&old.iter().collect::<Vec<_>>());
    let stop = CancellationToken::new();
    let tallies: Tallies = Default::default();
    let sessions: Vec<String> = (0..30).map(|i| format!("r{i}")).collect();
    let mut clients = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        clients.push(spawn_client(
            s.clone(),
            old[i % 3].addr.clone(),
            live.clone(),
            stop.clone(),
            tallies.clone(),
            i,
        ));
    }
    eventually_within(Duration::from_secs(15), "every client is welcomed", || {
        let t = tallies.clone();
        async move { t.lock().unwrap().values().all(|t| t.connections == 1) }
    })
    .await;
    let accepted: Accepted = Default::default();
    let stop_sender = CancellationToken::new();
    let sender = spawn_sender(
        sessions.clone(),
        usize::MAX,
        Duration::from_millis(10),
        live.clone(),
        stop_sender.clone(),
        accepted.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut new = Vec::new();
    for (i, pod) in old.iter_mut().enumerate() {
        let replacement = if i == 1 {
            // StatefulSet style: the replacement takes the name once the old one is gone.
            live.remove(pod);
            pod.sigterm();
            let status = pod.wait_exit(Duration::from_secs(20)).await;
            assert_eq!(status.code(), Some(0), "{} exit status", pod.name);
            let replacement = Pod::start(&pod.name, &redis.url(), &flags).await;
            live.add(&replacement);
            replacement
        } else {
            // Deployment style: surge first, then terminate.
            let replacement = Pod::start(&format!("roll-{i}-new"), &redis.url(), &flags).await;
            live.add(&replacement);
            live.remove(pod);
            pod.sigterm();
            let status = pod.wait_exit(Duration::from_secs(20)).await;
            assert_eq!(status.code(), Some(0), "{} exit status", pod.name);
            replacement
        };
        new.push(replacement);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_sender.cancel();
    let sent = tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the sender stops")
        .expect("sender task");
    assert!(sent > 300, "only {sent} messages were sent");
    assert_every_accepted_message_arrived_once_in_order(
        &accepted,
        &tallies,
        Duration::from_secs(20),
    )
    .await;
    stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    let tallies = tallies.lock().unwrap();
    for s in &sessions {
        let t = &tallies[s];
        assert!(
            t.ends.iter().any(|e| e == "1012"),
            "{s} was never drained with 1012: {t:?}"
        );
        assert!(
            t.ends.iter().all(|e| e == "1012"),
            "{s}: only drains (1012) may end connections here: {t:?}"
        );
    }
}
