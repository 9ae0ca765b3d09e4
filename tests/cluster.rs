//! Cluster mode (issue 3): the contract holds across pods that share one
//! Redis. Three real `wsfleet serve` processes per backend; the same
//! scenarios run against a standalone `redis-server` and against a
//! 3-master Redis Cluster.

mod common;

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use common::redis::{
    Pod, RedisCluster, RedisOptions, RedisServer, offset_key, redis_pings, xrange,
};
use common::{Ended, get_json, post_json};
use futures_util::FutureExt;
use serde_json::{Value, json};

/// Three pods on one Redis.
struct Fleet {
    pods: Vec<Pod>,
    redis_url: String,
    cluster: bool,
    /// Prefix of every session and channel name of this backend.
    tag: &'static str,
}

impl Fleet {
    async fn start(redis_url: &str, flags: &[&str], tag: &'static str) -> Fleet {
        let mut pods = Vec::new();
        for name in ["pod-a", "pod-b", "pod-c"] {
            pods.push(Pod::start(name, redis_url, flags).await);
        }
        Fleet {
            pods,
            redis_url: redis_url.to_string(),
            cluster: flags.contains(&"--redis-cluster"),
            tag,
        }
    }

    fn a(&self) -> &Pod {
        &self.pods[0]
    }
    fn b(&self) -> &Pod {
        &self.pods[1]
    }
    fn c(&self) -> &Pod {
        &self.pods[2]
    }

    /// A session or channel name unique to this backend and scenario.
    fn name(&self, what: &str) -> String {
        format!("{}.{what}", self.tag)
    }
}

