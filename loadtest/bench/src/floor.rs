//! `echo-floor`: the least a WebSocket server on tokio-tungstenite can do
//! that still lets `connect` and `ping` run against it.
//!
//! It sends the `welcome` frame, answers `ping` frames with `pong` (same id
//! and data) and `subscribe` with `ack`, sends a WebSocket ping every
//! heartbeat, and answers WebSocket pings. With the same buffer sizes as
//! wsfleet, the gap between the two in BENCHMARKS.md is what wsfleet's
//! features cost.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::accept_hdr_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

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

/// The session named in `?session=`, if any.
fn session_of(request: &Request) -> Option<String> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("session="))
        .map(str::to_string)
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

async fn connection(stream: TcpStream, config: Arc<FloorConfig>, n: u64) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut session = None;
    // The error type is tungstenite's (`ErrorResponse`), not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        session = session_of(request);
        Ok(response)
    };
    let mut ws =
        accept_hdr_async_with_config(stream, callback, Some(config.tuning.config())).await?;
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
    }
}
