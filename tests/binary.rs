//! The real `wsfleet` binary: flags, config errors, SIGTERM drain, exit code.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Ended};

const BIN: &str = env!("CARGO_BIN_EXE_wsfleet");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("run wsfleet");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "listen",
        "redis-url",
        "pod-name",
        "auth",
        "jwt-hs256-secret",
        "jwt-rs256-public-key-file",
        "api-key",
        "allowed-origins",
        "max-connections",
        "max-frame-bytes",
        "max-subscriptions",
        "rate-limit-per-sec",
        "outbound-queue",
        "handshake-timeout-s",
        "heartbeat-s",
        "retention-messages",
        "retention-s",
        "drain-s",
        "reconnect-jitter-ms",
        "webhook-url",
        "upstream-stream",
        "read-buffer-bytes",
        "write-buffer-bytes",
        "max-retained-bytes",
        "max-log-bytes",
        "log-format",
        "fault-injection",
    ] {
        assert!(
            help.contains(&format!("--{flag}")),
            "--{flag} missing from --help"
        );
        let env = format!("WSFLEET_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "{env} missing from --help");
    }
}

#[test]
fn controller_help_documents_every_flag_with_its_env_var() {
    let out = Command::new(BIN)
        .args(["controller", "--help"])
        .output()
        .expect("run wsfleet");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("redis-url", "WSFLEET_REDIS_URL"),
        ("redis-ca-file", "WSFLEET_REDIS_CA_FILE"),
        ("redis-timeout-ms", "WSFLEET_REDIS_TIMEOUT_MS"),
        ("listen", "WSFLEET_CONTROLLER_LISTEN"),
        ("namespace", "WSFLEET_NAMESPACE"),
        ("deployment", "WSFLEET_DEPLOYMENT"),
        ("pod-selector", "WSFLEET_POD_SELECTOR"),
        ("mode", "WSFLEET_SCALE_MODE"),
        ("interval-s", "WSFLEET_INTERVAL_S"),
        ("target-connections", "WSFLEET_TARGET_CONNECTIONS"),
        ("headroom", "WSFLEET_HEADROOM"),
        ("min-replicas", "WSFLEET_MIN_REPLICAS"),
        ("max-replicas", "WSFLEET_MAX_REPLICAS"),
        ("scale-up-after-s", "WSFLEET_SCALE_UP_AFTER_S"),
        ("scale-down-window-s", "WSFLEET_SCALE_DOWN_WINDOW_S"),
        ("scale-down-step", "WSFLEET_SCALE_DOWN_STEP"),
        ("scale-down-every-s", "WSFLEET_SCALE_DOWN_EVERY_S"),
        ("scale-tolerance", "WSFLEET_SCALE_TOLERANCE"),
        ("drain-timeout-s", "WSFLEET_DRAIN_TIMEOUT_S"),
        ("rebalance", "WSFLEET_REBALANCE"),
        ("rebalance-tolerance", "WSFLEET_REBALANCE_TOLERANCE"),
        ("shed-per-pod-per-s", "WSFLEET_SHED_PER_POD_PER_S"),
        (
            "shed-fleet-fraction-per-min",
            "WSFLEET_SHED_FLEET_FRACTION_PER_MIN",
        ),
        ("lease-name", "WSFLEET_LEASE_NAME"),
        ("lease-s", "WSFLEET_LEASE_S"),
        ("identity", "WSFLEET_IDENTITY"),
        ("log-format", "WSFLEET_LOG_FORMAT"),
    ] {
        assert!(
            help.contains(&format!("--{flag} ")),
            "--{flag} missing:\n{help}"
        );
        assert!(help.contains(env), "{env} missing:\n{help}");
    }
}

#[test]
fn controller_refuses_bad_bounds_before_touching_anything() {
    let out = Command::new(BIN)
        .args([
            "controller",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--min-replicas",
            "5",
            "--max-replicas",
            "2",
        ])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .expect("run wsfleet");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--min-replicas must not be greater than --max-replicas"),
        "{err}"
    );
}

#[test]
fn bad_config_exits_with_a_clear_message() {
    let out = Command::new(BIN)
        .args(["serve", "--auth", "jwt", "--listen", "127.0.0.1:0"])
        .env_remove("WSFLEET_JWT_HS256_SECRET")
        .output()
        .expect("run wsfleet");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--jwt-hs256-secret"), "{err}");
}

#[tokio::test]
async fn sigterm_drains_connections_then_exits_zero() {
    let port = free_port();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--drain-s",
            "2",
            "--pod-name",
            "bin-pod",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsfleet");
    let base = format!("127.0.0.1:{port}");
    common::eventually("the binary listens", || async {
        common::http()
            .get(format!("http://{base}/healthz"))
            .send()
            .await
            .is_ok()
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut c = Client::connect(&format!("ws://{base}/ws?session=b{i}")).await;
        assert_eq!(c.recv_json().await["pod"], "bin-pod");
        clients.push(c);
    }
    let pid = child.id().expect("pid").to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    common::eventually("readyz turns 503 while draining", || async {
        match common::http()
            .get(format!("http://{base}/readyz"))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16() == 503,
            Err(_) => false,
        }
    })
    .await;
    for client in &mut clients {
        let (frames, ended) = client.recv_until_end().await;
        assert_eq!(ended, Ended::Closed(1012));
        assert_eq!(
            frames.last().map(|f| f["type"].clone()),
            Some("reconnect".into())
        );
    }
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after draining")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "exit status");
    assert!(started.elapsed() < Duration::from_secs(20));
}
