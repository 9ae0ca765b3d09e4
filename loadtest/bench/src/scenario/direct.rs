//! `direct`: K connected sessions receive messages POSTed through the HTTP
//! API; measures end-to-end delivery latency (send time travels in `data.t`).
//!
//! With `http_targets` the POSTs go to other pods than the sessions are
//! connected to, which exercises cross-pod routing in a cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::connect::CLOSE_GRACE;
use super::fleet::{Conn, Event, Fleet, Observed, Phase, Ready};
use super::{Common, MAX_RATE, Plan, Share, check_range, handshake_rate, per_run_second};
use crate::http::{Destination, Publisher, paced};
use crate::multiproc::Coordinator;
use crate::protocol::{ServerFrame, now_micros, stamp};
use crate::report::Report;
use crate::stats::{Measurements, Stats};
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub common: Common,
    /// Connected sessions (all processes together).
    pub sessions: usize,
    /// Messages per second over all sessions.
    pub rate: f64,
    /// HTTP API bases to POST to, round-robin; empty: the pod each session
    /// is connected to.
    pub http_targets: Vec<String>,
    /// POSTs in flight at once per process.
    pub max_in_flight: usize,
    /// Longest wait for accepted messages to arrive after the run.
    pub drain_s: f64,
    /// Messages per request: above 1, `POST /v1/messages` batches.
    #[serde(default = "one")]
    pub batch: usize,
}

fn one() -> usize {
    1
}

impl Params {
    pub(crate) fn validate(&self) -> Result<()> {
        super::check_count("sessions", self.sessions)?;
        check_range("rate", self.rate, 0.0, MAX_RATE)?;
        check_range("drain", self.drain_s, 0.0, 600.0)?;
        validate_http_targets(&self.http_targets)?;
        if !(1..=1000).contains(&self.batch) {
            return Err(Error::InvalidParam(format!(
                "batch must be 1..=1000, got {}",
                self.batch
            )));
        }
        validate_in_flight(self.max_in_flight)
    }
}

pub(crate) fn validate_http_targets(targets: &[String]) -> Result<()> {
    for t in targets {
        if crate::target::parse_http_base(t)? != *t {
            return Err(Error::InvalidParam(format!(
                "http target {t:?} must be a bare http://host:port"
            )));
        }
    }
    Ok(())
}

pub(crate) fn validate_in_flight(n: usize) -> Result<()> {
    if (1..=10_000).contains(&n) {
        Ok(())
    } else {
        Err(Error::InvalidParam(
            "max in flight must be 1..=10000".into(),
        ))
    }
}

pub async fn run(params: Params) -> Result<Report> {
    Plan::Direct(params).run_local().await
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
    let ramp = fleet
        .open(&p.common, share, p.sessions, receiving_connection)
        .await;
    coord.ready(ramp.ready).await;
    fleet.set_phase(Phase::Run);

    let publisher = Publisher::new(stats.clone(), p.max_in_flight)?;
    let range = share.range(p.sessions);
    let started = Instant::now();
    if !range.is_empty() {
        let until = tokio::time::Instant::now() + p.common.duration();
        let http: Arc<[String]> = p.http_targets.clone().into();
        let dialer = fleet.dialer().clone();
        let publisher_ref = publisher.clone();
        let batch = p.batch.max(1);
        paced(&publisher, share.rate(p.rate) / batch as f64, until, |n| {
            let first = n as usize * batch;
            let global = |k: usize| range.start + ((first + k) % range.len());
            let base = if http.is_empty() {
                dialer.target(global(0)).http_base()
            } else {
                http[n as usize % http.len()].clone()
            };
            let sessions: Vec<String> = (0..batch).map(|k| p.common.session(global(k))).collect();
            let publisher = publisher_ref.clone();
            async move {
                if batch == 1 {
                    let _ = publisher
                        .post(&base, Destination::Session(&sessions[0]), n)
                        .await;
                } else {
                    publisher.post_batch(&base, &sessions, first as u64).await;
                }
            }
        })
        .await;
    }
    stats.set_phase("run", started.elapsed());
    fleet
        .drain(Duration::from_secs_f64(p.drain_s), |s| {
            s.get("delivered") >= s.get("post_ok")
        })
        .await;
    fleet.close(CLOSE_GRACE).await;
    Ok(stats.snapshot())
}

/// Receives direct messages until `Stop`, deduping by offset.
async fn receiving_connection(mut conn: Conn, ready: Ready) {
    ready.fire(true);
    loop {
        match conn.next_event().await {
            Event::Frame(ServerFrame::Message {
                offset,
                channel: None,
                data,
            }) => match conn.observe(&offset) {
                Observed::New(_) => {
                    conn.stats.incr("delivered");
                    if let Some(t) = stamp(&data) {
                        conn.stats
                            .record_us("delivery", now_micros().saturating_sub(t));
                    }
                }
                Observed::Duplicate => conn.stats.incr("duplicates_deduped"),
                Observed::Unparsable => {}
            },
            Event::Phase(Phase::Stop) => break,
            Event::Ended => return,
            _ => {}
        }
    }
    conn.close().await;
}

pub(crate) fn finish(m: &mut Measurements, prefix: &str) -> BTreeMap<String, f64> {
    let accepted = m.count(&format!("{prefix}post_ok"));
    let delivered = m.count(&format!("{prefix}delivered"));
    m.counts.insert(
        format!("{prefix}undelivered"),
        accepted.saturating_sub(delivered),
    );
    let mut rates = BTreeMap::new();
    handshake_rate(m, prefix, &mut rates);
    per_run_second(m, prefix, &["post_ok", "delivered"], &mut rates);
    rates
}
