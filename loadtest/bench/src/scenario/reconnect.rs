//! `reconnect`: sessions that keep dropping and resuming with `last` while
//! direct messages flow to them; verifies by offset that every accepted
//! message was delivered (`gaps` must be 0) and counts the duplicates the
//! client deduped.
//!
//! The check: the POSTer keeps each session's accepted offsets (from the
//! 202 answers); each connection keeps the offsets it processed. After the
//! run, sending stops, connections stop dropping and wait until they have
//! caught up; then every accepted offset not processed is a gap.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::connect::CLOSE_GRACE;
use super::direct::{validate_http_targets, validate_in_flight};
use super::fleet::{Conn, Event, Fleet, Observed, Phase, Ready, jitter};
use super::{Common, MAX_RATE, Plan, Share, check_range, handshake_rate, per_run_second};
use crate::Result;
use crate::http::{Destination, Publisher, paced};
use crate::multiproc::Coordinator;
use crate::protocol::{Offset, ServerFrame, now_micros, stamp};
use crate::report::Report;
use crate::stats::{Measurements, Stats};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub common: Common,
    pub sessions: usize,
    /// Messages per second over all sessions.
    pub rate: f64,
    /// Mean time between deliberate drops of one connection.
    pub drop_every_ms: u64,
    pub http_targets: Vec<String>,
    pub max_in_flight: usize,
    /// Longest wait for every session to catch up after the run.
    pub drain_s: f64,
}

impl Params {
    pub(crate) fn validate(&self) -> Result<()> {
        super::check_count("sessions", self.sessions)?;
        check_range("rate", self.rate, 0.0, MAX_RATE)?;
        check_range(
            "drop every ms",
            self.drop_every_ms as f64,
            10.0,
            3_600_000.0,
        )?;
        check_range("drain", self.drain_s, 0.0, 600.0)?;
        validate_http_targets(&self.http_targets)?;
        validate_in_flight(self.max_in_flight)
    }
}

/// Accepted offsets per local session, filled by the POSTer.
type Accepted = Arc<Vec<Mutex<Vec<Offset>>>>;

pub async fn run(params: Params) -> Result<Report> {
    Plan::Reconnect(params).run_local().await
}

pub async fn execute(p: &Params, share: Share, coord: &Coordinator) -> Result<Measurements> {
    let stats = Arc::new(Stats::new());
    let mut fleet = Fleet::new(&p.common, stats.clone())?;
    let range = share.range(p.sessions);
    let accepted: Accepted = Arc::new((0..range.len()).map(|_| Mutex::default()).collect());
    let drop_every = Duration::from_millis(p.drop_every_ms);
    let body_accepted = accepted.clone();
    let ramp = fleet
        .open(&p.common, share, p.sessions, move |conn, ready| {
            dropping_connection(conn, ready, drop_every, body_accepted.clone())
        })
        .await;
    coord.ready(ramp.ready).await;
    fleet.set_phase(Phase::Run);

    let publisher = Publisher::new(stats.clone(), p.max_in_flight)?;
    let started = Instant::now();
    if !range.is_empty() {
        let until = tokio::time::Instant::now() + p.common.duration();
        let dialer = fleet.dialer().clone();
        let publisher_ref = publisher.clone();
        paced(&publisher, share.rate(p.rate), until, |n| {
            let local = n as usize % range.len();
            let global = range.start + local;
            let base = if p.http_targets.is_empty() {
                dialer.target(global).http_base()
            } else {
                p.http_targets[n as usize % p.http_targets.len()].clone()
            };
            let session = p.common.session(global);
            let publisher = publisher_ref.clone();
            let accepted = accepted.clone();
            async move {
                if let Ok(offset) = publisher
                    .post(&base, Destination::Session(&session), n)
                    .await
                {
                    accepted[local]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(offset);
                }
            }
        })
        .await;
    }
    stats.set_phase("run", started.elapsed());
    // Every POST has been answered now; wait for the sessions to catch up.
    let sessions = ramp.ready;
    fleet
        .drain(Duration::from_secs_f64(p.drain_s), move |s| {
            s.get("caught_up") + s.get("gave_up") >= sessions
        })
        .await;
    fleet.close(CLOSE_GRACE).await;
    Ok(stats.snapshot())
}

