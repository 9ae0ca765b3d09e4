//! Cluster mode: the bus over Redis Streams.
//!
//! ```text
//!  sender pod                         Redis                           owner pod
//!  ----------                         -----                           ---------
//!  APPEND script (one slot) -------> {s:id}:log   (the truth)
//!    returns owner pod               {s:id}:owner (holder, epoch)
//!  XADD owner's inbox ------------> wsf:inbox:{pod} --XREADGROUP--> reader task
//!                                                                     -> mailbox.offer
//! ```
//!
//! On a single Redis server without `--redis-wait-replicas`, the XADD to
//! the owner's inbox (and to each subscribed pod's, for a channel) runs
//! inside the append's script (APPEND_ROUTE): one round trip per message
//! instead of two, with the log still written first. Redis Cluster keeps
//! the two steps (the inbox is in another slot), and so does a replica wait
//! (a message must not reach a socket before its 202 could be sent).
//!
//! * The session's (or channel's) log is written first and is the only copy
//!   that matters: the 202 is sent once the APPEND script has run. Inbox
//!   entries are a fast path; if one is lost with a dying pod, the client's
//!   resume with `last` reads the log (trap 1).
//! * Each log entry records the offset before it, so the connection task
//!   notices a late or lost inbox entry and reads the hole from the log.
//! * Ownership is a record naming its holder (instance + connection) plus a
//!   claim record that outlives it. Liveness is one lease per instance, not
//!   per session (trap 17): a dead instance's records are swept by a live
//!   pod, and an instance whose lease lapsed checks each of its sessions
//!   once and closes (4409) any that another connection claimed since: the
//!   fence for stale owners (traps 3 and 15, `ownership.rs`,
//!   `liveness.rs`).
//! * The blocking inbox read has its own connection, and so does WAIT
//!   (trap 8, `replicas.rs`).
//! * A channel message goes once to each pod that has subscribers, then to
//!   the local subscribers (trap 9).
//!
//! One job per file: `conn` (connections, what a failure means, metrics),
//! `keys` (layout), `scripts` (the Lua steps), `ownership` (claim, release,
//! the fence), `liveness` (the instance lease, sweeps), `inbox` (reading this pod's inbox), `replicas`
//! (WAIT), `upkeep` (the periodic pass), `fanout` (a channel's local
//! subscribers, offered in log order), `repair` (the delivery bound when
//! routing fails); this file is the [`Bus`] itself:
//! appends, routing, replays and channel membership.
//!
//! docs/architecture.md explains the design and its failure modes.

mod conn;
mod fanout;
mod inbox;
mod keys;
mod liveness;
mod ownership;
mod registry;
mod repair;
mod replicas;
pub mod scripts;
mod upkeep;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::future::join_all;
use rand::Rng;
use redis::AsyncCommands;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use conn::Target;
use conn::{BusMetrics, Conn, Effect};
use fanout::LocalChannel;
use keys::{ChannelKeys, SessionKeys};
use ownership::LocalOwner;
pub use registry::{FleetRegistry, PodReport};
use repair::{Hint, HintQueue, NoticeKind, RepairMetrics};
use replicas::{ReplicaRounds, ReplicaWait};

use super::{
    Bus, BusError, Claim, ConnId, Delivery, Mailbox, Offer, Outgoing, Replay, Result, Retention,
    SessionInfo, now_ms,
};
use crate::pod::{LocalPod, PodStatus};
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId, frame};
use crate::telemetry::{Metrics, otel};

/// Entries an inbox keeps at most (approximately): a backstop for a pod
/// that stopped reading. A live pod drops its own backlog long before this
/// and catches up from the logs (`repair.rs`), so senders' trimming never
/// removes an entry unnoticed.
const INBOX_MAXLEN: usize = 100_000;
/// Entries the upstream stream keeps at most (approximately).
const UPSTREAM_MAXLEN: usize = 1_000_000;
/// How long the probe write that tests whether Redis has memory again lives.
const MEMORY_PROBE_TTL_MS: u64 = 10_000;

/// How the Redis bus is set up.
#[derive(Clone)]
pub struct RedisOptions {
    pub target: Target,
    /// Session ownership and channel membership leases.
    pub lease: Duration,
    pub retention: Retention,
    /// Stream that upstream events are appended to.
    pub upstream_stream: String,
    /// Deadline of every Redis call.
    pub timeout: Duration,
    /// Replicas that must acknowledge an append (WAIT) before it is accepted.
    pub wait_replicas: u32,
    /// Route in the append's script where the deployment allows it (see
    /// `RedisBus::routes_in_script`).
    pub route_in_script: bool,
    /// Upstream events older than this are trimmed from the upstream
    /// stream (besides the count cap); zero: count cap only.
    pub upstream_max_age: Duration,
    /// Upper bound of the delay a connection asked to reconnect (its
    /// ownership could not be proven) is told to wait.
    pub reconnect_jitter_ms: u64,
    /// The largest message a client may send: after an `-OOM`, Redis counts
    /// as having memory again once a write of this size succeeds.
    pub max_message_bytes: usize,
    /// Longest delay before a message whose routing failed reaches its live
    /// connection; the repair loop runs every half of it.
    pub delivery_repair: Duration,
}

