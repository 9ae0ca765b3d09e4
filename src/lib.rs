//! wsfleet: a horizontally scaled WebSocket connection fleet.
//!
//! Every WebSocket is owned by one tokio task for its whole life, so a bug
//! or a slow client costs one connection, never the pod. Messages are made
//! durable in a per-session (or per-channel) log before they are
//! acknowledged, and routed to whichever pod owns the session; a client that
//! reconnects anywhere resumes from its last offset.
//!
//! Layout:
//! * [`protocol`]  - session ids, offsets, JSON frames, close codes (pure)
//! * [`bus`]       - durable logs and routing: the `Bus` trait and its
//!   in-memory implementation (embedded mode)
//! * [`gateway`]   - the edge: accept loop, HTTP API, WebSocket upgrade and
//!   the per-connection task, drain
//! * [`auth`]      - JWTs, API keys, channel permissions
//! * [`upstream`]  - events from clients to backends (webhook, stream)
//! * [`telemetry`] - Prometheus metrics and structured logs
//! * [`config`]    - every flag and `WSFLEET_*` variable
//! * [`pod`]       - this pod's name, capacity and load

pub mod auth;
pub mod bus;
pub mod config;
pub mod controller;
pub mod gateway;
pub mod pod;
pub mod protocol;
pub mod telemetry;
pub mod upstream;
