//! `echo-floor`: the least a WebSocket server on tokio-tungstenite can do
//! that still lets `connect` and `ping` run against it.
//!
//! It sends the `welcome` frame, answers `ping` frames with `pong` (same id
//! and data) and `subscribe` with `ack`, sends a WebSocket ping every
//! heartbeat, and answers WebSocket pings. With the same buffer sizes as
//! wsfleet, the gap between the two in BENCHMARKS.md is what wsfleet's
//! features cost.
//!
//! It answers the HTTP upgrade itself rather than with tokio-tungstenite's
//! `accept_hdr_async`: tungstenite's server handshake hands its 4 KiB
//! request buffer to the connection as its read buffer, whatever
//! `read_buffer_size` says, which made the "floor" spend some 4 KiB per idle
//! connection more than a server built like wsfleet (axum upgrades without
//! it) and hid most of the gap the floor exists to show.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::client::WsTuning;
use crate::{Error, Result};

/// What the floor server needs to know.
#[derive(Clone, Debug)]
pub struct FloorConfig {
    /// Read/write buffer sizes; only the two buffer sizes and max message apply.
    pub tuning: WsTuning,
    /// WebSocket ping interval; `None` sends none.
    pub heartbeat: Option<Duration>,
    /// The `pod` named in the welcome frame.
    pub pod: String,
}

impl Default for FloorConfig {
    fn default() -> Self {
        FloorConfig {
            tuning: WsTuning::default(),
            heartbeat: Some(Duration::from_secs(25)),
            pod: "echo-floor".into(),
        }
    }
}

/// Binds a loopback listener with a deep accept backlog (ramps open
/// thousands of connections per second).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(Error::NotLoopback(addr.to_string()));
    }
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(4096)?)
}

/// Serves connections until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: FloorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let config = Arc::new(config);
    let sessions = Arc::new(AtomicU64::new(0));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let config = config.clone();
                    let n = sessions.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let _ = connection(stream, config, n).await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors, most likely: back off a little.
                    eprintln!("echo-floor: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
}

/// The few fields of a client frame the floor looks at.
#[derive(Deserialize)]
struct ClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// The session named in `?session=` of a request target, if any.
fn session_of(target: &str) -> Option<String> {
    target
        .split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix("session="))
        .map(str::to_string)
}

/// Largest upgrade request head accepted.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The server side of the WebSocket upgrade: reads the request head, answers
/// `101` (or `400`), and returns the request target and any bytes read past
/// the head (exact size: they become the start of the read buffer).
async fn upgrade(stream: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut head = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(Error::Protocol("upgrade request head too large".into()));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Error::Protocol("closed during upgrade".into()));
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .map(str::to_string);
    let key = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| v.trim().to_string())
    });
    let (Some(target), Some(key)) = (target, key) else {
        let _ = stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await;
        return Err(Error::Protocol("not a WebSocket upgrade".into()));
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(response.as_bytes()).await?;
    Ok((target, head[end..].to_vec()))
}

/// Answers the text frame `text`, if it needs an answer.
fn answer(text: &str) -> Option<String> {
    let frame: ClientFrame = serde_json::from_str(text).ok()?;
    let data = frame.data.map(RawValue::get).unwrap_or("null");
    match (frame.kind.as_ref(), frame.id) {
        ("ping", Some(id)) => Some(format!(r#"{{"type":"pong","id":{id},"data":{data}}}"#)),
        ("ping", None) => Some(format!(r#"{{"type":"pong","data":{data}}}"#)),
        (_, Some(id)) => Some(format!(r#"{{"type":"ack","id":{id}}}"#)),
        _ => None,
    }
}

async fn connection(mut stream: TcpStream, config: Arc<FloorConfig>, n: u64) -> Result<()> {
    stream.set_nodelay(true)?;
    // Boxed so that its buffers are not part of the resting connection future.
    let (target, rest) = Box::pin(upgrade(&mut stream)).await?;
    let session = session_of(&target);
    drop(target);
    let mut ws = WebSocketStream::from_partially_read(
        stream,
        rest,
        Role::Server,
        Some(config.tuning.config()),
    )
    .await;
    let session = session.unwrap_or_else(|| format!("floor-{n}"));
    let welcome = format!(
        r#"{{"type":"welcome","session":"{session}","pod":"{}","resumed":false,"gap":false,"heartbeat_s":{}}}"#,
        config.pod,
        config.heartbeat.map(|h| h.as_secs()).unwrap_or(0)
    );
    drop(session);
    ws.send(Message::text(welcome)).await?;
    let mut heartbeat = config.heartbeat.map(|period| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let beat = async {
            match heartbeat.as_mut() {
                Some(i) => {
                    i.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = answer(&text) {
                        ws.send(Message::text(reply)).await?;
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
            _ = beat => ws.send(Message::Ping(Default::default())).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_pings_and_requests() {
        assert_eq!(
            answer(r#"{"type":"ping","id":7,"data":{"t":1}}"#).as_deref(),
            Some(r#"{"type":"pong","id":7,"data":{"t":1}}"#)
        );
        assert_eq!(
            answer(r#"{"type":"subscribe","channel":"c","id":2}"#).as_deref(),
            Some(r#"{"type":"ack","id":2}"#)
        );
        assert_eq!(answer(r#"{"type":"upstream","data":1}"#), None);
        assert_eq!(answer("not json"), None);
        assert_eq!(session_of("/ws?x=1&session=s9").as_deref(), Some("s9"));
        assert_eq!(session_of("/ws"), None);
    }
}