pub struct RedisBus {
    /// Itself, for tasks started from `&self` (channel catch-ups).
    me: Weak<RedisBus>,
    pod: Arc<LocalPod>,
    /// Random per process: tells this run of the pod from an earlier one
    /// with the same name (StatefulSets reuse names). Half of every holder.
    instance: u64,
    /// `instance` as Redis stores it (owner records, consumer name).
    inst: String,
    opts: RedisOptions,
    conn: Conn,
    metrics: Arc<Metrics>,
    bus_metrics: BusMetrics,
    /// Set when Redis answers `-OOM`, cleared when a probe write succeeds:
    /// readiness reports it until then.
    out_of_memory: AtomicBool,
    /// Replica acknowledgement, when `wait_replicas` > 0.
    replicas: Option<ReplicaWait>,
    /// Its round task, until `spawn_background` starts it.
    replica_rounds: std::sync::Mutex<Option<ReplicaRounds>>,
    /// Sessions whose connection lives here.
    sessions: DashMap<SessionId, LocalOwner>,
    /// This instance's session set in Redis (`liveness.rs`).
    members: liveness::InstanceMembers,
    /// Set when this instance's lease had lapsed: its sessions are checked
    /// (the fence) until a check of all of them completes.
    verify_pending: AtomicBool,
    /// Channels with subscribers here: the subscribers and what they were offered.
    channels: DashMap<ChannelName, LocalChannel>,
    /// This pod's inbox stream.
    inbox: String,
    /// Repair hints owed to other pods whose inbox could not be written.
    hints: HintQueue,
    repair_metrics: RepairMetrics,
}

/// What APPEND answered.
struct Appended {
    offset: Offset,
    prev: Option<Offset>,
    /// `None` for a duplicate (already routed once). Session: {owner pod,
    /// owner instance} or empty; channel: the pods with subscribers.
    targets: Option<Vec<String>>,
    /// The script also routed to the remote targets (APPEND_ROUTE).
    routed: bool,
    /// Remote targets the script could not route to (their inbox is gone).
    unrouted: Vec<String>,
    /// The `append` span's W3C traceparent, when traces are on.
    trace: Option<String>,
}

/// The keys of the log a message is appended to (see APPEND).
struct LogTarget<'a> {
    log: &'a str,
    head: &'a str,
    /// Session: the owner hash; channel: the pods sorted set.
    route: &'a str,
    /// 's' session, 'c' channel.
    kind: &'static str,
    /// The session id or channel name.
    name: &'a str,
}

/// A message's fields as a log or inbox entry stores them ('' for absent).
struct Stored<'a> {
    offset: Offset,
    prev: Option<Offset>,
    data: &'a str,
    from: &'a str,
    accepted_ms: u64,
    /// W3C traceparent of the span that stored or routed it.
    trace: &'a str,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn parse_offset(s: &str) -> Option<Offset> {
    if s.is_empty() { None } else { s.parse().ok() }
}

