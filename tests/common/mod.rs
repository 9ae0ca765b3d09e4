//! Test harness: a real gateway on a free loopback port, real WebSocket
//! clients (tokio-tungstenite) and a real HTTP client (reqwest).
#![allow(dead_code)]

pub mod helm;
pub mod kube_api;
pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsfleet::config::ServeConfig;
use wsfleet::gateway::{AppState, Gateway};

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway running inside the test process.
pub struct Server {
    pub addr: SocketAddr,
    pub state: std::sync::Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts a gateway with the given extra flags on 127.0.0.1:0.
    pub async fn start(flags: &[&str]) -> Server {
        Self::start_on("127.0.0.1:0", flags).await
    }

    /// Starts a gateway listening on `listen` (e.g. a test namespace's address).
    pub async fn start_on(listen: &str, flags: &[&str]) -> Server {
        let mut args = vec!["--listen", listen, "--pod-name", "pod-test"];
        args.extend_from_slice(flags);
        let config = ServeConfig::from_args(args).expect("flags parse");
        let gateway = Gateway::bind(config).await.expect("gateway starts");
        let addr = gateway.local_addr().expect("bound address");
        let state = gateway.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.addr, query)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn connect(&self, query: &str) -> Client {
        Client::connect(&self.ws_url(query)).await
    }

    /// Opens a session and returns the client after its welcome frame.
    pub async fn session(&self, session: &str) -> (Client, Value) {
        let mut client = self.connect(&format!("session={session}")).await;
        let welcome = client.recv_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (client, welcome)
    }

    /// POSTs `{"data": data}` to a session; returns (status, body).
    pub async fn post_session(&self, session: &str, data: Value) -> (u16, Value) {
        post_to_session(&self.http(""), session, data).await
    }

    pub async fn post_channel(&self, channel: &str, data: Value) -> (u16, Value) {
        post_to_channel(&self.http(""), channel, data).await
    }

    /// Starts draining as SIGTERM would, and waits for the gateway to stop.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }

    pub async fn metrics(&self) -> String {
        http()
            .get(self.http("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

/// The value of one sample in Prometheus text (`name{labels} value`), 0 if absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One HTTP client for every test: building a client loads the TLS root
/// store, which showed up in profiles when each request built its own.
///
/// Idle pooled connections are dropped after 5 s, before a pod's header
/// read timeout (`--handshake-timeout-s`, 10 s, which also bounds the idle
/// time between keep-alive requests) closes them: reusing one the pod is
/// closing at that moment fails the request.
pub fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client")
    });
    &CLIENT
}

/// POSTs `{"data": data}` to `{base}/v1/sessions/{session}/messages`.
pub async fn post_to_session(base: &str, session: &str, data: Value) -> (u16, Value) {
    post_json(
        &format!("{base}/v1/sessions/{session}/messages"),
        json!({ "data": data }),
        &[],
    )
    .await
}

/// POSTs `{"data": data}` to `{base}/v1/channels/{channel}/messages`.
pub async fn post_to_channel(base: &str, channel: &str, data: Value) -> (u16, Value) {
    post_json(
        &format!("{base}/v1/channels/{channel}/messages"),
        json!({ "data": data }),
        &[],
    )
    .await
}

pub async fn post_json(url: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = http().post(url).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let resp = http().get(url).send().await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A WebSocket client speaking the wsfleet protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for an answer to a request, in order.
    pending: std::collections::VecDeque<Value>,
}

/// What the server did to end a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code.
    Closed(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::try_connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    pub async fn try_connect(url: &str) -> Result<Client, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url.into_client_request()?).await?;
        Ok(Client {
            ws,
            pending: Default::default(),
        })
    }

    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client {
            ws,
            pending: Default::default(),
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next JSON text frame; panics on close or timeout.
    pub async fn recv_json(&mut self) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        self.recv_fresh().await
    }

    async fn recv_fresh(&mut self) -> Value {
        loop {
            let next = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match next {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON frame"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Sends a request and returns the answer carrying the same id.
    pub async fn request(&mut self, mut frame: Value, id: u64) -> Value {
        frame["id"] = json!(id);
        self.send_json(frame).await;
        loop {
            let reply = self.recv_fresh().await;
            if reply["id"] == json!(id) {
                return reply;
            }
            self.pending.push_back(reply);
        }
    }

    /// Application-level round trip: proves the connection still works.
    pub async fn assert_alive(&mut self) {
        let reply = self
            .request(json!({"type": "ping", "data": "alive?"}), 999_999)
            .await;
        assert_eq!(reply["type"], "pong");
        assert_eq!(reply["data"], "alive?");
    }

    /// Reads until the connection ends, returning the text frames seen and how it ended.
    pub async fn recv_until_end(&mut self) -> (Vec<Value>, Ended) {
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("timed out waiting for the connection to end");
            match next {
                Some(Ok(Message::Text(t))) => {
                    frames.push(serde_json::from_str(&t).expect("JSON frame"))
                }
                Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                    return (frames, Ended::Closed(code.into()));
                }
                Some(Ok(Message::Close(None))) => return (frames, Ended::Closed(1005)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (frames, Ended::Dropped),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// Waits until `check` holds, polling; panics after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}
