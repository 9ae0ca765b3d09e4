//! The part of the wsfleet protocol (see docs/protocol.md) the bench speaks.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

/// A message offset, `"<ms>-<seq>"`. Offsets of one session (or channel)
/// strictly increase and compare as the integer pair `(ms, seq)`; a bare
/// integer is read as `(n, 0)` so that counters also compare correctly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    pub ms: u64,
    pub seq: u64,
}

impl FromStr for Offset {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || crate::Error::Protocol(format!("bad offset {s:?}"));
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (
                ms.parse().map_err(|_| bad())?,
                seq.parse().map_err(|_| bad())?,
            ),
            None => (s.parse().map_err(|_| bad())?, 0),
        };
        Ok(Offset { ms, seq })
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The first frame of every connection.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Welcome {
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub resumed: bool,
    /// True when messages after `last` were already past retention.
    #[serde(default)]
    pub gap: bool,
    #[serde(default)]
    pub heartbeat_s: u64,
}

/// Server-to-client frames. Unknown types are tolerated: the protocol may grow.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    Welcome(Welcome),
    Message {
        offset: String,
        #[serde(default)]
        channel: Option<String>,
        #[serde(default)]
        data: Value,
    },
    Pong {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        data: Value,
    },
    Ack {
        #[serde(default)]
        id: Option<u64>,
    },
    Error {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    },
    /// Sent before close 1012: reconnect after `after_ms` with `last`.
    Reconnect {
        #[serde(default)]
        after_ms: u64,
    },
    #[serde(other)]
    Unknown,
}

impl ServerFrame {
    pub fn parse(text: &str) -> crate::Result<ServerFrame> {
        Ok(serde_json::from_str(text)?)
    }
}

/// Wall-clock microseconds since the epoch. The bench embeds this in
/// `data.t` because sender and receiver may be different processes on this
/// machine: they share the clock, not an `Instant`.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Reads the send timestamp the bench put in `data.t`.
pub fn stamp(data: &Value) -> Option<u64> {
    data.get("t").and_then(Value::as_u64)
}

/// `{"type":"ping","id":<id>,"data":{"t":<now>}}`
pub fn ping_frame(id: u64) -> String {
    format!(
        r#"{{"type":"ping","id":{id},"data":{{"t":{}}}}}"#,
        now_micros()
    )
}

/// `{"type":"subscribe","channel":..,"id":..}` plus `since` when resuming.
pub fn subscribe_frame(channel: &str, id: u64, since: Option<Offset>) -> String {
    match since {
        Some(since) => {
            format!(r#"{{"type":"subscribe","channel":"{channel}","id":{id},"since":"{since}"}}"#)
        }
        None => format!(r#"{{"type":"subscribe","channel":"{channel}","id":{id}}}"#),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_compare_as_integer_pairs() {
        let a: Offset = "1700000000000-9".parse().expect("valid");
        let b: Offset = "1700000000000-10".parse().expect("valid");
        let c: Offset = "1700000000001-0".parse().expect("valid");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert_eq!(
            "42".parse::<Offset>().expect("valid"),
            Offset { ms: 42, seq: 0 }
        );
        assert!("x-1".parse::<Offset>().is_err());
    }

    #[test]
    fn parses_server_frames() {
        let w = ServerFrame::parse(
            r#"{"type":"welcome","session":"s1","pod":"pod-a","resumed":false,"gap":false,"heartbeat_s":25}"#,
        )
        .expect("welcome");
        assert!(matches!(w, ServerFrame::Welcome(Welcome { ref pod, .. }) if pod == "pod-a"));
        let m =
            ServerFrame::parse(r#"{"type":"message","channel":"c","offset":"1-2","data":{"t":7}}"#)
                .expect("message");
        match m {
            ServerFrame::Message {
                offset,
                channel,
                data,
            } => {
                assert_eq!(offset, "1-2");
                assert_eq!(channel.as_deref(), Some("c"));
                assert_eq!(stamp(&data), Some(7));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ServerFrame::parse(r#"{"type":"novel","x":1}"#).expect("tolerated"),
            ServerFrame::Unknown
        ));
        assert!(matches!(
            ServerFrame::parse(r#"{"type":"reconnect","after_ms":1234}"#).expect("reconnect"),
            ServerFrame::Reconnect { after_ms: 1234 }
        ));
    }

    #[test]
    fn client_frames_are_json() {
        let v: Value = serde_json::from_str(&ping_frame(3)).expect("json");
        assert_eq!(v["id"], 3);
        assert!(stamp(&v["data"]).is_some());
        let v: Value =
            serde_json::from_str(&subscribe_frame("c", 2, Some(Offset { ms: 1, seq: 2 })))
                .expect("json");
        assert_eq!(v["since"], "1-2");
    }
}