impl RedisBus {
    /// Connects (lazily for a single server) and returns the bus. Call
    /// [`RedisBus::spawn_background`] to start the inbox reader and upkeep.
    pub async fn connect(
        opts: RedisOptions,
        pod: Arc<LocalPod>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let conn = opts
            .target
            .connect(opts.timeout)
            .await
            .map_err(unavailable)?;
        let instance = rand::rng().random::<u64>();
        let bus_metrics = BusMetrics::register(&metrics);
        let (replicas, replica_rounds) = if opts.wait_replicas > 0 {
            // Its own connection: WAIT blocks whatever is queued behind it.
            let wait_ms = replicas::wait_timeout_ms(opts.timeout);
            let own = opts
                .target
                .connect(Duration::from_millis(wait_ms) + opts.timeout)
                .await
                .map_err(unavailable)?;
            let (wait, rounds) = replicas::replica_wait(
                opts.wait_replicas,
                opts.timeout,
                keys::replica_barrier(&pod.name),
                own,
                bus_metrics.clone(),
            );
            (Some(wait), Some(rounds))
        } else {
            (None, None)
        };
        let repair_metrics = RepairMetrics::register(&metrics);
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            hints: HintQueue::default(),
            repair_metrics,
            inbox: keys::inbox(&pod.name),
            pod,
            instance,
            inst: ownership::instance_field(instance),
            opts,
            conn,
            metrics,
            bus_metrics,
            out_of_memory: AtomicBool::new(false),
            replicas,
            replica_rounds: std::sync::Mutex::new(replica_rounds),
            sessions: DashMap::new(),
            members: liveness::InstanceMembers::default(),
            verify_pending: AtomicBool::new(false),
            channels: DashMap::new(),
        }))
    }

    /// Starts the inbox reader, the upkeep loop (leases, fleet status) and
    /// the replica waiter and the delivery repair loop.
    pub fn spawn_background(self: &Arc<Self>, tracker: &TaskTracker, shutdown: CancellationToken) {
        tracker.spawn(inbox::read(self.clone(), shutdown.clone()));
        let rounds = self
            .replica_rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rounds) = rounds {
            tracker.spawn(rounds.run(shutdown.clone()));
        }
        tracker.spawn(repair::run(self.clone(), shutdown.clone()));
        tracker.spawn(upkeep::run(self.clone(), shutdown));
    }

    /// One Redis call whose failure means "nothing happened" (reads, claims,
    /// renewals, acknowledgements).
    async fn call<T>(
        &self,
        command: &'static str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        self.call_with(command, Effect::Plain, call).await
    }

    async fn call_with<T>(
        &self,
        command: &'static str,
        effect: Effect,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let outcome = self
            .bus_metrics
            .call(command, self.opts.timeout, effect, call)
            .await;
        if let Err(BusError::Full(why)) = &outcome
            && !self.out_of_memory.swap(true, Ordering::Relaxed)
        {
            self.bus_metrics.out_of_memory.set(1);
            tracing::error!(command, "{why}");
        }
        outcome
    }

    /// After an `-OOM`: whether Redis takes writes again. A real write (under
    /// `noeviction` only writes are refused) as large as the largest message
    /// (Redis near its limit takes small writes and refuses large ones),
    /// deleted at once.
    async fn probe_memory(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let key = keys::memory_probe(&self.pod.name);
        let mut probe = redis::pipe();
        probe
            .cmd("SET")
            .arg(&key)
            .arg(vec![b'x'; self.opts.max_message_bytes])
            .arg("PX")
            .arg(MEMORY_PROBE_TTL_MS)
            .ignore()
            .cmd("DEL")
            .arg(&key)
            .ignore();
        self.call::<()>("memory_probe", probe.query_async(&mut conn))
            .await?;
        self.out_of_memory.store(false, Ordering::Relaxed);
        self.bus_metrics.out_of_memory.set(0);
        tracing::info!("Redis accepts writes again");
        Ok(())
    }

    fn retention_ms(&self) -> u64 {
        self.opts.retention.max_age_ms
    }

    fn lease_ms(&self) -> u64 {
        self.opts.lease.as_millis() as u64
    }

    /// Whether APPEND_ROUTE may write other pods' inboxes in the append's
    /// own script (one round trip): a single server, no replica wait.
    fn routes_in_script(&self) -> bool {
        self.opts.route_in_script && !self.opts.target.cluster && self.replicas.is_none()
    }

    /// Appends a message under `span` (the `append` trace span, whose
    /// context the log entry carries) and counts it as accepted.
    async fn append(
        &self,
        target: LogTarget<'_>,
        idempotency: Option<String>,
        msg: &Outgoing<'_>,
        span: tracing::Span,
    ) -> Result<Appended> {
        let trace = otel::traceparent(&span);
        let kind = if target.kind == "s" {
            "session"
        } else {
            "channel"
        };
        let mut appended = self
            .run_append(target, idempotency, msg, trace.as_deref())
            .instrument(span)
            .await?;
        self.metrics
            .messages_accepted
            .with_label_values(&[kind])
            .inc();
        appended.trace = trace;
        Ok(appended)
    }

    /// Runs APPEND (or APPEND_ROUTE, see [`Self::routes_in_script`]) for a
    /// session or a channel.
    async fn run_append(
        &self,
        target: LogTarget<'_>,
        idempotency: Option<String>,
        msg: &Outgoing<'_>,
        trace: Option<&str>,
    ) -> Result<Appended> {
        let LogTarget {
            log,
            head,
            route,
            kind,
            name,
        } = target;
        let mut conn = self.conn.clone();
        let in_script = self.routes_in_script();
        let script = if in_script {
            &scripts::APPEND_ROUTE
        } else {
            &scripts::APPEND
        };
        let mut invocation = script.prepare_invoke();
        invocation
            .key(log)
            .key(head)
            .key(idempotency.as_deref().unwrap_or(head))
            .key(route)
            .arg(msg.data.get())
            .arg(msg.from.map(|s| s.as_str()).unwrap_or(""))
            .arg(self.opts.retention.max_messages)
            .arg(self.retention_ms())
            .arg(if idempotency.is_some() { "1" } else { "0" })
            .arg(kind)
            .arg(now_ms())
            .arg(trace.unwrap_or(""));
        if in_script {
            invocation
                .arg(&self.pod.name)
                .arg(&self.inst)
                .arg(name)
                .arg(INBOX_MAXLEN)
                .arg(self.lease_ms() * 2);
        }
        let (id, prev, duplicate, targets, unrouted) = if in_script {
            type Reply = (String, String, i64, Vec<String>, Vec<String>);
            let call = invocation.invoke_async::<Reply>(&mut conn);
            self.call_with("append", Effect::Append, call).await?
        } else {
            type Reply = (String, String, i64, Vec<String>);
            let call = invocation.invoke_async::<Reply>(&mut conn);
            let (id, prev, duplicate, targets) =
                self.call_with("append", Effect::Append, call).await?;
            (id, prev, duplicate, targets, Vec::new())
        };
        let offset = id.parse::<Offset>().map_err(unavailable)?;
        if let Some(replicas) = &self.replicas {
            // A duplicate is waited for too: its first attempt may be the
            // very one whose acknowledgement fell short.
            replicas.wait(&format!("offset {offset}")).await?;
        }
        if duplicate == 1 {
            return Ok(Appended {
                offset,
                prev: None,
                targets: None,
                routed: in_script,
                unrouted: Vec::new(),
                trace: None,
            });
        }
        Ok(Appended {
            offset,
            prev: parse_offset(&prev),
            targets: Some(targets),
            routed: in_script,
            unrouted,
            trace: None,
        })
    }

    /// Counts a hop to `pod` (made by [`Self::route`] or inside
    /// APPEND_ROUTE) and, when it failed, queues `hint` for the pod.
    fn routed_to(&self, pod: &str, kind: &'static str, hint: Hint, failure: Option<&str>) {
        let Some(failure) = failure else {
            self.bus_metrics
                .routed
                .with_label_values(&[kind, "out"])
                .inc();
            return;
        };
        self.repair_metrics
            .route_failures
            .with_label_values(&[kind])
            .inc();
        let queued = self.hints.push(pod, hint);
        self.repair_metrics.hints_queued.set(queued as i64);
        tracing::debug!(pod, kind, error = %failure, "routing to a pod failed; a repair hint is queued");
    }

    /// Appends an entry to another pod's inbox. On failure (an error, a
    /// timeout, or no inbox to write to) queues `hint` for the pod, so the
    /// repair loop catches the named log up there within the delivery bound.
    async fn route(&self, pod: &str, fields: &[(&str, &str)], kind: &'static str, hint: Hint) {
        let mut pipe = redis::pipe();
        let xadd = pipe
            .cmd("XADD")
            .arg(keys::inbox(pod))
            .arg("NOMKSTREAM")
            .arg("MAXLEN")
            .arg("~")
            .arg(INBOX_MAXLEN)
            .arg("*");
        for (k, v) in fields {
            xadd.arg(*k).arg(*v);
        }
        // The log is named in the pod's routed set too (same slot as its
        // inbox, same round trip): if the inbox entry is lost on its way
        // (trimmed, deleted), the pod's head check finds the log behind.
        let routed = matches!(hint, Hint::Session(_) | Hint::Channel(_));
        if routed {
            let key = keys::routed(pod);
            pipe.cmd("SADD").arg(&key).arg(hint.encode()).ignore();
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(self.lease_ms() * 2)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let failure = match self
            .call(
                "xadd_inbox",
                pipe.query_async::<(Option<String>,)>(&mut conn),
            )
            .await
        {
            Ok((Some(_),)) => None,
            // NOMKSTREAM: the pod's inbox is gone (deleted, Redis restarted
            // empty, or the pod died and its inbox expired).
            Ok((None,)) => Some("no inbox".to_string()),
            Err(e) => Some(e.to_string()),
        };
        self.routed_to(pod, kind, hint, failure.as_deref());
    }

    /// Hands a direct message to the local connection of its session.
    fn deliver_local_session(&self, session: &SessionId, delivery: &Arc<Delivery>) {
        if let Some(mut owner) = self.sessions.get_mut(session) {
            owner.offered = owner.offered.max(Some(delivery.offset));
            if owner.mailbox.offer(delivery) == Offer::Overflow {
                self.metrics.queue_overflows.inc();
            }
        }
    }

    /// Builds a delivery from stored fields.
    fn delivery(&self, channel: Option<&ChannelName>, stored: Stored<'_>) -> Option<Arc<Delivery>> {
        let Stored {
            offset,
            prev,
            data,
            from,
            accepted_ms,
            trace,
        } = stored;
        let data: &RawValue = match serde_json::from_str(data) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, %offset, "stored message is not JSON; skipped");
                return None;
            }
        };
        let frame = match channel {
            Some(c) => frame::channel_message(c, offset, data),
            None => frame::session_message(offset, (!from.is_empty()).then_some(from), data),
        };
        Some(Arc::new(Delivery {
            offset,
            prev,
            channel: channel.cloned(),
            frame: frame.into(),
            accepted_ms,
            trace: (channel.is_none() && !trace.is_empty()).then(|| trace.into()),
            resync: false,
        }))
    }

    /// Reads a log after `after` (REPLAY script) and says whether a gap lies
    /// between `after` and what is left.
    async fn replay(
        &self,
        log: &str,
        head: &str,
        channel: Option<&ChannelName>,
        after: Option<Offset>,
    ) -> Result<Replay> {
        let mut conn = self.conn.clone();
        let mut invocation = scripts::REPLAY.prepare_invoke();
        let after_arg = after.map(|o| o.to_string()).unwrap_or_default();
        invocation
            .key(log)
            .key(head)
            .arg(after_arg)
            .arg(self.opts.retention.max_messages + 16)
            .arg(self.retention_ms());
        type Entry = (String, Vec<String>);
        let (head, entries, trimmed): (String, Vec<Entry>, u64) = self
            .call("replay", invocation.invoke_async(&mut conn))
            .await?;
        self.metrics.retention_trims.inc_by(trimmed);
        let mut out = Vec::with_capacity(entries.len());
        let mut first_prev: Option<Option<Offset>> = None;
        for (i, (id, fields)) in entries.iter().enumerate() {
            let Ok(offset) = id.parse::<Offset>() else {
                continue;
            };
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv[0] == name)
                    .and_then(|kv| kv.get(1))
                    .map(String::as_str)
                    .unwrap_or("")
            };
            let prev = parse_offset(field("p"));
            if i == 0 {
                first_prev = Some(prev);
            }
            let accepted = field("t").parse().unwrap_or(0);
            let (data, from) = (field("d"), field("f"));
            let stored = Stored {
                offset,
                prev,
                data,
                from,
                accepted_ms: accepted,
                trace: field("tp"),
            };
            if let Some(d) = self.delivery(channel, stored) {
                out.push(d);
            }
        }
        let gap = replay_gap(after, first_prev, parse_offset(&head));
        Ok(Replay { entries: out, gap })
    }

    /// Sends the owner of a session a control notice (takeover, kick).
    async fn notify_owner(
        &self,
        pod: &str,
        kind: &'static str,
        session: &SessionId,
        inst: &str,
        conn: &str,
    ) {
        let hint = Hint::Notice {
            kind: NoticeKind::from_tag(kind),
            inst: inst.to_string(),
            conn: conn.to_string(),
            session: session.clone(),
        };
        self.route(
            pod,
            &[("k", kind), ("n", session), ("i", inst), ("c", conn)],
            "notice",
            hint,
        )
        .await;
    }

    /// Local half of a control notice: closes the named connection if it is here.
    fn close_local(&self, session: &SessionId, inst: &str, conn: &str, reason: CloseReason) {
        if let Some(holder) = ownership::parse_holder(inst, conn) {
            self.close_holder(session, holder, reason);
        }
    }

    /// Makes (or keeps) this pod a member of the channel's pods; returns
    /// the channel head and whether the membership was missing.
    async fn join_channel(&self, channel: &ChannelName) -> Result<(Option<Offset>, bool)> {
        let keys = ChannelKeys::new(channel);
        let mut conn = self.conn.clone();
        let mut invocation = scripts::SUBSCRIBE.prepare_invoke();
        invocation
            .key(&keys.pods)
            .key(&keys.head)
            .arg(&self.pod.name)
            .arg(self.lease_ms());
        let (head, added): (String, i64) = self
            .call("subscribe", invocation.invoke_async(&mut conn))
            .await?;
        Ok((parse_offset(&head), added == 1))
    }

    fn status_json(&self) -> String {
        serde_json::json!({
            "status": self.pod.status(),
            "expires_ms": now_ms() + self.lease_ms(),
        })
        .to_string()
    }
}

