//! Splitting one run over several processes of this binary.
//!
//! One process may hold at most as many sockets as its open-files limit
//! (20,000 on these machines), so `--processes P` re-executes this binary P
//! times as hidden `worker`s, each given the whole [`Plan`] as JSON and its
//! [`Share`]. A worker talks to its parent by lines on stdout:
//!
//! - `READY <n>` once its connections are up; it then waits for a line
//!   (`GO`) on stdin, so the parent can sample memory while every process
//!   holds its connections;
//! - `RESULT <json>`: its [`Measurements`], which the parent merges.
//!
//! Everything else a worker has to say goes to stderr, which is inherited.

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::machine::{MachineInfo, rss_kib};
use crate::report::Report;
use crate::scenario::{Plan, Share};
use crate::stats::Measurements;
use crate::{Error, Result};

/// Pause between "all connected" and the memory sample, so that buffers
/// freed after handshakes are returned and RSS is steady.
const SETTLE: Duration = Duration::from_millis(500);

/// RSS of each server process at one moment.
pub type ServerSample = Vec<(u32, Option<u64>)>;

pub fn sample_servers(pids: &[u32]) -> ServerSample {
    pids.iter().map(|&pid| (pid, rss_kib(Some(pid)))).collect()
}

/// Memory while every connection of the run is up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReadySample {
    pub connections: u64,
    /// RSS of the bench's process(es), summed.
    pub client_rss_kib: Option<u64>,
    pub servers: ServerSample,
}

/// Where a scenario says "my connections are up".
#[derive(Debug)]
pub enum Coordinator {
    /// Single process: sample memory here.
    Local {
        server_pids: Vec<u32>,
        sample: Mutex<Option<ReadySample>>,
    },
    /// Child of a multi-process run: tell the parent and wait for its go.
    Worker,
    /// Part of a bigger scenario (soak), which coordinates by itself.
    Nop,
}

impl Coordinator {
    pub fn local(server_pids: Vec<u32>) -> Self {
        Coordinator::Local {
            server_pids,
            sample: Mutex::new(None),
        }
    }

    /// Called once per scenario, after the ramp, with the number of
    /// connections this process holds.
    pub async fn ready(&self, connections: u64) {
        match self {
            Coordinator::Local {
                server_pids,
                sample,
            } => {
                tokio::time::sleep(SETTLE).await;
                let s = ReadySample {
                    connections,
                    client_rss_kib: rss_kib(None),
                    servers: sample_servers(server_pids),
                };
                *sample.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
            }
            Coordinator::Worker => {
                println!("READY {connections}");
                let mut line = String::new();
                let mut stdin = BufReader::new(tokio::io::stdin());
                // EOF (the parent went away) or GO: go on either way; the
                // whole run's time limit still bounds this process.
                let _ = tokio::time::timeout(Duration::from_secs(3600), stdin.read_line(&mut line))
                    .await;
            }
            Coordinator::Nop => {}
        }
    }

    pub fn take_sample(&self) -> Option<ReadySample> {
        match self {
            Coordinator::Local { sample, .. } => {
                sample.lock().unwrap_or_else(|e| e.into_inner()).take()
            }
            _ => None,
        }
    }
}

/// The body of a hidden `worker` process: run this share, print the result.
pub async fn run_worker(plan: &Plan, share: Share) -> Result<()> {
    let m = tokio::time::timeout(plan.time_limit(), plan.execute(share, &Coordinator::Worker))
        .await
        .map_err(|_| Error::Timeout("worker run"))??;
    println!("RESULT {}", serde_json::to_string(&m)?);
    Ok(())
}

/// What the parent hears from one child.
enum ChildEvent {
    Ready(u64),
    Result(Box<Measurements>),
    Exited,
}

/// One child process and the pipe to tell it to go on.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    ready: Option<u64>,
    result: Option<Measurements>,
    exited: bool,
}

/// Runs `plan` over `processes` children of this binary and merges them.
pub async fn run_parent(plan: &Plan, processes: usize) -> Result<Report> {
    plan.validate(processes)?;
    let machine = MachineInfo::current();
    let server_pids = plan.common().server_pids.clone();
    let servers_before = sample_servers(&server_pids);
    let exe = std::env::current_exe()?;
    let plan_json = serde_json::to_string(plan)?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + plan.time_limit() + Duration::from_secs(30);

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, ChildEvent)>();
    let mut workers = Vec::with_capacity(processes);
    for index in 0..processes {
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg("--plan")
            .arg(&plan_json)
            .arg("--index")
            .arg(index.to_string())
            .arg("--count")
            .arg(processes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or(Error::Worker {
            index,
            reason: "no stdout pipe".into(),
        })?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = if let Some(n) = line.strip_prefix("READY ") {
                    n.trim().parse().ok().map(ChildEvent::Ready)
                } else if let Some(json) = line.strip_prefix("RESULT ") {
                    match serde_json::from_str::<Measurements>(json) {
                        Ok(m) => Some(ChildEvent::Result(Box::new(m))),
                        Err(e) => {
                            eprintln!("worker {index}: unreadable result: {e}");
                            None
                        }
                    }
                } else {
                    eprintln!("worker {index}: {line}");
                    None
                };
                if let Some(event) = event {
                    let _ = tx.send((index, event));
                }
            }
            let _ = tx.send((index, ChildEvent::Exited));
        });
        workers.push(Worker {
            stdin: child.stdin.take(),
            child,
            ready: None,
            result: None,
            exited: false,
        });
    }
    drop(tx);

    let apply = |workers: &mut Vec<Worker>, (index, event): (usize, ChildEvent)| {
        let w = &mut workers[index];
        match event {
            ChildEvent::Ready(n) => w.ready = Some(n),
            ChildEvent::Result(m) => w.result = Some(*m),
            ChildEvent::Exited => w.exited = true,
        }
    };

    // Phase 1: every child holds its connections (or has ended).
    while workers.iter().any(|w| w.ready.is_none() && !w.exited) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => apply(&mut workers, event),
            Ok(None) => break,
            Err(_) => return Err(Error::Timeout("workers to connect")),
        }
    }
    tokio::time::sleep(SETTLE).await;
    let client_rss: Vec<u64> = workers
        .iter()
        .filter_map(|w| w.child.id().and_then(|pid| rss_kib(Some(pid))))
        .collect();
    let sample = ReadySample {
        connections: workers.iter().filter_map(|w| w.ready).sum(),
        client_rss_kib: (!client_rss.is_empty()).then(|| client_rss.iter().sum()),
        servers: sample_servers(&server_pids),
    };
    for w in &mut workers {
        if let Some(mut stdin) = w.stdin.take() {
            let _ = stdin.write_all(b"GO\n").await;
            let _ = stdin.flush().await;
        }
    }

    // Phase 2: every child reports and exits.
    while workers.iter().any(|w| !w.exited) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => apply(&mut workers, event),
            Ok(None) => break,
            Err(_) => return Err(Error::Timeout("workers to finish")),
        }
    }
    let mut merged = Measurements::default();
    for (index, w) in workers.iter_mut().enumerate() {
        let status = tokio::time::timeout(Duration::from_secs(10), w.child.wait())
            .await
            .map_err(|_| Error::Worker {
                index,
                reason: "did not exit".into(),
            })??;
        match (&w.result, status.success()) {
            (Some(m), true) => merged.merge(m),
            _ => {
                return Err(Error::Worker {
                    index,
                    reason: format!("exited with {status} without a result"),
                });
            }
        }
    }
    Ok(Report::build(
        plan,
        processes,
        merged,
        servers_before,
        Some(sample),
        started.elapsed(),
        machine,
    ))
}
