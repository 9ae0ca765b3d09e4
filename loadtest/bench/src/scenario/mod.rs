//! The scenarios. Each module has `Params`, a `run` that executes it in this
//! process and returns a [`Report`], and an `execute` that the multi-process
//! runner calls in each child with that child's [`Share`].
//!
//! Every scenario has the same shape (see [`fleet`]): open connections
//! (`Setup`), tell the [`Coordinator`] they are up (memory is sampled then),
//! do the work for `--duration` (`Run`), let in-flight work finish (`Drain`),
//! close everything (`Stop`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::WsTuning;
use crate::machine::{MachineInfo, rss_kib};
use crate::multiproc::Coordinator;
use crate::report::Report;
use crate::stats::Measurements;
use crate::target::Target;
use crate::{Error, Result};

pub mod connect;
pub mod direct;
pub mod fanout;
pub mod fleet;
pub mod ping;
pub mod reconnect;
pub mod soak;

/// No run lasts longer than a day, whatever it is asked.
pub const MAX_DURATION_S: f64 = 86_400.0;
/// Upper bound on connections of one run (all processes together).
pub const MAX_CONNECTIONS: usize = 2_000_000;
/// Upper bound on any rate parameter, per second.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Upper bound on processes of one run.
pub const MAX_PROCESSES: usize = 128;
/// Sockets a process keeps free of its open-files limit for everything else.
const FD_RESERVE: u64 = 200;

/// Parameters every scenario shares.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Common {
    /// Pods to connect to, round-robin by connection number.
    pub targets: Vec<Target>,
    /// Loopback source addresses, round-robin; empty lets the kernel choose.
    pub source_ips: Vec<Ipv4Addr>,
    pub tuning: WsTuning,
    /// Length of the `Run` phase.
    pub duration_s: f64,
    /// New connections per second over all processes; `None` is as fast as
    /// `connect_concurrency` allows.
    pub connect_rate: Option<f64>,
    /// Handshakes in flight at once per process, so a ramp does not
    /// overflow the server's accept backlog.
    pub connect_concurrency: usize,
    /// Bound on the `Setup` phase.
    pub ramp_timeout_s: f64,
    /// Times a failed or timed-out handshake is tried again, with jittered
    /// exponential backoff (as real clients do), before the connection
    /// counts as failed.
    #[serde(default)]
    pub connect_retries: u32,
    /// Prefix of every session id, so runs do not resume each other's sessions.
    pub run_id: String,
    /// Server processes whose RSS is reported (read from `/proc/<pid>/status`).
    pub server_pids: Vec<u32>,
}

impl Common {
    /// Defaults for `urls`, each validated to be loopback.
    pub fn new(urls: &[&str]) -> Result<Self> {
        Ok(Common {
            targets: urls
                .iter()
                .map(|u| Target::parse_ws(u))
                .collect::<Result<_>>()?,
            source_ips: Vec::new(),
            tuning: WsTuning::default(),
            duration_s: 10.0,
            connect_rate: None,
            connect_concurrency: 200,
            ramp_timeout_s: 120.0,
            connect_retries: 0,
            run_id: new_run_id(),
            server_pids: Vec::new(),
        })
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    pub fn ramp_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.ramp_timeout_s)
    }

    /// The session id of connection number `global`.
    pub fn session(&self, global: usize) -> String {
        format!("{}-{global}", self.run_id)
    }

    fn validate(&self) -> Result<()> {
        if self.targets.is_empty() {
            return Err(Error::InvalidParam("at least one --url is needed".into()));
        }
        check_range("duration", self.duration_s, 0.0, MAX_DURATION_S)?;
        check_range("ramp timeout", self.ramp_timeout_s, 0.1, 3600.0)?;
        if let Some(r) = self.connect_rate {
            check_range("connect rate", r, 0.001, MAX_RATE)?;
        }
        if self.connect_concurrency == 0 || self.connect_concurrency > 100_000 {
            return Err(Error::InvalidParam(
                "connect concurrency must be 1..=100000".into(),
            ));
        }
        if self.tuning.read_buffer < 256 {
            return Err(Error::InvalidParam(
                "read buffer must be at least 256 bytes".into(),
            ));
        }
        if !self
            .run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
        {
            return Err(Error::InvalidParam(
                "run id must match [A-Za-z0-9._:-]".into(),
            ));
        }
        Ok(())
    }
}

