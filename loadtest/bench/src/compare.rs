//! `compare`: one scenario against the echo floor and against wsfleet in
//! the same invocation, with the ratio of each headline number.
//!
//! A number for wsfleet alone ("4.7 KiB per idle connection") says little
//! until it is set against what the same runtime and WebSocket library cost
//! with no features at all. Measured in two separate invocations, the two
//! numbers drift apart with whatever else the machine was doing; here they
//! share the machine state, the buffer sizes and the client.
//!
//! Both servers run as child processes (the floor is this binary's
//! `echo-floor`), so each one's RSS is its own, and each is started just
//! before its run and stopped right after it: the second run never sees a
//! heap that the first one grew. The clients always run in worker
//! processes (even with `--processes 1`) for the same reason. Every child is
//! killed when this returns, on success, on error and on Ctrl-C/SIGTERM.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::client::{Dialer, WsTuning, read_welcome};
use crate::multiproc;
use crate::report::Report;
use crate::scenario::Plan;
use crate::target::Target;
use crate::{Error, Result};

/// How long a freshly started server has to answer its health probe.
const STARTUP_LIMIT: Duration = Duration::from_secs(20);
/// How long a server gets to exit after SIGKILL before we stop waiting.
const REAP_LIMIT: Duration = Duration::from_secs(5);

/// What `compare` runs.
#[derive(Clone, Debug)]
pub struct CompareParams {
    /// The `wsfleet` executable to start with `serve`.
    pub wsfleet_bin: PathBuf,
    /// The scenario (`connect` or `ping`); its targets and server pids are
    /// replaced by each server's.
    pub plan: Plan,
    /// Client processes per run.
    pub processes: usize,
    /// Server heartbeat (WebSocket ping period) of both servers, seconds.
    pub heartbeat_s: u64,
}

/// One side of the comparison: the scenario's report plus which server ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Side {
    /// The server's process id (gone by the time the report is read).
    pub server_pid: u32,
    /// The command line it was started with.
    pub server_command: Vec<String>,
    #[serde(flatten)]
    pub report: Report,
}

/// One line of the table: `ratio` is wsfleet / floor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub metric: String,
    pub floor: Option<f64>,
    pub wsfleet: Option<f64>,
    pub ratio: Option<f64>,
}

/// Everything `compare` measured, in the shape `--json` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareReport {
    pub scenario: String,
    pub read_buffer: usize,
    pub write_buffer: usize,
    pub heartbeat_s: u64,
    pub rows: Vec<Row>,
    pub floor: Side,
    pub wsfleet: Side,
}

/// A server child process on a loopback port. Killed when dropped (tokio's
/// `kill_on_drop`), so an early return or a cancelled future cannot leave
/// it running; [`ServerChild::stop`] also reaps it.
struct ServerChild {
    name: &'static str,
    child: Child,
    pid: u32,
    addr: SocketAddr,
    command: Vec<String>,
}

impl ServerChild {
    fn spawn(name: &'static str, program: &Path, args: Vec<String>) -> Result<Self> {
        let port = free_port()?;
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // wsfleet logs every connection at `info`; thousands of lines would
        // cost the server CPU during the ramp being measured.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd.spawn().map_err(|e| Error::Server {
            name,
            reason: format!("cannot start {}: {e}", program.display()),
        })?;
        let pid = child.id().ok_or(Error::Server {
            name,
            reason: "exited at once".into(),
        })?;
        let mut command = vec![program.display().to_string()];
        command.extend(args);
        Ok(ServerChild {
            name,
            child,
            pid,
            addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            command,
        })
    }

    /// Polls `probe` until it succeeds, the child exits or the limit passes.
    async fn wait_healthy(&mut self, tuning: WsTuning) -> Result<()> {
        let deadline = tokio::time::Instant::now() + STARTUP_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::Server {
                    name: self.name,
                    reason: format!("exited with {status} before it was healthy"),
                });
            }
            let probe = match self.name {
                "wsfleet" => healthz(self.addr).await,
                _ => ws_probe(self.addr, tuning).await,
            };
            let last_error = match probe {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Server {
                    name: self.name,
                    reason: format!(
                        "not healthy within {} s: {last_error}",
                        STARTUP_LIMIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server and waits (bounded) for it to be gone.
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(REAP_LIMIT, self.child.wait()).await;
    }
}

/// A loopback port nobody listens on right now. The port is free again when
/// the child binds it a moment later; another process could take it in
/// between, which the health check then reports (the child fails to bind).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// wsfleet is up when `/healthz` answers 2xx.
async fn healthz(addr: SocketAddr) -> Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let resp = client.get(format!("http://{addr}/healthz")).send().await?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(Error::HttpStatus(resp.status().as_u16()))
    }
}

