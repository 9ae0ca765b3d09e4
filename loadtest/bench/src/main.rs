//! `wsfleet-bench` command line: parse, build a plan, run it in one or
//! several processes, print and save the report.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use wsfleet_bench::bigframe;
use wsfleet_bench::client::WsTuning;
use wsfleet_bench::compare::{self, CompareParams};
use wsfleet_bench::floor::{self, FloorConfig};
use wsfleet_bench::multiproc;
use wsfleet_bench::scenario::{
    Common, MAX_DURATION_S, Plan, Share, connect, direct, fanout, new_run_id, ping, reconnect, soak,
};
use wsfleet_bench::target::{Target, parse_http_base, parse_source_ips};

/// Load generator and measuring tool for wsfleet. Talks to loopback only.
#[derive(Parser)]
#[command(name = "wsfleet-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open idle connections, hold them, and report handshakes and memory.
    Connect {
        #[command(flatten)]
        common: CommonArgs,
        /// Idle connections to open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
    /// Round-trip latency of application `ping` frames.
    Ping {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 100)]
        connections: usize,
        /// Pings per second over all connections.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Longest wait for outstanding pongs, seconds.
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
    },
    /// End-to-end latency of direct messages POSTed through the HTTP API.
    Direct {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        /// Messages per second over all sessions.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[command(flatten)]
        http: HttpArgs,
        /// Longest wait for accepted messages to arrive, seconds.
        #[arg(long, default_value_t = 5.0)]
        drain: f64,
        /// Messages per POST: above 1, messages go in `POST /v1/messages`
        /// batches of this many (to consecutive sessions), `rate`/`batch`
        /// requests a second.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Channel fan-out: subscribers on one channel, publishes over HTTP.
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Publishes per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Channel name (default: `<run id>-fanout`).
        #[arg(long)]
        channel: Option<String>,
        #[command(flatten)]
        http: HttpArgs,
        /// Longest wait for deliveries to stop arriving, seconds.
        #[arg(long, default_value_t = 5.0)]
        drain: f64,
        /// Least wait after the last publish before counting, seconds: set it
        /// above the fleet's delivery bound so a missing message was lost,
        /// not late.
        #[arg(long, default_value_t = 0.0)]
        settle: f64,
    },
    /// Sessions that drop and resume with `last` while messages flow;
    /// fails (exit 2) if any accepted message is never delivered.
    Reconnect {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 20)]
        sessions: usize,
        /// Messages per second over all sessions.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Mean time between drops of one connection, milliseconds.
        #[arg(long, default_value_t = 1000)]
        drop_every_ms: u64,
        #[command(flatten)]
        http: HttpArgs,
        /// Longest wait for every session to catch up, seconds.
        #[arg(long, default_value_t = 15.0)]
        drain: f64,
    },
    /// Idle connections, pings and direct messages together for a long time.
    Soak {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 1000)]
        idle: usize,
        #[arg(long, default_value_t = 50)]
        ping_connections: usize,
        #[arg(long, default_value_t = 100.0)]
        ping_rate: f64,
        #[arg(long, default_value_t = 50)]
        direct_sessions: usize,
        #[arg(long, default_value_t = 50.0)]
        direct_rate: f64,
        /// Seconds between progress lines (on stderr).
        #[arg(long, default_value_t = 30.0)]
        report_every: f64,
        #[command(flatten)]
        http: HttpArgs,
    },
    /// Minimal tokio-tungstenite echo server: the floor wsfleet is compared against.
    EchoFloor {
        /// Loopback address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 4096)]
        read_buffer: usize,
        #[arg(long, default_value_t = 0)]
        write_buffer: usize,
        /// Seconds between WebSocket pings to each client (0: none).
        #[arg(long, default_value_t = 25)]
        heartbeat: u64,
        /// Exit after this many seconds (it also exits on Ctrl-C).
        #[arg(long, default_value_t = 3600.0)]
        duration: f64,
    },
    /// The same scenario against the echo floor and against wsfleet, each
    /// started here as a child process on a free loopback port, with a
    /// table of wsfleet / floor ratios. `--url` and `--server-pid` do not
    /// apply: the servers are the ones it starts.
    Compare {
        /// The wsfleet executable (e.g. target/release/wsfleet).
        #[arg(long)]
        wsfleet_bin: PathBuf,
        #[arg(long, value_enum, default_value_t = CompareScenario::Connect)]
        scenario: CompareScenario,
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Pings per second over all connections (ping).
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Longest wait for outstanding pongs, seconds (ping).
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
        /// Heartbeat of both servers, seconds.
        #[arg(long, default_value_t = 25)]
        heartbeat: u64,
    },
    /// N idle subscribers of one channel, then one large publish: the
    /// server's RSS per connection before and after, i.e. what the large
    /// frame left behind on each connection. One process holds every
    /// connection (`ulimit -n` bounds N); needs `--server-pid`.
    Bigframe {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Bytes of the published message's `data`.
        #[arg(long, default_value_t = 60_000)]
        payload_bytes: usize,
        /// Pause before each RSS reading, seconds.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    /// One process of a multi-process run (started by the bench itself).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        plan: String,
        #[arg(long)]
        index: usize,
        #[arg(long)]
        count: usize,
    },
}

