//! Cluster-mode harness: a real `redis-server` (standalone or a 3-master
//! Redis Cluster) on free loopback ports with its own temp dir, and real
//! `wsfleet serve` pods (the built binary) pointed at it.
//!
//! Nothing here ever touches the system Redis on 6379. A test that cannot
//! start Redis fails with a message saying why; it is never skipped.
//!
//! Every process is killed when its handle drops; when the test is
//! panicking, the tail of each process's log is printed to help debugging.
//! Set `WSFLEET_KEEP_TEST_DIRS=1` to keep the temp dirs (logs, AOF files).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::{Client, get_json};

/// The `wsfleet` binary built by cargo for this test run.
pub const WSFLEET_BIN: &str = env!("CARGO_BIN_EXE_wsfleet");

/// How long a process gets to start or to stop.
const PROCESS_PATIENCE: Duration = Duration::from_secs(20);

/// A port nobody listens on right now (bind 127.0.0.1:0, read it, drop).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A directory under the system temp dir, unique to this test, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(kind: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "wsfleet-test-{kind}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("WSFLEET_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The last `lines` lines of a log file ("" if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends a signal with `kill(1)`; false if the process is already gone.
pub fn signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Waits for a child to exit; None after `within`.
async fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    tokio::time::timeout(within, child.wait())
        .await
        .ok()
        .and_then(Result::ok)
}

/// Best effort SIGKILL and reap, usable from `Drop`.
fn kill_now(child: &mut Child) {
    let _ = child.start_kill();
    for _ in 0..100 {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `PING` over raw RESP: true when the server answers `+PONG`.
pub async fn redis_pings(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Runs `redis-cli -p PORT args...` and returns its stdout; panics if it cannot run.
pub async fn redis_cli(port: u16, args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("redis-cli -p {port} {args:?} did not finish in 30 s"))
        .unwrap_or_else(|e| panic!("cannot run redis-cli (is redis-tools installed?): {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// How a [`RedisServer`] runs.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `--appendonly yes --appendfsync always`: every acknowledged write
    /// survives `stop()` + `restart()` (and even `kill()`). Without it a
    /// restart starts empty.
    pub persistent: bool,
    /// Extra `redis-server` arguments (the cluster uses this); `{port}` in
    /// them becomes the server's port.
    pub extra_args: Vec<String>,
}

/// A real `redis-server` on a free loopback port, with its own temp dir.
pub struct RedisServer {
    port: u16,
    opts: RedisOptions,
    child: Option<Child>,
    log: PathBuf,
    // Last: the dir is removed after the process is killed.
    dir: TempDir,
}

impl RedisServer {
    /// A non-persistent server (`--save "" --appendonly no`).
    pub async fn start() -> RedisServer {
        Self::start_with(RedisOptions::default()).await
    }

    pub async fn start_with(opts: RedisOptions) -> RedisServer {
        let dir = TempDir::new("redis");
        let log = dir.path().join("redis.log");
        let mut server = RedisServer {
            port: 0,
            opts,
            child: None,
            log,
            dir,
        };
        // The port can be taken between probing and binding: retry on a new one.
        let mut last_error = String::new();
        for _ in 0..3 {
            server.port = free_port();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("cannot start redis-server for this test: {last_error}");
    }

    fn args(&self) -> Vec<String> {
        let port = self.port.to_string();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port,
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--daemonize".into(),
            "no".into(),
            // Never hang on a missing system config or a supervisor.
            "--supervised".into(),
            "no".into(),
        ];
        if self.opts.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        let port = self.port.to_string();
        args.extend(
            self.opts
                .extra_args
                .iter()
                .map(|a| a.replace("{port}", &port)),
        );
        args
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new("redis-server")
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot spawn redis-server ({e}); install it (apt-get install redis-server) \
                     or run ./scripts/test.sh"
                )
            })?;
        let deadline = tokio::time::Instant::now() + PROCESS_PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    log_tail(&self.log, 20)
                ));
            }
            if redis_pings(self.port).await {
                self.child = Some(child);
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                kill_now(&mut child);
                return Err(format!(
                    "redis-server on port {} did not answer PING within {PROCESS_PATIENCE:?}:\n{}",
                    self.port,
                    log_tail(&self.log, 20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the server as configured: persistent servers get SIGTERM (the
    /// AOF is flushed), others `SHUTDOWN NOSAVE`; waits for the exit
    /// (SIGKILL after 20 s).
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.opts.persistent {
            if let Some(pid) = child.id() {
                signal(pid, "-TERM");
            }
        } else {
            let _ = redis_cli(self.port, &["shutdown", "nosave"]).await;
        }
        if wait_child(&mut child, PROCESS_PATIENCE).await.is_none() {
            eprintln!("redis-server on {} ignored shutdown; killing it", self.port);
            kill_now(&mut child);
        }
    }

    /// SIGKILL, and wait for the exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = wait_child(&mut child, PROCESS_PATIENCE).await;
        }
    }

    /// Starts again on the same port with the same dir (and so, when
    /// persistent, the same data). Stops the running server first.
    pub async fn restart(&mut self) {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + PROCESS_PATIENCE;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("cannot restart redis-server on port {}: {e}", self.port)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// `redis-cli` against this server.
    pub async fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server :{} log tail ({}) ---\n{}",
                self.port,
                self.log.display(),
                log_tail(&self.log, 15)
            );
        }
        if let Some(child) = self.child.as_mut() {
            kill_now(child);
        }
    }
}

