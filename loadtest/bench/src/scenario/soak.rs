//! `soak`: idle connections, pinging connections and direct messages side by
//! side for a long time, with a progress line every `report_every_s`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Common, Plan, Share, check_range, connect, direct, ping};
use crate::Result;
use crate::machine::rss_kib;
use crate::multiproc::Coordinator;
use crate::report::Report;
use crate::stats::{Measurements, Stats};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub common: Common,
    pub idle: usize,
    pub ping_connections: usize,
    pub ping_rate: f64,
    pub direct_sessions: usize,
    pub direct_rate: f64,
    pub http_targets: Vec<String>,
    pub report_every_s: f64,
}

impl Params {
    pub(crate) fn validate(&self) -> Result<()> {
        self.parts().0.validate()?;
        if self.ping_connections > 0 {
            self.parts().1.validate()?;
        }
        self.parts().2.validate()?;
        check_range("report every", self.report_every_s, 1.0, 86_400.0)
    }

    /// The three scenarios a soak runs, with distinct session ids.
    fn parts(&self) -> (connect::Params, ping::Params, direct::Params) {
        let with_run = |suffix: &str| {
            let mut c = self.common.clone();
            c.run_id = format!("{}-{suffix}", self.common.run_id);
            c
        };
        (
            connect::Params {
                common: with_run("idle"),
                connections: self.idle,
            },
            ping::Params {
                common: with_run("ping"),
                connections: self.ping_connections,
                rate: self.ping_rate,
                drain_s: 5.0,
            },
            direct::Params {
                common: with_run("direct"),
                sessions: self.direct_sessions,
                rate: self.direct_rate,
                http_targets: self.http_targets.clone(),
                max_in_flight: 64,
                drain_s: 10.0,
                batch: 1,
            },
        )
    }
}

pub async fn run(params: Params) -> Result<Report> {
    Plan::Soak(params).run_local().await
}

pub async fn execute(p: &Params, share: Share, coord: &Coordinator) -> Result<Measurements> {
    let (idle_p, ping_p, direct_p) = p.parts();
    let (idle_s, ping_s, direct_s) = (
        Arc::new(Stats::new()),
        Arc::new(Stats::new()),
        Arc::new(Stats::new()),
    );
    let parts = async {
        let nop = Coordinator::Nop;
        let ping_run = async {
            if ping_p.connections == 0 {
                return Ok(Measurements::default());
            }
            ping::execute_with(&ping_p, share, &nop, ping_s.clone()).await
        };
        tokio::join!(
            connect::execute_with(&idle_p, share, &nop, idle_s.clone()),
            ping_run,
            direct::execute_with(&direct_p, share, &nop, direct_s.clone()),
        )
    };
    let started = Instant::now();
    let every = Duration::from_secs_f64(p.report_every_s);
    // Progress lines, and one memory sample at the first of them (after the
    // ramps), run beside the parts so that neither holds the other up.
    let reporter = async {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut sampled = false;
        loop {
            tick.tick().await;
            progress(
                share,
                started,
                &idle_s,
                &ping_s,
                &direct_s,
                &p.common.server_pids,
            );
            if !sampled {
                sampled = true;
                let connections = idle_s.get("ready") + ping_s.get("ready") + direct_s.get("ready");
                coord.ready(connections).await;
            }
        }
    };
    let (idle, ping, direct) = tokio::select! {
        done = parts => done,
        never = reporter => never,
    };
    let mut m = idle?.prefixed("idle");
    m.merge(&ping?.prefixed("ping"));
    m.merge(&direct?.prefixed("direct"));
    Ok(m)
}

/// One progress line on stderr (stdout belongs to the result).
fn progress(
    share: Share,
    started: Instant,
    idle: &Stats,
    ping: &Stats,
    direct: &Stats,
    server_pids: &[u32],
) {
    let p99 = |s: &Stats, name: &str| {
        s.snapshot()
            .latencies
            .get(name)
            .map(|l| l.summary().p99_ms)
            .unwrap_or(0.0)
    };
    let servers: Vec<String> = server_pids
        .iter()
        .map(|&pid| format!("{pid}:{}KiB", rss_kib(Some(pid)).unwrap_or(0)))
        .collect();
    eprintln!(
        "[soak {}/{} t={:.0}s] idle held {} | ping sent {} recv {} p99 {:.2}ms | direct ok {} delivered {} p99 {:.2}ms | rss {}KiB servers [{}]",
        share.index,
        share.count,
        started.elapsed().as_secs_f64(),
        idle.get("ready"),
        ping.get("ping_sent"),
        ping.get("pong_received"),
        p99(ping, "rtt"),
        direct.get("post_ok"),
        direct.get("delivered"),
        p99(direct, "delivery"),
        rss_kib(None).unwrap_or(0),
        servers.join(" "),
    );
}

pub(crate) fn finish(m: &mut Measurements) -> BTreeMap<String, f64> {
    let mut rates = connect::finish(m, "idle.");
    rates.extend(ping::finish(m, "ping."));
    rates.extend(direct::finish(m, "direct."));
    rates
}
