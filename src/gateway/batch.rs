//! `POST /v1/messages`: many messages in one request, for backends that
//! send in bulk (api.md, "Batch send").
//!
//! Each message is accepted or refused on its own, and the answer holds one
//! result per message, in request order. Messages to one target (a session
//! or a channel) are appended in request order, one after the other, and
//! once the bus refuses one of them (unavailable, timeout) the rest of that
//! target are refused unsent, so what is stored of a target is always a
//! prefix of what was sent to it;
//! different targets are appended concurrently (in cluster mode their
//! Redis calls share one pipelined connection), which is what makes a batch
//! faster than as many single POSTs.
//!
//! Only a body that is not a batch at all (not JSON, no `messages` array,
//! empty, more than `--max-batch-messages`, larger than
//! `--max-batch-bytes`) is refused as a whole, with a 4xx: then nothing was
//! stored.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::AppState;
use super::api::{body_bytes, finish, follow_caller, parse_idempotency_key, traced};
use super::error::ApiError;
use crate::bus::{Bus, Outgoing};
use crate::protocol::{ChannelName, ErrorCode, Offset, SessionId};
use crate::telemetry::otel;
use tracing::Instrument;

/// Targets appended at once; beyond it the rest wait their turn.
const TARGETS_IN_FLIGHT: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item<'a> {
    #[serde(borrow, default)]
    session: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// Where one message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Session(SessionId),
    Channel(ChannelName),
}

/// One message of a batch, checked.
#[derive(Debug)]
pub struct Checked<'a> {
    pub target: Target,
    pub data: &'a RawValue,
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// A refusal of one message: its code and message, as in `{"error":..}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

/// Splits a batch body into its messages, each checked on its own. Pure
/// (no I/O), so every refusal has a table test; the outer `Err` refuses
/// the whole request.
pub fn parse_batch(
    body: &[u8],
    max_messages: usize,
    max_message_bytes: usize,
) -> Result<Vec<Result<Checked<'_>, Refusal>>, ApiError> {
    let batch: BatchBody<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be {{\"messages\": [{{\"session\"|\"channel\": .., \"data\": ..}}, ..]}}: {e}"
        ))
    })?;
    if batch.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    if batch.messages.len() > max_messages {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!(
                "{} messages in one batch; at most {max_messages} (--max-batch-messages)",
                batch.messages.len()
            ),
        ));
    }
    Ok(batch
        .messages
        .into_iter()
        .map(|raw| check_item(raw, max_message_bytes))
        .collect())
}

fn check_item(raw: &RawValue, max_message_bytes: usize) -> Result<Checked<'_>, Refusal> {
    let item: Item<'_> = serde_json::from_str(raw.get()).map_err(|e| {
        Refusal::bad(format!(
            "a message is {{\"session\" or \"channel\": <name>, \"data\": <json>, \"idempotency_key\"?: <key>}}: {e}"
        ))
    })?;
    let target = match (item.session, item.channel) {
        (Some(s), None) => {
            Target::Session(SessionId::parse(&s).map_err(|e| Refusal::bad(e.to_string()))?)
        }
        (None, Some(c)) => {
            Target::Channel(ChannelName::parse(&c).map_err(|e| Refusal::bad(e.to_string()))?)
        }
        _ => {
            return Err(Refusal::bad(
                "a message names exactly one of \"session\" and \"channel\"",
            ));
        }
    };
    if item.data.get().len() > max_message_bytes {
        return Err(Refusal {
            code: ErrorCode::TooLarge,
            message: format!(
                "data is {} bytes; at most {max_message_bytes} (--max-frame-bytes)",
                item.data.get().len()
            ),
        });
    }
    if let Some(key) = &item.idempotency_key {
        parse_idempotency_key(key.as_bytes()).map_err(|e| Refusal::bad(e.message))?;
    }
    Ok(Checked {
        target,
        data: item.data,
        idempotency_key: item.idempotency_key,
    })
}

/// Appends the checked messages: one target's in order, targets
/// concurrently. Returns one outcome per input, in input order.
pub async fn append_all(
    bus: &dyn Bus,
    items: &[Result<Checked<'_>, Refusal>],
) -> Vec<Result<Offset, Refusal>> {
    let mut by_target: HashMap<&Target, Vec<usize>> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        if let Ok(checked) = item {
            by_target.entry(&checked.target).or_default().push(i);
        }
    }
    let mut outcomes: Vec<Option<Result<Offset, Refusal>>> = items
        .iter()
        .map(|item| item.as_ref().err().map(|r| Err(r.clone())))
        .collect();
    let mut groups = by_target.into_iter().map(|(target, indexes)| async move {
        let mut done = Vec::with_capacity(indexes.len());
        let mut refused: Option<String> = None;
        for i in indexes {
            let Ok(checked) = &items[i] else { continue };
            // What is stored of one target is always a prefix of what was
            // sent to it: after a refusal, the rest of the target waits for
            // the backend's retry rather than overtaking it.
            if let Some(why) = &refused {
                done.push((
                    i,
                    Err(Refusal {
                        code: ErrorCode::Unavailable,
                        message: format!(
                            "not sent: an earlier message of this batch to the same target was refused ({why})"
                        ),
                    }),
                ));
                continue;
            }
            let msg = Outgoing {
                data: checked.data,
                from: None,
                idempotency_key: checked.idempotency_key.as_deref(),
            };
            let sent = match target {
                Target::Session(s) => bus.send_to_session(s, msg).await,
                Target::Channel(c) => bus.publish(c, msg).await,
            };
            let outcome = sent.map_err(|e| Refusal {
                code: e.code(),
                message: e.to_string(),
            });
            if let Err(r) = &outcome {
                refused = Some(r.code.as_str().to_string());
            }
            done.push((i, outcome));
        }
        done
    });
    let mut running = FuturesUnordered::new();
    for group in groups.by_ref().take(TARGETS_IN_FLIGHT) {
        running.push(group);
    }
    while let Some(done) = running.next().await {
        for (i, outcome) in done {
            outcomes[i] = Some(outcome);
        }
        if let Some(group) = groups.next() {
            running.push(group);
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Refusal::bad("not sent"))))
        .collect()
}