/// The floor has no HTTP API: it is up when a WebSocket handshake and its
/// welcome frame succeed.
async fn ws_probe(addr: SocketAddr, tuning: WsTuning) -> Result<()> {
    let target = Target::parse_ws(&format!("ws://{addr}/ws"))?;
    let dialer = Dialer::new(vec![target], Vec::new(), tuning)?;
    let mut ws = dialer.connect(0, "compare-probe", None).await?;
    read_welcome(&mut ws, Duration::from_secs(2)).await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(())
}

/// Runs the comparison: floor first, then wsfleet, each on a fresh server.
pub async fn run(params: &CompareParams) -> Result<CompareReport> {
    let (tuning, requested) = match &params.plan {
        Plan::Connect(p) => (p.common.tuning, p.connections),
        Plan::Ping(p) => (p.common.tuning, p.connections),
        other => {
            return Err(Error::InvalidParam(format!(
                "compare runs connect or ping (the floor cannot serve {})",
                other.name()
            )));
        }
    };
    params.plan.validate(params.processes)?;
    if !params.wsfleet_bin.is_file() {
        return Err(Error::InvalidParam(format!(
            "--wsfleet-bin {} is not a file",
            params.wsfleet_bin.display()
        )));
    }
    // The floor exits by itself even if this process is killed with
    // SIGKILL (no chance to clean up): run limit plus a margin.
    let floor_lifetime = params.plan.time_limit().as_secs() + 120;
    let exe = std::env::current_exe()?;
    let floor_args = vec![
        "echo-floor".to_string(),
        "--listen".into(),
        "127.0.0.1:{port}".into(),
        "--read-buffer".into(),
        tuning.read_buffer.to_string(),
        "--write-buffer".into(),
        tuning.write_buffer.to_string(),
        "--heartbeat".into(),
        params.heartbeat_s.to_string(),
        "--duration".into(),
        floor_lifetime.to_string(),
    ];
    let wsfleet_args = vec![
        "serve".to_string(),
        "--listen".into(),
        "127.0.0.1:{port}".into(),
        "--pod-name".into(),
        "compare".into(),
        "--read-buffer-bytes".into(),
        tuning.read_buffer.to_string(),
        "--write-buffer-bytes".into(),
        tuning.write_buffer.to_string(),
        "--heartbeat-s".into(),
        params.heartbeat_s.to_string(),
        "--max-connections".into(),
        (requested + 1000).max(100_000).to_string(),
    ];
    let floor = run_side(params, "floor", &exe, floor_args, tuning).await?;
    let wsfleet = run_side(params, "wsfleet", &params.wsfleet_bin, wsfleet_args, tuning).await?;
    Ok(CompareReport {
        scenario: params.plan.name().to_string(),
        read_buffer: tuning.read_buffer,
        write_buffer: tuning.write_buffer,
        heartbeat_s: params.heartbeat_s,
        rows: rows(&params.plan, &floor.report, &wsfleet.report),
        floor,
        wsfleet,
    })
}

/// Starts one server, runs the scenario against it, stops it.
async fn run_side(
    params: &CompareParams,
    name: &'static str,
    program: &Path,
    args: Vec<String>,
    tuning: WsTuning,
) -> Result<Side> {
    let mut server = ServerChild::spawn(name, program, args)?;
    let result = async {
        server.wait_healthy(tuning).await?;
        let mut plan = params.plan.clone();
        let common = plan_common_mut(&mut plan);
        common.targets = vec![Target::parse_ws(&format!("ws://{}/ws", server.addr))?];
        common.server_pids = vec![server.pid];
        eprintln!(
            "compare: {} against {name} (pid {}, {})",
            plan.name(),
            server.pid,
            server.addr
        );
        multiproc::run_parent(&plan, params.processes).await
    }
    .await;
    let (pid, command) = (server.pid, server.command.clone());
    server.stop().await;
    Ok(Side {
        server_pid: pid,
        server_command: command,
        report: result?,
    })
}

