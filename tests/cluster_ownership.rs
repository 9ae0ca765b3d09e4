//! Cluster mode: ownership that cannot be confused, and durability that
//! says what it knows (issue 8). Real `redis-server`s and real pods; Redis
//! is made to lose records, pause writes, run out of memory and restart
//! empty, and each test checks the invariant that must hold across it.
//!
//! docs/architecture.md, "Ownership and durability (Redis)", lists which
//! test proves which invariant.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{Pod, RedisOptions, RedisServer, eventually_within, xrange};
use common::{Client, Ended, get_json, metric, post_json};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// Several tests pause Redis or wait on WAIT: one at a time on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn log_key(session: &str) -> String {
    format!("wsf:{{s:{session}}}:log")
}
fn owner_key(session: &str) -> String {
    format!("wsf:{{s:{session}}}:owner")
}
fn claim_key(session: &str) -> String {
    format!("wsf:{{s:{session}}}:claim")
}
/// The sorted set of live instances: deleting it is what Redis shows a pod
/// whose instance lease lapsed (its next heartbeat finds no lease).
const INSTANCES: &str = "wsf:insts";

/// The counter older versions kept the epoch in.
fn old_epoch_key(session: &str) -> String {
    format!("wsf:{{s:{session}}}:epoch")
}

fn offset_of(v: &Value) -> String {
    v["offset"]
        .as_str()
        .unwrap_or_else(|| panic!("no offset in {v}"))
        .to_string()
}

async fn post_keyed(pod: &Pod, session: &str, data: Value, key: &str) -> (u16, Value) {
    post_json(
        &pod.http(&format!("/v1/sessions/{session}/messages")),
        json!({ "data": data }),
        &[("Idempotency-Key", key)],
    )
    .await
}

/// Reads until the connection ends or `within` passes; `None` if it is
/// still open then.
async fn end_within(client: &mut Client, within: Duration) -> Option<(Vec<Value>, Ended)> {
    tokio::time::timeout(within, client.recv_until_end())
        .await
        .ok()
}

async fn wait_ready(pod: &Pod) {
    eventually_within(Duration::from_secs(15), "/readyz 200", || async {
        get_json(&pod.http("/readyz")).await.0 == 200
    })
    .await;
}