/// A random run id, e.g. `b3f9a1c2`.
pub fn new_run_id() -> String {
    format!("b{:08x}", rand::random::<u32>())
}

pub(crate) fn check_range(what: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(Error::InvalidParam(format!(
            "{what} must be within {lo}..={hi}, got {v}"
        )))
    }
}

pub(crate) fn check_count(what: &str, n: usize) -> Result<()> {
    if n <= MAX_CONNECTIONS {
        Ok(())
    } else {
        Err(Error::InvalidParam(format!(
            "{what} must be at most {MAX_CONNECTIONS}"
        )))
    }
}

/// Which part of a run one process does: `index` of `count`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Share {
    pub index: usize,
    pub count: usize,
}

impl Share {
    pub fn whole() -> Self {
        Share { index: 0, count: 1 }
    }

    /// The global connection numbers of this share of `total`.
    pub fn range(&self, total: usize) -> Range<usize> {
        let count = self.count.max(1);
        let (base, rem) = (total / count, total % count);
        let start = self.index * base + self.index.min(rem);
        let len = base + usize::from(self.index < rem);
        start..start + len
    }

    /// This share of a total rate.
    pub fn rate(&self, total: f64) -> f64 {
        total / self.count.max(1) as f64
    }
}

/// A whole run's description: what children receive as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "kebab-case")]
pub enum Plan {
    Connect(connect::Params),
    Ping(ping::Params),
    Direct(direct::Params),
    Fanout(fanout::Params),
    Reconnect(reconnect::Params),
    Soak(soak::Params),
}

impl Plan {
    pub fn name(&self) -> &'static str {
        match self {
            Plan::Connect(_) => "connect",
            Plan::Ping(_) => "ping",
            Plan::Direct(_) => "direct",
            Plan::Fanout(_) => "fanout",
            Plan::Reconnect(_) => "reconnect",
            Plan::Soak(_) => "soak",
        }
    }

    pub fn common(&self) -> &Common {
        match self {
            Plan::Connect(p) => &p.common,
            Plan::Ping(p) => &p.common,
            Plan::Direct(p) => &p.common,
            Plan::Fanout(p) => &p.common,
            Plan::Reconnect(p) => &p.common,
            Plan::Soak(p) => &p.common,
        }
    }

    /// Connections the whole run opens.
    pub fn connections(&self) -> usize {
        match self {
            Plan::Connect(p) => p.connections,
            Plan::Ping(p) => p.connections,
            Plan::Direct(p) => p.sessions,
            Plan::Fanout(p) => p.subscribers,
            Plan::Reconnect(p) => p.sessions,
            Plan::Soak(p) => p.idle + p.ping_connections + p.direct_sessions,
        }
    }

    /// Checks every parameter, and that each of `processes` can hold its
    /// share of sockets under its open-files limit.
    pub fn validate(&self, processes: usize) -> Result<()> {
        self.common().validate()?;
        match self {
            Plan::Connect(p) => p.validate()?,
            Plan::Ping(p) => p.validate()?,
            Plan::Direct(p) => p.validate()?,
            Plan::Fanout(p) => p.validate()?,
            Plan::Reconnect(p) => p.validate()?,
            Plan::Soak(p) => p.validate()?,
        }
        if processes == 0 || processes > MAX_PROCESSES {
            return Err(Error::InvalidParam(format!(
                "processes must be 1..={MAX_PROCESSES}"
            )));
        }
        check_count("connections", self.connections())?;
        let per_process = self.connections().div_ceil(processes) as u64;
        if let Some(limit) = MachineInfo::current().open_files_limit
            && per_process + FD_RESERVE > limit
        {
            return Err(Error::InvalidParam(format!(
                "{per_process} connections per process exceed the open-files limit {limit} \
                 (minus {FD_RESERVE} spare): use --processes {}",
                self.connections() as u64 / limit.saturating_sub(FD_RESERVE).max(1) + 1
            )));
        }
        Ok(())
    }

    /// The most a whole run may take before it is cut off: ramp, run,
    /// drain and teardown, with slack.
    pub fn time_limit(&self) -> Duration {
        let c = self.common();
        Duration::from_secs_f64(c.ramp_timeout_s + c.duration_s + 120.0)
    }

    /// Runs this process's share. Records the process's RSS at start as
    /// `client_rss_kib_start`, which merges (sums) across processes.
    pub async fn execute(&self, share: Share, coord: &Coordinator) -> Result<Measurements> {
        let start_rss = rss_kib(None).unwrap_or(0);
        let mut m = match self {
            Plan::Connect(p) => connect::execute(p, share, coord).await?,
            Plan::Ping(p) => ping::execute(p, share, coord).await?,
            Plan::Direct(p) => direct::execute(p, share, coord).await?,
            Plan::Fanout(p) => fanout::execute(p, share, coord).await?,
            Plan::Reconnect(p) => reconnect::execute(p, share, coord).await?,
            Plan::Soak(p) => soak::execute(p, share, coord).await?,
        };
        m.counts.insert("client_rss_kib_start".into(), start_rss);
        Ok(m)
    }

    /// Adds counts derived from the merged measurements and returns the rates.
    pub fn finish(&self, m: &mut Measurements) -> BTreeMap<String, f64> {
        match self {
            Plan::Connect(_) => connect::finish(m, ""),
            Plan::Ping(_) => ping::finish(m, ""),
            Plan::Direct(_) => direct::finish(m, ""),
            Plan::Fanout(_) => fanout::finish(m, ""),
            Plan::Reconnect(_) => reconnect::finish(m, ""),
            Plan::Soak(_) => soak::finish(m),
        }
    }

    /// Runs the whole plan in this process and reports.
    pub async fn run_local(&self) -> Result<Report> {
        self.validate(1)?;
        let machine = MachineInfo::current();
        let servers_before = crate::multiproc::sample_servers(&self.common().server_pids);
        let coord = Coordinator::local(self.common().server_pids.clone());
        let started = Instant::now();
        let m = tokio::time::timeout(self.time_limit(), self.execute(Share::whole(), &coord))
            .await
            .map_err(|_| Error::Timeout("whole run"))??;
        Ok(Report::build(
            self,
            1,
            m,
            servers_before,
            coord.take_sample(),
            started.elapsed(),
            machine,
        ))
    }
}

