//! Orders from the controller, executed on this pod: shed connections for
//! a rebalance, or drain ahead of a scale-down (api.md v1.1 "Shedding").
//!
//! The bus delivers orders into [`crate::pod::LocalPod`] (each id once);
//! this task carries them out. Shedding asks the longest-connected
//! connections to leave with `reconnect` (jittered `after_ms`) + 1012, at
//! most `per_s` per second, with readiness off so the Service sends the
//! reconnects to other pods. Nothing is lost: clients resume with `last`.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AppState;
use crate::pod::OrderAction;
use crate::protocol::close::CloseReason;

/// Runs until `shutdown`; one order at a time, the newest waiting one next.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut orders = state.pod.orders();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = orders.changed() => if changed.is_err() { return },
        }
        let Some(order) = orders.borrow_and_update().clone() else {
            continue;
        };
        let span = tracing::info_span!("order", id = %order.id);
        match order.action {
            OrderAction::Drain => {
                state.metrics.orders.with_label_values(&["drain"]).inc();
                let _enter = span.enter();
                tracing::info!(
                    connections = state.pod.connections(),
                    "draining for a scale-down"
                );
                state.pod.start_draining();
                state.metrics.draining.set(1);
            }
            OrderAction::Shed { count, per_s } => {
                state.metrics.orders.with_label_values(&["shed"]).inc();
                shed(&state, count, per_s, &shutdown).instrument(span).await;
            }
        }
    }
}

/// Sheds `count` connections at `per_s` per second, readiness off meanwhile.
async fn shed(state: &AppState, count: usize, per_s: u32, shutdown: &CancellationToken) {
    let per_s = per_s.max(1) as usize;
    tracing::info!(count, per_s, "shedding connections");
    state.pod.set_shedding(true);
    state.metrics.shedding.set(1);
    let jitter = state.config.reconnect_jitter_ms;
    let mut left = count;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while left > 0 && !state.pod.is_draining() {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mut reason = || CloseReason::Rebalance {
            after_ms: rand::rng().random_range(0..=jitter),
        };
        let asked = state
            .bus
            .shed_local_connections(left.min(per_s), &mut reason);
        state.metrics.connections_shed.inc_by(asked as u64);
        if asked == 0 {
            break; // fewer connections here than ordered
        }
        left -= asked;
    }
    // The last batch is still saying goodbye; stay unready while it does,
    // or its reconnects could come straight back here.
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    state.pod.set_shedding(false);
    state.metrics.shedding.set(0);
    tracing::info!(shed = count - left, "shedding done");
}