async fn metrics_of(pod: &Pod) -> String {
    common::http()
        .get(pod.http("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

// ------------------------------------------- 1. claim identity (trap 15)

/// How Redis forgets a session's epoch.
enum Forget {
    /// The epoch records of this and older versions, and the owner record.
    EpochRecords,
    /// Everything: a restart without persistence.
    Everything,
}

/// Two connections of one session on one pod; between their claims Redis
/// forgets the session's epoch, so both get the same epoch. The old one's
/// release arrives after the new one owns the session: it must remove
/// nothing, here or in Redis.
async fn late_release_after_epoch_loss(forget: Forget) {
    let mut redis = RedisServer::start().await;
    // A long lease: no renewal runs during the test and tidies up for it.
    let a = Pod::start("own-late", &redis.url(), &["--session-lease-s", "60"]).await;
    let s = "late";
    let (mut old, _) = a.session(s).await;
    match forget {
        Forget::EpochRecords => {
            let (epoch, claim, owner) = (old_epoch_key(s), claim_key(s), owner_key(s));
            redis.cli(&["del", &epoch, &claim, &owner]).await;
        }
        Forget::Everything => redis.restart().await,
    }
    wait_ready(&a).await;
    let (mut new, _) = a.session(s).await;
    let (_, ended) = end_within(&mut old, Duration::from_secs(10))
        .await
        .expect("the older connection is closed");
    assert!(
        matches!(ended, Ended::Closed(4409) | Ended::Closed(1012)),
        "older connection: {ended:?}"
    );
    // The old connection has released by now (its task ended). The new one
    // still owns the session, locally and in Redis.
    let (status, body) = a.post_session(s, json!("after-late-release")).await;
    assert_eq!(status, 202, "{body}");
    let msg = new.recv_json().await;
    assert_eq!(msg["data"], "after-late-release", "{msg}");
    let (status, info) = a.get(&format!("/v1/sessions/{s}")).await;
    assert_eq!(status, 200, "the newer owner's record was removed: {info}");
    assert_eq!(info["pod"], "own-late");
    new.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_release_never_removes_a_newer_owner_when_the_epoch_record_is_lost() {
    let _serial = SERIAL.lock().await;
    late_release_after_epoch_loss(Forget::EpochRecords).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_release_never_removes_a_newer_owner_after_redis_restarts_empty() {
    let _serial = SERIAL.lock().await;
    late_release_after_epoch_loss(Forget::Everything).await;
}

// ---------------------------------------------- 2. the fence (trap 3)

/// A pod cut off from Redis for longer than the lease comes back: its
/// instance lease lapsed and its owner record was swept. If the session
/// moved meanwhile (claimed elsewhere, maybe released again), its check
/// must close the connection 4409 and must not re-create the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_never_re_owns_a_session_that_moved() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let a = Pod::start("own-fence", &redis.url(), &["--session-lease-s", "3"]).await;
    // What the claim record says after the session moved: claimed by a
    // connection of another process (still live), or claimed and released.
    let cases = [
        ("moved", "9 00000000000000ff 17 pod-elsewhere"),
        ("moved-released", "9"),
    ];
    let mut clients = Vec::new();
    for (s, _) in cases {
        clients.push(a.session(s).await.0);
    }
    for (s, record) in cases {
        // The record was swept and someone else claimed meanwhile.
        redis.cli(&["del", &owner_key(s)]).await;
        redis.cli(&["set", &claim_key(s), record]).await;
        redis.cli(&["incr", &old_epoch_key(s)]).await;
    }
    redis.cli(&["del", INSTANCES]).await;
    for ((s, _), client) in cases.iter().zip(clients.iter_mut()) {
        let (_, ended) = end_within(client, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{s}: the stale connection was not fenced"));
        assert_eq!(ended, Ended::Closed(4409), "{s}");
        let exists = redis.cli(&["exists", &owner_key(s)]).await;
        assert_eq!(exists.trim(), "0", "{s}: the owner record was re-created");
    }
}

/// When Redis has no trace of a session's claim at all (it lost its data),
/// nothing proves that nobody claimed since: the connection is asked to
/// reconnect (`reconnect` + 1012), claims again, and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_claim_redis_forgot_is_asked_to_reconnect() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let flags = ["--session-lease-s", "3", "--reconnect-jitter-ms", "200"];
    let a = Pod::start("own-forgot", &redis.url(), &flags).await;
    let (mut lost, _) = a.session("forgotten").await;
    let (mut lapsed, _) = a.session("lapsed").await;
    let (status, body) = a.post_session("forgotten", json!("before")).await;
    assert_eq!(status, 202, "{body}");
    let last = offset_of(&lost.recv_json().await);
    redis
        .cli(&[
            "del",
            &owner_key("forgotten"),
            &claim_key("forgotten"),
            &old_epoch_key("forgotten"),
        ])
        .await;
    // Only the record was swept here: the claim record still names it, so
    // nobody claimed since and the record is restored.
    redis.cli(&["del", &owner_key("lapsed")]).await;
    // What Redis looks like after it lost data: no instance lease either.
    redis.cli(&["del", INSTANCES]).await;

    let (frames, ended) = end_within(&mut lost, Duration::from_secs(10))
        .await
        .expect("the connection whose claim was forgotten is closed");
    assert_eq!(ended, Ended::Closed(1012), "{frames:?}");
    let notice = frames.last().expect("a reconnect frame before the close");
    assert_eq!(notice["type"], "reconnect", "{frames:?}");
    assert!(notice["after_ms"].as_u64().is_some_and(|ms| ms <= 200));
    let (mut again, welcome) = a.session(&format!("forgotten&last={last}")).await;
    assert_eq!(welcome["resumed"], true);
    let (status, _) = a.post_session("forgotten", json!("after")).await;
    assert_eq!(status, 202);
    assert_eq!(again.recv_json().await["data"], "after");

    eventually_within(
        Duration::from_secs(10),
        "the lapsed owner record is restored",
        || async { redis.cli(&["exists", &owner_key("lapsed")]).await.trim() == "1" },
    )
    .await;
    lapsed.assert_alive().await;
    let (status, _) = a.post_session("lapsed", json!("still here")).await;
    assert_eq!(status, 202);
    assert_eq!(lapsed.recv_json().await["data"], "still here");
}

// ------------------- 2b. liveness per instance, not per session (trap 17)

/// Sum of `calls=` over Redis's `INFO commandstats`.
async fn commands_run(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["info", "commandstats"]).await;
    stats
        .lines()
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Idle connections cost Redis nothing at rest: over several upkeep
/// periods, a pod holding 300 idle sessions runs a handful of commands per
/// period, as one holding none would. Per-session renewal (the old design)
/// ran 300 scripts every period here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_cost_redis_no_commands_at_rest() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    // Upkeep every second.
    let a = Pod::start("own-idle", &redis.url(), &["--session-lease-s", "3"]).await;
    const SESSIONS: usize = 300;
    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        clients.push(a.session(&format!("idle-{i}")).await.0);
    }
    // Past the first beats after the claims.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.cli(&["config", "resetstat"]).await;
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let commands = commands_run(&redis).await;
    // ~4 upkeep periods of a few commands, the repair loop, and the
    // commandstats reads themselves; 1,200 with a renewal per session.
    assert!(
        commands < 120,
        "{commands} Redis commands in {window:?} with {SESSIONS} idle sessions: upkeep grows with connections"
    );
    // Still owned and routed.
    let (status, body) = a.post_session("idle-7", json!("still routed")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(clients[7].recv_json().await["data"], "still routed");
}

/// A pod that dies leaves owner records naming its instance: a live pod
/// sweeps them once the instance's lease lapses, so lookups stop naming
/// the dead pod and Redis keeps nothing of the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pods_sessions_are_swept_once_its_lease_lapses() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let flags = ["--session-lease-s", "3"];
    let mut a = Pod::start("own-dead-a", &redis.url(), &flags).await;
    let b = Pod::start("own-dead-b", &redis.url(), &flags).await;
    let sessions = ["dead-1", "dead-2", "dead-3"];
    let mut clients = Vec::new();
    for s in sessions {
        clients.push(a.session(s).await.0);
    }
    let instances = redis.cli(&["zrange", INSTANCES, "0", "-1"]).await;
    assert_eq!(instances.lines().count(), 2, "{instances}");
    let (status, info) = b.get("/v1/sessions/dead-1").await;
    assert_eq!((status, info["pod"].as_str()), (200, Some("own-dead-a")));
    a.kill9().await;
    drop(clients);
    eventually_within(
        Duration::from_secs(15),
        "the dead pod's owner records are swept",
        || async {
            let mut all_gone = true;
            for s in sessions {
                all_gone &= redis.cli(&["exists", &owner_key(s)]).await.trim() == "0";
            }
            all_gone
        },
    )
    .await;
    let (status, _) = b.get("/v1/sessions/dead-2").await;
    assert_eq!(status, 404, "a swept session is not connected");
    eventually_within(
        Duration::from_secs(5),
        "the instance is forgotten",
        || async { redis.cli(&["zcard", INSTANCES]).await.trim() == "1" },
    )
    .await;
    let leftovers = redis.cli(&["keys", "wsf:inst:*"]).await;
    assert!(
        leftovers.trim().is_empty(),
        "instance keys left: {leftovers}"
    );
    assert!(
        metric(
            &metrics_of(&b).await,
            "wsfleet_bus_ownership_events_total{event=\"swept\"}"
        ) >= 3.0
    );
    // The sessions' logs are untouched: a reconnect elsewhere gets what was
    // sent meanwhile.
    let (status, body) = b.post_session("dead-3", json!("after the death")).await;
    assert_eq!(status, 202, "{body}");
    let (mut again, _) = b.session("dead-3&last=0-0").await;
    assert_eq!(again.recv_json().await["data"], "after the death");
}

/// A pod paused for longer than its lease (a GC-like stall, a partition)
/// comes back after a live pod swept its records. The session that was
/// claimed elsewhere meanwhile is closed 4409; the one nobody claimed gets
/// its record back and what was sent to it meanwhile, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_paused_past_its_lease_fences_what_moved_and_keeps_the_rest() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let flags = ["--session-lease-s", "3"];
    let a = Pod::start("own-pause-a", &redis.url(), &flags).await;
    let b = Pod::start("own-pause-b", &redis.url(), &flags).await;
    let (mut moved, _) = a.session("pause-moved").await;
    let (mut stayed, _) = a.session("pause-stayed").await;
    assert!(common::redis::signal(a.pid(), "-STOP"), "SIGSTOP");
    let resumed = scopeguard(a.pid());
    eventually_within(
        Duration::from_secs(15),
        "the paused pod's records are swept",
        || async {
            redis
                .cli(&["exists", &owner_key("pause-stayed")])
                .await
                .trim()
                == "0"
        },
    )
    .await;
    let (mut newer, _) = b.session("pause-moved").await;
    let (status, body) = b.post_session("pause-stayed", json!("while paused")).await;
    assert_eq!(status, 202, "{body}");
    drop(resumed); // SIGCONT
    let (_, ended) = end_within(&mut moved, Duration::from_secs(10))
        .await
        .expect("the moved session's stale connection is fenced");
    assert_eq!(ended, Ended::Closed(4409));
    assert_eq!(stayed.recv_json().await["data"], "while paused");
    eventually_within(
        Duration::from_secs(10),
        "the record is restored",
        || async {
            redis
                .cli(&["hget", &owner_key("pause-stayed"), "pod"])
                .await
                .trim()
                == "own-pause-a"
        },
    )
    .await;
    let (status, body) = b.post_session("pause-stayed", json!("after")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(stayed.recv_json().await["data"], "after");
    stayed.assert_alive().await;
    // The newer connection was never disturbed.
    let (status, _) = a
        .post_session("pause-moved", json!("to the newer one"))
        .await;
    assert_eq!(status, 202);
    assert_eq!(newer.recv_json().await["data"], "to the newer one");
    // The sweep deleted pod-a's session set; the check put back what it
    // kept, so pod-a's death now still frees the session.
    let mut a = a;
    a.kill9().await;
    drop(stayed);
    eventually_within(
        Duration::from_secs(15),
        "the restored record is swept after the pod dies",
        || async {
            redis
                .cli(&["exists", &owner_key("pause-stayed")])
                .await
                .trim()
                == "0"
        },
    )
    .await;
}

/// Sends SIGCONT when dropped, so a failing assertion never leaves a pod
/// stopped.
fn scopeguard(pid: u32) -> impl Drop {
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            common::redis::signal(self.0, "-CONT");
        }
    }
    Cont(pid)
}

