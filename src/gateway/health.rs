//! Liveness, readiness and metrics.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// The process is alive and serving HTTP.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 only if this pod can take new connections now.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let reason = if state.pod.is_draining() {
        Some("draining".to_string())
    } else if state.pod.is_shedding() {
        Some("shedding".to_string())
    } else if state.pod.is_full() {
        Some(format!("at capacity ({} connections)", state.pod.capacity))
    } else if let Err(e) = state.bus.check().await {
        Some(e.to_string())
    } else {
        None
    };
    match reason {
        None => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state
        .metrics
        .connections
        .set(state.pod.connections() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
