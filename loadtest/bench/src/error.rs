//! The library's one error type; `anyhow` is only used in `main.rs`.

use tokio_tungstenite::tungstenite;

/// Everything that can stop a bench run or one of its connections.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A URL or address the bench was asked to use is malformed.
    #[error("invalid target {url:?}: {reason}")]
    InvalidTarget { url: String, reason: String },
    /// Load is only ever sent to this machine: see `target.rs`.
    #[error("refusing {0:?}: wsfleet-bench only talks to loopback (127.0.0.0/8, localhost, [::1])")]
    NotLoopback(String),
    /// A command-line or library parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// WebSocket handshake or transport failure (boxed: tungstenite's error is large).
    #[error("websocket: {0}")]
    Ws(Box<tungstenite::Error>),
    /// HTTP API call failure.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The HTTP API answered with an unexpected status.
    #[error("http status {0}")]
    HttpStatus(u16),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Something did not happen within its bound.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The server said something the bench does not expect.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A child process of a multi-process run failed.
    #[error("worker {index} failed: {reason}")]
    Worker { index: usize, reason: String },
    /// A server process started by `compare` (the floor or wsfleet) failed.
    #[error("{name} server: {reason}")]
    Server { name: &'static str, reason: String },
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        Error::Ws(Box::new(e))
    }
}

impl Error {
    /// A short stable name used as a counter suffix (`failed.<kind>`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidTarget { .. } | Error::NotLoopback(_) | Error::InvalidParam(_) => {
                "config"
            }
            Error::Ws(e) => match **e {
                tungstenite::Error::Io(_) => "io",
                tungstenite::Error::Http(_) => "http_status",
                tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                    "closed"
                }
                _ => "ws",
            },
            Error::Http(_) => "http",
            Error::HttpStatus(_) => "http_status",
            Error::Io(_) => "io",
            Error::Json(_) => "json",
            Error::Timeout(_) => "timeout",
            Error::Protocol(_) => "protocol",
            Error::Worker { .. } => "worker",
            Error::Server { .. } => "server",
        }
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
