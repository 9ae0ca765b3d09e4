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

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve(view: FleetView) -> String {
        let state = HttpState {
            metrics: ControllerMetrics::new(),
            view: Arc::new(RwLock::new(view)),
            fresh_for_ms: 45_000,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        format!("http://{addr}")
    }

    async fn get(url: String) -> (u16, serde_json::Value) {
        let r = reqwest::get(url).await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }

    #[tokio::test]
    async fn fleet_totals_for_keda_only_while_fresh() {
        let base = serve(FleetView {
            updated_ms: now_ms(),
            connections: 123_456,
            pods: 7,
            unknown_pods: 0,
            desired_replicas: 15,
            replicas: Some(7),
            leader: true,
        })
        .await;
        let (status, body) = get(format!("{base}/fleet")).await;
        assert_eq!(status, 200);
        assert_eq!(body["fleet"]["connections"], 123_456);
        assert_eq!(body["fleet"]["desired_replicas"], 15);
        let (status, body) = get(format!("{base}/readyz")).await;
        assert_eq!((status, body["leader"].clone()), (200, json!(true)));

        // Never reported, or too old: 503, never zeros.
        for view in [
            FleetView::default(),
            FleetView {
                updated_ms: now_ms() - 60_000,
                connections: 5,
                ..Default::default()
            },
        ] {
            let base = serve(view).await;
            let (status, body) = get(format!("{base}/fleet")).await;
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["error"]["code"], "unavailable");
            assert_eq!(get(format!("{base}/readyz")).await.0, 503);
            assert_eq!(get(format!("{base}/healthz")).await.0, 200);
        }
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let base = serve(FleetView::default()).await;
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        for name in [
            "wsfleet_controller_fleet_connections",
            "wsfleet_controller_desired_replicas",
            "wsfleet_controller_leader",
            "wsfleet_controller_reconcile_duration_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}: {text}");
        }
    }
}
