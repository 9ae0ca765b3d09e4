//! `/v1/*`: the HTTP API backends use to reach sessions and channels.
//! Handlers only translate HTTP to bus calls and back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use tracing::Instrument;

use super::AppState;
use super::error::ApiError;
use crate::auth::api_key_matches;
use crate::bus::Outgoing;
use crate::bus::memory::MAX_IDEMPOTENCY_KEY_LEN;
use crate::protocol::{ChannelName, ErrorCode, SessionId};
use crate::telemetry::otel;

/// Who may call `/v1/*`, decided from the config, the socket's peer and
/// the presented key alone (no I/O, so every case has a table test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiAccess {
    Allowed,
    /// `--api-key` is set and the request did not carry it.
    WrongKey,
    /// No `--api-key`, no `--insecure-api`, and the peer is not loopback.
    NotLoopback,
}

/// The gate of the backend API. With a key, every peer (loopback too) must
/// present it; without one, only loopback peers get in unless the operator
/// opened it on purpose with `--insecure-api`. `peer` comes from the
/// accepted socket, never from a header a client could forge; an unknown
/// peer counts as remote.
pub fn api_access(
    api_key: Option<&str>,
    insecure_api: bool,
    peer: Option<IpAddr>,
    authorization: Option<&str>,
) -> ApiAccess {
    if let Some(expected) = api_key {
        let presented = authorization.and_then(|v| v.strip_prefix("Bearer "));
        return if presented.is_some_and(|p| api_key_matches(expected, p)) {
            ApiAccess::Allowed
        } else {
            ApiAccess::WrongKey
        };
    }
    if insecure_api || peer.is_some_and(is_loopback) {
        ApiAccess::Allowed
    } else {
        ApiAccess::NotLoopback
    }
}

/// 127.0.0.0/8, ::1, and IPv4-mapped loopback (`::ffff:127.0.0.1`, what a
/// dual-stack `[::]` listener sees for an IPv4 loopback client).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Refuses `/v1/*` to callers [`api_access`] does not allow.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let access = api_access(
        state.config.api_key.as_ref().map(|k| k.0.as_str()),
        state.config.insecure_api,
        peer,
        authorization,
    );
    match access {
        ApiAccess::Allowed => next.run(request).await,
        ApiAccess::WrongKey => {
            count(&state, "auth", StatusCode::UNAUTHORIZED);
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .into_response()
        }
        ApiAccess::NotLoopback => {
            count(&state, "auth_not_loopback", StatusCode::UNAUTHORIZED);
            tracing::debug!(peer = ?peer, "backend API refused to a non-loopback peer");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                NOT_LOOPBACK_MESSAGE,
            )
            .into_response()
        }
    }
}

/// What a remote caller of a pod without `--api-key` is told.
pub const NOT_LOOPBACK_MESSAGE: &str = "the backend API answers only loopback peers when no \
     --api-key is set: start the pod with --api-key (and send Authorization: Bearer <key>), \
     or open it to the network on purpose with --insecure-api";

/// The body of both message POSTs: `{"data":<json>}`. `data` borrows
/// from the request body: the message is never copied while parsing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBody<'a> {
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// Parses a message POST's body. Pure, so it is fuzzed (`fuzz/`); the
/// router caps `body` at `--max-frame-bytes` before it gets here, and
/// nothing here allocates more than the error message.
pub fn parse_message_body(body: &[u8]) -> Result<MessageBody<'_>, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body must be {{\"data\": <json>}}: {e}")))
}

/// Checks an `Idempotency-Key` header value: 1 to
/// [`MAX_IDEMPOTENCY_KEY_LEN`] characters, each visible ASCII, space or tab
/// (what `HeaderValue::to_str` accepts). Pure and fuzzed like the body.
pub fn parse_idempotency_key(value: &[u8]) -> Result<&str, ApiError> {
    let printable = value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    if !printable {
        return Err(ApiError::bad_request(
            "Idempotency-Key must be visible ASCII",
        ));
    }
    if value.is_empty() || value.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
        )));
    }
    std::str::from_utf8(value)
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))
}

/// The body as axum read it, or why it could not (too large: 413).
pub(super) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                rejection.body_text(),
            )
        } else {
            ApiError::bad_request(rejection.body_text())
        }
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|value| parse_idempotency_key(value.as_bytes()))
        .transpose()
}

fn session_id(raw: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn count(state: &AppState, route: &str, status: StatusCode) {
    state
        .metrics
        .http_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
}

/// Runs a handler body and counts its outcome under `route`.
pub(super) fn finish(
    state: &AppState,
    route: &str,
    result: Result<Response, ApiError>,
) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    count(state, route, response.status());
    response
}

/// Makes the caller's W3C trace context (`traceparent` header) the parent
/// of the request's span. With traces off the header is not even looked up.
pub(super) fn follow_caller(span: &tracing::Span, headers: &HeaderMap) {
    if !span.is_disabled() {
        otel::follow(
            span,
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
        );
    }
}

/// Ends a traced request: records its status on the span.
pub(super) fn traced(span: &tracing::Span, response: Response) -> Response {
    span.record("http.response.status_code", response.status().as_u16());
    response
}

