//! The pod's periodic upkeep, every lease/3: publish its status, keep its
//! inbox alive, renew its instance's lease (the liveness of all its
//! sessions, and the sweep of dead instances: `liveness.rs`) and its
//! channel memberships, report its pending inbox entries, and pick up the
//! controller's order for it. Its Redis commands grow with pods and
//! channels with local subscribers, never with connections (trap 17).

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use super::{RedisBus, keys};
use crate::protocol::ChannelName;

pub async fn run(bus: Arc<RedisBus>, shutdown: CancellationToken) {
    let period = (bus.opts.lease / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        once(&bus).await;
    }
    // Leaving the fleet view at once is kinder than waiting for the lease.
    let mut conn = bus.conn.clone();
    let _ = bus
        .call::<i64>("hdel", conn.hdel(keys::FLEET, &bus.pod.name))
        .await;
}

async fn once(bus: &RedisBus) {
    let mut conn = bus.conn.clone();
    let status = bus.status_json();
    if bus
        .call::<i64>("hset", conn.hset(keys::FLEET, &bus.pod.name, status))
        .await
        .is_err()
    {
        return; // Redis is away; try again next tick
    }
    let _ = bus
        .call::<i64>(
            "pexpire",
            conn.pexpire(&bus.inbox, (bus.lease_ms() * 20) as i64),
        )
        .await;

    bus.heartbeat().await;
    read_order(bus, &mut conn).await;

    let channels: Vec<ChannelName> = bus.channels.iter().map(|e| e.key().clone()).collect();
    for channel in channels {
        // A membership that was missing means Redis lost it (restarted
        // empty): publishes since then never reached this pod.
        if let Ok((_, true)) = bus.join_channel(&channel).await {
            bus.catch_up_channel(&channel, "membership_lost");
        }
    }

    let pending: std::result::Result<Vec<redis::Value>, _> = bus
        .call("xpending", async {
            redis::cmd("XPENDING")
                .arg(&bus.inbox)
                .arg(keys::INBOX_GROUP)
                .query_async(&mut conn)
                .await
        })
        .await;
    if let Ok(summary) = pending
        && let Some(redis::Value::Int(n)) = summary.first()
    {
        bus.bus_metrics.pending.set(*n);
    }
}

/// The controller's newest order for this pod, handed to the pod (which
/// runs each order once). A malformed order is logged and skipped: the
/// controller and the pod may be different versions.
async fn read_order(bus: &RedisBus, conn: &mut super::conn::Conn) {
    let Ok(Some(json)) = bus
        .call::<Option<String>>("hget", conn.hget(keys::CONTROL, &bus.pod.name))
        .await
    else {
        return;
    };
    match serde_json::from_str::<crate::pod::Order>(&json) {
        Ok(order) => {
            let id = order.id.clone();
            if bus.pod.offer_order(order) {
                tracing::info!(order = %id, "order from the controller");
            }
        }
        Err(e) => tracing::warn!(error = %e, "unreadable order from the controller"),
    }
}
