//! `fanout`: S subscribers on one channel; messages published through the
//! HTTP API at a rate; measures delivery latency and deliveries per second.
//!
//! In a multi-process run only the first process publishes (at the full
//! rate), so every subscriber in every process expects every message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::connect::CLOSE_GRACE;
use super::direct::{validate_http_targets, validate_in_flight};
use super::fleet::{Conn, Event, Fleet, Phase, Ready};
use super::{Common, MAX_RATE, Plan, Share, check_range, handshake_rate, per_run_second};
use crate::http::{Destination, Publisher, paced};
use crate::multiproc::Coordinator;
use crate::protocol::{Offset, ServerFrame, now_micros, stamp, subscribe_frame};
use crate::report::Report;
use crate::stats::{Measurements, Stats};
use crate::{Error, Result};

/// The id of the (only) subscribe request each connection sends.
const SUBSCRIBE_ID: u64 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub common: Common,
    pub subscribers: usize,
    /// Publishes per second.
    pub rate: f64,
    /// Channel name; default `<run id>-fanout`.
    pub channel: Option<String>,
    /// HTTP API bases to publish to, round-robin; empty: the `--url` pods.
    pub http_targets: Vec<String>,
    pub max_in_flight: usize,
    /// Longest wait for deliveries to stop arriving after the run.
    pub drain_s: f64,
    /// Least wait after the last publish before deliveries are counted:
    /// set it above the fleet's delivery bound (`--delivery-repair-ms`) so
    /// that a message still missing then was lost, not late.
    #[serde(default)]
    pub settle_s: f64,
}

impl Params {
    pub(crate) fn validate(&self) -> Result<()> {
        super::check_count("subscribers", self.subscribers)?;
        check_range("rate", self.rate, 0.0, MAX_RATE)?;
        check_range("drain", self.drain_s, 0.0, 600.0)?;
        check_range("settle", self.settle_s, 0.0, 600.0)?;
        validate_http_targets(&self.http_targets)?;
        validate_in_flight(self.max_in_flight)?;
        let channel = self.channel();
        if channel.is_empty()
            || channel.len() > 128
            || !channel
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
        {
            return Err(Error::InvalidParam(
                "channel must match [A-Za-z0-9._:-]{1,128}".into(),
            ));
        }
        Ok(())
    }

    pub fn channel(&self) -> String {
        self.channel
            .clone()
            .unwrap_or_else(|| format!("{}-fanout", self.common.run_id))
    }
}

pub async fn run(params: Params) -> Result<Report> {
    Plan::Fanout(params).run_local().await
}

pub async fn execute(p: &Params, share: Share, coord: &Coordinator) -> Result<Measurements> {
    let stats = Arc::new(Stats::new());
    let mut fleet = Fleet::new(&p.common, stats.clone())?;
    let channel: Arc<str> = p.channel().into();
    let body_channel = channel.clone();
    let ramp = fleet
        .open(&p.common, share, p.subscribers, move |conn, ready| {
            subscriber(conn, ready, body_channel.clone())
        })
        .await;
    coord.ready(ramp.ready).await;
    fleet.set_phase(Phase::Run);

    let started = Instant::now();
    if share.index == 0 {
        let publisher = Publisher::new(stats.clone(), p.max_in_flight)?;
        let bases: Arc<[String]> = if p.http_targets.is_empty() {
            p.common.targets.iter().map(|t| t.http_base()).collect()
        } else {
            p.http_targets.clone().into()
        };
        let until = tokio::time::Instant::now() + p.common.duration();
        let publisher_ref = publisher.clone();
        paced(&publisher, p.rate, until, |n| {
            let base = bases[n as usize % bases.len()].clone();
            let channel = channel.clone();
            let publisher = publisher_ref.clone();
            async move {
                let _ = publisher
                    .post(&base, Destination::Channel(&channel), n)
                    .await;
            }
        })
        .await;
    } else {
        tokio::time::sleep(p.common.duration()).await;
    }
    stats.set_phase("run", started.elapsed());
    let settle = Duration::from_secs_f64(p.settle_s);
    fleet
        .drain_quiet(
            "delivered",
            Duration::from_millis(500),
            settle,
            settle + Duration::from_secs_f64(p.drain_s),
        )
        .await;
    fleet.close(CLOSE_GRACE).await;
    Ok(stats.snapshot())
}