#[async_trait]
impl Bus for RedisBus {
    #[tracing::instrument(level = "debug", skip_all, fields(%session))]
    async fn claim(&self, session: &SessionId, mailbox: &Mailbox) -> Result<Claim> {
        self.claim_session(session, mailbox).await
    }

    async fn release(&self, session: &SessionId, claim: Claim) {
        self.release_session(session, claim).await
    }

    async fn send_to_session(&self, session: &SessionId, msg: Outgoing<'_>) -> Result<Offset> {
        let keys = SessionKeys::new(session);
        let idem = msg
            .idempotency_key
            .map(|k| SessionKeys::idempotency(session, k));
        let span = tracing::info_span!(target: otel::TARGET, "append", session = %session, log = "session");
        let target = LogTarget {
            log: &keys.log,
            head: &keys.head,
            route: &keys.owner,
            kind: "s",
            name: session.as_str(),
        };
        let appended = self.append(target, idem, &msg, span).await?;
        let Appended {
            offset,
            prev,
            targets,
            routed,
            unrouted,
            trace,
        } = appended;
        let Some(targets) = targets else {
            return Ok(offset);
        };
        let (Some(pod), Some(inst)) = (targets.first(), targets.get(1)) else {
            return Ok(offset); // not connected: delivered on connect
        };
        let accepted = now_ms();
        if *pod == self.pod.name && *inst == self.inst {
            let from = msg.from.map(|s| s.as_str()).unwrap_or("");
            let trace = trace.as_deref().unwrap_or("");
            if let Some(d) = self.delivery(
                None,
                Stored {
                    offset,
                    prev,
                    data: msg.data.get(),
                    from,
                    accepted_ms: accepted,
                    trace,
                },
            ) {
                self.deliver_local_session(session, &d);
            }
        } else if routed {
            // The script wrote the owner's inbox (the `deliver` span there
            // is a child of the append), unless the inbox was gone.
            let failure = unrouted.contains(pod).then_some("inbox gone or refused");
            self.routed_to(pod, "session", Hint::Session(session.clone()), failure);
        } else {
            // The owner's socket write becomes a child of this hop.
            let span =
                tracing::info_span!(target: otel::TARGET, "route", session = %session, pod = %pod);
            let trace = otel::traceparent(&span).unwrap_or_default();
            let (offset_s, prev_s, t) = (
                offset.to_string(),
                prev.map(|p| p.to_string()).unwrap_or_default(),
                accepted.to_string(),
            );
            let from = msg.from.map(|s| s.as_str()).unwrap_or("");
            let fields = [
                ("k", "s"),
                ("n", session.as_str()),
                ("o", &offset_s),
                ("p", &prev_s),
                ("d", msg.data.get()),
                ("f", from),
                ("t", &t),
                ("tp", &trace),
            ];
            // Without a trace the field is left out, not sent empty.
            let fields = &fields[..if trace.is_empty() { 7 } else { 8 }];
            self.route(pod, fields, "session", Hint::Session(session.clone()))
                .instrument(span)
                .await;
        }
        Ok(offset)
    }

