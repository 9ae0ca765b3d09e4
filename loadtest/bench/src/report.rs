//! The result of a run: a human summary and a machine-readable JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::machine::MachineInfo;
use crate::multiproc::{ReadySample, ServerSample};
use crate::scenario::Plan;
use crate::stats::{Measurements, Percentiles};

/// Memory of one server process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerMemory {
    pub pid: u32,
    pub rss_kib_before: Option<u64>,
    /// While every connection was up.
    pub rss_kib_connected: Option<u64>,
    /// Growth divided by all connections of the run (with several server
    /// processes, their sum is the server cost per connection).
    pub bytes_per_connection: Option<f64>,
}

/// Memory of the bench and the servers, sampled once all connections were up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryReport {
    pub connections: u64,
    /// RSS of the bench process(es) when they started, summed.
    pub client_rss_kib_start: Option<u64>,
    pub client_rss_kib_connected: Option<u64>,
    pub client_bytes_per_connection: Option<f64>,
    pub servers: Vec<ServerMemory>,
    /// Sum of the servers' `bytes_per_connection`.
    pub server_bytes_per_connection: Option<f64>,
}

/// Everything a run measured, in the shape `--json` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub params: serde_json::Value,
    pub machine: MachineInfo,
    pub processes: usize,
    pub elapsed_s: f64,
    pub phases_s: BTreeMap<String, f64>,
    pub counts: BTreeMap<String, u64>,
    pub rates: BTreeMap<String, f64>,
    pub latency_ms: BTreeMap<String, Percentiles>,
    pub memory: MemoryReport,
    pub error_samples: Vec<String>,
}

fn per_connection(before: Option<u64>, after: Option<u64>, connections: u64) -> Option<f64> {
    let (before, after) = (before?, after?);
    (connections > 0).then(|| (after as f64 - before as f64) * 1024.0 / connections as f64)
}

impl Report {
    pub fn build(
        plan: &Plan,
        processes: usize,
        mut m: Measurements,
        servers_before: ServerSample,
        ready: Option<ReadySample>,
        elapsed: Duration,
        machine: MachineInfo,
    ) -> Report {
        let rates = plan.finish(&mut m);
        let client_start = m.counts.remove("client_rss_kib_start");
        let ready = ready.unwrap_or_default();
        let servers: Vec<ServerMemory> = servers_before
            .iter()
            .map(|&(pid, before)| {
                let connected = ready
                    .servers
                    .iter()
                    .find(|(p, _)| *p == pid)
                    .and_then(|(_, rss)| *rss);
                ServerMemory {
                    pid,
                    rss_kib_before: before,
                    rss_kib_connected: connected,
                    bytes_per_connection: per_connection(before, connected, ready.connections),
                }
            })
            .collect();
        let server_total = servers
            .iter()
            .map(|s| s.bytes_per_connection)
            .sum::<Option<f64>>()
            .filter(|_| !servers.is_empty());
        let memory = MemoryReport {
            connections: ready.connections,
            client_rss_kib_start: client_start,
            client_rss_kib_connected: ready.client_rss_kib,
            client_bytes_per_connection: per_connection(
                client_start,
                ready.client_rss_kib,
                ready.connections,
            ),
            servers,
            server_bytes_per_connection: server_total,
        };
        Report {
            scenario: plan.name().to_string(),
            params: serde_json::to_value(plan).unwrap_or(serde_json::Value::Null),
            machine,
            processes,
            elapsed_s: elapsed.as_secs_f64(),
            phases_s: m.phases_s.clone(),
            latency_ms: m
                .latencies
                .iter()
                .map(|(k, v)| (k.clone(), v.summary()))
                .collect(),
            counts: m.counts,
            rates,
            memory,
            error_samples: m.error_samples,
        }
    }

    pub fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// What makes this run a failure rather than a measurement: for now, a
    /// message lost across reconnects.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.scenario == "reconnect" && self.count("gaps") > 0 {
            out.push(format!(
                "{} accepted messages were never delivered",
                self.count("gaps")
            ));
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")?;
        Ok(())
    }

    /// The summary a person reads.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            s,
            "== wsfleet-bench {}: {} process(es), {:.1} s ==",
            self.scenario, self.processes, self.elapsed_s
        );
        let _ = writeln!(
            s,
            "machine: {} cpus, {:.1} GiB, kernel {}, open files limit {}",
            self.machine.nproc,
            self.machine
                .mem_total_kib
                .map(|k| mib(k) / 1024.0)
                .unwrap_or(0.0),
            self.machine.kernel,
            self.machine
                .open_files_limit
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into())
        );
        let phases: Vec<String> = self
            .phases_s
            .iter()
            .map(|(k, v)| format!("{k} {v:.2} s"))
            .collect();
        let _ = writeln!(s, "phases: {}", phases.join(", "));
        let _ = writeln!(s, "counts:");
        for (k, v) in &self.counts {
            let _ = writeln!(s, "  {k:<32} {v:>12}");
        }
        if !self.rates.is_empty() {
            let _ = writeln!(s, "rates:");
            for (k, v) in &self.rates {
                let _ = writeln!(s, "  {k:<32} {v:>12.1}");
            }
        }
        if !self.latency_ms.is_empty() {
            let _ = writeln!(
                s,
                "latency (ms)  {:>22} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "count", "p50", "p90", "p99", "p99.9", "max"
            );
            for (k, p) in &self.latency_ms {
                let _ = writeln!(
                    s,
                    "  {k:<22} {:>12} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
                );
            }
        }
        let m = &self.memory;
        let _ = writeln!(s, "memory at {} connections:", m.connections);
        if let (Some(a), Some(b)) = (m.client_rss_kib_start, m.client_rss_kib_connected) {
            let _ = writeln!(
                s,
                "  client RSS {:.1} MiB -> {:.1} MiB ({} per connection)",
                mib(a),
                mib(b),
                bytes(m.client_bytes_per_connection)
            );
        }
        for srv in &m.servers {
            let _ = writeln!(
                s,
                "  server pid {} RSS {:.1} MiB -> {:.1} MiB ({} per connection)",
                srv.pid,
                mib(srv.rss_kib_before.unwrap_or(0)),
                mib(srv.rss_kib_connected.unwrap_or(0)),
                bytes(srv.bytes_per_connection)
            );
        }
        if m.servers.len() > 1 {
            let _ = writeln!(
                s,
                "  servers together: {} per connection",
                bytes(m.server_bytes_per_connection)
            );
        }
        if !self.error_samples.is_empty() {
            let _ = writeln!(s, "error examples:");
            for e in &self.error_samples {
                let _ = writeln!(s, "  {e}");
            }
        }
        for p in self.problems() {
            let _ = writeln!(s, "PROBLEM: {p}");
        }
        s
    }
}

fn bytes(b: Option<f64>) -> String {
    match b {
        Some(b) if b.abs() >= 1024.0 => format!("{:.2} KiB", b / 1024.0),
        Some(b) => format!("{b:.0} B"),
        None => "n/a".into(),
    }
}