/// Subscribes, reports ready on the `ack`, then records every channel
/// message; after a reconnect it resubscribes with `since` = the last
/// channel offset it processed, and dedupes the overlap. A subscriber whose
/// connection never ended adds what it got to `steady_delivered`, so that
/// losses without any close or gap notice show on their own.
async fn subscriber(mut conn: Conn, ready: Ready, channel: Arc<str>) {
    let mut ready = Some(ready);
    let mut since: Option<Offset> = None;
    let mut delivered = 0u64;
    let mut steady = true;
    if !conn
        .send_text(subscribe_frame(&channel, SUBSCRIBE_ID, None))
        .await
    {
        return;
    }
    loop {
        match conn.next_event().await {
            Event::Frame(ServerFrame::Ack {
                id: Some(SUBSCRIBE_ID),
            }) => {
                if let Some(ready) = ready.take() {
                    conn.stats.incr("subscribed");
                    ready.fire(true);
                }
            }
            Event::Frame(ServerFrame::Error {
                id: Some(SUBSCRIBE_ID),
                ..
            }) => {
                if let Some(ready) = ready.take() {
                    ready.fire(false);
                }
            }
            Event::Frame(ServerFrame::Message {
                offset,
                channel: Some(c),
                data,
            }) if *c == *channel => {
                let Ok(o) = offset.parse::<Offset>() else {
                    conn.stats.incr("bad_offset");
                    continue;
                };
                if since.is_some_and(|s| o <= s) {
                    conn.stats.incr("duplicates_deduped");
                    continue;
                }
                since = Some(o);
                delivered += 1;
                conn.stats.incr("delivered");
                if let Some(t) = stamp(&data) {
                    conn.stats
                        .record_us("delivery", now_micros().saturating_sub(t));
                }
            }
            Event::Reconnected => {
                steady = false;
                conn.stats.incr("resubscribed");
                if !conn
                    .send_text(subscribe_frame(&channel, SUBSCRIBE_ID, since))
                    .await
                {
                    continue;
                }
            }
            Event::Phase(Phase::Stop) => break,
            Event::Ended => return,
            _ => {}
        }
    }
    if steady && ready.is_none() {
        conn.stats.incr("steady_subscribers");
        conn.stats.add("steady_delivered", delivered);
    }
    conn.close().await;
}

pub(crate) fn finish(m: &mut Measurements, prefix: &str) -> BTreeMap<String, f64> {
    let published = m.count(&format!("{prefix}post_ok"));
    let subscribed = m.count(&format!("{prefix}subscribed"));
    let delivered = m.count(&format!("{prefix}delivered"));
    let expected = published * subscribed;
    m.counts
        .insert(format!("{prefix}expected_deliveries"), expected);
    m.counts.insert(
        format!("{prefix}missing_deliveries"),
        expected.saturating_sub(delivered),
    );
    // Lost without a trace: subscribers that were never closed, never
    // resubscribed and never told of a gap, yet did not get everything.
    let steady = m.count(&format!("{prefix}steady_subscribers"));
    let steady_delivered = m.count(&format!("{prefix}steady_delivered"));
    m.counts.insert(
        format!("{prefix}missing_deliveries_steady"),
        (published * steady).saturating_sub(steady_delivered),
    );
    let mut rates = BTreeMap::new();
    handshake_rate(m, prefix, &mut rates);
    per_run_second(m, prefix, &["post_ok", "delivered"], &mut rates);
    rates
}
