//! Embedded mode's memory budget, against the real binary: messages to
//! 100,000 never-connected sessions fill `--max-retained-bytes`, after which
//! new messages are refused with 503 naming the flag, a connected session
//! keeps working, and the process's RSS stays bounded by the budget.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use common::Client;

const BIN: &str = env!("CARGO_BIN_EXE_wsfleet");

const BUDGET: u64 = 32 * 1024 * 1024;
/// What RSS may grow beyond the budget: allocator fragmentation and free
/// lists, the HTTP connections' buffers and tasks, tokio's and hyper's
/// caches. Everything the budget counts is an estimate of heap bytes, so
/// this also absorbs the estimate being low.
const SLACK: u64 = 32 * 1024 * 1024;
const SESSIONS: usize = 100_000;
const IN_FLIGHT: usize = 64;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_refuses_new_messages_and_bounds_rss() {
    let port = common::redis::free_port();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--pod-name",
            "budget-pod",
            "--max-retained-bytes",
            &BUDGET.to_string(),
            // The live client is not polled while the POSTs run, so it
            // answers no pings: a long heartbeat keeps it connected.
            "--heartbeat-s",
            "600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsfleet");
    let pid = child.id().expect("pid");
    let base = format!("http://127.0.0.1:{port}");
    common::eventually("the binary listens", || async {
        common::http()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok()
    })
    .await;
    let mut live = Client::connect(&format!("ws://127.0.0.1:{port}/ws?session=live")).await;
    assert_eq!(live.recv_json().await["type"], "welcome");
    // Warm the HTTP path (connection pool, server tasks) before the baseline.
    let (status, _) = common::post_to_session(&base, "warm-up", json!(0)).await;
    assert_eq!(status, 202);
    let baseline = rss_bytes(pid);

    let peak = Arc::new(AtomicU64::new(baseline));
    let watcher = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let results: Vec<(u16, Value)> =
        futures_util::stream::iter(0..SESSIONS)
            .map(|i| {
                let base = base.clone();
                async move {
                    common::post_to_session(&base, &format!("offline-{i}"), json!({"n": i})).await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
    let took = started.elapsed();
    peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
    watcher.abort();

    let accepted = results.iter().filter(|(s, _)| *s == 202).count();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 503)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(
        accepted + refused.len(),
        SESSIONS,
        "every POST is accepted or refused as full"
    );
    assert!(
        accepted > 1000,
        "only {accepted} accepted before the budget"
    );
    assert!(
        !refused.is_empty(),
        "the budget never refused ({accepted} accepted)"
    );
    for body in &refused {
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("--max-retained-bytes"), "{body}");
    }

    // Existing sessions keep working: the live one answers, and so does the API.
    live.assert_alive().await;
    let (status, body) = common::get_json(&format!("{base}/v1/sessions/live")).await;
    assert_eq!((status, &body["connected"]), (200, &json!(true)), "{body}");
    let metrics = common::http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let retained = common::metric(&metrics, "wsfleet_retained_bytes");
    assert!(retained > 0.0 && retained <= BUDGET as f64, "{retained}");
    let refusals = common::metric(
        &metrics,
        r#"wsfleet_bus_refusals_total{limit="max_retained_bytes"}"#,
    );
    assert_eq!(refusals as usize, refused.len());

    let peak = peak.load(Ordering::Relaxed);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{SESSIONS} POSTs in {took:?}: {accepted} accepted, {} refused; RSS {:.1} MiB -> peak {:.1} MiB (budget {:.0} MiB, slack {:.0} MiB)",
        refused.len(),
        mib(baseline),
        mib(peak),
        mib(BUDGET),
        mib(SLACK),
    );
    assert!(
        peak < baseline + BUDGET + SLACK,
        "RSS peaked at {:.1} MiB, over baseline {:.1} + budget {:.0} + slack {:.0} MiB",
        mib(peak),
        mib(baseline),
        mib(BUDGET),
        mib(SLACK)
    );
    let _ = child.kill().await;
}
