//! `GET /ws`: everything that can refuse a client happens here, before the
//! upgrade, as an HTTP status with a JSON body. Once upgraded, the
//! connection belongs to its own task (`connection`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::connection::{self, Connection};
use super::error::ApiError;
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

pub async fn websocket(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WsQuery>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let started = Instant::now();
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            let error = ApiError::new(
                rejection.status(),
                ErrorCode::BadRequest,
                rejection.body_text(),
            );
            return refuse(&state, "not_websocket", error);
        }
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
    let tracked = state.tracker.token();
    let limits = &state.config;
    upgrade
        .read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(limits.write_buffer_bytes)
        .max_write_buffer_size(
            limits
                .max_frame_bytes
                .saturating_mul(4)
                .max(limits.write_buffer_bytes + 1),
        )
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        // The closure returns the connection's future itself: an `async`
        // block around it would keep a second copy of `conn` for the whole
        // life of the connection.
        .on_upgrade(move |socket| connection::serve(socket, conn, tracked))
}
