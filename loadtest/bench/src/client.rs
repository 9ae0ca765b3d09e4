//! Dialing one WebSocket connection, with per-connection memory kept small.
//!
//! A bench that wants to hold hundreds of thousands of connections next to
//! the server on one machine must spend little per connection itself
//! (design/traps.md, item 11): tungstenite allocates its read buffer eagerly
//! (128 KiB by default), so the bench sizes it down on purpose.
//!
//! The bench also does the HTTP upgrade itself ([`upgrade`]) instead of
//! calling `tokio_tungstenite::client_async_with_config`: tungstenite's
//! client handshake reads the response into a 4 KiB `Vec` and hands that
//! very allocation to the connection as its read buffer, whatever
//! `read_buffer_size` says, so every idle client connection kept 4 KiB it
//! never needed (measured with heaptrack: 4.1 KiB of the 7.5 KiB the bench
//! spent per connection).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::protocol::{Offset, ServerFrame, Welcome};
use crate::target::Target;
use crate::{Error, Result};

/// One client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// Buffer sizes and timeouts of every connection.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WsTuning {
    /// tungstenite read buffer, allocated eagerly per connection.
    pub read_buffer: usize,
    /// tungstenite write buffer target; 0 writes every frame through at once.
    pub write_buffer: usize,
    /// Largest message accepted, so a misbehaving server cannot balloon us.
    pub max_message: usize,
    /// Bound on TCP connect plus upgrade.
    pub handshake_timeout_ms: u64,
}

impl Default for WsTuning {
    fn default() -> Self {
        WsTuning {
            read_buffer: 1024,
            write_buffer: 0,
            max_message: 1 << 20,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl WsTuning {
    pub fn config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer)
            .write_buffer_size(self.write_buffer)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// Opens connections, spreading them round-robin over pods and source
/// addresses by their global connection number.
#[derive(Debug)]
pub struct Dialer {
    targets: Arc<[Target]>,
    source_ips: Arc<[Ipv4Addr]>,
    tuning: WsTuning,
}

impl Dialer {
    pub fn new(targets: Vec<Target>, source_ips: Vec<Ipv4Addr>, tuning: WsTuning) -> Result<Self> {
        if targets.is_empty() {
            return Err(Error::InvalidParam("at least one --url is needed".into()));
        }
        if !source_ips.is_empty() && targets.iter().any(|t| !t.addr.is_ipv4()) {
            return Err(Error::InvalidParam(
                "--source-ips are IPv4 and need IPv4 targets".into(),
            ));
        }
        Ok(Dialer {
            targets: targets.into(),
            source_ips: source_ips.into(),
            tuning,
        })
    }

    pub fn tuning(&self) -> &WsTuning {
        &self.tuning
    }

    /// The pod that connection number `global` talks to.
    pub fn target(&self, global: usize) -> &Target {
        &self.targets[global % self.targets.len()]
    }

    /// Connects and upgrades connection number `global` for `session`,
    /// resuming after `last`. Bounded by the handshake timeout.
    pub async fn connect(&self, global: usize, session: &str, last: Option<Offset>) -> Result<Ws> {
        tokio::time::timeout(
            self.tuning.handshake_timeout(),
            self.connect_unbounded(global, session, last),
        )
        .await
        .map_err(|_| Error::Timeout("handshake"))?
    }

    async fn connect_unbounded(
        &self,
        global: usize,
        session: &str,
        last: Option<Offset>,
    ) -> Result<Ws> {
        let target = self.target(global);
        let socket = match target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if !self.source_ips.is_empty() {
            let ip = self.source_ips[global % self.source_ips.len()];
            socket.bind(SocketAddr::new(ip.into(), 0))?;
        }
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let path = target.request_path(session, last);
        upgrade(stream, &target.authority, &path, self.tuning.config()).await
    }
}

/// Largest upgrade response accepted; wsfleet's is about 200 bytes.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The client side of the WebSocket upgrade (RFC 6455 section 4.1) over
/// `stream`, leaving the connection with a read buffer of exactly the
/// configured size (see the module docs for why not tungstenite's).
/// Bytes the server sent after its response (the `welcome` frame, often in
/// the same segment) are handed to the WebSocket, not lost.
pub async fn upgrade(
    mut stream: TcpStream,
    authority: &str,
    path: &str,
    config: WebSocketConfig,
) -> Result<Ws> {
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // Read the response head into a temporary buffer; it is freed on return.
    let mut head = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(Error::Protocol("upgrade response head too large".into()));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Error::Protocol("connection closed during upgrade".into()));
        }
        head.extend_from_slice(&chunk[..n]);
    };
    check_response(&head[..end], &derive_accept_key(key.as_bytes()))?;
    // An exact-size copy: tungstenite reserves up to its read buffer size on
    // top of what it is given, and keeps the capacity it is given.
    let rest = head[end..].to_vec();
    drop(head);
    Ok(WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(config)).await)
}

/// Checks that `head` is a `101` whose `Sec-WebSocket-Accept` is `accept`.
fn check_response(head: &[u8], accept: &str) -> Result<()> {
    let text = std::str::from_utf8(head)
        .map_err(|_| Error::Protocol("upgrade response is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("bad status line {status_line:?}")))?;
    if status != 101 {
        return Err(Error::HttpStatus(status));
    }
    let header = |name: &str| {
        text.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(Error::Protocol("101 without Upgrade: websocket".into()));
    }
    if header("sec-websocket-accept") != Some(accept) {
        return Err(Error::Protocol("wrong Sec-WebSocket-Accept".into()));
    }
    Ok(())
}

/// Reads frames until the `welcome` (which the server sends first), within `limit`.
pub async fn read_welcome(ws: &mut Ws, limit: Duration) -> Result<Welcome> {
    let read = async {
        while let Some(msg) = ws.next().await {
            match msg? {
                Message::Text(text) => {
                    return match ServerFrame::parse(&text)? {
                        ServerFrame::Welcome(w) => Ok(w),
                        other => Err(Error::Protocol(format!(
                            "expected welcome first, got {other:?}"
                        ))),
                    };
                }
                Message::Close(frame) => {
                    return Err(Error::Protocol(format!("closed before welcome: {frame:?}")));
                }
                _ => {}
            }
        }
        Err(Error::Protocol("closed before welcome".into()))
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| Error::Timeout("welcome"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_upgrade_response() {
        let accept = derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\n\
             connection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
        );
        assert!(check_response(ok.as_bytes(), &accept).is_ok());
        assert!(check_response(ok.as_bytes(), "other").is_err());
        assert!(matches!(
            check_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", &accept),
            Err(Error::HttpStatus(503))
        ));
        assert!(check_response(b"garbage\r\n\r\n", &accept).is_err());
    }
}