/// Drops and resumes every `drop_every` (jittered, half of them with a
/// close frame, half as a bare TCP shutdown) during `Run`; during `Drain`
/// checks whether it has processed every accepted offset; at `Stop`
/// counts gaps.
async fn dropping_connection(
    mut conn: Conn,
    ready: Ready,
    drop_every: Duration,
    accepted: Accepted,
) {
    ready.fire(true);
    let mut processed: Vec<Offset> = Vec::new();
    let next_drop = || drop_every / 2 + jitter(drop_every);
    let drop_timer = tokio::time::sleep(next_drop());
    tokio::pin!(drop_timer);
    let mut check = tokio::time::interval(Duration::from_millis(100));
    let mut caught_up = false;
    loop {
        tokio::select! {
            _ = &mut drop_timer, if conn.phase() == Phase::Run && !conn.is_broken() => {
                conn.stats.incr("drops");
                if let Event::Ended = conn.drop_and_resume(rand::random::<bool>()).await {
                    break;
                }
                drop_timer.as_mut().reset(tokio::time::Instant::now() + next_drop());
            }
            _ = check.tick(), if conn.phase() == Phase::Drain && !caught_up => {
                if missing(&accepted[conn.local], &processed) == 0 {
                    caught_up = true;
                    conn.stats.incr("caught_up");
                }
            }
            event = conn.next_event() => match event {
                Event::Frame(ServerFrame::Message { offset, channel: None, data }) => {
                    match conn.observe(&offset) {
                        Observed::New(o) => {
                            processed.push(o);
                            conn.stats.incr("delivered");
                            if let Some(t) = stamp(&data) {
                                conn.stats.record_us("delivery", now_micros().saturating_sub(t));
                            }
                        }
                        Observed::Duplicate => conn.stats.incr("duplicates_deduped"),
                        Observed::Unparsable => {}
                    }
                }
                Event::Phase(Phase::Stop) | Event::Ended => break,
                _ => {}
            }
        }
    }
    let accepted = accepted[conn.local]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    conn.stats.add("accepted_checked", accepted.len() as u64);
    conn.stats.add("gaps", missing_of(&accepted, &processed));
    if conn.phase() >= Phase::Stop {
        conn.close().await;
    }
}

fn missing(accepted: &Mutex<Vec<Offset>>, processed: &[Offset]) -> u64 {
    missing_of(
        &accepted.lock().unwrap_or_else(|e| e.into_inner()),
        processed,
    )
}

/// Accepted offsets not in `processed` (which is increasing, as delivered).
fn missing_of(accepted: &[Offset], processed: &[Offset]) -> u64 {
    accepted
        .iter()
        .filter(|o| processed.binary_search(o).is_err())
        .count() as u64
}

pub(crate) fn finish(m: &mut Measurements, prefix: &str) -> BTreeMap<String, f64> {
    let gaps = m.count(&format!("{prefix}gaps"));
    m.counts.insert(format!("{prefix}gaps"), gaps);
    let mut rates = BTreeMap::new();
    handshake_rate(m, prefix, &mut rates);
    per_run_second(m, prefix, &["post_ok", "delivered", "drops"], &mut rates);
    rates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_gaps_by_offset() {
        let o = |ms, seq| Offset { ms, seq };
        let processed = [o(1, 0), o(1, 1), o(3, 0)];
        assert_eq!(missing_of(&[o(1, 1), o(3, 0)], &processed), 0);
        assert_eq!(missing_of(&[o(3, 0), o(2, 5), o(1, 0)], &processed), 1);
        assert_eq!(missing_of(&[], &processed), 0);
    }
}
