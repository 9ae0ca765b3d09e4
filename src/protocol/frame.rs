//! JSON frames: parsing what clients send and rendering what the server sends.
//!
//! Pure functions, no I/O: everything here can be unit-tested and fuzzed.
//! Client payloads (`data`, `id`) are kept as raw JSON and echoed back byte
//! for byte, so the server never re-encodes what it only forwards.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ChannelName, Offset, SessionId};

/// The `code` of an error frame or an HTTP error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    TooLarge,
    RateLimited,
    UnknownType,
    Unavailable,
    /// The bus may or may not have stored the message (outcome unknown).
    Timeout,
    NotFound,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
        }
    }
}

/// One client frame, validated.
#[derive(Debug)]
pub enum ClientFrame {
    Subscribe {
        channel: ChannelName,
        since: Option<Offset>,
    },
    Unsubscribe {
        channel: ChannelName,
    },
    Publish {
        channel: ChannelName,
        data: Box<RawValue>,
    },
    Send {
        session: SessionId,
        data: Box<RawValue>,
    },
    Upstream {
        data: Box<RawValue>,
    },
    Ping {
        data: Option<Box<RawValue>>,
    },
    /// A fresh token for the same session, before the current one expires.
    Refresh {
        token: String,
    },
    /// Fault injection: make this connection's task panic (refused unless enabled).
    Panic,
}

impl ClientFrame {
    /// The frame's `type`, used as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Upstream { .. } => "upstream",
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::Refresh { .. } => "refresh",
            ClientFrame::Panic => "panic",
        }
    }
}

/// A client frame with the optional correlation id the answer must carry.
#[derive(Debug)]
pub struct Request {
    pub id: Option<Box<RawValue>>,
    pub frame: ClientFrame,
}

/// A frame that could not be accepted, with what to tell the client.
#[derive(Debug)]
pub struct Rejection {
    pub id: Option<Box<RawValue>>,
    pub code: ErrorCode,
    pub message: String,
}

/// Every field any client frame may carry; which are required depends on `type`.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<Box<RawValue>>,
    channel: Option<String>,
    session: Option<String>,
    since: Option<String>,
    data: Option<Box<RawValue>>,
    token: Option<String>,
}

/// Parses one text frame. Errors say exactly what is wrong, and keep the
/// frame's `id` when it could be read so the client can correlate them.
pub fn parse_client_frame(text: &str) -> Result<Request, Rejection> {
    let envelope: Envelope = serde_json::from_str(text).map_err(|e| Rejection {
        id: None,
        code: ErrorCode::BadRequest,
        message: format!("frame is not a JSON object of the expected shape: {e}"),
    })?;
    let id = envelope.id;
    let reject = |code, message: String, id| Rejection { id, code, message };
    let Some(kind) = envelope.kind else {
        return Err(reject(
            ErrorCode::BadRequest,
            "missing field \"type\"".into(),
            id,
        ));
    };
    let channel = |id: Option<Box<RawValue>>, c: Option<String>| match c {
        None => Err(reject(
            ErrorCode::BadRequest,
            "missing field \"channel\"".into(),
            id,
        )),
        Some(c) => match ChannelName::parse(&c) {
            Ok(c) => Ok((c, id)),
            Err(e) => Err(reject(ErrorCode::BadRequest, e.to_string(), id)),
        },
    };
    let data = |id: Option<Box<RawValue>>, d: Option<Box<RawValue>>| match d {
        None => Err(reject(
            ErrorCode::BadRequest,
            "missing field \"data\"".into(),
            id,
        )),
        Some(d) => Ok((d, id)),
    };
    let frame = match kind.as_str() {
        "subscribe" => {
            let since = match envelope.since.as_deref().map(str::parse::<Offset>) {
                None => None,
                Some(Ok(o)) => Some(o),
                Some(Err(e)) => {
                    return Err(reject(ErrorCode::BadRequest, format!("since: {e}"), id));
                }
            };
            let (channel, id) = channel(id, envelope.channel)?;
            return Ok(Request {
                id,
                frame: ClientFrame::Subscribe { channel, since },
            });
        }
        "unsubscribe" => {
            let (channel, id) = channel(id, envelope.channel)?;
            return Ok(Request {
                id,
                frame: ClientFrame::Unsubscribe { channel },
            });
        }
        "publish" => {
            let (channel, id) = channel(id, envelope.channel)?;
            let (data, id) = data(id, envelope.data)?;
            return Ok(Request {
                id,
                frame: ClientFrame::Publish { channel, data },
            });
        }
        "send" => {
            let session = match envelope.session.as_deref().map(SessionId::parse) {
                None => {
                    return Err(reject(
                        ErrorCode::BadRequest,
                        "missing field \"session\"".into(),
                        id,
                    ));
                }
                Some(Err(e)) => return Err(reject(ErrorCode::BadRequest, e.to_string(), id)),
                Some(Ok(s)) => s,
            };
            let (data, id) = data(id, envelope.data)?;
            ClientFrame::Send { session, data }.with(id)
        }
        "upstream" => {
            let (data, id) = data(id, envelope.data)?;
            ClientFrame::Upstream { data }.with(id)
        }
        "ping" => ClientFrame::Ping {
            data: envelope.data,
        }
        .with(id),
        "refresh" => match envelope.token {
            Some(token) if !token.is_empty() => ClientFrame::Refresh { token }.with(id),
            _ => {
                return Err(reject(
                    ErrorCode::BadRequest,
                    "missing field \"token\"".into(),
                    id,
                ));
            }
        },
        "panic" => ClientFrame::Panic.with(id),
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(reject(
                ErrorCode::UnknownType,
                format!("unknown frame type {shown:?}"),
                id,
            ));
        }
    };
    Ok(frame)
}