    async fn publish(&self, channel: &ChannelName, msg: Outgoing<'_>) -> Result<Offset> {
        let keys = ChannelKeys::new(channel);
        let idem = msg
            .idempotency_key
            .map(|k| ChannelKeys::idempotency(channel, k));
        let span = tracing::info_span!(target: otel::TARGET, "append", channel = %channel, log = "channel");
        let target = LogTarget {
            log: &keys.log,
            head: &keys.head,
            route: &keys.pods,
            kind: "c",
            name: channel.as_str(),
        };
        let appended = self.append(target, idem, &msg, span).await?;
        let Appended {
            offset,
            prev,
            targets: pods,
            routed,
            unrouted,
            trace,
        } = appended;
        let Some(pods) = pods else { return Ok(offset) };
        let accepted = now_ms();
        let (offset_s, prev_s, t) = (
            offset.to_string(),
            prev.map(|p| p.to_string()).unwrap_or_default(),
            accepted.to_string(),
        );
        let fields = [
            ("k", "c"),
            ("n", channel.as_str()),
            ("o", &offset_s),
            ("p", &prev_s),
            ("d", msg.data.get()),
            ("t", &t),
            ("tp", trace.as_deref().unwrap_or("")),
        ];
        // Each pod's fan-out links to the append (no per-pod route span:
        // the links say where the message went).
        let fields = &fields[..if trace.is_none() { 6 } else { 7 }];
        let mut remote = Vec::new();
        for pod in &pods {
            if *pod == self.pod.name {
                let stored = Stored {
                    offset,
                    prev,
                    data: msg.data.get(),
                    from: "",
                    accepted_ms: accepted,
                    trace: "",
                };
                if let Some(d) = self.delivery(Some(channel), stored) {
                    let span =
                        tracing::info_span!(target: otel::TARGET, "fanout", channel = %channel);
                    otel::link(&span, trace.as_deref());
                    span.in_scope(|| self.deliver_channel(channel, &d));
                }
            } else if routed {
                let failure = unrouted.contains(pod).then_some("inbox gone or refused");
                self.routed_to(pod, "channel", Hint::Channel(channel.clone()), failure);
            } else {
                remote.push(self.route(pod, fields, "channel", Hint::Channel(channel.clone())));
            }
        }
        join_all(remote).await;
        Ok(offset)
    }