/// `<prefix><name>_per_s` for each counter, over the `run` phase.
pub(crate) fn per_run_second(
    m: &Measurements,
    prefix: &str,
    names: &[&str],
    rates: &mut BTreeMap<String, f64>,
) {
    let run = m.phase(&format!("{prefix}run"));
    if run <= 0.0 {
        return;
    }
    for name in names {
        let key = format!("{prefix}{name}");
        rates.insert(format!("{key}_per_s"), m.count(&key) as f64 / run);
    }
}

/// `<prefix>handshakes_per_s`: connections established over the ramp.
pub(crate) fn handshake_rate(m: &Measurements, prefix: &str, rates: &mut BTreeMap<String, f64>) {
    let ramp = m.phase(&format!("{prefix}ramp"));
    if ramp > 0.0 {
        rates.insert(
            format!("{prefix}handshakes_per_s"),
            m.count(&format!("{prefix}connected")) as f64 / ramp,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for total in [0, 1, 7, 100, 20_001] {
            for count in 1..=7 {
                let mut next = 0;
                for index in 0..count {
                    let r = Share { index, count }.range(total);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn plans_round_trip_as_json() {
        let common = Common::new(&["ws://127.0.0.1:9/ws"]).expect("loopback");
        let plan = Plan::Connect(connect::Params {
            common,
            connections: 3,
        });
        let json = serde_json::to_string(&plan).expect("serialize");
        let back: Plan = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.name(), "connect");
        assert_eq!(back.connections(), 3);
    }

    #[test]
    fn refuses_bad_parameters() {
        let mut common = Common::new(&["ws://127.0.0.1:9/ws"]).expect("loopback");
        common.duration_s = MAX_DURATION_S + 1.0;
        let plan = Plan::Connect(connect::Params {
            common,
            connections: 3,
        });
        assert!(plan.validate(1).is_err());
        assert!(Common::new(&["ws://10.0.0.1:9/ws"]).is_err());
    }
}
