//! Smoke tests of every scenario against the real gateway (embedded mode),
//! started inside the test process on a free loopback port, plus the
//! `compare` subcommand end to end against the `wsfleet` binary.
//!
//! The echo floor (tests/smoke.rs) can only answer `connect` and `ping`;
//! these tests are what shows that the bench and the server agree on the
//! protocol for direct messages, channels and resumes, so that a number
//! the bench reports is a measurement of wsfleet and not of a mismatch.
//! Each run is small and short: they are correctness checks, not loads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wsfleet::config::ServeConfig;
use wsfleet::gateway::Gateway;
use wsfleet_bench::report::Report;
use wsfleet_bench::scenario::{Common, connect, direct, fanout, ping, reconnect, soak};

/// A gateway running inside the test process; stopped by [`Server::stop`]
/// (or, if a test panics first, by the runtime shutting down).
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Embedded mode on 127.0.0.1:0, with the buffer sizes the benchmarks use.
    async fn start() -> Server {
        let config = ServeConfig::from_args([
            "--listen",
            "127.0.0.1:0",
            "--pod-name",
            "pod-bench-test",
            "--read-buffer-bytes",
            "1024",
            "--write-buffer-bytes",
            "0",
        ])
        .expect("flags parse");
        let gateway = Gateway::bind(config).await.expect("gateway starts");
        let addr = gateway.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn common(&self, duration_s: f64) -> Common {
        let url = format!("ws://{}/ws", self.addr);
        let mut c = Common::new(&[url.as_str()]).expect("loopback url");
        c.duration_s = duration_s;
        c.ramp_timeout_s = 20.0;
        c.tuning.read_buffer = 1024;
        c.server_pids = vec![std::process::id()];
        c
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(40), task).await;
        }
    }
}