    async fn session_log(&self, session: &SessionId, after: Option<Offset>) -> Result<Replay> {
        let keys = SessionKeys::new(session);
        self.replay(&keys.log, &keys.head, None, after).await
    }

    async fn channel_log(&self, channel: &ChannelName, after: Option<Offset>) -> Result<Replay> {
        let keys = ChannelKeys::new(channel);
        self.replay(&keys.log, &keys.head, Some(channel), after)
            .await
    }

    async fn subscribe(&self, channel: &ChannelName, mailbox: &Mailbox) -> Result<Option<Offset>> {
        // Local first, then the membership: a message routed here in
        // between finds its subscriber; one appended before the membership
        // is older than the head returned below.
        {
            let mut local = self.channels.entry(channel.clone()).or_default();
            if !local.subscribers.iter().any(|m| m.id == mailbox.id) {
                local.subscribers.push(mailbox.clone());
            }
        }
        match self.join_channel(channel).await {
            Ok((head, _)) => {
                if let Some(mut local) = self.channels.get_mut(channel) {
                    local.start_at(head);
                }
                Ok(head)
            }
            Err(e) => {
                self.unsubscribe(channel, mailbox.id).await;
                Err(e)
            }
        }
    }

    async fn unsubscribe(&self, channel: &ChannelName, conn_id: ConnId) {
        if let Some(mut local) = self.channels.get_mut(channel) {
            local.subscribers.retain(|m| m.id != conn_id);
        }
        let emptied = self
            .channels
            .remove_if(channel, |_, s| s.subscribers.is_empty())
            .is_some();
        if emptied {
            let keys = ChannelKeys::new(channel);
            let mut conn = self.conn.clone();
            // On failure the membership lease runs out by itself.
            let _ = self
                .call::<i64>("zrem", conn.zrem(&keys.pods, &self.pod.name))
                .await;
        }
    }

