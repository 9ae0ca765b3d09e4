//! The controller's HTTP endpoints: `/metrics` (Prometheus, for an HPA
//! through prometheus-adapter), `/fleet` (JSON for KEDA's `metrics-api`
//! scaler: fleet totals, since KEDA's AverageValue divides by replicas),
//! `/healthz` and `/readyz` (ready once a tick read the whole fleet
//! recently).

use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use super::metrics::ControllerMetrics;
use super::reconcile::FleetView;
use crate::bus::now_ms;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: ControllerMetrics,
    pub view: Arc<RwLock<FleetView>>,
    /// A view older than this is stale: `/readyz` says so, `/fleet` 503s.
    pub fresh_for_ms: u64,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/fleet", get(fleet))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

fn snapshot(state: &HttpState) -> (FleetView, bool) {
    let view = state.view.read().unwrap_or_else(|e| e.into_inner()).clone();
    let fresh =
        view.updated_ms > 0 && now_ms().saturating_sub(view.updated_ms) <= state.fresh_for_ms;
    (view, fresh)
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// `{"fleet":{"connections":..,"desired_replicas":..,...}}`. Stale or
/// missing data is a 503, never zeros: KEDA then keeps the current scale
/// instead of scaling to the minimum.
async fn fleet(State(state): State<HttpState>) -> Response {
    let (view, fresh) = snapshot(&state);
    if !fresh {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"code": "unavailable", "message": "no recent view of the fleet (pods or Redis unreachable)"}})),
        )
            .into_response();
    }
    Json(json!({ "fleet": view })).into_response()
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let (view, fresh) = snapshot(&state);
    if fresh {
        Json(json!({"ready": true, "leader": view.leader})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "no recent view of the fleet"})),
        )
            .into_response()
    }
}
