//! Every error path of the contract: a clear answer, and the connection and
//! the process keep working.

mod common;

use common::{Ended, Server, get_json, post_json};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_open() {
    let server = Server::start(&[]).await;
    let (mut client, _) = server.session("e").await;
    // (frame, expected code, id echoed)
    let cases = [
        ("not json at all", "bad_request", None),
        (r#"{"type":"teleport","id":7}"#, "unknown_type", Some(7)),
        (r#"{"type":"subscribe","id":8}"#, "bad_request", Some(8)),
        (
            r#"{"type":"subscribe","channel":"no spaces","id":9}"#,
            "bad_request",
            Some(9),
        ),
        (
            r#"{"type":"subscribe","channel":"c","since":"soon","id":10}"#,
            "bad_request",
            Some(10),
        ),
        (
            r#"{"type":"send","session":"x","id":11}"#,
            "bad_request",
            Some(11),
        ),
        (r#"{"type":"panic","id":12}"#, "forbidden", Some(12)),
        (
            r#"{"type":"upstream","data":1,"id":13}"#,
            "unavailable",
            Some(13),
        ),
    ];
    for (text, code, id) in cases {
        client.send_text(text).await;
        let reply = client.recv_json().await;
        assert_eq!(reply["type"], "error", "{text}");
        assert_eq!(reply["code"], code, "{text}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(reply.get("id").and_then(|v| v.as_u64()), id, "{text}");
        client.assert_alive().await;
    }
    client
        .ws
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    let reply = client.recv_json().await;
    assert_eq!(reply["code"], "bad_request");
    client.assert_alive().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_1009_and_the_pod_carries_on() {
    let server = Server::start(&["--max-frame-bytes", "1024"]).await;
    let (mut big, _) = server.session("big").await;
    let (mut other, _) = server.session("other").await;
    let huge = json!({"type":"ping","data":"x".repeat(2000)}).to_string();
    big.send_text(&huge).await;
    let (_, ended) = big.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1009));
    other.assert_alive().await;
    let (_again, welcome) = server.session("big").await;
    assert_eq!(welcome["type"], "welcome");
}

/// A raw client (no WebSocket library, so it can break the protocol): the
/// upgrade, then the server's frames read one by one.
async fn raw_session(server: &Server, session: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /ws?session={session} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    tcp
}

/// Reads server frames until a close; returns its code (None: closed
/// without one, or the connection ended first).
async fn raw_close_code(tcp: &mut tokio::net::TcpStream) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let read = async {
        loop {
            let mut h = [0u8; 2];
            tcp.read_exact(&mut h).await.ok()?;
            assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
            let len = match h[1] & 0x7F {
                126 => tcp.read_u16().await.ok()? as usize,
                127 => tcp.read_u64().await.ok()? as usize,
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.ok()?;
            if h[0] & 0x0F == 0x8 {
                return (len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("the server closes")
}

/// A masked client frame.
fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
    let key = [9u8, 8, 7, 6];
    assert!(payload.len() < 126);
    let mut f = vec![b0, 0x80 | payload.len() as u8];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    f
}

#[tokio::test]
async fn protocol_violations_close_with_their_code_and_the_pod_carries_on() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(&[]).await;
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("unmasked", vec![0x81, 2, b'h', b'i'], 1002),
        ("reserved bit", masked(0xC1, b"hi"), 1002),
        ("not UTF-8", masked(0x81, b"\xff\xfe"), 1007),
        (
            "close code 1005",
            masked(0x88, &1005u16.to_be_bytes()),
            1002,
        ),
    ];
    for (i, (name, frame, code)) in cases.into_iter().enumerate() {
        let mut tcp = raw_session(&server, &format!("raw-{i}")).await;
        tcp.write_all(&frame).await.unwrap();
        assert_eq!(raw_close_code(&mut tcp).await, Some(code), "{name}");
    }
    let metrics = server.metrics().await;
    for (code, n) in [("1002", 3.0), ("1007", 1.0)] {
        assert_eq!(
            common::metric(
                &metrics,
                &format!("wsfleet_connections_closed_total{{code=\"{code}\"}}")
            ),
            n,
            "{code}"
        );
    }
    let (mut other, _) = server.session("after-raw").await;
    other.assert_alive().await;
}

#[tokio::test]
async fn too_many_subscriptions_is_refused_per_connection() {
    let server = Server::start(&["--max-subscriptions", "2"]).await;
    let (mut client, _) = server.session("subs").await;
    for (i, channel) in ["a", "b"].iter().enumerate() {
        let ack = client
            .request(json!({"type":"subscribe","channel":channel}), i as u64)
            .await;
        assert_eq!(ack["type"], "ack");
    }
    let refused = client
        .request(json!({"type":"subscribe","channel":"c"}), 3)
        .await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "too_large");
    // Subscribing again to one it has is not a new subscription.
    let again = client
        .request(json!({"type":"subscribe","channel":"a"}), 4)
        .await;
    assert_eq!(again["type"], "ack");
    // Unsubscribing frees a slot.
    client
        .request(json!({"type":"unsubscribe","channel":"b"}), 5)
        .await;
    let ack = client
        .request(json!({"type":"subscribe","channel":"c"}), 6)
        .await;
    assert_eq!(ack["type"], "ack");
}

#[tokio::test]
async fn frames_over_the_rate_limit_are_refused_then_allowed_again() {
    let server = Server::start(&["--rate-limit-per-sec", "5"]).await;
    let (mut client, _) = server.session("fast").await;
    for i in 0..10 {
        client.send_json(json!({"type":"ping","id":i})).await;
    }
    // Five pongs (the burst is the rate), then one rate_limited error for
    // the rest of the burst: error replies are bounded too (at most one per
    // second; two if the burst straddles a second boundary).
    let mut pongs = 0;
    let mut limited = 0;
    while pongs + limited < 6 {
        let reply = client.recv_json().await;
        match reply["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(reply["code"], "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs, 5, "the burst is the rate");
    assert_eq!(limited, 1);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    client.assert_alive().await;
}

#[tokio::test]
async fn a_client_flooding_binary_frames_is_closed_1008() {
    let server = Server::start(&["--rate-limit-per-sec", "5"]).await;
    let (mut client, _) = server.session("flood").await;
    'flood: for _ in 0..7 {
        for _ in 0..20 {
            // A failed send means the server already closed us: stop and
            // read how.
            if client
                .ws
                .send(Message::binary(vec![1u8, 2, 3]))
                .await
                .is_err()
            {
                break 'flood;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    }
    let (_, ended) = client.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1008));
}

#[tokio::test]
async fn http_api_errors_are_json_with_fitting_status() {
    let server = Server::start(&["--max-frame-bytes", "1024"]).await;
    let url = |p: &str| server.http(p);
    // (status, code) for each bad request
    let (s, b) = post_json(
        &url("/v1/sessions/bad%20id/messages"),
        json!({"data":1}),
        &[],
    )
    .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_request")));
    let (s, b) = post_json(&url("/v1/sessions/ok/messages"), json!({"nodata":1}), &[]).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_request")));
    let (s, b) = post_json(
        &url("/v1/sessions/ok/messages"),
        json!({"data":"x".repeat(2000)}),
        &[],
    )
    .await;
    assert_eq!((s, b["error"]["code"].as_str()), (413, Some("too_large")));
    let (s, b) = post_json(&url("/v1/channels/a*b/messages"), json!({"data":1}), &[]).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_request")));
    let long_key = "k".repeat(300);
    let (s, _) = post_json(
        &url("/v1/sessions/ok/messages"),
        json!({"data":1}),
        &[("Idempotency-Key", &long_key)],
    )
    .await;
    assert_eq!(s, 400);
    let (s, b) = get_json(&url("/v1/sessions/nobody")).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("not_found")));
    let resp = common::http()
        .delete(url("/v1/sessions/nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let raw = common::http()
        .post(url("/v1/sessions/ok/messages"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    // The process is still fine.
    let (s, _) = server.post_session("ok", json!(1)).await;
    assert_eq!(s, 202);
}

#[tokio::test]
async fn bad_upgrade_requests_are_refused_before_the_upgrade() {
    let server = Server::start(&[]).await;
    let (s, b) = get_json(&server.http("/ws?session=a")).await;
    assert_eq!(s, 400, "plain GET without upgrade headers: {b}");
    assert_eq!(b["error"]["code"], "bad_request");
    for query in ["session=bad%20id", "session=a&last=yesterday"] {
        let err = common::Client::try_connect(&server.ws_url(query))
            .await
            .err()
            .expect(query);
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status().as_u16(), 400, "{query}")
            }
            other => panic!("{query}: {other}"),
        }
    }
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let server = Server::start(&["--api-key", "sekrit"]).await;
    let url = server.http("/v1/sessions/s/messages");
    let (s, b) = post_json(&url, json!({"data":1}), &[]).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, _) = post_json(
        &url,
        json!({"data":1}),
        &[("Authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = post_json(
        &url,
        json!({"data":1}),
        &[("Authorization", "Bearer sekrit")],
    )
    .await;
    assert_eq!(s, 202);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(get_json(&server.http("/healthz")).await.0, 200);
    assert_eq!(
        common::http()
            .get(server.http("/metrics"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test]
async fn slow_consumer_is_closed_with_1013_and_resumes_without_loss() {
    let server = Server::start(&["--outbound-queue", "8", "--heartbeat-s", "30"]).await;
    let (mut client, _) = server.session("slow").await;
    // The client reads nothing while ~25 MB are sent: socket buffers fill,
    // the connection's queue overflows.
    let payload = "p".repeat(60_000);
    let mut sent = Vec::new();
    for i in 0..400 {
        let (status, body) = server
            .post_session("slow", json!({"i": i, "pad": payload}))
            .await;
        assert_eq!(status, 202);
        sent.push(body["offset"].as_str().unwrap().to_string());
    }
    let (frames, ended) = client.recv_until_end().await;
    assert_eq!(ended, Ended::Closed(1013), "after {} frames", frames.len());
    assert!(frames.len() < 400, "the queue must have overflowed");
    let mut received: Vec<String> = frames
        .iter()
        .map(|f| f["offset"].as_str().unwrap().to_string())
        .collect();
    let last = received.last().cloned();
    let query = match &last {
        Some(last) => format!("slow&last={last}"),
        None => "slow".to_string(),
    };
    let (mut again, welcome) = server.session(&query).await;
    assert_eq!(welcome["gap"], false);
    while received.len() < sent.len() {
        let msg = again.recv_json().await;
        received.push(msg["offset"].as_str().unwrap().to_string());
    }
    assert_eq!(received, sent, "every accepted message, once, in order");
    let text = server.metrics().await;
    assert!(common::metric(&text, "wsfleet_queue_overflows_total") >= 1.0);
    assert_eq!(
        common::metric(&text, "wsfleet_connections_closed_total{code=\"1013\"}"),
        1.0
    );
}