    async fn session_info(&self, session: &SessionId) -> Result<Option<SessionInfo>> {
        let keys = SessionKeys::new(session);
        let mut conn = self.conn.clone();
        let (pod, at): (Option<String>, Option<u64>) = self
            .call(
                "hmget",
                redis::cmd("HMGET")
                    .arg(&keys.owner)
                    .arg("pod")
                    .arg("at")
                    .query_async(&mut conn),
            )
            .await?;
        let Some(pod) = pod else { return Ok(None) };
        let at_ms = at.unwrap_or(0);
        let connected_at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Ok(Some(SessionInfo {
            session: session.clone(),
            pod,
            connected_at,
        }))
    }

    async fn disconnect(&self, session: &SessionId) -> Result<bool> {
        let keys = SessionKeys::new(session);
        let mut conn = self.conn.clone();
        let (pod, inst, owner_conn): (Option<String>, Option<String>, Option<String>) = self
            .call(
                "hmget",
                redis::cmd("HMGET")
                    .arg(&keys.owner)
                    .arg(&["pod", "inst", "conn"])
                    .query_async(&mut conn),
            )
            .await?;
        let (Some(pod), Some(inst), Some(owner_conn)) = (pod, inst, owner_conn) else {
            return Ok(false);
        };
        if inst == self.inst {
            self.close_local(session, &inst, &owner_conn, CloseReason::Kicked);
        } else {
            self.notify_owner(&pod, "k", session, &inst, &owner_conn)
                .await;
        }
        Ok(true)
    }

    async fn fleet(&self) -> Result<Vec<PodStatus>> {
        let mut conn = self.conn.clone();
        let all: std::collections::HashMap<String, String> =
            self.call("hgetall", conn.hgetall(keys::FLEET)).await?;
        let now = now_ms();
        let mut pods = Vec::new();
        let mut expired = Vec::new();
        for (name, json) in all {
            let parsed: Option<(PodStatus, u64)> = serde_json::from_str::<serde_json::Value>(&json)
                .ok()
                .and_then(|v| {
                    let status = serde_json::from_value(v.get("status")?.clone()).ok()?;
                    Some((status, v.get("expires_ms")?.as_u64()?))
                });
            match parsed {
                Some((status, expires)) if expires > now => pods.push(status),
                _ => expired.push(name),
            }
        }
        if !expired.is_empty() {
            let _ = self
                .call::<i64>("hdel", conn.hdel(keys::FLEET, &expired))
                .await;
        }
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        Ok(pods)
    }

