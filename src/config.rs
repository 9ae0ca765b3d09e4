//! Configuration: one typed struct per subcommand, from CLI flags and
//! `WSFLEET_*` environment variables. Defaults work on a laptop.
//!
//! Secrets (JWT key, API key, Redis URL with password) are wrapped in
//! [`Secret`] so that no `Debug` or log line ever prints them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "wsfleet",
    version,
    about = "A horizontally scaled WebSocket connection fleet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway pod (embedded mode without --redis-url).
    Serve(Box<ServeConfig>),
    /// Size, drain and rebalance a fleet of gateway pods on Kubernetes
    /// (docs/controller.md).
    Controller(Box<ControllerConfig>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScaleMode {
    /// Only export the figures (Prometheus, `GET /fleet` for KEDA); an HPA
    /// or KEDA owns replicas.
    Metrics,
    /// Patch the Deployment's scale subresource: the controller is the
    /// only writer of replicas (never together with an HPA on it).
    Scale,
}

/// `wsfleet controller`: every flag, with defaults that suit a fleet of
/// ~10,000 connections per pod.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerConfig {
    /// Redis URL of the fleet (the pods' --redis-url): the pods' reports
    /// and the controller's orders live there.
    #[arg(long, env = "WSFLEET_REDIS_URL", hide_env_values = true)]
    pub redis_url: Secret,

    /// PEM file of the CA that signed Redis's TLS certificate (rediss://).
    #[arg(long, env = "WSFLEET_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Milliseconds before a Redis command counts as failed.
    #[arg(long, env = "WSFLEET_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,

    /// Address of the controller's own /metrics, /healthz, /readyz, /fleet.
    #[arg(
        long,
        env = "WSFLEET_CONTROLLER_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub listen: SocketAddr,

    /// Namespace of the gateway Deployment. Default: $POD_NAMESPACE, else
    /// the client's default namespace.
    #[arg(long, env = "WSFLEET_NAMESPACE")]
    pub namespace: Option<String>,

    /// Name of the gateway Deployment.
    #[arg(long, env = "WSFLEET_DEPLOYMENT", default_value = "wsfleet")]
    pub deployment: String,

    /// Label selector of the gateway pods.
    #[arg(
        long,
        env = "WSFLEET_POD_SELECTOR",
        default_value = "app.kubernetes.io/name=wsfleet,app.kubernetes.io/component=gateway"
    )]
    pub pod_selector: String,

    /// Who owns replicas: `metrics` (an HPA or KEDA) or `scale` (us).
    #[arg(long, env = "WSFLEET_SCALE_MODE", value_enum, default_value_t = ScaleMode::Metrics)]
    pub mode: ScaleMode,

    /// Seconds between reconciliations at most: a tick also runs every
    /// --lease-s/3 + 1 s to renew the Lease (6 s with the defaults). Also
    /// the length of one shedding order (per pod: --shed-per-pod-per-s x
    /// this).
    #[arg(long, env = "WSFLEET_INTERVAL_S", default_value_t = 15)]
    pub interval_s: u64,

    /// Connections one pod should hold.
    #[arg(long, env = "WSFLEET_TARGET_CONNECTIONS", default_value_t = 10_000)]
    pub target_connections: usize,

    /// Spare room kept above the load (0.2 = 20 %).
    #[arg(long, env = "WSFLEET_HEADROOM", default_value_t = 0.2)]
    pub headroom: f64,

    #[arg(long, env = "WSFLEET_MIN_REPLICAS", default_value_t = 2)]
    pub min_replicas: u32,

    #[arg(long, env = "WSFLEET_MAX_REPLICAS", default_value_t = 50)]
    pub max_replicas: u32,

    /// Seconds the load must want more pods before scaling up.
    #[arg(long, env = "WSFLEET_SCALE_UP_AFTER_S", default_value_t = 30)]
    pub scale_up_after_s: u64,

    /// Scale down only to the most pods any tick asked for over this many
    /// seconds.
    #[arg(long, env = "WSFLEET_SCALE_DOWN_WINDOW_S", default_value_t = 600)]
    pub scale_down_window_s: u64,

    /// Pods removed per scale-down step at most.
    #[arg(long, env = "WSFLEET_SCALE_DOWN_STEP", default_value_t = 1)]
    pub scale_down_step: u32,

    /// Seconds between scale-down steps at least.
    #[arg(long, env = "WSFLEET_SCALE_DOWN_EVERY_S", default_value_t = 120)]
    pub scale_down_every_s: u64,

    /// Hysteresis: a scale-down must still fit with this much more load
    /// (0.1 = 10 %).
    #[arg(long, env = "WSFLEET_SCALE_TOLERANCE", default_value_t = 0.1)]
    pub scale_tolerance: f64,

    /// Seconds a scale-down victim may take to drain before replicas go
    /// down anyway (the gateway's --drain-s plus its grace).
    #[arg(long, env = "WSFLEET_DRAIN_TIMEOUT_S", default_value_t = 60)]
    pub drain_timeout_s: u64,

    /// Rebalance long-lived connections after a scale-out.
    #[arg(long, env = "WSFLEET_REBALANCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub rebalance: bool,

    /// A pod more than this fraction above the fleet average sheds
    /// (0.1 = 10 %).
    #[arg(long, env = "WSFLEET_REBALANCE_TOLERANCE", default_value_t = 0.1)]
    pub rebalance_tolerance: f64,

    /// Connections one pod sheds per second at most.
    #[arg(long, env = "WSFLEET_SHED_PER_POD_PER_S", default_value_t = 100)]
    pub shed_per_pod_per_s: u32,

    /// Fraction of the fleet's connections shed per minute at most, all
    /// pods together (0.05 = 5 %).
    #[arg(
        long,
        env = "WSFLEET_SHED_FLEET_FRACTION_PER_MIN",
        default_value_t = 0.05
    )]
    pub shed_fleet_fraction_per_min: f64,

    /// Name of the leader-election Lease.
    #[arg(long, env = "WSFLEET_LEASE_NAME", default_value = "wsfleet-controller")]
    pub lease_name: String,

    /// Seconds the leader's Lease lasts without renewal.
    #[arg(long, env = "WSFLEET_LEASE_S", default_value_t = 15)]
    pub lease_s: u64,

    /// This replica's identity in the Lease. Default: $POD_NAME, else the
    /// hostname.
    #[arg(long, env = "WSFLEET_IDENTITY")]
    pub identity: Option<String>,

    #[arg(long, env = "WSFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl ControllerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (value, name) in [
            (self.interval_s, "--interval-s"),
            (self.target_connections as u64, "--target-connections"),
            (self.lease_s, "--lease-s"),
            (self.max_replicas as u64, "--max-replicas"),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.min_replicas > self.max_replicas {
            return Err(ConfigError::Bounds("--min-replicas", "--max-replicas"));
        }
        for (value, name) in [
            (self.headroom, "--headroom"),
            (self.scale_tolerance, "--scale-tolerance"),
            (self.rebalance_tolerance, "--rebalance-tolerance"),
            (
                self.shed_fleet_fraction_per_min,
                "--shed-fleet-fraction-per-min",
            ),
        ] {
            if !(0.0..=10.0).contains(&value) {
                return Err(ConfigError::Fraction(name));
            }
        }
        Ok(())
    }

    pub fn resolved_identity(&self) -> String {
        self.identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "wsfleet-controller".to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Anyone may connect; `?session=` picks the session (random if absent).
    None,
    /// A JWT (HS256 or RS256) is required; its `sid`/`sub` claim is the session.
    Jwt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A value that must never be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address for WebSocket, HTTP API, health and /metrics.
    #[arg(long, env = "WSFLEET_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Redis URL (redis:// or rediss://). Absent: embedded mode, the whole
    /// fleet in this one process.
    #[arg(long, env = "WSFLEET_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// Treat --redis-url as a comma-separated list of Redis Cluster seed nodes.
    #[arg(long, env = "WSFLEET_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,

    /// PEM file of the CA that signed Redis's TLS certificate (rediss://),
    /// when it is not in the public web PKI (a private or cluster CA).
    #[arg(long, env = "WSFLEET_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Deadline of every Redis call, in milliseconds: then 503 `unavailable`,
    /// or 504 `timeout` for an append that was sent (outcome unknown).
    #[arg(long, env = "WSFLEET_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,

    /// Replicas that must acknowledge each append before it is accepted
    /// (Redis WAIT, on a connection of its own; single-server mode only;
    /// 504 `timeout` when too few do in time). 0: the primary alone.
    #[arg(long, env = "WSFLEET_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// Single server without replica wait: append a message and write it
    /// to the owning pods' inboxes in one script, one round trip. `false`
    /// makes them two steps (what Redis Cluster and
    /// `--redis-wait-replicas` always do), e.g. to compare the two.
    #[arg(long, env = "WSFLEET_REDIS_ROUTE_IN_SCRIPT", default_value_t = true, action = clap::ArgAction::Set)]
    pub redis_route_in_script: bool,

    /// Cluster mode: longest delay, in milliseconds, before a message whose
    /// routing to its pod failed (refused, timed out, inbox lost) still
    /// reaches the live connection from the log. The repair loop runs every
    /// half of it; each run costs one Redis round trip per pod.
    #[arg(long, env = "WSFLEET_DELIVERY_REPAIR_MS", default_value_t = 2000)]
    pub delivery_repair_ms: u64,

    /// Seconds a session's ownership (and a pod's channel membership) lasts
    /// without renewal: a dead pod's sessions are free after this.
    #[arg(long, env = "WSFLEET_SESSION_LEASE_S", default_value_t = 30)]
    pub session_lease_s: u64,

    /// This pod's name in the fleet. Default: $POD_NAME, else the hostname.
    #[arg(long, env = "WSFLEET_POD_NAME")]
    pub pod_name: Option<String>,

    /// How WebSocket clients authenticate.
    #[arg(long, env = "WSFLEET_AUTH", value_enum, default_value = "none")]
    pub auth: AuthMode,

    /// HS256 secret for --auth jwt.
    #[arg(long, env = "WSFLEET_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<Secret>,

    /// PEM file with the RS256 public key for --auth jwt.
    #[arg(long, env = "WSFLEET_JWT_RS256_PUBLIC_KEY_FILE")]
    pub jwt_rs256_public_key_file: Option<PathBuf>,

    /// API key required as `Authorization: Bearer <key>` on /v1/*. Absent:
    /// /v1/* answers loopback peers only (unless --insecure-api).
    #[arg(long, env = "WSFLEET_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Without --api-key, open /v1/* to every peer instead of loopback only.
    /// Anyone who reaches the port can then message any session.
    #[arg(long, env = "WSFLEET_INSECURE_API", default_value_t = false)]
    pub insecure_api: bool,

    /// Comma-separated browser origins allowed to open WebSockets. Absent: any.
    #[arg(long, env = "WSFLEET_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Most WebSocket connections this pod holds at once.
    #[arg(long, env = "WSFLEET_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Largest WebSocket message (and HTTP API body) in bytes.
    #[arg(long, env = "WSFLEET_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Most messages in one `POST /v1/messages` batch.
    #[arg(long, env = "WSFLEET_MAX_BATCH_MESSAGES", default_value_t = 1000)]
    pub max_batch_messages: usize,

    /// Largest `POST /v1/messages` body in bytes (each message's `data`
    /// still obeys --max-frame-bytes).
    #[arg(long, env = "WSFLEET_MAX_BATCH_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_batch_bytes: usize,

    /// Most channel subscriptions per connection.
    #[arg(long, env = "WSFLEET_MAX_SUBSCRIPTIONS", default_value_t = 64)]
    pub max_subscriptions: usize,

    /// Inbound frames per second per connection (burst of the same size).
    #[arg(long, env = "WSFLEET_RATE_LIMIT_PER_SEC", default_value_t = 100)]
    pub rate_limit_per_sec: u32,

    /// Outbound queue per connection, in messages; overflow closes it with 1013.
    #[arg(long, env = "WSFLEET_OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,

    /// Seconds a client has to send its HTTP upgrade request.
    #[arg(long, env = "WSFLEET_HANDSHAKE_TIMEOUT_S", default_value_t = 10)]
    pub handshake_timeout_s: u64,

    /// Seconds between server pings; a client silent for two of them is closed.
    #[arg(long, env = "WSFLEET_HEARTBEAT_S", default_value_t = 25)]
    pub heartbeat_s: u64,

    /// Messages retained per session and per channel.
    #[arg(long, env = "WSFLEET_RETENTION_MESSAGES", default_value_t = 1000)]
    pub retention_messages: usize,

    /// Seconds messages are retained.
    #[arg(long, env = "WSFLEET_RETENTION_S", default_value_t = 300)]
    pub retention_s: u64,

    /// Embedded mode: bytes of memory all retained messages may hold
    /// together (frames, idempotency keys, session and channel entries;
    /// estimated). Beyond it new messages get 503 `unavailable`. Size it to
    /// about a quarter of the memory the process may use.
    #[arg(long, env = "WSFLEET_MAX_RETAINED_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_retained_bytes: usize,

    /// Embedded mode: bytes one session's or channel's log may hold; its
    /// oldest messages are trimmed beyond (a resume then reports a gap).
    /// The default holds the default retention of full-size frames.
    #[arg(long, env = "WSFLEET_MAX_LOG_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_log_bytes: usize,

    /// Seconds over which a draining pod spreads its reconnect + 1012 closes.
    #[arg(long, env = "WSFLEET_DRAIN_S", default_value_t = 30)]
    pub drain_s: u64,

    /// Upper bound of the random `after_ms` a draining pod tells clients to wait.
    #[arg(long, env = "WSFLEET_RECONNECT_JITTER_MS", default_value_t = 2000)]
    pub reconnect_jitter_ms: u64,

    /// URL to POST upstream events (connect, disconnect, upstream) to.
    /// It may carry credentials (user:password@ or a token in the query), so
    /// it is a secret: never logged, never shown by --help.
    #[arg(long, env = "WSFLEET_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<Secret>,

    /// Redis stream for upstream events (cluster mode).
    #[arg(
        long,
        env = "WSFLEET_UPSTREAM_STREAM",
        default_value = "wsfleet:upstream"
    )]
    pub upstream_stream: String,

    /// Seconds an event stays in --upstream-stream (besides its cap of about
    /// 1,000,000 events); older ones are trimmed on the next append, so a
    /// backend that is away longer misses them. 0: no age cap.
    #[arg(long, env = "WSFLEET_UPSTREAM_MAX_AGE_S", default_value_t = 86_400)]
    pub upstream_max_age_s: u64,

    /// Per-connection WebSocket read buffer in bytes (allocated for every
    /// connection and never grown: a larger frame is read into an
    /// allocation of its own size, freed with the message).
    #[arg(long, env = "WSFLEET_READ_BUFFER_BYTES", default_value_t = 1024)]
    pub read_buffer_bytes: usize,

    /// No effect since the own framing (`gateway::socket`), which writes
    /// each frame through without an out-buffer; accepted so existing
    /// deployments that set it still start.
    #[arg(long, env = "WSFLEET_WRITE_BUFFER_BYTES", default_value_t = 0)]
    pub write_buffer_bytes: usize,

    /// Log format.
    #[arg(long, env = "WSFLEET_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// For tests and chaos drills only: lets a `{"type":"panic"}` frame crash
    /// its connection's task.
    #[arg(long, env = "WSFLEET_FAULT_INJECTION", default_value_t = false)]
    pub fault_injection: bool,
}

