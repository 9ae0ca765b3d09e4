//! Smoke tests against the in-process echo-floor server: each scenario that
//! the floor supports runs briefly and must produce sane numbers.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tokio::sync::oneshot;
use wsfleet_bench::floor::{self, FloorConfig};
use wsfleet_bench::scenario::{Common, connect, ping};

/// A running echo-floor on a free loopback port; stops when dropped.
struct Floor {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

fn start_floor() -> Floor {
    let listener = floor::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(floor::serve(listener, FloorConfig::default(), async move {
        let _ = stopped.await;
    }));
    Floor { addr, _stop: stop }
}

fn common(floor: &Floor, duration_s: f64) -> Common {
    let url = format!("ws://{}/ws", floor.addr);
    let mut c = Common::new(&[url.as_str()]).expect("loopback url");
    c.duration_s = duration_s;
    c.ramp_timeout_s = 20.0;
    c.server_pids = vec![std::process::id()];
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_holds_every_connection() {
    let floor = start_floor();
    let report = connect::run(connect::Params {
        common: common(&floor, 0.5),
        connections: 50,
    })
    .await
    .expect("connect run");
    assert_eq!(report.count("connected"), 50, "{}", report.human());
    assert_eq!(report.count("ready"), 50);
    assert_eq!(report.count("held_to_end"), 50);
    assert_eq!(report.memory.connections, 50);
    assert!(report.memory.client_rss_kib_connected.is_some());
    assert_eq!(report.memory.servers.len(), 1);
    let hs = report.latency_ms["handshake"];
    assert_eq!(hs.count, 50);
    assert!(hs.p50_ms > 0.0 && hs.max_ms >= hs.p99_ms);
    assert!(report.rates["handshakes_per_s"] > 0.0);

    let json = serde_json::to_string(&report).expect("serialize");
    let back: serde_json::Value = serde_json::from_str(&json).expect("parse");
    assert_eq!(back["scenario"], "connect");
    assert_eq!(back["counts"]["connected"], 50);
}

/// Handshakes refused because the server is not up yet are retried with
/// backoff (`--connect-retries`) and succeed once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_retried_until_the_server_is_up() {
    // A port that is free now and bound 600 ms later.
    let addr = floor::bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind")
        .local_addr()
        .expect("local addr");
    let url = format!("ws://{addr}/ws");
    let mut c = Common::new(&[url.as_str()]).expect("loopback url");
    c.duration_s = 0.3;
    c.ramp_timeout_s = 20.0;
    c.connect_retries = 6;
    let (stop, stopped) = oneshot::channel::<()>();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let listener = floor::bind(addr).expect("bind the late server");
        floor::serve(listener, FloorConfig::default(), async move {
            let _ = stopped.await;
        })
        .await
    });
    let report = connect::run(connect::Params {
        common: c,
        connections: 20,
    })
    .await
    .expect("connect run");
    assert_eq!(report.count("ready"), 20, "{}", report.human());
    assert!(
        report.count("connect_retried.refused") + report.count("connect_retried.io") >= 20,
        "every connection was refused at least once: {}",
        report.human()
    );
    assert_eq!(report.count("connect_failed.refused"), 0);
    drop(stop);
    let _ = late.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_measures_round_trips() {
    let floor = start_floor();
    let report = ping::run(ping::Params {
        common: common(&floor, 1.0),
        connections: 10,
        rate: 200.0,
        drain_s: 2.0,
    })
    .await
    .expect("ping run");
    let sent = report.count("ping_sent");
    assert!(
        sent >= 100,
        "expected ~200 pings, got {sent}\n{}",
        report.human()
    );
    assert_eq!(report.count("pong_received"), sent);
    assert_eq!(report.count("pong_missing"), 0);
    let rtt = report.latency_ms["rtt"];
    assert_eq!(rtt.count, sent);
    assert!(rtt.p50_ms > 0.0 && rtt.p99_ms >= rtt.p50_ms && rtt.p999_ms > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_non_loopback_targets() {
    assert!(Common::new(&["ws://192.168.0.1:8080/ws"]).is_err());
    let out = Command::new(env!("CARGO_BIN_EXE_wsfleet-bench"))
        .args([
            "connect",
            "--url",
            "ws://10.1.2.3:8080/ws",
            "--connections",
            "1",
        ])
        .output()
        .expect("run binary");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

/// The binary end to end: two worker processes, JSON output merged by the parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_splits_over_processes_and_writes_json() {
    let floor = start_floor();
    let dir = std::env::temp_dir().join(format!("wsfleet-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("ping.json");
    let url = format!("ws://{}/ws", floor.addr);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wsfleet-bench"))
            .args([
                "ping",
                "--url",
                &url,
                "--connections",
                "20",
                "--rate",
                "200",
            ])
            .args(["--duration", "1", "--processes", "2", "--json"])
            .arg(&json_path)
            .output(),
    )
    .await
    .expect("bounded")
    .expect("run binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json file"))
            .expect("valid json");
    assert_eq!(v["scenario"], "ping");
    assert_eq!(v["processes"], 2);
    assert_eq!(v["counts"]["connected"], 20);
    assert_eq!(v["memory"]["connections"], 20);
    let sent = v["counts"]["ping_sent"].as_u64().expect("sent");
    assert!(sent >= 100, "{stdout}");
    assert_eq!(v["counts"]["pong_received"].as_u64(), Some(sent));
    assert!(v["latency_ms"]["rtt"]["p99_ms"].as_f64().expect("p99") > 0.0);
    assert!(v["machine"]["nproc"].as_u64().expect("nproc") >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}