pub async fn send_batch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!(target: otel::TARGET, "http.batch", otel.kind = "server", messages = tracing::field::Empty, http.response.status_code = tracing::field::Empty);
    follow_caller(&span, &headers);
    let result = async {
        let bytes = body_bytes(body)?;
        let items = parse_batch(
            &bytes,
            state.config.max_batch_messages,
            state.config.max_frame_bytes,
        )?;
        tracing::Span::current().record("messages", items.len());
        let outcomes = append_all(state.bus.as_ref(), &items).await;
        let mut accepted = 0u64;
        let results: Vec<Value> = outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(offset) => {
                    accepted += 1;
                    json!({"offset": offset})
                }
                Err(r) => json!({"error": {"code": r.code.as_str(), "message": r.message}}),
            })
            .collect();
        let refused = results.len() as u64 - accepted;
        let counted = &state.metrics.batch_messages;
        counted.with_label_values(&["accepted"]).inc_by(accepted);
        counted.with_label_values(&["refused"]).inc_by(refused);
        Ok((StatusCode::OK, Json(json!({"results": results}))).into_response())
    }
    .instrument(span.clone())
    .await;
    traced(&span, finish(&state, "send_batch", result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal_of(body: &str) -> Refusal {
        let items = parse_batch(body.as_bytes(), 10, 16).expect("a batch");
        assert_eq!(items.len(), 1, "{body}");
        items.into_iter().next().expect("one").expect_err(body)
    }

    #[test]
    fn each_message_is_checked_on_its_own() {
        let body = r#"{"messages":[
            {"session":"s1","data":{"a":1}},
            {"channel":"c.x","data":"hi","idempotency_key":"k1"},
            {"session":"s1","channel":"c","data":1},
            {"data":1}
        ]}"#;
        let items = parse_batch(body.as_bytes(), 10, 64).expect("a batch");
        assert_eq!(items.len(), 4);
        let first = items[0].as_ref().expect("first ok");
        assert_eq!(
            first.target,
            Target::Session(SessionId::parse("s1").expect("id"))
        );
        assert_eq!(first.data.get(), r#"{"a":1}"#);
        let second = items[1].as_ref().expect("second ok");
        assert_eq!(second.idempotency_key.as_deref(), Some("k1"));
        assert!(items[2].is_err() && items[3].is_err());
    }

    #[test]
    fn a_bad_message_gets_a_specific_refusal() {
        let cases = [
            (
                r#"{"messages":[{"session":"s","data":1,"extra":2}]}"#,
                "unknown field",
            ),
            (r#"{"messages":[{"session":"s"}]}"#, "missing field `data`"),
            (r#"{"messages":[{"session":"a b","data":1}]}"#, "session"),
            (r#"{"messages":[{"channel":"","data":1}]}"#, "channel"),
            (r#"{"messages":[{"data":1}]}"#, "exactly one"),
            (
                r#"{"messages":[{"session":"s","data":1,"idempotency_key":""}]}"#,
                "Idempotency-Key",
            ),
            (r#"{"messages":[5]}"#, "a message is"),
        ];
        for (body, needle) in cases {
            let r = refusal_of(body);
            assert_eq!(r.code, ErrorCode::BadRequest, "{body}");
            assert!(r.message.contains(needle), "{body}: {}", r.message);
        }
        let r = refusal_of(r#"{"messages":[{"session":"s","data":"0123456789abcdefgh"}]}"#);
        assert_eq!(r.code, ErrorCode::TooLarge);
        assert!(r.message.contains("--max-frame-bytes"), "{}", r.message);
    }

    #[test]
    fn a_body_that_is_not_a_batch_is_refused_whole() {
        let cases = [
            ("", StatusCode::BAD_REQUEST, "body must be"),
            ("[]", StatusCode::BAD_REQUEST, "body must be"),
            (
                r#"{"messages":{}}"#,
                StatusCode::BAD_REQUEST,
                "body must be",
            ),
            (
                r#"{"messages":[],"x":1}"#,
                StatusCode::BAD_REQUEST,
                "unknown field",
            ),
            (
                r#"{"messages":[]}"#,
                StatusCode::BAD_REQUEST,
                "must not be empty",
            ),
            (
                r#"{"messages":[1,2,3]}"#,
                StatusCode::PAYLOAD_TOO_LARGE,
                "--max-batch-messages",
            ),
        ];
        for (body, status, needle) in cases {
            let e = parse_batch(body.as_bytes(), 2, 64).expect_err(body);
            assert_eq!(e.status, status, "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn escaped_names_are_unescaped_before_they_are_checked() {
        let items = parse_batch(br#"{"messages":[{"session":"s\u0031","data":1}]}"#, 10, 64)
            .expect("a batch");
        let checked = items[0].as_ref().expect("ok");
        assert_eq!(
            checked.target,
            Target::Session(SessionId::parse("s1").expect("id"))
        );
    }
}