/// Every run here is bounded; a hang is a failure, not a stuck CI job.
async fn bounded<F: std::future::Future<Output = wsfleet_bench::Result<Report>>>(
    what: &str,
    run: F,
) -> Report {
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

fn assert_no_errors(report: &Report) {
    assert!(
        report.error_samples.is_empty(),
        "errors: {:?}\n{}",
        report.error_samples,
        report.human()
    );
    for (k, v) in &report.counts {
        let bad = k.contains("failed")
            || k.contains("timed_out")
            || k.contains("panicked")
            || k.contains("gave_up")
            || k.contains("closed_by_server");
        assert!(!bad || *v == 0, "{k} = {v}\n{}", report.human());
    }
}

fn assert_percentiles(report: &Report, name: &str, count: u64) {
    let p = report
        .latency_ms
        .get(name)
        .unwrap_or_else(|| panic!("no {name} latency\n{}", report.human()));
    assert_eq!(p.count, count, "{name} count\n{}", report.human());
    assert!(
        p.p50_ms > 0.0 && p.p99_ms >= p.p50_ms && p.p999_ms >= p.p99_ms && p.max_ms >= p.p999_ms,
        "{name}: {p:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_against_wsfleet() {
    let server = Server::start().await;
    let report = bounded(
        "connect",
        connect::run(connect::Params {
            common: server.common(0.5),
            connections: 50,
        }),
    )
    .await;
    assert_no_errors(&report);
    assert_eq!(report.count("connected"), 50, "{}", report.human());
    assert_eq!(report.count("ready"), 50);
    assert_eq!(report.count("held_to_end"), 50);
    assert_eq!(report.memory.connections, 50);
    assert_percentiles(&report, "handshake", 50);
    assert_percentiles(&report, "welcome", 50);
    assert!(report.rates["handshakes_per_s"] > 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_against_wsfleet() {
    let server = Server::start().await;
    let report = bounded(
        "ping",
        ping::run(ping::Params {
            common: server.common(1.0),
            connections: 20,
            rate: 200.0,
            drain_s: 3.0,
        }),
    )
    .await;
    assert_no_errors(&report);
    assert_eq!(report.count("connected"), 20);
    let sent = report.count("ping_sent");
    assert!(sent >= 100, "expected ~200 pings, got {sent}");
    assert_eq!(report.count("pong_received"), sent, "{}", report.human());
    assert_eq!(report.count("pong_missing"), 0);
    assert_percentiles(&report, "rtt", sent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_against_wsfleet() {
    let server = Server::start().await;
    let report = bounded(
        "direct",
        direct::run(direct::Params {
            common: server.common(1.0),
            sessions: 10,
            rate: 100.0,
            http_targets: Vec::new(),
            max_in_flight: 16,
            drain_s: 5.0,
            batch: 1,
        }),
    )
    .await;
    assert_no_errors(&report);
    let posted = report.count("post_ok");
    assert!(posted >= 50, "expected ~100 posts, got {posted}");
    assert_eq!(report.count("delivered"), posted, "{}", report.human());
    assert_eq!(report.count("undelivered"), 0);
    assert_percentiles(&report, "delivery", posted);
    assert_percentiles(&report, "http_post", posted);
    server.stop().await;
}

/// The same through `POST /v1/messages` batches of 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_in_batches_against_wsfleet() {
    let server = Server::start().await;
    let report = bounded(
        "direct-batch",
        direct::run(direct::Params {
            common: server.common(1.0),
            sessions: 10,
            rate: 200.0,
            http_targets: Vec::new(),
            max_in_flight: 16,
            drain_s: 5.0,
            batch: 10,
        }),
    )
    .await;
    assert_no_errors(&report);
    let posted = report.count("post_ok");
    assert!(posted >= 100, "expected ~200 messages, got {posted}");
    assert_eq!(posted % 10, 0, "whole batches: {posted}");
    assert_eq!(report.count("delivered"), posted, "{}", report.human());
    assert_percentiles(&report, "delivery", posted);
    assert_percentiles(&report, "http_batch", posted / 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_wsfleet() {
    let server = Server::start().await;
    let report = bounded(
        "fanout",
        fanout::run(fanout::Params {
            common: server.common(1.0),
            subscribers: 20,
            rate: 10.0,
            channel: None,
            http_targets: Vec::new(),
            max_in_flight: 16,
            drain_s: 5.0,
            settle_s: 0.0,
        }),
    )
    .await;
    assert_no_errors(&report);
    assert_eq!(report.count("subscribed"), 20, "{}", report.human());
    let published = report.count("post_ok");
    assert!(published >= 5, "expected ~10 publishes, got {published}");
    assert_eq!(report.count("expected_deliveries"), published * 20);
    assert_eq!(
        report.count("delivered"),
        published * 20,
        "{}",
        report.human()
    );
    assert_eq!(report.count("missing_deliveries"), 0);
    assert_eq!(report.count("steady_subscribers"), 20, "{}", report.human());
    assert_eq!(report.count("missing_deliveries_steady"), 0);
    assert_percentiles(&report, "delivery", published * 20);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_against_wsfleet_has_no_gaps() {
    let server = Server::start().await;
    let report = bounded(
        "reconnect",
        reconnect::run(reconnect::Params {
            common: server.common(2.0),
            sessions: 10,
            rate: 100.0,
            drop_every_ms: 300,
            http_targets: Vec::new(),
            max_in_flight: 16,
            drain_s: 10.0,
        }),
    )
    .await;
    assert!(report.problems().is_empty(), "{}", report.human());
    let posted = report.count("post_ok");
    assert!(posted >= 100, "expected ~200 posts, got {posted}");
    assert!(report.count("drops") >= 10, "{}", report.human());
    assert!(report.count("reconnected") >= report.count("drops"));
    assert_eq!(report.count("accepted_checked"), posted);
    assert_eq!(report.count("gaps"), 0, "{}", report.human());
    assert_eq!(report.count("welcome_gap"), 0);
    assert_eq!(report.count("caught_up"), 10, "{}", report.human());
    assert!(report.count("delivered") >= posted);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_against_wsfleet() {
    let server = Server::start().await;
    let report = bounded(
        "soak",
        soak::run(soak::Params {
            common: server.common(3.0),
            idle: 30,
            ping_connections: 5,
            ping_rate: 50.0,
            direct_sessions: 5,
            direct_rate: 20.0,
            http_targets: Vec::new(),
            report_every_s: 1.0,
        }),
    )
    .await;
    assert_no_errors(&report);
    assert_eq!(report.count("idle.held_to_end"), 30, "{}", report.human());
    let pings = report.count("ping.ping_sent");
    assert!(pings >= 50, "expected ~150 pings, got {pings}");
    assert_eq!(report.count("ping.pong_received"), pings);
    assert_percentiles(&report, "ping.rtt", pings);
    let posted = report.count("direct.post_ok");
    assert!(posted >= 20, "expected ~60 posts, got {posted}");
    assert_eq!(report.count("direct.delivered"), posted);
    assert_eq!(report.count("direct.undelivered"), 0);
    assert_percentiles(&report, "direct.delivery", posted);
    assert_eq!(report.memory.connections, 40);
    server.stop().await;
}

/// The `wsfleet` binary of this build. It belongs to another package, so
/// cargo gives no `CARGO_BIN_EXE_` for it; it is built into the same
/// directory as this package's binary by `cargo test --workspace` (which
/// builds every workspace binary before running tests) or by
/// `cargo build --workspace`. `WSFLEET_BIN` overrides the lookup.
fn wsfleet_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("WSFLEET_BIN") {
        return PathBuf::from(path);
    }
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_wsfleet-bench"));
    let path = bench.with_file_name(format!("wsfleet{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "the wsfleet binary is missing at {} (it is not built by `cargo test -p wsfleet-bench`): \
         run `cargo test --workspace`, or `cargo build -p wsfleet` with the same profile and \
         target dir first, or set WSFLEET_BIN",
        path.display()
    );
    path
}

/// `compare` end to end: both servers as child processes, both runs, the
/// table and the JSON, and no child left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_floor_and_wsfleet() {
    let wsfleet = wsfleet_bin();
    let dir = std::env::temp_dir().join(format!("wsfleet-bench-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("compare.json");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wsfleet-bench"))
            .arg("compare")
            .arg("--wsfleet-bin")
            .arg(&wsfleet)
            .args(["--scenario", "ping", "--connections", "50", "--rate", "200"])
            .args(["--duration", "1", "--read-buffer", "1024", "--json"])
            .arg(&json_path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("compare finishes within 120 s")
    .expect("run binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ratio"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json file"))
            .expect("valid json");
    assert_eq!(v["scenario"], "ping");
    for side in ["floor", "wsfleet"] {
        assert_eq!(v[side]["counts"]["connected"], 50, "{side}: {stdout}");
        assert_eq!(v[side]["memory"]["connections"], 50, "{side}");
        let sent = v[side]["counts"]["ping_sent"].as_u64().expect("sent");
        assert!(sent >= 100, "{side}: {sent} pings");
        assert_eq!(v[side]["counts"]["pong_received"].as_u64(), Some(sent));
        assert!(
            v[side]["latency_ms"]["rtt"]["p99_ms"]
                .as_f64()
                .expect("p99")
                > 0.0
        );
        let pid = v[side]["server_pid"].as_u64().expect("server pid") as u32;
        assert!(
            wsfleet_bench::machine::rss_kib(Some(pid)).is_none(),
            "{side} server {pid} still running after compare"
        );
    }
    let rows = v["rows"].as_array().expect("rows");
    let metric = |name: &str| {
        rows.iter()
            .find(|r| r["metric"].as_str().is_some_and(|m| m.starts_with(name)))
            .unwrap_or_else(|| panic!("no {name} row: {stdout}"))
    };
    for name in [
        "handshakes/s",
        "ping RTT p50",
        "ping RTT p99",
        "ping RTT p99.9",
    ] {
        let row = metric(name);
        assert!(row["floor"].as_f64().is_some_and(|x| x > 0.0), "{row}");
        assert!(row["wsfleet"].as_f64().is_some_and(|x| x > 0.0), "{row}");
        assert!(row["ratio"].as_f64().is_some_and(|x| x > 0.0), "{row}");
    }
    metric("server RSS per idle connection");
    let _ = std::fs::remove_dir_all(&dir);
}
