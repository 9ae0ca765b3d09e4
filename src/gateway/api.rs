//! `/v1/*`: the HTTP API backends use to reach sessions and channels.
//! Handlers only translate HTTP to bus calls and back.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use super::error::ApiError;
use crate::auth::api_key_matches;
use crate::bus::Outgoing;
use crate::bus::memory::MAX_IDEMPOTENCY_KEY_LEN;
use crate::protocol::{ChannelName, ErrorCode, SessionId};

/// Refuses `/v1/*` without the configured API key.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.config.api_key {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = presented.is_some_and(|p| api_key_matches(&expected.0, p));
        if !ok {
            count(&state, "auth", StatusCode::UNAUTHORIZED);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    data: Box<RawValue>,
}

/// Reads `{"data":<json>}`; the router caps bodies at the frame size limit.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<MessageBody, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                rejection.body_text(),
            )
        } else {
            ApiError::bad_request(rejection.body_text())
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body must be {{\"data\": <json>}}: {e}")))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
        )));
    }
    Ok(Some(key))
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
fn finish(state: &AppState, route: &str, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    count(state, route, response.status());
    response
}

#[tracing::instrument(skip_all, fields(session = %session))]
pub async fn send_to_session(
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let session = session_id(&session)?;
        let body = parse_body(body)?;
        let key = idempotency_key(&headers)?;
        let msg = Outgoing {
            data: &body.data,
            from: None,
            idempotency_key: key,
        };
        let offset = state.bus.send_to_session(&session, msg).await?;
        Ok((StatusCode::ACCEPTED, Json(json!({"offset": offset}))).into_response())
    }
    .await;
    finish(&state, "send_to_session", result)
}

#[tracing::instrument(skip_all, fields(channel = %channel))]
pub async fn publish(
    State(state): State<Arc<AppState>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let channel =
            ChannelName::parse(&channel).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let body = parse_body(body)?;
        let key = idempotency_key(&headers)?;
        let msg = Outgoing {
            data: &body.data,
            from: None,
            idempotency_key: key,
        };
        let offset = state.bus.publish(&channel, msg).await?;
        Ok((StatusCode::ACCEPTED, Json(json!({"offset": offset}))).into_response())
    }
    .await;
    finish(&state, "publish", result)
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
