//! The delivery bound in cluster mode (traps 1 and 16): an accepted message
//! reaches a connected session, and every connected subscriber, within
//! `--delivery-repair-ms` even when the routing hop between pods fails for
//! real: Redis refuses the inbox XADD (an ACL), a reader's reply is lost
//! after Redis marked its entries delivered (a stalled server), the inbox
//! is deleted under live connections. Every check includes the last message
//! of a quiet session: no later message comes to fill its hole.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::redis::{Pod, RedisOptions, RedisServer, signal, xrange};
use common::{Client, http, metric};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// The bound the pods are configured with in these tests.
const BOUND: Duration = Duration::from_millis(1000);
/// How long a test waits for a repaired delivery: the bound plus slack for
/// a loaded 2-core machine (the bound is a contract, not a benchmark).
const WAIT: Duration = Duration::from_millis(4000);

/// These tests start several processes each: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A standalone Redis that allows `DEBUG` from loopback.
async fn redis() -> RedisServer {
    RedisServer::start_with(RedisOptions {
        persistent: false,
        extra_args: vec!["--enable-debug-command".into(), "local".into()],
    })
    .await
}

/// Creates ACL user `pods` (password `pw`) that may do everything except
/// XADD to an inbox (`wsf:inbox:*`), and, unless `hints`, except SADD: the
/// routing hop fails with NOPERM while appends to logs still work.
async fn restrict_pods_user(redis: &RedisServer, hints: bool) -> String {
    let mut args = vec!["ACL", "SETUSER", "pods", "on", ">pw", "~*", "&*", "+@all"];
    args.push("-xadd");
    if !hints {
        args.push("-sadd");
        // Instances' session sets (ownership, not routing) stay writable.
        args.push("(+sadd ~wsf:inst:*)");
    }
    // Logs (`wsf:{s:..}`, `wsf:{c:..}`) and the upstream stream stay writable.
    args.push("(+xadd ~wsf:{* ~wsfleet:*)");
    let out = redis.cli(&args).await;
    assert!(out.contains("OK"), "ACL SETUSER failed: {out}");
    format!("redis://pods:pw@127.0.0.1:{}", redis.port())
}