impl ClientFrame {
    fn with(self, id: Option<Box<RawValue>>) -> Request {
        Request { id, frame: self }
    }
}

// ---- server frames -------------------------------------------------------
//
// Rendered straight to `String`: the per-connection task writes text frames,
// and messages fanned out to many connections are rendered once and shared.

#[derive(Serialize)]
struct Welcome<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session: &'a str,
    pod: &'a str,
    resumed: bool,
    gap: bool,
    heartbeat_s: u64,
}

pub fn welcome(session: &str, pod: &str, resumed: bool, gap: bool, heartbeat_s: u64) -> String {
    to_json(&Welcome {
        kind: "welcome",
        session,
        pod,
        resumed,
        gap,
        heartbeat_s,
    })
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<Offset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gap: Option<bool>,
}

/// `{"type":"ack","id":..}`, plus the offset the message got when the
/// acknowledged frame was a `publish` or `send`.
pub fn ack(id: &RawValue, offset: Option<Offset>) -> String {
    to_json(&Ack {
        kind: "ack",
        id,
        offset,
        gap: None,
    })
}

/// The ack of a `subscribe` with `since`: `gap` says whether messages after
/// `since` were already trimmed (v1.1).
pub fn subscribe_ack(id: &RawValue, gap: Option<bool>) -> String {
    to_json(&Ack {
        kind: "ack",
        id,
        offset: None,
        gap,
    })
}

#[derive(Serialize)]
struct Pong<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

pub fn pong(id: Option<&RawValue>, data: Option<&RawValue>) -> String {
    to_json(&Pong {
        kind: "pong",
        id,
        data,
    })
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    message: &'a str,
}

pub fn error(id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    to_json(&ErrorFrame {
        kind: "error",
        id,
        code: code.as_str(),
        channel: None,
        message,
    })
}

/// An error about one channel, e.g. a subscription a refreshed token no
/// longer allows; `channel` names it so clients need not parse the message.
pub fn channel_error(channel: &str, code: ErrorCode, message: &str) -> String {
    to_json(&ErrorFrame {
        kind: "error",
        id: None,
        code: code.as_str(),
        channel: Some(channel),
        message,
    })
}

#[derive(Serialize)]
struct Reconnect {
    #[serde(rename = "type")]
    kind: &'static str,
    after_ms: u64,
}

pub fn reconnect(after_ms: u64) -> String {
    to_json(&Reconnect {
        kind: "reconnect",
        after_ms,
    })
}

#[derive(Serialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    offset: Offset,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    data: &'a RawValue,
}

/// A direct message to a session, `from` another session when sent by one.
pub fn session_message(offset: Offset, from: Option<&str>, data: &RawValue) -> String {
    to_json(&Message {
        kind: "message",
        channel: None,
        offset,
        from,
        data,
    })
}