// ------------------------- 3. concurrent claims of one session, one pod

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_on_one_pod_leave_exactly_the_newest_alive() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let flags = ["--session-lease-s", "3"];
    let a = Pod::start("own-race-a", &redis.url(), &flags).await;
    let b = Pod::start("own-race-b", &redis.url(), &flags).await;
    let s = "race";
    let connects = (0..24).map(|_| {
        let url = a.ws_url(&format!("session={s}"));
        tokio::spawn(async move {
            let mut client = Client::connect(&url).await;
            let welcome = client.recv_json().await;
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            client
        })
    });
    let mut clients: Vec<Client> = join_all(connects)
        .await
        .into_iter()
        .map(|c| c.expect("connect task"))
        .collect();
    // Longer than three renewals: a survivor Redis does not name as the
    // owner would be fenced meanwhile.
    let ends = join_all(
        clients
            .iter_mut()
            .map(|c| end_within(c, Duration::from_secs(4))),
    )
    .await;
    let open: Vec<usize> = (0..ends.len()).filter(|&i| ends[i].is_none()).collect();
    assert_eq!(open.len(), 1, "survivors: {open:?}; ends: {ends:?}");
    for (_, ended) in ends.iter().flatten() {
        assert_eq!(*ended, Ended::Closed(4409), "{ends:?}");
    }
    let survivor = &mut clients[open[0]];
    // The survivor is the owner Redis names, and that owner holds the
    // newest epoch ever given for the session.
    let owner_epoch = redis.cli(&["hget", &owner_key(s), "epoch"]).await;
    let claim = redis.cli(&["get", &claim_key(s)]).await;
    assert_eq!(
        claim.split_whitespace().next(),
        Some(owner_epoch.trim()),
        "owner record {owner_epoch:?} vs claim record {claim:?}"
    );
    let (status, body) = b.post_session(s, json!("to the survivor")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(survivor.recv_json().await["data"], "to the survivor");
    survivor.assert_alive().await;
}