/// Polls `GET url` until `check(status, body)` holds; panics with the last answer.
async fn until_get(url: &str, what: &str, check: impl Fn(u16, &Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get_json(url).await;
        if check(status, &body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10 s waiting for: {what}; GET {url} last answered {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn offset_of(v: &Value) -> String {
    v["offset"]
        .as_str()
        .unwrap_or_else(|| panic!("no offset in {v}"))
        .to_string()
}

/// Runs every scenario, in order, on one fleet. A failing scenario does not
/// stop the others; the test fails at the end naming every failed one.
async fn run_all(redis_url: &str, flags: &[&str], tag: &'static str) {
    let fleet = Fleet::start(redis_url, flags, tag).await;
    let mut failed: Vec<String> = Vec::new();
    macro_rules! scenario {
        ($f:ident) => {
            let name = stringify!($f);
            eprintln!("[{tag}] scenario {name}");
            let run = tokio::time::timeout(Duration::from_secs(60), $f(&fleet));
            match AssertUnwindSafe(run).catch_unwind().await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => failed.push(format!("{name}: timed out after 60 s")),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failed.push(format!("{name}: {why}"));
                }
            }
        };
    }
    // First: it counts connections, so nothing else may be connected.
    scenario!(fleet_lists_every_pod_from_any_pod);
    scenario!(http_post_via_another_pod_reaches_the_session_with_its_offset);
    scenario!(messages_posted_before_connecting_are_delivered_on_any_pod);
    scenario!(send_frame_reaches_a_session_on_another_pod);
    scenario!(channel_publish_reaches_subscribers_on_every_pod);
    scenario!(takeover_across_pods_closes_the_old_connection_4409);
    scenario!(session_lookup_on_any_pod_names_the_owner);
    scenario!(delete_via_another_pod_closes_with_1000);
    scenario!(idempotency_key_holds_across_pods);
    scenario!(resume_on_a_different_pod_delivers_exactly_the_rest);
    scenario!(upstream_events_land_in_the_redis_stream);
    scenario!(a_batch_through_another_pod_reaches_sessions_and_channels_in_order);
    assert!(
        failed.is_empty(),
        "[{tag}] {} scenario(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[tokio::test]
async fn cluster_contract_on_standalone_redis() {
    let redis = RedisServer::start().await;
    run_all(&redis.url(), &[], "sa").await;
}

#[tokio::test]
async fn cluster_contract_on_redis_cluster() {
    let cluster = RedisCluster::start(3).await;
    run_all(&cluster.urls(), &["--redis-cluster"], "rc").await;
}

// ---------------------------------------------------------------- scenarios

async fn fleet_lists_every_pod_from_any_pod(fleet: &Fleet) {
    let (_c1, _) = fleet.b().session(&fleet.name("count-1")).await;
    let (_c2, _) = fleet.b().session(&fleet.name("count-2")).await;
    let names: BTreeSet<String> = fleet.pods.iter().map(|p| p.name.clone()).collect();
    for pod in &fleet.pods {
        let url = pod.http("/v1/fleet");
        let mut last = Value::Null;
        let ok = async {
            loop {
                let (status, body) = get_json(&url).await;
                assert_eq!(status, 200, "{body}");
                last = body.clone();
                let listed: BTreeSet<String> = body["pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["pod"].as_str().map(String::from))
                    .collect();
                let b = body["pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["pod"] == "pod-b");
                if listed == names
                    && b.is_some_and(|b| b["connections"] == 2)
                    && body["connections"] == 2
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(15), ok)
            .await
            .is_err()
        {
            panic!(
                "GET /v1/fleet on {} never listed exactly {names:?} with 2 connections on pod-b; last: {last}",
                pod.name
            );
        }
        for entry in last["pods"].as_array().expect("pods") {
            assert!(entry["capacity"].as_u64().is_some(), "{entry}");
            assert_eq!(entry["draining"], false, "{entry}");
            assert!(entry["connections"].as_u64().is_some(), "{entry}");
        }
    }
}

async fn http_post_via_another_pod_reaches_the_session_with_its_offset(fleet: &Fleet) {
    let s = fleet.name("direct");
    let (mut client, welcome) = fleet.a().session(&s).await;
    assert_eq!(welcome["pod"], "pod-a");
    let mut previous: Option<(u64, u64)> = None;
    for (i, via) in [fleet.b(), fleet.c(), fleet.a(), fleet.b()]
        .iter()
        .enumerate()
    {
        let (status, body) = via.post_session(&s, json!({"n": i})).await;
        assert_eq!(status, 202, "POST via {}: {body}", via.name);
        let msg = client.recv_json().await;
        assert_eq!(msg["type"], "message", "{msg}");
        assert_eq!(msg["data"], json!({"n": i}));
        assert_eq!(msg["offset"], body["offset"], "{msg}");
        assert!(
            msg.get("channel").is_none() && msg.get("from").is_none(),
            "{msg}"
        );
        let key = offset_key(&offset_of(&msg));
        assert!(previous < Some(key), "offsets must increase: {msg}");
        previous = Some(key);
    }
}

async fn messages_posted_before_connecting_are_delivered_on_any_pod(fleet: &Fleet) {
    let s = fleet.name("later");
    let mut offsets = Vec::new();
    for (i, via) in fleet.pods.iter().enumerate() {
        let (status, body) = via.post_session(&s, json!(i)).await;
        assert_eq!(status, 202, "{body}");
        offsets.push(offset_of(&body));
    }
    let (mut client, welcome) = fleet.c().session(&s).await;
    assert_eq!(welcome["gap"], false);
    assert_eq!(welcome["resumed"], false);
    for (i, offset) in offsets.iter().enumerate() {
        let msg = client.recv_json().await;
        assert_eq!(msg["data"], json!(i), "{msg}");
        assert_eq!(&offset_of(&msg), offset);
    }
}

async fn send_frame_reaches_a_session_on_another_pod(fleet: &Fleet) {
    let alice = fleet.name("alice");
    let bob = fleet.name("bob");
    let (mut a, _) = fleet.a().session(&alice).await;
    let (mut b, _) = fleet.b().session(&bob).await;
    let ack = a
        .request(json!({"type":"send","session":bob,"data":{"text":"hi"}}), 1)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let msg = b.recv_json().await;
    assert_eq!(msg["type"], "message", "{msg}");
    assert_eq!(msg["from"], alice.as_str());
    assert_eq!(msg["data"], json!({"text":"hi"}));
    assert_eq!(msg["offset"], ack["offset"]);
    // And back, B to A.
    let ack = b
        .request(json!({"type":"send","session":alice,"data":"back"}), 2)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let msg = a.recv_json().await;
    assert_eq!(msg["from"], bob.as_str());
    assert_eq!(msg["data"], "back");
    assert_eq!(msg["offset"], ack["offset"]);
}

async fn channel_publish_reaches_subscribers_on_every_pod(fleet: &Fleet) {
    let channel = fleet.name("room");
    let mut clients = Vec::new();
    for (i, pod) in [fleet.a(), fleet.b()].iter().enumerate() {
        let (mut c, _) = pod.session(&fleet.name(&format!("sub{i}"))).await;
        let ack = c
            .request(json!({"type":"subscribe","channel":channel}), 1)
            .await;
        assert_eq!(ack, json!({"type":"ack","id":1}));
        clients.push(c);
    }
    // Published over HTTP on C, which has no subscriber.
    let (status, body) = fleet.c().post_channel(&channel, json!("from-c")).await;
    assert_eq!(status, 202, "{body}");
    for c in &mut clients {
        let msg = c.recv_json().await;
        assert_eq!(msg["type"], "message", "{msg}");
        assert_eq!(msg["channel"], channel.as_str());
        assert_eq!(msg["data"], "from-c");
        assert_eq!(msg["offset"], body["offset"]);
    }
    // Published by a client on A: the subscriber on B and A itself receive it.
    let ack = clients[0]
        .request(
            json!({"type":"publish","channel":channel,"data":"from-a"}),
            2,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for c in &mut clients {
        let msg = c.recv_json().await;
        assert_eq!(msg["data"], "from-a", "{msg}");
        assert_eq!(msg["offset"], ack["offset"]);
        assert!(offset_key(&offset_of(&msg)) > offset_key(&offset_of(&body)));
    }
    // A late subscriber on C replays with `since` what it missed.
    let (mut late, _) = fleet.c().session(&fleet.name("late-sub")).await;
    let since = offset_of(&body);
    let ack = late
        .request(
            json!({"type":"subscribe","channel":channel,"since":since}),
            3,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let msg = late.recv_json().await;
    assert_eq!(msg["data"], "from-a", "{msg}");
    // Unsubscribing on B stops delivery there, not on A.
    let ack = clients[1]
        .request(json!({"type":"unsubscribe","channel":channel}), 4)
        .await;
    assert_eq!(ack["type"], "ack");
    let (status, _) = fleet.b().post_channel(&channel, json!("after")).await;
    assert_eq!(status, 202);
    assert_eq!(clients[0].recv_json().await["data"], "after");
    assert_eq!(late.recv_json().await["data"], "after");
    clients[1].send_json(json!({"type":"ping","id":"p"})).await;
    let next = clients[1].recv_json().await;
    assert_eq!(next["type"], "pong", "unsubscribed on B, yet got {next}");
}

async fn a_batch_through_another_pod_reaches_sessions_and_channels_in_order(fleet: &Fleet) {
    let (s1, s2, ch) = (
        fleet.name("batch-1"),
        fleet.name("batch-2"),
        fleet.name("batch-c"),
    );
    let (mut on_a, _) = fleet.a().session(&s1).await;
    let (mut on_b, _) = fleet.b().session(&s2).await;
    let ack = on_b
        .request(json!({"type":"subscribe","channel":ch}), 1)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // 60 messages interleaved over three targets, sent through pod-c.
    let mut messages = Vec::new();
    for i in 0..20 {
        messages.push(json!({"session": s1, "data": i}));
        messages.push(json!({"session": s2, "data": i}));
        messages.push(json!({"channel": ch, "data": i}));
    }
    messages.push(json!({"session": "bad name", "data": 0}));
    let (status, body) = common::post_json(
        &fleet.c().http("/v1/messages"),
        json!({ "messages": messages }),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 61, "{body}");
    assert_eq!(results[60]["error"]["code"], "bad_request", "{body}");
    for (i, r) in results[..60].iter().enumerate() {
        assert!(r["offset"].is_string(), "message {i}: {r}");
    }
    for i in 0..20 {
        let m = on_a.recv_json().await;
        assert_eq!(
            (m["data"].as_i64(), &m["offset"]),
            (Some(i), &results[3 * i as usize]["offset"]),
            "{m}"
        );
    }
    // pod-b gets s2's messages and the channel's, each stream in order.
    let (mut direct, mut channel) = (0, 0);
    while direct < 20 || channel < 20 {
        let m = on_b.recv_json().await;
        if m["channel"].is_string() {
            assert_eq!(m["data"].as_i64(), Some(channel), "{m}");
            channel += 1;
        } else {
            assert_eq!(m["data"].as_i64(), Some(direct), "{m}");
            direct += 1;
        }
    }
}

async fn takeover_across_pods_closes_the_old_connection_4409(fleet: &Fleet) {
    let s = fleet.name("taken");
    let (mut old, _) = fleet.a().session(&s).await;
    let (mut new, welcome) = fleet.b().session(&s).await;
    assert_eq!(welcome["pod"], "pod-b");
    let (_, ended) = old.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(4409), "the old connection on pod-a");
    let (status, body) = fleet.c().post_session(&s, json!("after-takeover")).await;
    assert_eq!(status, 202, "{body}");
    let msg = new.recv_json().await;
    assert_eq!(msg["data"], "after-takeover", "{msg}");
    assert_eq!(msg["offset"], body["offset"]);
    for pod in &fleet.pods {
        let url = pod.http(&format!("/v1/sessions/{s}"));
        until_get(&url, "the owner is pod-b", |_, b| b["pod"] == "pod-b").await;
    }
    // Taking it back to A (resuming after what B processed) closes B's
    // connection the same way.
    let resume = format!("{s}&last={}", offset_of(&msg));
    let (mut back, _) = fleet.a().session(&resume).await;
    let (_, ended) = new.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(4409), "the connection on pod-b");
    let (status, _) = fleet.b().post_session(&s, json!("back")).await;
    assert_eq!(status, 202);
    assert_eq!(back.recv_json().await["data"], "back");
}

async fn session_lookup_on_any_pod_names_the_owner(fleet: &Fleet) {
    let s = fleet.name("where");
    let (_client, _) = fleet.a().session(&s).await;
    for pod in [fleet.b(), fleet.c(), fleet.a()] {
        let (status, body) = pod.get(&format!("/v1/sessions/{s}")).await;
        assert_eq!(status, 200, "GET via {}: {body}", pod.name);
        assert_eq!(body["session"], s.as_str());
        assert_eq!(body["connected"], true);
        assert_eq!(body["pod"], "pod-a", "GET via {}: {body}", pod.name);
        let at = body["connected_at"].as_str().expect("connected_at");
        assert!(
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok(),
            "{at}"
        );
    }
    let (status, body) = fleet
        .b()
        .get(&format!("/v1/sessions/{}", fleet.name("nobody")))
        .await;
    assert_eq!(status, 404, "{body}");
}

async fn delete_via_another_pod_closes_with_1000(fleet: &Fleet) {
    let s = fleet.name("deleted");
    let (mut client, _) = fleet.a().session(&s).await;
    let url = fleet.b().http(&format!("/v1/sessions/{s}"));
    let resp = common::http().delete(&url).send().await.expect("DELETE");
    assert_eq!(resp.status().as_u16(), 204);
    let (_, ended) = client.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1000));
    let lookup = fleet.c().http(&format!("/v1/sessions/{s}"));
    until_get(&lookup, "the deleted session is gone", |st, _| st == 404).await;
    let resp = common::http().delete(&url).send().await.expect("DELETE");
    assert_eq!(resp.status().as_u16(), 404, "not connected any more");
}

async fn idempotency_key_holds_across_pods(fleet: &Fleet) {
    let s = fleet.name("idem");
    let (mut client, _) = fleet.c().session(&s).await;
    let path = format!("/v1/sessions/{s}/messages");
    let key = [("Idempotency-Key", "idem-key-1")];
    let (s1, b1) = post_json(&fleet.a().http(&path), json!({"data": "once"}), &key).await;
    let (s2, b2) = post_json(&fleet.b().http(&path), json!({"data": "once"}), &key).await;
    assert_eq!((s1, s2), (202, 202), "{b1} {b2}");
    assert_eq!(b1["offset"], b2["offset"], "the retry via pod-b");
    let (s3, b3) = fleet.a().post_session(&s, json!("next")).await;
    assert_eq!(s3, 202);
    let first = client.recv_json().await;
    assert_eq!(first["data"], "once");
    assert_eq!(first["offset"], b1["offset"]);
    let second = client.recv_json().await;
    assert_eq!(
        second["data"], "next",
        "the retry must not be delivered twice: {second}"
    );
    assert_eq!(second["offset"], b3["offset"]);
    // Channels too.
    let channel = fleet.name("idem-ch");
    let path = format!("/v1/channels/{channel}/messages");
    let (s1, b1) = post_json(&fleet.b().http(&path), json!({"data": 1}), &key).await;
    let (s2, b2) = post_json(&fleet.c().http(&path), json!({"data": 1}), &key).await;
    assert_eq!((s1, s2), (202, 202), "{b1} {b2}");
    assert_eq!(b1["offset"], b2["offset"], "channel retry via pod-c");
}

async fn resume_on_a_different_pod_delivers_exactly_the_rest(fleet: &Fleet) {
    let s = fleet.name("resume");
    let (mut client, _) = fleet.a().session(&s).await;
    let mut offsets = Vec::new();
    for i in 0..3 {
        let (status, body) = fleet.b().post_session(&s, json!(i)).await;
        assert_eq!(status, 202);
        offsets.push(offset_of(&body));
        assert_eq!(client.recv_json().await["data"], json!(i));
    }
    client.close().await;
    let lookup = fleet.a().http(&format!("/v1/sessions/{s}"));
    until_get(&lookup, "the closed session is released", |st, _| st == 404).await;
    for i in 3..6 {
        let (status, body) = fleet.c().post_session(&s, json!(i)).await;
        assert_eq!(status, 202);
        offsets.push(offset_of(&body));
    }
    let (mut resumed, welcome) = fleet.b().session(&format!("{s}&last={}", offsets[2])).await;
    assert_eq!(welcome["resumed"], true);
    assert_eq!(welcome["gap"], false);
    for (i, offset) in offsets.iter().enumerate().skip(3) {
        let msg = resumed.recv_json().await;
        assert_eq!(msg["data"], json!(i), "{msg}");
        assert_eq!(&offset_of(&msg), offset);
    }
    let (status, body) = fleet.a().post_session(&s, json!("live")).await;
    assert_eq!(status, 202);
    let msg = resumed.recv_json().await;
    assert_eq!(msg["data"], "live", "{msg}");
    assert_eq!(msg["offset"], body["offset"]);
    resumed.send_json(json!({"type":"ping","id":"end"})).await;
    let next = resumed.recv_json().await;
    assert_eq!(next["type"], "pong", "nothing more may arrive, got {next}");
}

async fn upstream_events_land_in_the_redis_stream(fleet: &Fleet) {
    let s = fleet.name("up");
    let (mut client, _) = fleet.a().session(&s).await;
    let ack = client
        .request(json!({"type":"upstream","data":{"k":"v","s":s}}), 1)
        .await;
    assert_eq!(ack, json!({"type":"ack","id":1}));
    client.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (entries, events) = loop {
        let entries = xrange(&fleet.redis_url, fleet.cluster, "wsfleet:upstream").await;
        let events: Vec<Value> = entries
            .iter()
            .filter_map(|e| e.json())
            .filter(|e| e["session"] == s.as_str())
            .collect();
        let kinds: BTreeSet<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
        if ["connect", "upstream", "disconnect"]
            .iter()
            .all(|k| kinds.contains(k))
        {
            break (entries, events);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connect, upstream and disconnect events of {s} never all appeared in \
             XRANGE wsfleet:upstream; entries: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for event in &events {
        assert_eq!(event["pod"], "pod-a", "{event}");
        let ts = event["ts"].as_str().expect("ts");
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{ts}"
        );
    }
    let find = |kind: &str| {
        let matching: Vec<&Value> = events.iter().filter(|e| e["event"] == kind).collect();
        assert_eq!(matching.len(), 1, "one {kind} event expected: {events:?}");
        matching[0].clone()
    };
    assert_eq!(find("connect")["data"], Value::Null);
    assert_eq!(find("upstream")["data"], json!({"k":"v","s":s}));
    assert_eq!(find("disconnect")["data"]["code"], 1000);
    // Stream entry ids are Redis ids, in order connect < upstream < disconnect.
    let pos = |kind: &str| {
        entries
            .iter()
            .position(|e| {
                e.json()
                    .is_some_and(|j| j["session"] == s.as_str() && j["event"] == kind)
            })
            .expect("entry")
    };
    assert!(pos("connect") < pos("upstream") && pos("upstream") < pos("disconnect"));
}

// ------------------------------------------------------------ harness checks

/// The harness itself: persistence survives stop + restart, its absence
/// does not; `kill` and restart on the same port work.
#[tokio::test]
async fn harness_redis_server_restarts_with_and_without_persistence() {
    let mut durable = RedisServer::start_with(RedisOptions {
        persistent: true,
        ..Default::default()
    })
    .await;
    let mut volatile = RedisServer::start().await;
    for r in [&durable, &volatile] {
        assert!(r.cli(&["set", "k", "v"]).await.contains("OK"));
    }
    durable.stop().await;
    volatile.stop().await;
    assert!(!redis_pings(durable.port()).await, "stopped");
    durable.restart().await;
    volatile.restart().await;
    assert_eq!(durable.cli(&["get", "k"]).await.trim(), "v");
    assert_eq!(volatile.cli(&["get", "k"]).await.trim(), "");
    durable.kill().await;
    assert!(!redis_pings(durable.port()).await, "killed");
    durable.restart().await;
    assert_eq!(durable.cli(&["get", "k"]).await.trim(), "v", "fsync always");
}

#[tokio::test]
async fn harness_redis_cluster_has_three_masters_covering_all_slots() {
    let cluster = RedisCluster::start(3).await;
    assert_eq!(cluster.urls().split(',').count(), 3);
    let nodes = cluster.nodes[0].cli(&["cluster", "nodes"]).await;
    assert_eq!(nodes.matches("master").count(), 3, "{nodes}");
    // Keys land on different nodes and are reachable through the cluster client.
    let (url, port) = (cluster.urls(), cluster.nodes[1].port());
    let out = common::redis::redis_cli(port, &["-c", "xadd", "{t}x", "*", "f", "{\"a\":1}"]).await;
    assert!(out.contains('-'), "{out}");
    let entries = xrange(&url, true, "{t}x").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].json(), Some(json!({"a":1})));
}
