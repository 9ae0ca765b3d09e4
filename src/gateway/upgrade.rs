//! `GET /ws`: everything that can refuse a client happens here, before the
//! upgrade, as an HTTP status with a JSON body. Once upgraded, the
//! connection belongs to its own task (`connection`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use futures_util::future::Either;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::AppState;
use super::connection::{self, Connection};
use super::error::ApiError;
use super::socket::{Socket, SocketConfig};
use crate::protocol::{ErrorCode, Offset, SessionId};

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    session: Option<String>,
    last: Option<String>,
    token: Option<String>,
}

fn refuse(state: &AppState, reason: &str, error: ApiError) -> Response {
    state
        .metrics
        .handshakes_rejected
        .with_label_values(&[reason])
        .inc();
    tracing::debug!(reason, message = %error.message, "upgrade refused");
    error.into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// A valid WebSocket upgrade request (RFC 6455 section 4.2.1), checked as
/// axum's `WebSocketUpgrade` checks it. wsfleet upgrades by hand so that the
/// connection gets its own [`Socket`], whose buffers do not keep the size
/// of large frames (see `socket`).
pub struct Handshake {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let bad = |status: StatusCode, message: &str| {
            ApiError::new(status, ErrorCode::BadRequest, message)
        };
        if parts.version > Version::HTTP_11 {
            return Err(bad(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "WebSocket upgrades need HTTP/1.1",
            ));
        }
        if parts.method != Method::GET {
            return Err(bad(
                StatusCode::METHOD_NOT_ALLOWED,
                "Request method must be `GET`",
            ));
        }
        let has = |name: header::HeaderName, token: &str| {
            parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if !has(header::CONNECTION, "upgrade") {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !has(header::UPGRADE, "websocket") {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if !has(header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(bad(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        Ok(Handshake { key, on_upgrade })
    }
}

pub async fn websocket(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WsQuery>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<Handshake, ApiError>,
) -> Response {
    let started = Instant::now();
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(error) => return refuse(&state, "not_websocket", error),
    };
    let Query(query) = match query {
        Ok(q) => q,
        Err(rejection) => {
            return refuse(
                &state,
                "bad_request",
                ApiError::bad_request(rejection.body_text()),
            );
        }
    };
    if state.pod.is_draining() {
        return refuse(
            &state,
            "draining",
            ApiError::unavailable("pod is draining; connect to another pod"),
        );
    }
    if !state.config.allowed_origins.is_empty()
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| state.config.allowed_origins.iter().any(|a| a == o));
        if !allowed {
            let error = ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "origin not allowed",
            );
            return refuse(&state, "origin", error);
        }
    }
    let token = bearer(&headers).or(query.token.as_deref());
    let grant = match state.auth.authenticate(token) {
        Ok(grant) => grant,
        Err(e) => {
            let error = ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                e.to_string(),
            );
            return refuse(&state, "unauthorized", error);
        }
    };
    let requested = match query.session.as_deref().map(SessionId::parse).transpose() {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                &state,
                "bad_request",
                ApiError::bad_request(format!("session: {e}")),
            );
        }
    };
    let session = match (&grant.session, requested) {
        (Some(granted), Some(requested)) if *granted != requested => {
            let error = ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "the session in the URL differs from the token's session",
            );
            return refuse(&state, "forbidden", error);
        }
        (Some(granted), _) => granted.clone(),
        (None, Some(requested)) => requested,
        (None, None) => SessionId::random(),
    };
    let last = match query.last.as_deref().map(str::parse::<Offset>).transpose() {
        Ok(l) => l,
        Err(e) => {
            return refuse(
                &state,
                "bad_request",
                ApiError::bad_request(format!("last: {e}")),
            );
        }
    };
    let Some(slot) = state.pod.reserve() else {
        let error = ApiError::unavailable(format!(
            "pod at capacity ({} connections)",
            state.pod.capacity
        ));
        return refuse(&state, "capacity", error);
    };

    let conn = Connection::new(
        state.clone(),
        state.next_conn_id.fetch_add(1, Ordering::Relaxed),
        session,
        last,
        grant,
        slot,
        started,
    );
    // Base64, so always a valid header value.
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(upgrade.key.as_bytes())) else {
        return refuse(
            &state,
            "bad_request",
            ApiError::bad_request("bad Sec-WebSocket-Key"),
        );
    };
    let tracked = state.tracker.token();
    let limits = &state.config;
    let config = SocketConfig {
        read_buffer_bytes: limits.read_buffer_bytes,
        max_frame_bytes: limits.max_frame_bytes,
        max_message_bytes: limits.max_frame_bytes,
    };
    // `then` instead of an `async` block: a block would keep a second copy
    // of `conn` (its capture) for the whole life of the connection.
    tokio::spawn(upgrade.on_upgrade.then(move |upgraded| match upgraded {
        Ok(io) => Either::Left(connection::serve(
            Socket::new(TokioIo::new(io), config),
            conn,
            tracked,
        )),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed after the handshake");
            Either::Right(std::future::ready(()))
        }
    }));
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}
