//! A connection's life and the pod's: heartbeats, handshake timeout,
//! capacity, crash isolation, drain on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Ended, Server, get_json};
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn silent_clients_are_closed_and_answering_ones_are_kept() {
    let server = Server::start(&["--heartbeat-s", "1"]).await;
    let (mut silent, _) = server.session("silent").await;
    let (mut lively, _) = server.session("lively").await;
    // `lively` keeps reading, so tungstenite answers the server's pings.
    let reader = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_millis(3500);
        while Instant::now() < deadline {
            if let Ok(None | Some(Err(_))) =
                tokio::time::timeout(Duration::from_millis(100), lively.ws.next()).await
            {
                panic!("the answering client was closed");
            }
        }
        lively
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (_, ended) = silent.recv_until_end().await;
    assert_eq!(
        ended,
        Ended::Dropped,
        "no pong for two heartbeats: connection dropped"
    );
    let mut lively = reader.await.expect("reader");
    lively.assert_alive().await;
}

#[tokio::test]
async fn a_client_that_never_sends_its_request_is_cut_off() {
    let server = Server::start(&["--handshake-timeout-s", "1"]).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("server should close the idle TCP connection")
        .unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
        "got {n} bytes"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn over_capacity_gets_503_and_readyz_says_why() {
    let server = Server::start(&["--max-connections", "2"]).await;
    let (_a, _) = server.session("a").await;
    let (_b, _) = server.session("b").await;
    let err = Client::try_connect(&server.ws_url("session=c"))
        .await
        .err()
        .expect("third is refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 503);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "unavailable");
        }
        other => panic!("expected HTTP 503, got {other}"),
    }
    let (status, body) = get_json(&server.http("/readyz")).await;
    assert_eq!(status, 503);
    assert!(
        body["reason"].as_str().unwrap().contains("capacity"),
        "{body}"
    );
    drop(_a);
    common::eventually("a slot frees up", || async {
        get_json(&server.http("/readyz")).await.0 == 200
    })
    .await;
    let (_c, welcome) = server.session("c").await;
    assert_eq!(welcome["type"], "welcome");
}

/// The crash-isolation test: 1,000 connections, one panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_closes_alone_with_1011() {
    const N: usize = 1000;
    let server = Server::start(&["--fault-injection"]).await;
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let (mut client, _) = server.session(&format!("c{i}")).await;
        let ack = client
            .request(json!({"type":"subscribe","channel":"all"}), 1)
            .await;
        assert_eq!(ack["type"], "ack");
        clients.push(client);
    }
    let mut victim = clients.remove(N / 2);
    victim.send_json(json!({"type":"panic"})).await;
    let (_, ended) = victim.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1011));

    // Everyone else still gets channel messages and direct messages.
    server.post_channel("all", json!("still here")).await;
    for (i, client) in clients.iter_mut().enumerate() {
        let msg = client.recv_json().await;
        assert_eq!(msg["data"], "still here", "client {i}");
    }
    // After the victim's removal, index N/2 holds session c{N/2 + 1}.
    server
        .post_session(&format!("c{}", N / 2 + 1), json!("direct"))
        .await;
    assert_eq!(clients[N / 2].recv_json().await["data"], "direct");

    // The pod still accepts new connections, the victim's session included.
    let (mut fresh, _) = server.session(&format!("c{}", N / 2)).await;
    fresh.assert_alive().await;
    let text = server.metrics().await;
    assert_eq!(common::metric(&text, "wsfleet_task_failures_total"), 1.0);
    assert_eq!(
        common::metric(&text, "wsfleet_connections_closed_total{code=\"1011\"}"),
        1.0
    );
    assert_eq!(common::metric(&text, "wsfleet_connections"), N as f64);
}

#[tokio::test]
async fn drain_in_process_spreads_reconnects_and_finishes() {
    let server = Server::start(&["--drain-s", "2", "--reconnect-jitter-ms", "500"]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(server.session(&format!("d{i}")).await.0);
    }
    let state = server.state.clone();
    let http = server.http("/readyz");
    // Each client notes when its own close arrives.
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let (frames, ended) = client.recv_until_end().await;
                (Instant::now(), frames, ended)
            })
        })
        .collect();
    let stopping = tokio::spawn(server.stop());
    common::eventually("readyz turns 503", || async {
        get_json(&http).await.0 == 503
    })
    .await;
    assert!(state.pod.is_draining());
    let mut close_times = Vec::new();
    for watcher in watchers {
        let (at, frames, ended) = watcher.await.expect("watcher");
        assert_eq!(ended, Ended::Closed(1012));
        let notice = frames.last().expect("reconnect notice");
        assert_eq!(notice["type"], "reconnect");
        assert!(notice["after_ms"].as_u64().unwrap() <= 500);
        close_times.push(at);
    }
    close_times.sort();
    let spread = close_times[close_times.len() - 1] - close_times[0];
    assert!(
        spread >= Duration::from_millis(500),
        "closes must be spread over the window, got {spread:?}"
    );
    stopping.await.unwrap();
}