pub async fn send_to_session(
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!(target: otel::TARGET, "http.send", session = %session, otel.kind = "server", http.response.status_code = tracing::field::Empty);
    follow_caller(&span, &headers);
    let result = async {
        let session = session_id(&session)?;
        let bytes = body_bytes(body)?;
        let body = parse_message_body(&bytes)?;
        let key = idempotency_key(&headers)?;
        let msg = Outgoing {
            data: body.data,
            from: None,
            idempotency_key: key,
        };
        let offset = state.bus.send_to_session(&session, msg).await?;
        Ok((StatusCode::ACCEPTED, Json(json!({"offset": offset}))).into_response())
    }
    .instrument(span.clone())
    .await;
    traced(&span, finish(&state, "send_to_session", result))
}

pub async fn publish(
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!(target: otel::TARGET, "http.publish", channel = %channel, otel.kind = "server", http.response.status_code = tracing::field::Empty);
    follow_caller(&span, &headers);
    let result = async {
        let channel =
            ChannelName::parse(&channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let bytes = body_bytes(body)?;
        let body = parse_message_body(&bytes)?;
        let key = idempotency_key(&headers)?;
        let msg = Outgoing {
            data: body.data,
            from: None,
            idempotency_key: key,
        };
        let offset = state.bus.publish(&channel, msg).await?;
        Ok((StatusCode::ACCEPTED, Json(json!({"offset": offset}))).into_response())
    }
    .instrument(span.clone())
    .await;
    traced(&span, finish(&state, "publish", result))
}

fn not_connected(session: &SessionId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("session {session} is not connected"),
    )
}

pub async fn get_session(
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
) -> Response {
    let result = async {
        let session = session_id(&session)?;
        let info = state
            .bus
            .session_info(&session)
            .await?
            .ok_or_else(|| not_connected(&session))?;
        let connected_at = info.connected_at.format(&Rfc3339).unwrap_or_default();
        Ok(Json(json!({
            "session": info.session,
            "connected": true,
            "pod": info.pod,
            "connected_at": connected_at,
        }))
        .into_response())
    }
    .await;
    finish(&state, "get_session", result)
}

#[tracing::instrument(skip_all, fields(session = %session))]
pub async fn delete_session(
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
) -> Response {
    let result = async {
        let session = session_id(&session)?;
        if state.bus.disconnect(&session).await? {
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(not_connected(&session))
        }
    }
    .await;
    finish(&state, "delete_session", result)
}

pub async fn fleet(State(state): State<Arc<AppState>>) -> Response {
    let result = async {
        let pods = state.bus.fleet().await?;
        let connections: usize = pods.iter().map(|p| p.connections).sum();
        Ok(Json(json!({"pods": pods, "connections": connections})).into_response())
    }
    .await;
    finish(&state, "fleet", result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn loopback_is_127_8_and_ipv6_one_and_their_mapped_forms() {
        for yes in ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "10.0.0.1",
            "192.0.2.1",
            "0.0.0.0",
            "::",
            "::ffff:10.0.0.1",
            "fe80::1",
            "128.0.0.1",
        ] {
            assert!(!is_loopback(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn the_backend_api_is_closed_to_the_network_by_default() {
        use ApiAccess::*;
        let key = Some("k3y");
        // (api key, --insecure-api, socket peer, Authorization header, verdict)
        type Case = (
            Option<&'static str>,
            bool,
            Option<IpAddr>,
            Option<&'static str>,
            ApiAccess,
        );
        let cases: &[Case] = &[
            // No key: loopback only.
            (None, false, ip("127.0.0.1"), None, Allowed),
            (None, false, ip("::1"), None, Allowed),
            (None, false, ip("::ffff:127.0.0.1"), None, Allowed),
            (None, false, ip("10.1.2.3"), None, NotLoopback),
            (None, false, ip("::ffff:10.1.2.3"), None, NotLoopback),
            // A header cannot stand in for the socket's peer, nor a bearer
            // for a key nobody configured.
            (
                None,
                false,
                ip("10.1.2.3"),
                Some("Bearer anything"),
                NotLoopback,
            ),
            // Unknown peer (no socket info): remote.
            (None, false, None, None, NotLoopback),
            // Opened on purpose.
            (None, true, ip("10.1.2.3"), None, Allowed),
            (None, true, None, None, Allowed),
            // With a key, everyone needs it, loopback included.
            (key, false, ip("10.1.2.3"), Some("Bearer k3y"), Allowed),
            (key, false, ip("127.0.0.1"), Some("Bearer k3y"), Allowed),
            (key, false, ip("127.0.0.1"), None, WrongKey),
            (key, false, ip("10.1.2.3"), None, WrongKey),
            (key, false, ip("10.1.2.3"), Some("Bearer k3"), WrongKey),
            (key, false, ip("10.1.2.3"), Some("k3y"), WrongKey),
            (key, false, ip("10.1.2.3"), Some("Basic k3y"), WrongKey),
            (key, true, ip("10.1.2.3"), None, WrongKey),
        ];
        for &(api_key, insecure, peer, auth, want) in cases {
            assert_eq!(
                api_access(api_key, insecure, peer, auth),
                want,
                "key={api_key:?} insecure={insecure} peer={peer:?} auth={auth:?}"
            );
        }
    }

    #[test]
    fn the_refusal_names_both_ways_in() {
        assert!(NOT_LOOPBACK_MESSAGE.contains("--api-key"));
        assert!(NOT_LOOPBACK_MESSAGE.contains("--insecure-api"));
    }
}