/// A channel message, rendered once and shared by every subscriber.
pub fn channel_message(channel: &str, offset: Offset, data: &RawValue) -> String {
    to_json(&Message {
        kind: "message",
        channel: Some(channel),
        offset,
        from: None,
        data,
    })
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these structs cannot fail: every field is a string, number,
    // bool or already-valid raw JSON, and no map has non-string keys.
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "rendering a server frame failed");
        String::from(r#"{"type":"error","code":"internal","message":"render failed"}"#)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(text: &str) -> ErrorCode {
        parse_client_frame(text).expect_err(text).code
    }

    #[test]
    fn parses_every_client_frame() {
        let cases = [
            (
                r#"{"type":"subscribe","channel":"c","since":"1-0"}"#,
                "subscribe",
            ),
            (r#"{"type":"subscribe","channel":"c"}"#, "subscribe"),
            (r#"{"type":"unsubscribe","channel":"c"}"#, "unsubscribe"),
            (
                r#"{"type":"publish","channel":"c","data":{"x":1}}"#,
                "publish",
            ),
            (r#"{"type":"send","session":"s2","data":"hi"}"#, "send"),
            (r#"{"type":"upstream","data":[1,2]}"#, "upstream"),
            (r#"{"type":"ping","id":1,"data":{"t":5}}"#, "ping"),
            (r#"{"type":"ping"}"#, "ping"),
            (r#"{"type":"panic"}"#, "panic"),
            (r#"{"type":"refresh","id":1,"token":"a.b.c"}"#, "refresh"),
        ];
        for (text, kind) in cases {
            let req = parse_client_frame(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(req.frame.kind(), kind);
        }
    }

    #[test]
    fn keeps_id_and_data_verbatim() {
        let req =
            parse_client_frame(r#"{"type":"ping","id":"a-7","data":{"b": [1, 2.50]}}"#).unwrap();
        assert_eq!(req.id.as_deref().map(RawValue::get), Some(r#""a-7""#));
        let ClientFrame::Ping { data } = req.frame else {
            panic!("not a ping")
        };
        assert_eq!(
            data.as_deref().map(RawValue::get),
            Some(r#"{"b": [1, 2.50]}"#)
        );
    }

    #[test]
    fn rejects_bad_frames_with_specific_codes() {
        let cases = [
            ("not json", ErrorCode::BadRequest),
            ("[1,2]", ErrorCode::BadRequest),
            (r#"{"id":1}"#, ErrorCode::BadRequest),
            (r#"{"type":"teleport"}"#, ErrorCode::UnknownType),
            (r#"{"type":"subscribe"}"#, ErrorCode::BadRequest),
            (
                r#"{"type":"subscribe","channel":"bad name"}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type":"subscribe","channel":"c","since":"yesterday"}"#,
                ErrorCode::BadRequest,
            ),
            (r#"{"type":"publish","channel":"c"}"#, ErrorCode::BadRequest),
            (r#"{"type":"send","data":1}"#, ErrorCode::BadRequest),
            (
                r#"{"type":"send","session":"","data":1}"#,
                ErrorCode::BadRequest,
            ),
            (r#"{"type":"upstream"}"#, ErrorCode::BadRequest),
            (r#"{"type":"refresh"}"#, ErrorCode::BadRequest),
            (r#"{"type":"refresh","token":""}"#, ErrorCode::BadRequest),
            (r#"{"type":"refresh","token":7}"#, ErrorCode::BadRequest),
            (r#"{"type":5}"#, ErrorCode::BadRequest),
        ];
        for (text, code) in cases {
            assert_eq!(code_of(text), code, "{text}");
        }
    }

    #[test]
    fn rejection_keeps_the_id_when_readable() {
        let err = parse_client_frame(r#"{"type":"teleport","id":42}"#).unwrap_err();
        assert_eq!(err.id.as_deref().map(RawValue::get), Some("42"));
        let rendered = error(err.id.as_deref(), err.code, &err.message);
        let v: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["id"], 42);
        assert_eq!(v["code"], "unknown_type");
    }

    #[test]
    fn renders_server_frames_as_the_contract_says() {
        let data = RawValue::from_string("{\"k\":true}".into()).unwrap();
        let offset: Offset = "12-3".parse().unwrap();
        let cases = [
            (
                welcome("s1", "pod-a", true, false, 25),
                r#"{"type":"welcome","session":"s1","pod":"pod-a","resumed":true,"gap":false,"heartbeat_s":25}"#,
            ),
            (
                session_message(offset, Some("s2"), &data),
                r#"{"type":"message","offset":"12-3","from":"s2","data":{"k":true}}"#,
            ),
            (
                channel_message("c", offset, &data),
                r#"{"type":"message","channel":"c","offset":"12-3","data":{"k":true}}"#,
            ),
            (reconnect(1234), r#"{"type":"reconnect","after_ms":1234}"#),
            (
                subscribe_ack(&RawValue::from_string("3".into()).unwrap(), Some(true)),
                r#"{"type":"ack","id":3,"gap":true}"#,
            ),
            (
                channel_error("c", ErrorCode::Forbidden, "dropped"),
                r#"{"type":"error","code":"forbidden","channel":"c","message":"dropped"}"#,
            ),
            (
                pong(None, Some(&data)),
                r#"{"type":"pong","data":{"k":true}}"#,
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
