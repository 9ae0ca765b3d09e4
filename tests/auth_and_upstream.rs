//! JWT auth, channel permissions, allowed origins, and upstream events.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::post;
use common::{Client, Server};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret";

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600
}

fn status_of(err: tokio_tungstenite::tungstenite::Error) -> u16 {
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

async fn jwt_server() -> Server {
    Server::start(&["--auth", "jwt", "--jwt-hs256-secret", SECRET]).await
}

#[tokio::test]
async fn jwt_in_header_or_query_names_the_session() {
    let server = jwt_server().await;
    let t = token(json!({"sub": "user-1", "sid": "sess-1", "exp": exp(), "channels": []}));
    let mut by_query = Client::connect(&server.ws_url(&format!("token={t}"))).await;
    assert_eq!(by_query.recv_json().await["session"], "sess-1");
    by_query.close().await;

    let t = token(json!({"sub": "user-2", "exp": exp()}));
    let mut request = server.ws_url("").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("header token accepted");
    let mut by_header = Client::from_stream(ws);
    assert_eq!(by_header.recv_json().await["session"], "user-2");
}

#[tokio::test]
async fn bad_tokens_get_401_before_the_upgrade() {
    let server = jwt_server().await;
    let expired = token(json!({"sub": "u", "exp": 1_000_000}));
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "u", "exp": exp()}),
        &EncodingKey::from_secret(b"other"),
    )
    .unwrap();
    for query in [
        String::new(),
        format!("token={expired}"),
        format!("token={wrong_key}"),
        "token=garbage".into(),
    ] {
        let err = Client::try_connect(&server.ws_url(&query))
            .await
            .err()
            .expect("refused");
        assert_eq!(status_of(err), 401, "{query}");
    }
    // A session in the URL that differs from the token's is refused.
    let t = token(json!({"sub": "mine", "exp": exp()}));
    let err = Client::try_connect(&server.ws_url(&format!("token={t}&session=theirs")))
        .await
        .err()
        .expect("refused");
    assert_eq!(status_of(err), 403);
    let text = server.metrics().await;
    assert_eq!(
        common::metric(
            &text,
            "wsfleet_handshakes_rejected_total{reason=\"unauthorized\"}"
        ),
        4.0
    );
}

#[tokio::test]
async fn channel_claims_limit_subscribe_and_publish() {
    let server = jwt_server().await;
    let t = token(json!({"sub": "u", "exp": exp(), "channels": ["chat.*", "news"]}));
    let mut client = Client::connect(&server.ws_url(&format!("token={t}"))).await;
    client.recv_json().await;
    // (frame, allowed)
    let cases = [
        (json!({"type":"subscribe","channel":"chat.room"}), true),
        (json!({"type":"subscribe","channel":"news"}), true),
        (json!({"type":"subscribe","channel":"secret"}), false),
        (json!({"type":"publish","channel":"chat.x","data":1}), true),
        (
            json!({"type":"publish","channel":"newsroom","data":1}),
            false,
        ),
    ];
    for (i, (frame, allowed)) in cases.into_iter().enumerate() {
        let reply = client.request(frame.clone(), i as u64).await;
        if allowed {
            assert_eq!(reply["type"], "ack", "{frame}: {reply}");
        } else {
            assert_eq!(reply["code"], "forbidden", "{frame}: {reply}");
        }
    }
}

#[tokio::test]
async fn foreign_origins_get_403() {
    let server = Server::start(&[
        "--allowed-origins",
        "https://app.example,https://admin.example",
    ])
    .await;
    let connect_from = |origin: &'static str| {
        let url = server.ws_url("session=o");
        async move {
            let mut request = url.into_client_request().unwrap();
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
            tokio_tungstenite::connect_async(request).await
        }
    };
    let err = connect_from("https://evil.example")
        .await
        .expect_err("refused");
    assert_eq!(status_of(err), 403);
    assert!(connect_from("https://admin.example").await.is_ok());
    // Non-browser clients send no Origin and are not affected.
    assert!(
        Client::try_connect(&server.ws_url("session=o2"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn upstream_events_reach_the_webhook() {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    let app = Router::new().route(
        "/hook",
        post(move |axum::Json(body): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let server = Server::start(&["--webhook-url", &hook]).await;
    let (mut client, _) = server.session("up").await;
    let ack = client
        .request(json!({"type":"upstream","data":{"order":42}}), 1)
        .await;
    assert_eq!(ack["type"], "ack");
    client.close().await;
    common::eventually("three events arrive", || async {
        received.lock().unwrap().len() >= 3
    })
    .await;
    let events = received.lock().unwrap().clone();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for kind in ["connect", "upstream", "disconnect"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    for event in &events {
        assert_eq!(event["session"], "up");
        assert_eq!(event["pod"], "pod-test");
        let ts = event["ts"].as_str().expect("ts");
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok()
        );
    }
    let upstream = events.iter().find(|e| e["event"] == "upstream").unwrap();
    assert_eq!(upstream["data"], json!({"order": 42}));
    let disconnect = events.iter().find(|e| e["event"] == "disconnect").unwrap();
    assert_eq!(disconnect["data"]["code"], 1000);
}
