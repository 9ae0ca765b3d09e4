//! The edge: HTTP API, health, metrics and the WebSocket upgrade on one
//! port, and the per-connection task behind every WebSocket.
//!
//! * `server`     - accept loop, HTTP/1 connections, graceful drain
//! * `upgrade`    - `GET /ws`: checks before the upgrade (origin, auth, capacity)
//! * `control`    - orders from the controller: shed connections, drain
//! * `connection` - the one task that owns one WebSocket for its whole life
//! * `order`      - what a connection has written per log, and what to do next (pure)
//! * `rate`       - inbound frame rate limit and the policy for abusers (pure)
//! * `api`        - `/v1/*` for backends
//! * `health`     - `/healthz`, `/readyz`, `/metrics`
//! * `error`      - the JSON error body every HTTP path answers with

mod api;
mod batch;
mod connection;
mod control;
mod error;
mod health;
mod order;
mod rate;
mod server;
pub mod socket;
mod upgrade;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::routing::{get, post};
use tokio_util::task::TaskTracker;

pub use api::{
    ApiAccess, MessageBody, api_access, is_loopback, parse_idempotency_key, parse_message_body,
};
pub use error::ApiError;
pub use server::{Gateway, StartError, shutdown_signal};

use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::config::ServeConfig;
use crate::pod::LocalPod;
use crate::telemetry::Metrics;
use crate::upstream::Upstream;

/// Everything a handler or a connection task needs, shared by all of them.
pub struct AppState {
    pub config: ServeConfig,
    pub pod: Arc<LocalPod>,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    pub auth: Authenticator,
    pub upstream: Upstream,
    /// Tracks every connection task so shutdown can wait for them (axum's
    /// graceful shutdown does not see upgraded connections).
    pub tracker: TaskTracker,
    /// Source of per-pod connection ids.
    pub next_conn_id: AtomicU64,
}

/// All routes, in one place.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/sessions/{session}/messages", post(api::send_to_session))
        .route(
            "/sessions/{session}",
            get(api::get_session).delete(api::delete_session),
        )
        .route("/channels/{channel}/messages", post(api::publish))
        .route(
            "/messages",
            post(batch::send_batch).layer(axum::extract::DefaultBodyLimit::max(
                state.config.max_batch_bytes,
            )),
        )
        .route("/fleet", get(api::fleet))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_api_key,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_frame_bytes,
        ));
    Router::new()
        .route("/ws", get(upgrade::websocket))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .nest("/v1", v1)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}