/// A Redis Cluster of masters only (no replicas), each a [`RedisServer`].
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "redis-cli --cluster create needs 3 masters");
        let mut nodes = Vec::new();
        for _ in 0..masters {
            // Explicit bus port: P + 10000 may be above 65535 for ephemeral ports.
            let bus = free_port();
            let opts = RedisOptions {
                persistent: false,
                extra_args: vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-port".into(),
                    bus.to_string(),
                    "--cluster-config-file".into(),
                    "nodes-{port}.conf".into(),
                    "--cluster-node-timeout".into(),
                    "5000".into(),
                ],
            };
            nodes.push(RedisServer::start_with(opts).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = redis_cli(nodes[0].port(), &args).await;
        assert!(
            out.contains("[OK] All 16384 slots covered"),
            "redis-cli --cluster create failed:\n{out}"
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` and knows every node.
    pub async fn wait_ok(&self) {
        let deadline = tokio::time::Instant::now() + PROCESS_PATIENCE;
        loop {
            let mut all_ok = true;
            let mut last = String::new();
            for node in &self.nodes {
                let info = node.cli(&["cluster", "info"]).await;
                let ok = info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()));
                if !ok {
                    all_ok = false;
                    last = format!(":{} says\n{info}", node.port());
                }
            }
            if all_ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Redis Cluster did not reach cluster_state:ok in {PROCESS_PATIENCE:?}; {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The seed URLs, comma-joined, as `--redis-url` takes them with `--redis-cluster`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One entry of a Redis stream: its id and its field/value pairs.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl StreamEntry {
    /// The first field whose value is a JSON object (the event, whatever the
    /// field is called), or None.
    pub fn json(&self) -> Option<Value> {
        self.fields.iter().find_map(|(_, v)| {
            serde_json::from_str::<Value>(v)
                .ok()
                .filter(Value::is_object)
        })
    }
}

/// `XRANGE key - +` against a standalone Redis (one URL) or a Redis Cluster
/// (comma-separated seed URLs, `cluster = true`).
pub async fn xrange(urls: &str, cluster: bool, key: &str) -> Vec<StreamEntry> {
    let mut cmd = ::redis::cmd("XRANGE");
    cmd.arg(key).arg("-").arg("+");
    let raw: Vec<(String, Vec<String>)> = if cluster {
        let client = ::redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>())
            .expect("cluster client");
        let mut conn = client
            .get_async_connection()
            .await
            .expect("connect to the Redis Cluster");
        cmd.query_async(&mut conn).await.expect("XRANGE")
    } else {
        let client = ::redis::Client::open(urls).expect("redis client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        cmd.query_async(&mut conn).await.expect("XRANGE")
    };
    raw.into_iter()
        .map(|(id, flat)| StreamEntry {
            id,
            fields: flat
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv.get(1).cloned().unwrap_or_default()))
                .collect(),
        })
        .collect()
}

/// A real `wsfleet serve` process in cluster mode.
pub struct Pod {
    pub name: String,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub redis_url: String,
    pub extra: Vec<String>,
    child: Option<Child>,
    pid: u32,
    exit: Option<ExitStatus>,
    log: PathBuf,
    // Last: the dir is removed after the process is killed.
    dir: TempDir,
}

impl Pod {
    /// Starts a pod and waits until `/healthz` answers and `/readyz` is 200.
    pub async fn start(name: &str, redis_url: &str, extra: &[&str]) -> Pod {
        Self::start_with_env(name, redis_url, extra, &[]).await
    }

    /// [`Pod::start`] with extra environment variables for the process.
    pub async fn start_with_env(
        name: &str,
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Pod {
        let pod = Self::spawn_with_env(name, redis_url, extra, env).await;
        let ready = pod.http("/readyz");
        let deadline = tokio::time::Instant::now() + PROCESS_PATIENCE;
        loop {
            if let Ok(r) = super::http().get(&ready).send().await
                && r.status().as_u16() == 200
            {
                return pod;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pod {name}: /readyz not 200 within {PROCESS_PATIENCE:?}; log:\n{}",
                pod.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a pod and waits only for `/healthz` (it may not be ready).
    pub async fn spawn(name: &str, redis_url: &str, extra: &[&str]) -> Pod {
        Self::spawn_with_env(name, redis_url, extra, &[]).await
    }

    async fn spawn_with_env(
        name: &str,
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Pod {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_spawn(name, redis_url, extra, env).await {
                Ok(pod) => return pod,
                Err(e) => last_error = e,
            }
        }
        panic!("cannot start pod {name}: {last_error}");
    }

    async fn try_spawn(
        name: &str,
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Pod, String> {
        let dir = TempDir::new(&format!("pod-{name}"));
        let log = dir.path().join("wsfleet.log");
        let addr = format!("127.0.0.1:{}", free_port());
        let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let file_err = file.try_clone().map_err(|e| e.to_string())?;
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &addr,
            "--pod-name",
            name,
            "--redis-url",
            redis_url,
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(WSFLEET_BIN)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .env_remove("WSFLEET_REDIS_URL")
            .env_remove("WSFLEET_POD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(file_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot spawn {WSFLEET_BIN}: {e}"))?;
        let pid = child.id().expect("pid of a running child");
        let health = format!("http://{addr}/healthz");
        let deadline = tokio::time::Instant::now() + PROCESS_PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "`wsfleet {}` exited with {status}; log:\n{}",
                    args.join(" "),
                    log_tail(&log, 30)
                ));
            }
            if let Ok(r) = super::http().get(&health).send().await
                && r.status().is_success()
            {
                return Ok(Pod {
                    name: name.to_string(),
                    addr,
                    redis_url: redis_url.to_string(),
                    extra: extra.iter().map(|s| s.to_string()).collect(),
                    child: Some(child),
                    pid,
                    exit: None,
                    log,
                    dir,
                });
            }
            if tokio::time::Instant::now() > deadline {
                kill_now(&mut child);
                return Err(format!(
                    "no /healthz within {PROCESS_PATIENCE:?}; log:\n{}",
                    log_tail(&log, 30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.addr, query)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    pub async fn connect(&self, query: &str) -> Client {
        Client::connect(&self.ws_url(query)).await
    }

    /// Opens a session on this pod and returns the client after its welcome.
    pub async fn session(&self, query: &str) -> (Client, Value) {
        let mut client = self.connect(&format!("session={query}")).await;
        let welcome = client.recv_json().await;
        assert_eq!(welcome["type"], "welcome", "pod {}: {welcome}", self.name);
        assert_eq!(welcome["pod"], self.name.as_str(), "{welcome}");
        (client, welcome)
    }

    pub async fn post_session(&self, session: &str, data: Value) -> (u16, Value) {
        super::post_to_session(&self.http(""), session, data).await
    }

    pub async fn post_channel(&self, channel: &str, data: Value) -> (u16, Value) {
        super::post_to_channel(&self.http(""), channel, data).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        get_json(&self.http(path)).await
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            self.exit = wait_child(&mut child, PROCESS_PATIENCE).await;
        }
    }

    /// SIGTERM (drain), without waiting.
    pub fn sigterm(&self) {
        assert!(
            self.child.is_some() && signal(self.pid, "-TERM"),
            "pod {} is not running",
            self.name
        );
    }

    /// Waits for the process to exit; panics (with the log) after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        if let Some(mut child) = self.child.take() {
            match wait_child(&mut child, within).await {
                Some(status) => self.exit = Some(status),
                None => {
                    let tail = self.log_tail(30);
                    self.child = Some(child);
                    panic!(
                        "pod {} did not exit within {within:?}; log:\n{tail}",
                        self.name
                    );
                }
            }
        }
        self.exit.expect("exit status of a reaped pod")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- pod {} ({}) log tail ({}) ---\n{}",
                self.name,
                self.addr,
                self.log.display(),
                self.log_tail(25)
            );
        }
        if let Some(child) = self.child.as_mut() {
            kill_now(child);
        }
    }
}

/// Waits until `check` holds, polling every 50 ms; panics after `within`.
pub async fn eventually_within<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An offset `<ms>-<seq>` as a comparable pair.
pub fn offset_key(offset: &str) -> (u64, u64) {
    let (ms, seq) = offset
        .split_once('-')
        .unwrap_or_else(|| panic!("malformed offset {offset:?}"));
    (
        ms.parse().expect("offset ms"),
        seq.parse().expect("offset seq"),
    )
}