/// Why a configuration cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--auth jwt needs --jwt-hs256-secret or --jwt-rs256-public-key-file")]
    JwtKeyMissing,
    #[error("reading the RS256 public key {path}: {source}")]
    JwtKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the JWT key is invalid: {0}")]
    JwtKeyInvalid(String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("{0} must not be empty (leave it unset instead)")]
    Empty(&'static str),
    #[error("--redis-wait-replicas works with a single Redis primary, not with --redis-cluster")]
    WaitWithCluster,
    #[error("{0} must not be greater than {1}")]
    Bounds(&'static str, &'static str),
    #[error("{0} must be a non-negative fraction (0.1 = 10 %)")]
    Fraction(&'static str),
}

impl ServeConfig {
    /// Parses a config as the CLI would, for tests and embedding.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: ServeConfig,
        }
        let args = std::iter::once(std::ffi::OsString::from("wsfleet-serve"))
            .chain(args.into_iter().map(Into::into));
        Ok(Wrapper::try_parse_from(args)?.config)
    }

    /// Checks what clap cannot: combinations and non-zero limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let non_zero = [
            (self.max_connections, "--max-connections"),
            (self.max_frame_bytes, "--max-frame-bytes"),
            (self.max_batch_messages, "--max-batch-messages"),
            (self.max_batch_bytes, "--max-batch-bytes"),
            (self.outbound_queue, "--outbound-queue"),
            (self.retention_messages, "--retention-messages"),
            (self.rate_limit_per_sec as usize, "--rate-limit-per-sec"),
            (self.heartbeat_s as usize, "--heartbeat-s"),
            (self.handshake_timeout_s as usize, "--handshake-timeout-s"),
            (self.session_lease_s as usize, "--session-lease-s"),
            (self.redis_timeout_ms as usize, "--redis-timeout-ms"),
            (self.delivery_repair_ms as usize, "--delivery-repair-ms"),
            (self.max_retained_bytes, "--max-retained-bytes"),
            (self.max_log_bytes, "--max-log-bytes"),
        ];
        if let Some((_, name)) = non_zero.iter().find(|(v, _)| *v == 0) {
            return Err(ConfigError::Zero(name));
        }
        // An empty key would be matched by `Authorization: Bearer ` alone.
        if self.api_key.as_ref().is_some_and(|k| k.0.is_empty()) {
            return Err(ConfigError::Empty("--api-key"));
        }
        if self.redis_wait_replicas > 0 && self.redis_cluster {
            return Err(ConfigError::WaitWithCluster);
        }
        if self.auth == AuthMode::Jwt
            && self.jwt_hs256_secret.is_none()
            && self.jwt_rs256_public_key_file.is_none()
        {
            return Err(ConfigError::JwtKeyMissing);
        }
        Ok(())
    }

    /// The pod name: flag or env, else $POD_NAME, else the hostname.
    pub fn resolved_pod_name(&self) -> String {
        if let Some(name) = &self.pod_name {
            return name.clone();
        }
        if let Ok(name) = std::env::var("POD_NAME")
            && !name.is_empty()
        {
            return name;
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "wsfleet".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_locally() {
        let c = ServeConfig::from_args(Vec::<String>::new()).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert!(c.redis_url.is_none());
        assert_eq!(c.max_frame_bytes, 65536);
        assert_eq!(c.retention_messages, 1000);
        assert_eq!(c.retention_s, 300);
        c.validate().unwrap();
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = ServeConfig::from_args([
            "--api-key",
            "hunter2",
            "--auth",
            "jwt",
            "--jwt-hs256-secret",
            "s3cret",
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn validation_catches_bad_combinations() {
        let jwt_without_key = ServeConfig::from_args(["--auth", "jwt"]).unwrap();
        assert!(matches!(
            jwt_without_key.validate(),
            Err(ConfigError::JwtKeyMissing)
        ));
        let zero = ServeConfig::from_args(["--outbound-queue", "0"]).unwrap();
        assert!(matches!(
            zero.validate(),
            Err(ConfigError::Zero("--outbound-queue"))
        ));
    }
}
