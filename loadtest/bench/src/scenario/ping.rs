//! `ping`: M connections send application `ping` frames at a total rate and
//! measure the round trip to the matching `pong`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::connect::CLOSE_GRACE;
use super::fleet::{Conn, Event, Fleet, Phase, Ready, jitter};
use super::{Common, MAX_RATE, Plan, Share, check_range, handshake_rate, per_run_second};
use crate::Result;
use crate::multiproc::Coordinator;
use crate::protocol::{ServerFrame, now_micros, ping_frame, stamp};
use crate::report::Report;
use crate::stats::{Measurements, Stats};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub common: Common,
    pub connections: usize,
    /// Pings per second over all connections.
    pub rate: f64,
    /// Longest wait for outstanding pongs after the run.
    pub drain_s: f64,
}

impl Params {
    pub(crate) fn validate(&self) -> Result<()> {
        super::check_count("connections", self.connections)?;
        check_range("rate", self.rate, 0.001, MAX_RATE)?;
        check_range("drain", self.drain_s, 0.0, 600.0)
    }
}

pub async fn run(params: Params) -> Result<Report> {
    Plan::Ping(params).run_local().await
}

pub async fn execute(p: &Params, share: Share, coord: &Coordinator) -> Result<Measurements> {
    execute_with(p, share, coord, Arc::new(Stats::new())).await
}

pub async fn execute_with(
    p: &Params,
    share: Share,
    coord: &Coordinator,
    stats: Arc<Stats>,
) -> Result<Measurements> {
    let mut fleet = Fleet::new(&p.common, stats.clone())?;
    // Every connection pings at the same rate: total rate / all connections.
    let period = Duration::from_secs_f64(p.connections.max(1) as f64 / p.rate);
    let ramp = fleet
        .open(&p.common, share, p.connections, move |conn, ready| {
            pinging_connection(conn, ready, period)
        })
        .await;
    coord.ready(ramp.ready).await;
    fleet.set_phase(Phase::Run);
    let started = Instant::now();
    tokio::time::sleep(p.common.duration()).await;
    stats.set_phase("run", started.elapsed());
    // Done when every connection has stopped sending and has had its pongs
    // (comparing sent and received counts instead would race with a ping
    // being sent at this very moment).
    let connections = ramp.ready;
    fleet
        .drain(Duration::from_secs_f64(p.drain_s), move |s| {
            s.get("ping_finished") >= connections
        })
        .await;
    fleet.close(CLOSE_GRACE).await;
    Ok(stats.snapshot())
}

/// Pings every `period` during `Run` (starting at a random point of the
/// period, so connections do not ping in lockstep), records each pong's
/// round trip, and keeps reading until every ping is answered or `Stop`.
async fn pinging_connection(mut conn: Conn, ready: Ready, period: Duration) {
    ready.fire(true);
    let alive = ping_until_answered(&mut conn, period).await;
    conn.stats.incr("ping_finished");
    if alive && conn.hold_until(Phase::Stop).await {
        conn.close().await;
    }
}

/// The pinging loop; false if the connection ended for good.
async fn ping_until_answered(conn: &mut Conn, period: Duration) -> bool {
    if !conn.hold_until(Phase::Run).await {
        return false;
    }
    let first = tokio::time::Instant::now() + jitter(period);
    let mut tick = tokio::time::interval_at(first, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut next_id, mut outstanding) = (0u64, 0u64);
    let mut sending = conn.phase() == Phase::Run;
    loop {
        tokio::select! {
            _ = tick.tick(), if sending && !conn.is_broken() => {
                next_id += 1;
                if conn.send_text(ping_frame(next_id)).await {
                    conn.stats.incr("ping_sent");
                    outstanding += 1;
                }
            }
            event = conn.next_event() => match event {
                Event::Frame(ServerFrame::Pong { data, .. }) => {
                    if let Some(t) = stamp(&data) {
                        conn.stats.record_us("rtt", now_micros().saturating_sub(t));
                    }
                    conn.stats.incr("pong_received");
                    outstanding = outstanding.saturating_sub(1);
                    if !sending && outstanding == 0 {
                        break;
                    }
                }
                Event::Phase(Phase::Drain) => {
                    sending = false;
                    if outstanding == 0 {
                        break;
                    }
                }
                Event::Phase(Phase::Stop) => break,
                // Pings in flight on the lost socket are not coming back.
                Event::Reconnected => outstanding = 0,
                Event::Ended => return false,
                _ => {}
            }
        }
    }
    true
}

pub(crate) fn finish(m: &mut Measurements, prefix: &str) -> BTreeMap<String, f64> {
    let sent = m.count(&format!("{prefix}ping_sent"));
    let received = m.count(&format!("{prefix}pong_received"));
    m.counts.insert(
        format!("{prefix}pong_missing"),
        sent.saturating_sub(received),
    );
    let mut rates = BTreeMap::new();
    handshake_rate(m, prefix, &mut rates);
    per_run_second(m, prefix, &["ping_sent", "pong_received"], &mut rates);
    rates
}