    async fn append_upstream(&self, event_json: &str) -> Result<bool> {
        let mut conn = self.conn.clone();
        let mut invocation = scripts::UPSTREAM.prepare_invoke();
        invocation
            .key(&self.opts.upstream_stream)
            .arg(event_json)
            .arg(UPSTREAM_MAXLEN)
            .arg(self.opts.upstream_max_age.as_millis() as u64);
        self.call_with::<String>(
            "xadd_upstream",
            Effect::Append,
            invocation.invoke_async(&mut conn),
        )
        .await?;
        Ok(true)
    }

    /// Reachable, and (after an `-OOM`) taking writes again.
    async fn check(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        self.call::<String>("ping", redis::cmd("PING").query_async(&mut conn))
            .await?;
        if self.out_of_memory.load(Ordering::Relaxed) {
            self.probe_memory().await?;
        }
        Ok(())
    }

    fn close_local_connections(&self, reason: CloseReason) -> usize {
        let mut asked = 0;
        for owner in self.sessions.iter() {
            owner.mailbox.close(reason);
            asked += 1;
        }
        asked
    }

    fn shed_local_connections(
        &self,
        count: usize,
        reason: &mut dyn FnMut() -> CloseReason,
    ) -> usize {
        let local = self
            .sessions
            .iter()
            .map(|o| (o.local.claim.holder.conn, o.mailbox.clone()))
            .collect();
        crate::bus::shed_oldest(local, count, reason)
    }
}

/// Whether a replay after `after` may be missing messages: `false` only
/// when the log itself shows that nothing after `after` was trimmed or
/// lost. `first_prev` is the `prev` of the first entry returned (`None`
/// when nothing was returned; `Some(None)` when that entry names no
/// predecessor), `head` the newest offset the log remembers.
///
/// * An entry names its predecessor: continuous iff that is not after
///   `after`. One that names none was appended to a log with no head, the
///   first ever or the first after Redis lost the log; a client holding
///   `after` saw an older entry, so it is the latter.
/// * Nothing after `after`: continuous iff the head is not after `after`.
///   No head at all (lost, or expired `--retention-s` + 1 h after the last
///   append) proves nothing.
fn replay_gap(
    after: Option<Offset>,
    first_prev: Option<Option<Offset>>,
    head: Option<Offset>,
) -> bool {
    let Some(after) = after else { return false };
    match first_prev {
        Some(prev) => prev.is_none_or(|p| p > after),
        None => head.is_none_or(|h| h > after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(ms: u64) -> Offset {
        format!("{ms}-0").parse().expect("offset")
    }

    #[test]
    fn a_gap_is_reported_unless_the_log_proves_continuity() {
        /// (what, after, prev of the first entry returned, head, gap)
        type Case = (
            &'static str,
            Option<Offset>,
            Option<Option<Offset>>,
            Option<Offset>,
            bool,
        );
        let cases: &[Case] = &[
            ("no `after`: nothing to prove", None, None, None, false),
            ("no `after`, log lost", None, Some(None), Some(o(9)), false),
            (
                "first entry follows `after`",
                Some(o(5)),
                Some(Some(o(5))),
                Some(o(9)),
                false,
            ),
            (
                "first entry follows an older one",
                Some(o(5)),
                Some(Some(o(3))),
                Some(o(9)),
                false,
            ),
            (
                "entries after `after` trimmed",
                Some(o(5)),
                Some(Some(o(7))),
                Some(o(9)),
                true,
            ),
            (
                "log restarted (first entry names no predecessor)",
                Some(o(5)),
                Some(None),
                Some(o(9)),
                true,
            ),
            (
                "nothing new, head is `after`",
                Some(o(5)),
                None,
                Some(o(5)),
                false,
            ),
            (
                "nothing new, head older than `after`",
                Some(o(5)),
                None,
                Some(o(4)),
                false,
            ),
            (
                "everything after `after` trimmed",
                Some(o(5)),
                None,
                Some(o(9)),
                true,
            ),
            ("log and head lost", Some(o(5)), None, None, true),
        ];
        for (what, after, first_prev, head, gap) in cases {
            assert_eq!(replay_gap(*after, *first_prev, *head), *gap, "{what}");
        }
    }
}