// ------------------------------------------------ 4. WAIT on its own

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_proceed_while_a_wait_for_replicas_is_outstanding() {
    let _serial = SERIAL.lock().await;
    // No replica ever answers this WAIT: it runs for its whole timeout
    // (half of --redis-timeout-ms). 8 s of it: the session below must
    // connect inside that window even on a loaded 2-core machine (4 s was
    // flaky there).
    let redis = RedisServer::start().await;
    let flags = ["--redis-wait-replicas", "1", "--redis-timeout-ms", "16000"];
    let a = Pod::start("own-wait", &redis.url(), &flags).await;
    let url = a.http("/v1/sessions/waited/messages");
    let post = tokio::spawn(async move {
        post_json(
            &url,
            json!({"data": "needs a replica"}),
            &[("Idempotency-Key", "w1")],
        )
        .await
    });
    eventually_within(Duration::from_secs(5), "a WAIT blocks in Redis", || async {
        redis
            .cli(&["info", "clients"])
            .await
            .lines()
            .any(|l| l.trim() == "blocked_clients:1")
    })
    .await;
    let (mut client, welcome) = a.session("claimed-meanwhile").await;
    assert_eq!(welcome["type"], "welcome");
    assert!(
        !post.is_finished(),
        "the claim waited for the WAIT to end: they share a connection"
    );
    client.assert_alive().await;
    let (status, body) = post.await.expect("post task");
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("replicas"), "{message}");
    // On the primary all along, once.
    assert_eq!(
        xrange(&redis.url(), false, &log_key("waited")).await.len(),
        1
    );
}