/// Scenarios the floor can serve, hence the ones `compare` runs.
#[derive(Clone, Copy, ValueEnum)]
enum CompareScenario {
    Connect,
    Ping,
}

const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws";

/// Options every scenario takes.
#[derive(Args)]
struct CommonArgs {
    /// Server WebSocket URL(s), comma-separated or repeated; connections
    /// are spread round-robin. Loopback hosts only.
    #[arg(long = "url", value_delimiter = ',', default_value = DEFAULT_URL)]
    urls: Vec<String>,
    /// Seconds of the measured phase (default 10; soak 600).
    #[arg(long)]
    duration: Option<f64>,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Processes to split the connections over (one holds < open-files limit sockets).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Loopback source addresses for client sockets: `127.0.0.2,127.0.0.3`
    /// or ranges `127.0.0.2-127.0.0.40` / `127.0.0.2-40`.
    #[arg(long = "source-ips", value_delimiter = ',')]
    source_ips: Vec<String>,
    /// Server process to report RSS of (repeatable).
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// New connections per second over all processes (default: as fast as
    /// --connect-concurrency allows).
    #[arg(long)]
    connect_rate: Option<f64>,
    /// Handshakes in flight at once, per process.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Longest time to open all connections, seconds.
    #[arg(long, default_value_t = 120.0)]
    ramp_timeout: f64,
    /// Retries of a failed or timed-out handshake, with jittered
    /// exponential backoff from 250 ms up to 8 s, as real clients do.
    #[arg(long, default_value_t = 0)]
    connect_retries: u32,
    /// Per-connection tungstenite read buffer, bytes (allocated eagerly).
    /// 1024 is wsfleet's default; frames larger than it still work.
    #[arg(long, default_value_t = 1024)]
    read_buffer: usize,
    /// Per-connection tungstenite write buffer, bytes (0: write through).
    #[arg(long, default_value_t = 0)]
    write_buffer: usize,
    /// Bound on TCP connect + upgrade, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Session id prefix (default: random), so runs do not resume each other.
    #[arg(long)]
    run_id: Option<String>,
}

/// Where messages are POSTed.
#[derive(Args)]
struct HttpArgs {
    /// HTTP API base(s) to POST to, round-robin (default: the pod each
    /// session is connected to). Loopback only.
    #[arg(long = "http-target", value_delimiter = ',')]
    http_targets: Vec<String>,
    /// POSTs in flight at once, per process.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
}

