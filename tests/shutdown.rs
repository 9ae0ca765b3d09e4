//! Shutdown keeps its word: queued webhook events reach the backend before
//! the process exits, and connections still open when the drain window is
//! over are closed with 1001, never cut without a close frame.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use common::redis::{TempDir, free_port, signal};
use common::{Client, Ended};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_wsfleet");

/// A `wsfleet serve` child process logging to a file.
struct Pod {
    child: tokio::process::Child,
    addr: String,
    log: PathBuf,
    _dir: TempDir,
}

impl Pod {
    async fn start(flags: &[&str]) -> Pod {
        let dir = TempDir::new("shutdown");
        let log = dir.path().join("wsfleet.log");
        let file = std::fs::File::create(&log).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = tokio::process::Command::new(BIN)
            .args(["serve", "--listen", &addr, "--pod-name", "shut"])
            .args(flags)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("WSFLEET_REDIS_URL")
            .env_remove("WSFLEET_WEBHOOK_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wsfleet");
        let pod = Pod {
            child,
            addr,
            log,
            _dir: dir,
        };
        let health = format!("http://{}/healthz", pod.addr);
        common::eventually("the pod answers /healthz", || async {
            common::http().get(&health).send().await.is_ok()
        })
        .await;
        pod
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        assert!(signal(self.child.id().expect("running"), "-TERM"));
    }

    async fn wait_exit(&mut self, within: Duration) {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit within {within:?}; log:\n{}", self.log_text()))
            .expect("wait");
        assert!(status.success(), "{status}; log:\n{}", self.log_text());
    }
}

/// A backend that answers each webhook POST only after `delay`, and fails
/// the first attempt of every disconnect event of an even-numbered session
/// with 503 (so delivery at shutdown must include retries).
async fn slow_webhook(delay: Duration) -> (String, Arc<Mutex<Vec<Value>>>) {
    let delivered: Arc<Mutex<Vec<Value>>> = Arc::default();
    let failed_once: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sink = delivered.clone();
    let app = Router::new().route(
        "/hook",
        post(move |axum::Json(event): axum::Json<Value>| {
            let (sink, failed_once) = (sink.clone(), failed_once.clone());
            async move {
                tokio::time::sleep(delay).await;
                let session = event["session"].as_str().unwrap_or_default().to_string();
                let even = session
                    .trim_start_matches('w')
                    .parse::<u32>()
                    .is_ok_and(|n| n % 2 == 0);
                if event["event"] == "disconnect" && even {
                    let first = failed_once.lock().unwrap().insert(session);
                    if first {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                }
                sink.lock().unwrap().push(event);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, delivered)
}

#[tokio::test]
async fn every_queued_webhook_event_is_delivered_before_the_process_exits() {
    const CLIENTS: usize = 40;
    let (hook, delivered) = slow_webhook(Duration::from_millis(300)).await;
    let mut pod = Pod::start(&["--webhook-url", &hook, "--drain-s", "1"]).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = Client::connect(&format!("ws://{}/ws?session=w{i}", pod.addr)).await;
        assert_eq!(client.recv_json().await["type"], "welcome");
        clients.push(client);
    }
    // Most connect events are still queued or in flight (32 at a time,
    // 300 ms each) when the drain starts; every disconnect event is queued
    // during the drain, the last ones just before the pod would exit.
    pod.sigterm();
    for client in &mut clients {
        let (_, ended) = client.recv_until_end().await;
        assert_eq!(ended, Ended::Closed(1012));
    }
    pod.wait_exit(Duration::from_secs(30)).await;

    let events = delivered.lock().unwrap().clone();
    for kind in ["connect", "disconnect"] {
        let mut sessions: Vec<&str> = events
            .iter()
            .filter(|e| e["event"] == kind)
            .filter_map(|e| e["session"].as_str())
            .collect();
        sessions.sort_unstable();
        sessions.dedup();
        assert_eq!(
            sessions.len(),
            CLIENTS,
            "{kind} events delivered before exit: {sessions:?}; log:\n{}",
            pod.log_text()
        );
    }
    let disconnect = events.iter().find(|e| e["event"] == "disconnect").unwrap();
    assert_eq!(disconnect["data"], json!({"code": 1012}));
}

#[tokio::test]
async fn connections_left_after_the_drain_window_are_closed_1001() {
    // The heartbeat bounds how long a write may block; make it longer than
    // the drain so the stuck connection is still there when the window ends.
    let mut pod = Pod::start(&[
        "--drain-s",
        "1",
        "--heartbeat-s",
        "60",
        "--outbound-queue",
        "1000",
    ])
    .await;
    let base = format!("http://{}", pod.addr);
    let mut polite = Client::connect(&format!("ws://{}/ws?session=polite", pod.addr)).await;
    assert_eq!(polite.recv_json().await["type"], "welcome");
    // A client that stops reading: the messages below fill its socket
    // buffers, and the server's write to it blocks, so it cannot act on
    // the drain in time.
    let mut stuck = Client::connect(&format!("ws://{}/ws?session=stuck", pod.addr)).await;
    assert_eq!(stuck.recv_json().await["type"], "welcome");
    let chunk = "x".repeat(60_000);
    for _ in 0..300 {
        let (status, body) = common::post_to_session(&base, "stuck", json!(chunk)).await;
        assert_eq!(status, 202, "{body}");
    }
    pod.sigterm();
    let (frames, ended) = polite.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1012), "inside the window: reconnect");
    assert_eq!(frames.last().unwrap()["type"], "reconnect");

    // Only once the pod has given up on the window (its log says so, or
    // the window, its 5 s grace and a margin have passed) does the stuck
    // client read again: whatever it gets last must be a 1001 close frame.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(9);
    while !pod.log_text().contains("closing the rest with 1001")
        && tokio::time::Instant::now() < give_up
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, ended) = stuck.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1001), "log:\n{}", pod.log_text());
    pod.wait_exit(Duration::from_secs(20)).await;
}