fn plan_common_mut(plan: &mut Plan) -> &mut crate::scenario::Common {
    match plan {
        Plan::Connect(p) => &mut p.common,
        Plan::Ping(p) => &mut p.common,
        Plan::Direct(p) => &mut p.common,
        Plan::Fanout(p) => &mut p.common,
        Plan::Reconnect(p) => &mut p.common,
        Plan::Soak(p) => &mut p.common,
    }
}

/// Counters that mean something went wrong in a connect or ping run.
fn errors(r: &Report) -> f64 {
    const BAD: [&str; 9] = [
        "failed",
        "timed_out",
        "connection_lost",
        "closed_by_server",
        "gave_up",
        "pong_missing",
        "panicked",
        "server_error",
        "aborted",
    ];
    r.counts
        .iter()
        .filter(|(k, _)| BAD.iter().any(|b| k.contains(b)))
        .map(|(_, v)| *v)
        .sum::<u64>() as f64
}

fn rows(plan: &Plan, floor: &Report, wsfleet: &Report) -> Vec<Row> {
    type Metric = fn(&Report) -> Option<f64>;
    let mut metrics: Vec<(&str, Metric)> = vec![
        ("connections held", |r| Some(r.memory.connections as f64)),
        ("server RSS per idle connection (KiB)", |r| {
            r.memory.server_bytes_per_connection.map(|b| b / 1024.0)
        }),
        ("client RSS per connection (KiB)", |r| {
            r.memory.client_bytes_per_connection.map(|b| b / 1024.0)
        }),
        ("handshakes/s", |r| r.rates.get("handshakes_per_s").copied()),
        ("handshake p50 (ms)", |r| {
            r.latency_ms.get("handshake").map(|p| p.p50_ms)
        }),
        ("handshake p99 (ms)", |r| {
            r.latency_ms.get("handshake").map(|p| p.p99_ms)
        }),
    ];
    if matches!(plan, Plan::Ping(_)) {
        metrics.extend([
            (
                "pings/s",
                (|r| r.rates.get("ping_sent_per_s").copied()) as Metric,
            ),
            ("ping RTT p50 (ms)", |r| {
                r.latency_ms.get("rtt").map(|p| p.p50_ms)
            }),
            ("ping RTT p99 (ms)", |r| {
                r.latency_ms.get("rtt").map(|p| p.p99_ms)
            }),
            ("ping RTT p99.9 (ms)", |r| {
                r.latency_ms.get("rtt").map(|p| p.p999_ms)
            }),
        ]);
    }
    metrics.push(("errors", |r| Some(errors(r))));
    metrics
        .into_iter()
        .map(|(metric, f)| {
            let (a, b) = (f(floor), f(wsfleet));
            Row {
                metric: metric.to_string(),
                floor: a,
                wsfleet: b,
                ratio: match (a, b) {
                    (Some(a), Some(b)) if a > 0.0 => Some(b / a),
                    _ => None,
                },
            }
        })
        .collect()
}

impl CompareReport {
    /// The table a person reads, after both runs' own summaries.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.floor.report.human());
        let _ = writeln!(s, "{}", self.wsfleet.report.human());
        let _ = writeln!(
            s,
            "== compare {}: read buffer {} B, write buffer {} B, heartbeat {} s ==",
            self.scenario, self.read_buffer, self.write_buffer, self.heartbeat_s
        );
        let cell = |v: Option<f64>| match v {
            Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
            Some(v) => format!("{v:.3}"),
            None => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "{:<38} {:>12} {:>12} {:>8}",
            "metric", "floor", "wsfleet", "ratio"
        );
        for r in &self.rows {
            let ratio = r
                .ratio
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                s,
                "{:<38} {:>12} {:>12} {:>8}",
                r.metric,
                cell(r.floor),
                cell(r.wsfleet),
                ratio
            );
        }
        s
    }

    /// Why this comparison is not a fair measurement, if it is not: a side
    /// that did not hold every connection, or that found a problem.
    pub fn problems(&self, requested: usize) -> Vec<String> {
        let mut out = Vec::new();
        for (name, side) in [("floor", &self.floor), ("wsfleet", &self.wsfleet)] {
            let held = side.report.memory.connections;
            if held < requested as u64 {
                out.push(format!("{name}: {held} of {requested} connections held"));
            }
            out.extend(
                side.report
                    .problems()
                    .into_iter()
                    .map(|p| format!("{name}: {p}")),
            );
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")?;
        Ok(())
    }
}