impl CommonArgs {
    fn common(&self, default_duration: f64) -> anyhow::Result<Common> {
        let duration = self.duration.unwrap_or(default_duration);
        if !(0.0..=MAX_DURATION_S).contains(&duration) {
            bail!("--duration must be within 0..={MAX_DURATION_S} seconds");
        }
        Ok(Common {
            targets: self
                .urls
                .iter()
                .map(|u| Target::parse_ws(u))
                .collect::<Result<_, _>>()?,
            source_ips: parse_source_ips(&self.source_ips)?,
            tuning: WsTuning {
                read_buffer: self.read_buffer,
                write_buffer: self.write_buffer,
                handshake_timeout_ms: self.handshake_timeout_ms,
                ..WsTuning::default()
            },
            duration_s: duration,
            connect_rate: self.connect_rate,
            connect_concurrency: self.connect_concurrency,
            ramp_timeout_s: self.ramp_timeout,
            connect_retries: self.connect_retries,
            run_id: self.run_id.clone().unwrap_or_else(new_run_id),
            server_pids: self.server_pids.clone(),
        })
    }
}

impl HttpArgs {
    fn targets(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .http_targets
            .iter()
            .map(|t| parse_http_base(t))
            .collect::<Result<_, _>>()?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; exit code 2 means the run found a problem (e.g. gaps).
async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let (plan, common) = match command {
        Command::EchoFloor {
            listen,
            read_buffer,
            write_buffer,
            heartbeat,
            duration,
        } => {
            echo_floor(listen, read_buffer, write_buffer, heartbeat, duration).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Compare {
            wsfleet_bin,
            scenario,
            common,
            connections,
            rate,
            drain,
            heartbeat,
        } => {
            return run_compare(
                wsfleet_bin,
                scenario,
                &common,
                connections,
                rate,
                drain,
                heartbeat,
            )
            .await;
        }
        Command::Worker { plan, index, count } => {
            let plan: Plan = serde_json::from_str(&plan).context("reading the worker plan")?;
            multiproc::run_worker(&plan, Share { index, count }).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Bigframe {
            common,
            connections,
            payload_bytes,
            settle,
        } => return run_bigframe(&common, connections, payload_bytes, settle).await,
        Command::Connect {
            common,
            connections,
        } => (
            Plan::Connect(connect::Params {
                common: common.common(10.0)?,
                connections,
            }),
            common,
        ),
        Command::Ping {
            common,
            connections,
            rate,
            drain,
        } => (
            Plan::Ping(ping::Params {
                common: common.common(10.0)?,
                connections,
                rate,
                drain_s: drain,
            }),
            common,
        ),
        Command::Direct {
            common,
            sessions,
            rate,
            http,
            drain,
            batch,
        } => (
            Plan::Direct(direct::Params {
                common: common.common(10.0)?,
                sessions,
                rate,
                http_targets: http.targets()?,
                max_in_flight: http.max_in_flight,
                drain_s: drain,
                batch,
            }),
            common,
        ),
        Command::Fanout {
            common,
            subscribers,
            rate,
            channel,
            http,
            drain,
            settle,
        } => (
            Plan::Fanout(fanout::Params {
                common: common.common(10.0)?,
                subscribers,
                rate,
                channel,
                http_targets: http.targets()?,
                max_in_flight: http.max_in_flight,
                drain_s: drain,
                settle_s: settle,
            }),
            common,
        ),
        Command::Reconnect {
            common,
            sessions,
            rate,
            drop_every_ms,
            http,
            drain,
        } => (
            Plan::Reconnect(reconnect::Params {
                common: common.common(10.0)?,
                sessions,
                rate,
                drop_every_ms,
                http_targets: http.targets()?,
                max_in_flight: http.max_in_flight,
                drain_s: drain,
            }),
            common,
        ),
        Command::Soak {
            common,
            idle,
            ping_connections,
            ping_rate,
            direct_sessions,
            direct_rate,
            report_every,
            http,
        } => (
            Plan::Soak(soak::Params {
                common: common.common(600.0)?,
                idle,
                ping_connections,
                ping_rate,
                direct_sessions,
                direct_rate,
                http_targets: http.targets()?,
                report_every_s: report_every,
            }),
            common,
        ),
    };

    let report = if common.processes > 1 {
        multiproc::run_parent(&plan, common.processes).await?
    } else {
        plan.run_local().await?
    };
    print!("{}", report.human());
    if let Some(path) = &common.json {
        report
            .write_json(path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("result written to {}", path.display());
    }
    let problems = report.problems();
    if !problems.is_empty() {
        eprintln!("run failed: {}", problems.join("; "));
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// `bigframe`: one process, one server; exit 2 if a subscriber missed the
/// message (the growth would then not be the large frame's).
async fn run_bigframe(
    args: &CommonArgs,
    connections: usize,
    payload_bytes: usize,
    settle: f64,
) -> anyhow::Result<ExitCode> {
    if args.processes != 1 {
        bail!("bigframe runs in one process: --processes does not apply");
    }
    let [server_pid] = args.server_pids[..] else {
        bail!("bigframe needs exactly one --server-pid (the server whose RSS it reads)");
    };
    if !(0.0..=600.0).contains(&settle) {
        bail!("--settle must be within 0..=600 seconds");
    }
    let common = args.common(10.0)?;
    let Some(target) = common.targets.first().cloned() else {
        bail!("bigframe needs a --url");
    };
    let outcome = bigframe::run(bigframe::Params {
        target,
        server_pid,
        connections,
        payload_bytes,
        connect_concurrency: common.connect_concurrency,
        tuning: common.tuning,
        settle: Duration::from_secs_f64(settle),
        timeout: Duration::from_secs_f64(common.ramp_timeout_s),
        run_id: common.run_id,
    })
    .await?;
    print!("{}", outcome.human());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&outcome)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("result written to {}", path.display());
    }
    if outcome.received < connections {
        eprintln!(
            "run failed: {} of {connections} subscribers got the message",
            outcome.received
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// `compare`: both runs, the table, the JSON; exit 2 if a side did not
/// hold every connection (the ratios would compare unlike loads).
async fn run_compare(
    wsfleet_bin: PathBuf,
    scenario: CompareScenario,
    common_args: &CommonArgs,
    connections: usize,
    rate: f64,
    drain: f64,
    heartbeat: u64,
) -> anyhow::Result<ExitCode> {
    if !common_args.server_pids.is_empty() || common_args.urls != [DEFAULT_URL] {
        bail!("compare starts its own servers: --url and --server-pid do not apply");
    }
    let common = common_args.common(10.0)?;
    let plan = match scenario {
        CompareScenario::Connect => Plan::Connect(connect::Params {
            common,
            connections,
        }),
        CompareScenario::Ping => Plan::Ping(ping::Params {
            common,
            connections,
            rate,
            drain_s: drain,
        }),
    };
    let params = CompareParams {
        wsfleet_bin,
        plan,
        processes: common_args.processes,
        heartbeat_s: heartbeat,
    };
    // On Ctrl-C or SIGTERM the comparison future is dropped, which kills
    // every server and worker child it started (kill_on_drop).
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let report = tokio::select! {
        r = compare::run(&params) => r?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; servers and workers stopped"),
        _ = sigterm.recv() => bail!("terminated; servers and workers stopped"),
    };
    print!("{}", report.human());
    if let Some(path) = &common_args.json {
        report
            .write_json(path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("result written to {}", path.display());
    }
    let problems = report.problems(connections);
    if !problems.is_empty() {
        eprintln!("comparison unfair: {}", problems.join("; "));
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

async fn echo_floor(
    listen: SocketAddr,
    read_buffer: usize,
    write_buffer: usize,
    heartbeat: u64,
    duration: f64,
) -> anyhow::Result<()> {
    if !(0.0..=MAX_DURATION_S).contains(&duration) {
        bail!("--duration must be within 0..={MAX_DURATION_S} seconds");
    }
    let listener = floor::bind(listen)?;
    let addr = listener.local_addr()?;
    println!("echo-floor listening on {addr} pid {}", std::process::id());
    let config = FloorConfig {
        tuning: WsTuning {
            read_buffer,
            write_buffer,
            ..WsTuning::default()
        },
        heartbeat: (heartbeat > 0).then(|| Duration::from_secs(heartbeat)),
        ..FloorConfig::default()
    };
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = tokio::time::sleep(Duration::from_secs_f64(duration)) => {}
        }
    };
    floor::serve(listener, config, shutdown).await?;
    Ok(())
}