fn flags(extra: &[&'static str]) -> Vec<&'static str> {
    let mut f = vec!["--delivery-repair-ms", "1000"];
    f.extend_from_slice(extra);
    f
}

async fn metrics(pod: &Pod) -> String {
    http()
        .get(pod.http("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Reads `client` until every offset in `want` arrived (after dedupe by
/// offset, as a client does), each within `WAIT` of `accepted_at`; checks
/// they came in order and nothing else did. Returns the frames kept.
async fn expect_messages(
    client: &mut Client,
    channel: Option<&str>,
    want: &[String],
    accepted_at: Instant,
    what: &str,
) -> Vec<Value> {
    let deadline = accepted_at + WAIT;
    let mut seen: Vec<String> = Vec::new();
    let mut kept = Vec::new();
    while seen.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, client.ws.next()).await;
        let Ok(next) = next else {
            panic!(
                "{what}: after {WAIT:?} only {seen:?} of {want:?} arrived (bound {BOUND:?}); \
                 the routing hop failed and nothing repaired it"
            );
        };
        let frame: Value = match next {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t).expect("JSON frame"),
            Some(Ok(_)) => continue,
            other => panic!("{what}: connection ended: {other:?}"),
        };
        if frame["type"] != "message" {
            continue;
        }
        assert_eq!(
            frame["channel"].as_str(),
            channel,
            "{what}: unexpected frame {frame}"
        );
        let offset = frame["offset"].as_str().expect("offset").to_string();
        if seen.contains(&offset) {
            continue; // a duplicate: the client dedupes it
        }
        assert!(
            want.contains(&offset),
            "{what}: unexpected offset {offset} ({frame}), want {want:?}"
        );
        seen.push(offset);
        kept.push(frame);
    }
    assert_eq!(seen, want, "{what}: out of order");
    kept
}

/// POSTs `n` direct messages to `session` through `via`; returns their offsets.
async fn send_direct(via: &Pod, session: &str, n: usize, tag: &str) -> Vec<String> {
    let mut offsets = Vec::new();
    for i in 0..n {
        let (status, body) = via.post_session(session, json!({"tag": tag, "i": i})).await;
        assert_eq!(status, 202, "POST to {session}: {body}");
        offsets.push(body["offset"].as_str().expect("offset").to_string());
    }
    offsets
}

async fn publish(via: &Pod, channel: &str, n: usize, tag: &str) -> Vec<String> {
    let mut offsets = Vec::new();
    for i in 0..n {
        let (status, body) = via.post_channel(channel, json!({"tag": tag, "i": i})).await;
        assert_eq!(status, 202, "POST to channel {channel}: {body}");
        offsets.push(body["offset"].as_str().expect("offset").to_string());
    }
    offsets
}

async fn subscribe(pod: &Pod, session: &str, channel: &str) -> Client {
    let (mut client, _) = pod.session(session).await;
    let ack = client
        .request(json!({"type": "subscribe", "channel": channel}), 1)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_whose_inbox_xadd_is_refused_arrive_within_the_bound() {
    let _serial = SERIAL.lock().await;
    let redis = redis().await;
    let url = restrict_pods_user(&redis, true).await;
    // The sender routes in a step of its own (as with Redis Cluster or a
    // replica wait): its refused XADD is a separate command. The other
    // tests here refuse the hop inside the append's script.
    let a = Pod::start("pod-a", &url, &flags(&["--redis-route-in-script", "false"])).await;
    let b = Pod::start("pod-b", &url, &flags(&[])).await;

    let (mut quiet, _) = b.session("quiet-1").await;
    let mut subscriber = subscribe(&b, "sub-1", "news").await;

    // Direct messages: the last one is the last of a quiet session.
    let accepted_at = Instant::now();
    let direct = send_direct(&a, "quiet-1", 3, "direct").await;
    let frames = expect_messages(&mut quiet, None, &direct, accepted_at, "direct").await;
    assert_eq!(frames[2]["data"], json!({"tag": "direct", "i": 2}));

    // Channel messages to a subscriber on the other pod.
    let accepted_at = Instant::now();
    let published = publish(&a, "news", 3, "channel").await;
    expect_messages(
        &mut subscriber,
        Some("news"),
        &published,
        accepted_at,
        "channel",
    )
    .await;

    // One more, long after: a single message with nothing behind it.
    tokio::time::sleep(BOUND).await;
    let accepted_at = Instant::now();
    let last = send_direct(&a, "quiet-1", 1, "last").await;
    expect_messages(&mut quiet, None, &last, accepted_at, "last direct").await;

    let failures = metrics(&a).await;
    assert!(
        metric(&failures, "wsfleet_route_failures_total{kind=\"session\"}") >= 4.0,
        "the refused XADDs are counted:\n{failures}"
    );
    assert!(metric(&failures, "wsfleet_route_failures_total{kind=\"channel\"}") >= 3.0);
    let repairs = metrics(&b).await;
    assert!(
        metric(
            &repairs,
            "wsfleet_route_repairs_total{reason=\"route_failed\"}"
        ) >= 2.0,
        "the repairs are counted:\n{repairs}"
    );
    quiet.assert_alive().await;
    subscriber.assert_alive().await;
}

/// Sends `XADD <key> * <fields>` and `DEBUG SLEEP <s>` in one write, so
/// that Redis serves the blocked reader (its XREADGROUP marks the entry
/// delivered) and then stalls before the reply leaves: the reader's call
/// times out with the entry in its pending list.
async fn xadd_then_stall(port: u16, key: &str, fields: &[(String, String)], sleep_s: &str) {
    fn resp(args: &[&str]) -> String {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        out
    }
    let mut xadd: Vec<&str> = vec!["XADD", key, "*"];
    for (k, v) in fields {
        xadd.push(k);
        xadd.push(v);
    }
    let payload = resp(&xadd) + &resp(&["DEBUG", "SLEEP", sleep_s]);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to Redis");
    stream.write_all(payload.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 256];
    let mut got = String::new();
    while !got.contains("+OK") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("Redis answers after the stall")
            .expect("read");
        assert!(n > 0, "Redis closed the connection: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(!got.contains("-ERR"), "XADD + DEBUG SLEEP: {got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_whose_read_reply_timed_out_are_read_again_from_the_pending_list() {
    let _serial = SERIAL.lock().await;
    let redis = redis().await;
    // Neither the inbox XADD nor a repair hint can be written by the pods:
    // the only copy on its way to pod-b is the entry stuck in its pending list.
    let url = restrict_pods_user(&redis, false).await;
    let slow = flags(&["--redis-timeout-ms", "500"]);
    let a = Pod::start("pod-a", &url, &slow).await;
    let b = Pod::start("pod-b", &url, &slow).await;
    let (mut quiet, _) = b.session("stalled-1").await;

    let accepted_at = Instant::now();
    let offsets = send_direct(&a, "stalled-1", 1, "stalled").await;
    // The entry pod-a would have routed, written as pod-a writes it.
    let log = xrange(&redis.url(), false, "wsf:{s:stalled-1}:log").await;
    let entry = log
        .iter()
        .find(|e| e.id == offsets[0])
        .expect("the accepted message is in the log");
    let field = |name: &str| {
        entry
            .fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let fields: Vec<(String, String)> = [
        ("k", "s".to_string()),
        ("n", "stalled-1".to_string()),
        ("o", entry.id.clone()),
        ("p", field("p")),
        ("d", field("d")),
        ("f", field("f")),
        ("t", field("t")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // The reader's deadline is BLOCK (1 s) + 500 ms; the stall outlasts it.
    xadd_then_stall(redis.port(), "wsf:inbox:{pod-b}", &fields, "3").await;
    let stalled_at = Instant::now();
    expect_messages(&mut quiet, None, &offsets, stalled_at, "pending entry").await;
    let _ = accepted_at;
    let repairs = metrics(&b).await;
    assert!(
        metric(&repairs, "wsfleet_route_repairs_total{reason=\"pending\"}") >= 1.0,
        "{repairs}"
    );
    let pending = redis.cli(&["XPENDING", "wsf:inbox:{pod-b}", "pod"]).await;
    assert!(
        pending.trim_start().starts_with('0'),
        "nothing stays pending: {pending}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_inbox_does_not_strand_connected_clients() {
    let _serial = SERIAL.lock().await;
    let redis = redis().await;
    let a = Pod::start("pod-a", &redis.url(), &flags(&[])).await;
    let b = Pod::start("pod-b", &redis.url(), &flags(&[])).await;
    let (mut quiet, _) = b.session("quiet-2").await;
    let mut subscriber = subscribe(&b, "sub-2", "alerts").await;

    let before = send_direct(&a, "quiet-2", 1, "before").await;
    expect_messages(&mut quiet, None, &before, Instant::now(), "before").await;

    // Delete the inbox (stream and group) while both clients are connected,
    // and send at once, racing the reader's recovery.
    let deleted = redis.cli(&["DEL", "wsf:inbox:{pod-b}"]).await;
    assert!(deleted.contains('1'), "DEL inbox: {deleted}");
    let accepted_at = Instant::now();
    let direct = send_direct(&a, "quiet-2", 2, "after").await;
    let published = publish(&a, "alerts", 2, "after").await;
    expect_messages(&mut quiet, None, &direct, accepted_at, "direct after DEL").await;
    expect_messages(
        &mut subscriber,
        Some("alerts"),
        &published,
        accepted_at,
        "channel after DEL",
    )
    .await;

    // And again, with nothing sent until the deletion is long past.
    redis.cli(&["DEL", "wsf:inbox:{pod-b}"]).await;
    tokio::time::sleep(BOUND).await;
    let accepted_at = Instant::now();
    let direct = send_direct(&a, "quiet-2", 1, "later").await;
    let published = publish(&a, "alerts", 1, "later").await;
    expect_messages(&mut quiet, None, &direct, accepted_at, "direct later").await;
    expect_messages(
        &mut subscriber,
        Some("alerts"),
        &published,
        accepted_at,
        "channel later",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_holes_are_filled_once_per_pod_not_once_per_subscriber() {
    let _serial = SERIAL.lock().await;
    let redis = redis().await;
    // pod-a cannot route at all, pod-b can: messages published through
    // pod-a reach pod-b's subscribers only by repair, and each one through
    // pod-b arrives live with a hole before it.
    let restricted = restrict_pods_user(&redis, true).await;
    let a = Pod::start("pod-a", &restricted, &flags(&[])).await;
    let b = Pod::start("pod-b", &redis.url(), &flags(&[])).await;
    const SUBSCRIBERS: usize = 20;
    const ROUNDS: usize = 5;
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        subscribers.push(subscribe(&b, &format!("hole-sub-{i}"), "mixed").await);
    }
    let replays = |text: &str| {
        metric(
            text,
            "wsfleet_bus_command_duration_seconds_count{command=\"replay\"}",
        )
    };
    let replays_before = replays(&metrics(&b).await);
    let accepted_at = Instant::now();
    let mut want = Vec::new();
    for round in 0..ROUNDS {
        want.extend(publish(&a, "mixed", 1, &format!("via-a-{round}")).await);
        want.extend(publish(&b, "mixed", 1, &format!("via-b-{round}")).await);
    }
    // The last one has nothing behind it to reveal its hole.
    want.extend(publish(&a, "mixed", 1, "via-a-last").await);
    for (i, sub) in subscribers.iter_mut().enumerate() {
        expect_messages(
            sub,
            Some("mixed"),
            &want,
            accepted_at,
            &format!("subscriber {i}"),
        )
        .await;
    }
    let unique: HashSet<&String> = want.iter().collect();
    assert_eq!(unique.len(), want.len());
    // Trap 9: a hole costs one log read for the pod, not one per subscriber
    // (which would be SUBSCRIBERS * ROUNDS reads here).
    let read = replays(&metrics(&b).await) - replays_before;
    assert!(
        read < SUBSCRIBERS as f64,
        "{read} log reads for {ROUNDS} holes among {SUBSCRIBERS} subscribers"
    );
}

/// Reads `client` for `quiet` and fails on any message frame: what was
/// expected arrived exactly once, nothing repeats after it.
async fn assert_no_more_messages(client: &mut Client, quiet: Duration, what: &str) {
    let until = Instant::now() + quiet;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(next) = tokio::time::timeout(left, client.ws.next()).await else {
            return;
        };
        match next {
            Some(Ok(Message::Text(t))) => {
                let frame: Value = serde_json::from_str(&t).expect("JSON frame");
                assert_ne!(frame["type"], "message", "{what}: delivered twice: {frame}");
            }
            Some(Ok(_)) => {}
            other => panic!("{what}: connection ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_from_the_inbox_before_they_are_read_arrive_within_the_bound() {
    let _serial = SERIAL.lock().await;
    let redis = redis().await;
    let a = Pod::start("pod-a", &redis.url(), &flags(&[])).await;
    let b = Pod::start("pod-b", &redis.url(), &flags(&[])).await;
    let (mut quiet, _) = b.session("trim-1").await;
    let mut subscriber = subscribe(&b, "sub-trim", "trimmed").await;
    let before = send_direct(&a, "trim-1", 1, "before").await;
    expect_messages(&mut quiet, None, &before, Instant::now(), "before").await;

    // Freeze pod-b past its blocking read (1 s), so that no read of its is
    // waiting in Redis to be served the entries; route to it, then trim
    // its inbox to nothing: the routes succeeded, no hint names the logs,
    // and nothing later is sent that would reveal a hole.
    assert!(signal(b.pid(), "-STOP"), "SIGSTOP pod-b");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let direct = send_direct(&a, "trim-1", 2, "trimmed").await;
    let published = publish(&a, "trimmed", 2, "trimmed").await;
    let len = redis.cli(&["XLEN", "wsf:inbox:{pod-b}"]).await;
    let trimmed = redis
        .cli(&["XTRIM", "wsf:inbox:{pod-b}", "MAXLEN", "0"])
        .await;
    assert!(signal(b.pid(), "-CONT"), "SIGCONT pod-b");
    let resumed_at = Instant::now();
    assert_eq!(len.trim(), "4", "the 4 routes reached the inbox");
    assert_eq!(trimmed.trim(), "4", "and were trimmed unread");

    expect_messages(&mut quiet, None, &direct, resumed_at, "trimmed direct").await;
    expect_messages(
        &mut subscriber,
        Some("trimmed"),
        &published,
        resumed_at,
        "trimmed channel",
    )
    .await;
    assert_no_more_messages(&mut quiet, BOUND, "trimmed direct").await;
    assert_no_more_messages(&mut subscriber, Duration::ZERO, "trimmed channel").await;
    let repairs = metrics(&b).await;
    assert!(
        metric(
            &repairs,
            "wsfleet_route_repairs_total{reason=\"head_check\"}"
        ) >= 1.0,
        "the head check repaired the session:\n{repairs}"
    );
    assert!(metric(&repairs, "wsfleet_route_heads_checked_total") >= 2.0);
}

/// What one subscriber of the burst test saw.
#[derive(Debug, Default)]
struct Seen {
    offsets: Vec<String>,
    duplicates: usize,
    out_of_order: usize,
    /// The close code, if the server closed the connection.
    closed: Option<u16>,
}

/// Reads channel messages until `want` distinct ones arrived, the
/// connection ended, or `within` passed.
async fn read_burst(mut client: Client, want: usize, within: Duration) -> Seen {
    let until = Instant::now() + within;
    let mut seen = Seen::default();
    let mut newest: Option<(u64, u64)> = None;
    while seen.offsets.len() < want {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(next) = tokio::time::timeout(left, client.ws.next()).await else {
            break;
        };
        match next {
            Some(Ok(Message::Text(t))) => {
                let frame: Value = serde_json::from_str(&t).expect("JSON frame");
                if frame["type"] != "message" {
                    continue;
                }
                let offset = frame["offset"].as_str().expect("offset").to_string();
                let key = common::redis::offset_key(&offset);
                match newest {
                    Some(n) if key == n => seen.duplicates += 1,
                    Some(n) if key < n => {
                        if seen.offsets.contains(&offset) {
                            seen.duplicates += 1;
                        } else {
                            seen.out_of_order += 1;
                            seen.offsets.push(offset);
                        }
                    }
                    _ => {
                        newest = Some(key);
                        seen.offsets.push(offset);
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                seen.closed = Some(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                break;
            }
            Some(Ok(_)) => {}
            _ => {
                seen.closed = Some(1006);
                break;
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_burst_reaches_every_subscriber_exactly_once_in_order() {
    let _serial = SERIAL.lock().await;
    let redis = redis().await;
    // A short Redis deadline: under the burst some log reads time out,
    // which is what must never turn into a skipped message.
    let f = flags(&["--redis-timeout-ms", "200"]);
    let a = Pod::start("pod-a", &redis.url(), &f).await;
    let b = Pod::start("pod-b", &redis.url(), &f).await;
    const SUBSCRIBERS: usize = 50;
    const PUBLISHES: usize = 500;
    let mut readers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let pod = if i % 2 == 0 { &a } else { &b };
        let client = subscribe(pod, &format!("burst-sub-{i}"), "burst").await;
        readers.push(tokio::spawn(read_burst(
            client,
            PUBLISHES,
            Duration::from_secs(12),
        )));
    }
    // Publishes through both pods, 16 in flight: routes race each other
    // and the local fast path, so holes are routine.
    let started = Instant::now();
    let accepted = futures_util::stream::iter(0..PUBLISHES)
        .map(|i| {
            let pod = if i % 2 == 0 { &a } else { &b };
            async move {
                let (status, body) = pod.post_channel("burst", json!({"i": i})).await;
                (status, body["offset"].as_str().map(str::to_string))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut offsets: Vec<String> = accepted
        .iter()
        .filter(|(status, _)| *status == 202)
        .filter_map(|(_, o)| o.clone())
        .collect();
    offsets.sort_by_key(|o| common::redis::offset_key(o));
    let published_in = started.elapsed();
    assert!(
        offsets.len() * 10 >= PUBLISHES * 9,
        "most publishes are accepted: {} of {PUBLISHES}",
        offsets.len()
    );
    let mut closed = 0usize;
    let mut lost = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let mut seen = reader.await.expect("reader task");
        if let Some(code) = seen.closed {
            // A close is not a silent loss: the client resumes with `since`.
            closed += 1;
            assert_eq!(code, 1013, "subscriber {i} closed with {code}");
            continue;
        }
        assert_eq!(seen.duplicates, 0, "subscriber {i}: duplicates");
        assert_eq!(seen.out_of_order, 0, "subscriber {i}: out of order");
        seen.offsets.retain(|o| offsets.contains(o));
        if seen.offsets != offsets {
            lost.push((i, offsets.len() - seen.offsets.len()));
        }
    }
    let overflows = metric(&metrics(&a).await, "wsfleet_queue_overflows_total")
        + metric(&metrics(&b).await, "wsfleet_queue_overflows_total");
    assert!(
        lost.is_empty(),
        "{} subscribers that stayed connected missed messages (subscriber, missing): {lost:?}; \
         {} publishes in {published_in:?}",
        lost.len(),
        offsets.len()
    );
    assert!(
        closed == 0 || overflows > 0.0,
        "{closed} subscribers were closed without a queue overflow"
    );
    // Subscribers in order never read the log (issue 10's slow mode: a log
    // read per subscriber per hole, a standing queue on Redis): a hole is
    // filled once per pod, by the pod's fan-out cursor, which offers only
    // in order.
    let connection_reads = metric(&metrics(&a).await, "wsfleet_holes_filled_total")
        + metric(&metrics(&b).await, "wsfleet_holes_filled_total");
    assert_eq!(
        connection_reads, 0.0,
        "subscribers read the channel log themselves"
    );
}