// -------------------------------------------- 5. outcome unknown (504)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_without_a_reply_is_504_and_its_retry_returns_the_first_offset() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let a = Pod::start("own-504", &redis.url(), &["--redis-timeout-ms", "300"]).await;
    let s = "unknown";
    // Scripts loaded, sender connected, before Redis stops answering writes.
    let (status, _) = a.post_session(s, json!("warm-up")).await;
    assert_eq!(status, 202);
    let (mut sender, _) = a.session("unknown-sender").await;

    let paused_for = Duration::from_millis(2000);
    let pause = redis
        .cli(&[
            "client",
            "pause",
            &paused_for.as_millis().to_string(),
            "write",
        ])
        .await;
    assert_eq!(pause.trim(), "OK", "{pause}");
    let paused_at = Instant::now();
    let (status, body) = post_keyed(&a, s, json!("once"), "k-unknown").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Idempotency-Key"), "{message}");
    let reply = sender
        .request(json!({"type": "send", "session": s, "data": "frame"}), 5)
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "timeout", "{reply}");
    assert!(
        paused_at.elapsed() < paused_for,
        "Redis resumed too early for this test"
    );

    // Redis runs the paused appends when the pause ends.
    let log = log_key(s);
    eventually_within(
        Duration::from_secs(10),
        "the paused appends ran",
        || async { xrange(&redis.url(), false, &log).await.len() == 3 },
    )
    .await;
    let (status, body) = post_keyed(&a, s, json!("once"), "k-unknown").await;
    assert_eq!(status, 202, "{body}");
    let entries = xrange(&redis.url(), false, &log).await;
    let stored: Vec<&str> = entries
        .iter()
        .filter(|e| e.fields.iter().any(|(k, v)| k == "d" && v == "\"once\""))
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(stored, [offset_of(&body).as_str()], "{entries:?}");
    assert_eq!(
        entries.len(),
        3,
        "the retry stored a duplicate: {entries:?}"
    );
    let metrics = metrics_of(&a).await;
    assert!(
        metric(&metrics, "wsfleet_bus_outcome_unknown_total") >= 2.0,
        "{metrics}"
    );
}

