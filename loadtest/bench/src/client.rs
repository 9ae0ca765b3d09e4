//! Dialing one WebSocket connection, with per-connection memory kept small.
//!
//! A bench that wants to hold hundreds of thousands of connections next to
//! the server on one machine must spend little per connection itself
//! (design/traps.md, item 11): tungstenite allocates its read buffer eagerly
//! (128 KiB by default), so the bench sizes it down on purpose.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

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
            read_buffer: 4096,
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
        let url = target.ws_url(session, last);
        // The handshake response (headers) is dropped at once: nothing of it
        // is kept per connection.
        let (ws, _response) =
            client_async_with_config(url, stream, Some(self.tuning.config())).await?;
        Ok(ws)
    }
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