// ------------------------------------------------------ 6. Redis OOM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_is_503_unready_and_recovers_when_memory_frees() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start_with(RedisOptions {
        persistent: false,
        extra_args: ["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"]
            .map(String::from)
            .to_vec(),
    })
    .await;
    let a = Pod::start("own-oom", &redis.url(), &[]).await;
    let (mut client, _) = a.session("oom-reader").await;
    let big = "x".repeat(48 * 1024);
    let mut refusal = None;
    for i in 0..1000 {
        let (status, body) = a.post_session(&format!("oom-{}", i % 8), json!(big)).await;
        if status != 202 {
            refusal = Some((status, body));
            break;
        }
    }
    let (status, body) = refusal.expect("Redis never ran out of memory");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("out of memory") && message.contains("maxmemory"),
        "{message}"
    );
    let (status, ready) = get_json(&a.http("/readyz")).await;
    assert_eq!(status, 503, "{ready}");
    let reason = ready["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("out of memory"), "{ready}");
    let metrics = metrics_of(&a).await;
    assert!(
        metric(&metrics, "wsfleet_bus_oom_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "wsfleet_bus_out_of_memory"), 1.0);
    // Connections that do not need to write carry on.
    client.assert_alive().await;

    redis.cli(&["flushall"]).await;
    wait_ready(&a).await;
    assert_eq!(
        metric(&metrics_of(&a).await, "wsfleet_bus_out_of_memory"),
        0.0
    );
    let (status, body) = a.post_session("oom-after", json!("fits again")).await;
    assert_eq!(status, 202, "{body}");
}

// --------------------------------------- 7. upstream stream capped by age

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_stream_drops_events_older_than_its_age_cap() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let stream = "own:upstream";
    let flags = ["--upstream-stream", stream, "--upstream-max-age-s", "1"];
    let a = Pod::start("own-up", &redis.url(), &flags).await;
    let sessions_in = async |what: &str| -> Vec<String> {
        let entries = xrange(&redis.url(), false, stream).await;
        let sessions: Vec<String> = entries
            .iter()
            .filter_map(|e| e.json())
            .map(|v| v["session"].as_str().unwrap_or_default().to_string())
            .collect();
        eprintln!("{what}: {sessions:?}");
        sessions
    };
    let (old, _) = a.session("up-old").await;
    old.close().await;
    eventually_within(Duration::from_secs(10), "the old events", || async {
        sessions_in("before").await.len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (_new, _) = a.session("up-new").await;
    eventually_within(Duration::from_secs(10), "old events trimmed", || async {
        let sessions = sessions_in("after").await;
        !sessions.is_empty() && sessions.iter().all(|s| s == "up-new")
    })
    .await;
}

// ------------------------------------------- 8. gaps after Redis lost data

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_redis_lost_the_session_log_reports_a_gap() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start().await;
    let a = Pod::start("own-gap", &redis.url(), &[]).await;
    let s = "gapped";
    let (mut client, _) = a.session(s).await;
    for data in ["m1", "m2"] {
        assert_eq!(a.post_session(s, json!(data)).await.0, 202);
    }
    let m1 = offset_of(&client.recv_json().await);
    let m2 = offset_of(&client.recv_json().await);
    client.close().await;
    // Control: nothing lost, nothing new after m2; m2 follows m1.
    for (last, gap, replayed) in [(&m2, false, 0), (&m1, false, 1)] {
        let (mut c, welcome) = a.session(&format!("{s}&last={last}")).await;
        assert_eq!(welcome["gap"], gap, "last={last}: {welcome}");
        for _ in 0..replayed {
            assert_eq!(c.recv_json().await["data"], "m2");
        }
        c.close().await;
    }

    // Redis restarts empty; a new message starts a new log.
    redis.restart().await;
    wait_ready(&a).await;
    let (status, body) = a.post_session(s, json!("m3")).await;
    assert_eq!(status, 202, "{body}");
    let (mut c, welcome) = a.session(&format!("{s}&last={m2}")).await;
    assert_eq!(welcome["gap"], true, "a log that restarted: {welcome}");
    assert_eq!(c.recv_json().await["data"], "m3");
    c.close().await;

    // Everything gone, nothing new: nothing proves that nothing was lost.
    redis.cli(&["flushall"]).await;
    let m3 = offset_of(&body);
    let (c, welcome) = a.session(&format!("{s}&last={m3}")).await;
    assert_eq!(welcome["gap"], true, "a log that vanished: {welcome}");
    c.close().await;
}

/// The same rule for channels, straight on the bus (the subscribe `ack`
/// renders `Replay::gap`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_replay_after_redis_lost_the_log_reports_a_gap() {
    use serde_json::value::RawValue;
    use wsfleet::bus::redis::{RedisBus, RedisOptions as BusOptions, Target};
    use wsfleet::bus::{Bus, Outgoing, Retention};
    use wsfleet::protocol::ChannelName;

    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let opts = BusOptions {
        target: Target {
            urls: vec![redis.url()],
            cluster: false,
            ca_pem: None,
        },
        lease: Duration::from_secs(30),
        retention: Retention {
            max_messages: 100,
            max_age_ms: 300_000,
        },
        upstream_stream: "own:unused".into(),
        timeout: Duration::from_secs(2),
        wait_replicas: 0,
        route_in_script: true,
        upstream_max_age: Duration::ZERO,
        reconnect_jitter_ms: 0,
        max_message_bytes: 64 * 1024,
        delivery_repair: Duration::from_secs(2),
    };
    let pod = Arc::new(wsfleet::pod::LocalPod::new("own-gap-bus".into(), 10));
    let metrics = Arc::new(wsfleet::telemetry::Metrics::new());
    let bus = RedisBus::connect(opts, pod, metrics).await.expect("bus");
    let channel = ChannelName::parse("gapped.channel").expect("channel");
    let data = RawValue::from_string("\"m\"".into()).expect("json");
    let publish = async || {
        let msg = Outgoing {
            data: &data,
            from: None,
            idempotency_key: None,
        };
        bus.publish(&channel, msg).await.expect("publish")
    };
    let o1 = publish().await;
    let o2 = publish().await;
    let replay = bus.channel_log(&channel, Some(o1)).await.expect("replay");
    assert!(!replay.gap && replay.entries.len() == 1, "{replay:?}");
    let replay = bus.channel_log(&channel, Some(o2)).await.expect("replay");
    assert!(!replay.gap && replay.entries.is_empty(), "{replay:?}");

    redis.cli(&["flushall"]).await;
    let o3 = publish().await;
    let replay = bus.channel_log(&channel, Some(o2)).await.expect("replay");
    assert!(replay.gap, "a log that restarted: {replay:?}");
    assert_eq!(replay.entries.len(), 1);
    assert_eq!(replay.entries[0].offset, o3);

    redis.cli(&["flushall"]).await;
    let replay = bus.channel_log(&channel, Some(o3)).await.expect("replay");
    assert!(replay.gap, "a log that vanished: {replay:?}");
    assert!(replay.entries.is_empty());
    // Without `since` there is nothing to prove.
    assert!(!bus.channel_log(&channel, None).await.expect("replay").gap);
}

// ------------------------------------------- the scripts, one by one

/// CLAIM, VERIFY and RELEASE against a real Redis, for every state the two
/// records of a session can be in: they match the holder, never the epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_scripts_match_the_holder_never_the_epoch() {
    use wsfleet::bus::redis::scripts;

    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start().await;
    let client = ::redis::Client::open(redis.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    const ME: (&str, &str) = ("00000000000000aa", "1");
    const OTHER: (&str, &str) = ("00000000000000bb", "2");
    const MEMORY: &str = "600000";

    /// (what, owner record holder, claim record, caller, reply, owner after, claim after)
    type RenewCase = (
        &'static str,
        Option<(&'static str, &'static str)>,
        Option<&'static str>,
        (&'static str, &'static str),
        i64,
        Option<&'static str>,
    );
    let renew_cases: &[RenewCase] = &[
        (
            "still mine",
            Some(ME),
            Some("5 00000000000000aa 1 p"),
            ME,
            1,
            Some(ME.0),
        ),
        (
            "someone else's",
            Some(OTHER),
            Some("6 00000000000000bb 2 q"),
            ME,
            -1,
            Some(OTHER.0),
        ),
        (
            "same epoch, other holder",
            Some(OTHER),
            Some("5 00000000000000bb 2 q"),
            ME,
            -1,
            Some(OTHER.0),
        ),
        (
            "lapsed, nobody claimed since",
            None,
            Some("5 00000000000000aa 1 p"),
            ME,
            2,
            Some(ME.0),
        ),
        (
            "lapsed, claimed elsewhere since",
            None,
            Some("6 00000000000000bb 2 q"),
            ME,
            -1,
            None,
        ),
        (
            "lapsed, claimed and released since",
            None,
            Some("6"),
            ME,
            -1,
            None,
        ),
        (
            "lapsed, and my own claim released",
            None,
            Some("5"),
            ME,
            -1,
            None,
        ),
        ("no trace of any claim", None, None, ME, -2, None),
    ];
    for (i, (what, owner, claim, caller, want, owner_after)) in renew_cases.iter().enumerate() {
        let (owner_key, claim_key) = (format!("o{{r{i}}}"), format!("c{{r{i}}}"));
        if let Some((inst, c)) = owner {
            redis
                .cli(&[
                    "hset", &owner_key, "pod", "p", "inst", inst, "conn", c, "epoch", "5",
                ])
                .await;
        }
        if let Some(claim) = claim {
            redis.cli(&["set", &claim_key, claim]).await;
        }
        let mut invocation = scripts::VERIFY.prepare_invoke();
        invocation
            .key(&owner_key)
            .key(&claim_key)
            .arg("p")
            .arg(caller.0)
            .arg(caller.1)
            .arg(0);
        let reply: i64 = invocation.invoke_async(&mut conn).await.expect("VERIFY");
        assert_eq!(reply, *want, "VERIFY: {what}");
        let inst = redis.cli(&["hget", &owner_key, "inst"]).await;
        assert_eq!(
            Some(inst.trim()).filter(|s| !s.is_empty()),
            *owner_after,
            "VERIFY: {what}: owner record after"
        );
    }

    /// (what, owner record holder, claim record, reply, owner left, claim after)
    type ReleaseCase = (
        &'static str,
        Option<(&'static str, &'static str)>,
        Option<&'static str>,
        i64,
        bool,
        &'static str,
    );
    let release_cases: &[ReleaseCase] = &[
        (
            "mine",
            Some(ME),
            Some("5 00000000000000aa 1 p"),
            1,
            false,
            "5",
        ),
        (
            "a newer owner with the same epoch",
            Some(OTHER),
            Some("5 00000000000000bb 2 q"),
            0,
            true,
            "5 00000000000000bb 2 q",
        ),
        (
            "lapsed, still my claim",
            None,
            Some("5 00000000000000aa 1 p"),
            0,
            false,
            "5",
        ),
        ("nothing left", None, None, 0, false, ""),
    ];
    for (i, (what, owner, claim, want, owner_left, claim_after)) in release_cases.iter().enumerate()
    {
        let (owner_key, claim_key) = (format!("o{{l{i}}}"), format!("c{{l{i}}}"));
        if let Some((inst, c)) = owner {
            redis
                .cli(&[
                    "hset", &owner_key, "pod", "p", "inst", inst, "conn", c, "epoch", "5",
                ])
                .await;
        }
        if let Some(claim) = claim {
            redis.cli(&["set", &claim_key, claim]).await;
        }
        let mut invocation = scripts::RELEASE.prepare_invoke();
        invocation
            .key(&owner_key)
            .key(&claim_key)
            .arg(ME.0)
            .arg(ME.1)
            .arg(MEMORY);
        let reply: i64 = invocation.invoke_async(&mut conn).await.expect("RELEASE");
        assert_eq!(reply, *want, "RELEASE: {what}");
        let left = redis.cli(&["exists", &owner_key]).await.trim() == "1";
        assert_eq!(left, *owner_left, "RELEASE: {what}: owner record left");
        let after = redis.cli(&["get", &claim_key]).await;
        assert_eq!(after.trim(), *claim_after, "RELEASE: {what}: claim record");
    }

    // CLAIM: the epoch continues from whichever record survived, and the
    // displaced holder is reported with whether it may still be live.
    /// (what, owner epoch + holder, claim record, epoch, live, displaced)
    type ClaimCase = (
        &'static str,
        Option<(&'static str, (&'static str, &'static str))>,
        Option<&'static str>,
        u64,
        i64,
        &'static str,
    );
    let claim_cases: &[ClaimCase] = &[
        ("first claim ever", None, None, 1, 0, ""),
        (
            "live owner",
            Some(("4", OTHER)),
            Some("4 00000000000000bb 2 q"),
            5,
            1,
            OTHER.0,
        ),
        ("claim record lost", Some(("4", OTHER)), None, 5, 1, OTHER.0),
        (
            "owner record lapsed",
            None,
            Some("9 00000000000000bb 2 q"),
            10,
            0,
            OTHER.0,
        ),
        ("released", None, Some("9"), 10, 0, ""),
    ];
    for (i, (what, owner, claim, epoch, live, displaced)) in claim_cases.iter().enumerate() {
        let (owner_key, claim_key) = (format!("o{{c{i}}}"), format!("c{{c{i}}}"));
        if let Some((e, (inst, c))) = owner {
            redis
                .cli(&[
                    "hset", &owner_key, "pod", "q", "inst", inst, "conn", c, "epoch", e,
                ])
                .await;
        }
        if let Some(claim) = claim {
            redis.cli(&["set", &claim_key, claim]).await;
        }
        let mut invocation = scripts::CLAIM.prepare_invoke();
        invocation
            .key(&owner_key)
            .key(&claim_key)
            .arg("p")
            .arg(ME.0)
            .arg(ME.1)
            .arg(0);
        let (got_epoch, got_live, _pod, got_inst, _conn): (u64, i64, String, String, String) =
            invocation.invoke_async(&mut conn).await.expect("CLAIM");
        assert_eq!(
            (got_epoch, got_live, got_inst.as_str()),
            (*epoch, *live, *displaced),
            "CLAIM: {what}"
        );
        let record = redis.cli(&["get", &claim_key]).await;
        assert_eq!(
            record.trim(),
            format!("{epoch} {} {} p", ME.0, ME.1),
            "CLAIM: {what}"
        );
        // No per-session lease: the records live as long as the instance.
        for key in [&owner_key, &claim_key] {
            let ttl = redis.cli(&["pttl", key]).await;
            assert_eq!(ttl.trim(), "-1", "CLAIM: {what}: {key} has a TTL");
        }
    }

    // SWEEP removes a dead instance's record only while it still names
    // that instance, and lets the claim record expire like a released one.
    // (what, owner holder, reply, owner left)
    let sweep_cases: &[(&str, (&str, &str), i64, bool)] = &[
        ("the dead instance's", OTHER, 1, false),
        ("claimed since by a live one", ME, 0, true),
    ];
    for (i, (what, holder, want, left)) in sweep_cases.iter().enumerate() {
        let (owner_key, claim_key) = (format!("o{{w{i}}}"), format!("c{{w{i}}}"));
        redis
            .cli(&[
                "hset", &owner_key, "pod", "p", "inst", holder.0, "conn", holder.1,
            ])
            .await;
        let record = format!("3 {} {} p", holder.0, holder.1);
        redis.cli(&["set", &claim_key, &record]).await;
        let mut invocation = scripts::SWEEP.prepare_invoke();
        invocation
            .key(&owner_key)
            .key(&claim_key)
            .arg(OTHER.0)
            .arg(MEMORY);
        let reply: i64 = invocation.invoke_async(&mut conn).await.expect("SWEEP");
        assert_eq!(reply, *want, "SWEEP: {what}");
        let exists = redis.cli(&["exists", &owner_key]).await.trim() == "1";
        assert_eq!(exists, *left, "SWEEP: {what}: owner record left");
        let ttl: i64 = redis
            .cli(&["pttl", &claim_key])
            .await
            .trim()
            .parse()
            .expect("pttl");
        assert_eq!(ttl > 0, *want == 1, "SWEEP: {what}: claim record ttl {ttl}");
    }

    // HEARTBEAT: first beat finds no lease (2), a running one 0, a lapsed
    // one 1; other lapsed instances are listed, running ones are not.
    let beat = |inst: &'static str, lease_ms: i64| {
        let mut invocation = scripts::HEARTBEAT.prepare_invoke();
        invocation.key("insts").arg(inst).arg(lease_ms).arg(8);
        invocation
    };
    let mut conn2 = conn.clone();
    let mut once = async |inst: &'static str, lease_ms: i64| -> (i64, Vec<String>) {
        beat(inst, lease_ms)
            .invoke_async(&mut conn2)
            .await
            .expect("HEARTBEAT")
    };
    assert_eq!(once(ME.0, 60_000).await, (2, vec![]), "first beat");
    assert_eq!(once(ME.0, 60_000).await, (0, vec![]), "running lease");
    assert_eq!(once(OTHER.0, 1).await, (2, vec![]), "other's first beat");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        once(ME.0, 60_000).await,
        (0, vec![OTHER.0.to_string()]),
        "the other's lease lapsed"
    );
    assert_eq!(once(OTHER.0, 60_000).await.0, 1, "a lapsed lease renewed");
    assert_eq!(once(ME.0, 60_000).await, (0, vec![]), "nobody lapsed");
}
