//! Cluster mode: the bus over Redis Streams.
//!
//! ```text
//!  sender pod                         Redis                           owner pod
//!  ----------                         -----                           ---------
//!  APPEND script (one slot) -------> {s:id}:log   (the truth)
//!    returns owner pod               {s:id}:owner (leased, epoch)
//!  XADD owner's inbox ------------> wsf:inbox:{pod} --XREADGROUP--> reader task
//!                                                                     -> mailbox.offer
//! ```
//!
//! * The session's (or channel's) log is written first and is the only copy
//!   that matters: the 202 is sent once the APPEND script has run. Inbox
//!   entries are a fast path; if one is lost with a dying pod, the client's
//!   resume with `last` reads the log (trap 1).
//! * Each log entry records the offset before it, so the connection task
//!   notices a late or lost inbox entry and reads the hole from the log.
//! * Ownership is a leased hash with an epoch; the owning pod renews the
//!   lease of each of its sessions and closes (4409) any whose record
//!   names another connection: the fence for stale owners (trap 3).
//! * The blocking inbox read has its own connection (trap 8).
//! * A channel message goes once to each pod that has subscribers, then to
//!   the local subscribers (trap 9).
//!
//! docs/architecture.md explains the design and its failure modes.

mod conn;
mod inbox;
mod keys;
mod scripts;

use std::sync::Arc;
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

pub use conn::Target;
use conn::{BusMetrics, Conn};
use keys::{ChannelKeys, SessionKeys};

use super::{
    Bus, BusError, Claim, ConnId, Delivery, Holder, Mailbox, Offer, Outgoing, Replay, Result,
    Retention, SessionInfo, now_ms,
};
use crate::pod::{LocalPod, PodStatus};
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId, frame};
use crate::telemetry::Metrics;

/// Entries an inbox keeps at most (approximately); older ones are dropped,
/// which costs latency (the log fills the hole), never messages.
const INBOX_MAXLEN: usize = 100_000;
/// Entries the upstream stream keeps at most (approximately).
const UPSTREAM_MAXLEN: usize = 1_000_000;

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
}

/// A session owned by a connection on this pod.
struct LocalOwner {
    epoch: u64,
    mailbox: Mailbox,
    connected_at_ms: u64,
}

pub struct RedisBus {
    pod: Arc<LocalPod>,
    /// Random per process: tells this run of the pod from an earlier one
    /// with the same name (StatefulSets reuse names).
    inst: String,
    opts: RedisOptions,
    conn: Conn,
    metrics: Arc<Metrics>,
    bus_metrics: BusMetrics,
    /// Sessions whose connection lives here.
    sessions: DashMap<SessionId, LocalOwner>,
    /// Channels with subscribers here, and those subscribers.
    channels: DashMap<ChannelName, Vec<Mailbox>>,
    /// This pod's inbox stream.
    inbox: String,
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
        let inst = format!("{:016x}", rand::rng().random::<u64>());
        let bus_metrics = BusMetrics::register(&metrics);
        Ok(Arc::new(Self {
            inbox: keys::inbox(&pod.name),
            pod,
            inst,
            opts,
            conn,
            metrics,
            bus_metrics,
            sessions: DashMap::new(),
            channels: DashMap::new(),
        }))
    }

    /// Starts the inbox reader and the upkeep loop (leases, fleet status).
    pub fn spawn_background(self: &Arc<Self>, tracker: &TaskTracker, shutdown: CancellationToken) {
        tracker.spawn(inbox::read(self.clone(), shutdown.clone()));
        tracker.spawn(upkeep(self.clone(), shutdown));
    }

    async fn call<T>(
        &self,
        command: &'static str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        self.bus_metrics
            .call(command, self.opts.timeout, call)
            .await
    }

    fn retention_ms(&self) -> u64 {
        self.opts.retention.max_age_ms
    }

    fn lease_ms(&self) -> u64 {
        self.opts.lease.as_millis() as u64
    }

    /// Runs APPEND for a session or a channel; returns (offset, prev, targets)
    /// or `None` for the targets of a duplicate (already routed once).
    async fn append(
        &self,
        log: &str,
        head: &str,
        idempotency: Option<String>,
        route: &str,
        kind: &str,
        msg: &Outgoing<'_>,
    ) -> Result<(Offset, Option<Offset>, Option<Vec<String>>)> {
        let mut conn = self.conn.clone();
        let mut invocation = scripts::APPEND.prepare_invoke();
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
            .arg(now_ms());
        let (id, prev, duplicate, targets): (String, String, i64, Vec<String>) = self
            .call("append", invocation.invoke_async(&mut conn))
            .await?;
        let offset = id.parse::<Offset>().map_err(unavailable)?;
        if self.opts.wait_replicas > 0 {
            // WAIT covers the writes made earlier on this same connection,
            // the append included. Commands queued behind it wait too: the
            // price of replica acknowledgement on a multiplexed connection.
            let mut wait = redis::cmd("WAIT");
            wait.arg(self.opts.wait_replicas)
                .arg(self.opts.timeout.as_millis() as u64 / 2);
            let acked: i64 = self.call("wait", wait.query_async(&mut conn)).await?;
            if acked < i64::from(self.opts.wait_replicas) {
                return Err(BusError::Unavailable(format!(
                    "only {acked} of {} replicas acknowledged offset {offset}; it may still be delivered, retry with the same Idempotency-Key",
                    self.opts.wait_replicas
                )));
            }
        }
        if duplicate == 1 {
            return Ok((offset, None, None));
        }
        Ok((offset, parse_offset(&prev), Some(targets)))
    }

    /// Appends an entry to another pod's inbox.
    async fn route(&self, pod: &str, fields: &[(&str, &str)], kind: &'static str) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys::inbox(pod))
            .arg("NOMKSTREAM")
            .arg("MAXLEN")
            .arg("~")
            .arg(INBOX_MAXLEN)
            .arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        let mut conn = self.conn.clone();
        match self
            .call("xadd_inbox", cmd.query_async::<Option<String>>(&mut conn))
            .await
        {
            Ok(_) => self
                .bus_metrics
                .routed
                .with_label_values(&[kind, "out"])
                .inc(),
            // The log has the message; the owner catches up on its next
            // message or the client's next resume.
            Err(e) => tracing::warn!(error = %e, pod, "routing to the owner pod failed"),
        }
    }

    /// Hands a direct message to the local connection of its session.
    fn deliver_local_session(&self, session: &SessionId, delivery: &Arc<Delivery>) {
        if let Some(owner) = self.sessions.get(session)
            && owner.mailbox.offer(delivery) == Offer::Overflow
        {
            self.metrics.queue_overflows.inc();
        }
    }

    /// Hands a channel message to every local subscriber.
    fn deliver_local_channel(&self, channel: &ChannelName, delivery: &Arc<Delivery>) {
        if let Some(mut subscribers) = self.channels.get_mut(channel) {
            subscribers.retain(|m| match m.offer(delivery) {
                Offer::Queued => true,
                Offer::Overflow => {
                    self.metrics.queue_overflows.inc();
                    true
                }
                Offer::Closed => false,
            });
        }
    }

    /// Builds a delivery from stored fields.
    fn delivery(
        &self,
        channel: Option<&ChannelName>,
        offset: Offset,
        prev: Option<Offset>,
        data: &str,
        from: &str,
        accepted_ms: u64,
    ) -> Option<Arc<Delivery>> {
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
        let mut first_prev = None;
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
                first_prev = prev;
            }
            let accepted = field("t").parse().unwrap_or(0);
            if let Some(d) = self.delivery(channel, offset, prev, field("d"), field("f"), accepted)
            {
                out.push(d);
            }
        }
        let gap = match after {
            None => false,
            Some(after) => match out.first() {
                Some(_) => first_prev.is_some_and(|p| p > after),
                None => parse_offset(&head).is_some_and(|h| h > after),
            },
        };
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
        self.route(
            pod,
            &[("k", kind), ("n", session), ("i", inst), ("c", conn)],
            kind,
        )
        .await;
    }

    /// Local half of a control notice: closes the named connection if it is here.
    fn close_local(&self, session: &SessionId, inst: &str, conn: &str, reason: CloseReason) {
        if inst != self.inst {
            return;
        }
        let Ok(conn) = conn.parse::<ConnId>() else {
            return;
        };
        // Only closed here: the connection's own release then removes it
        // and deletes the owner record.
        if let Some(owner) = self.sessions.get(session)
            && owner.mailbox.id == conn
        {
            owner.mailbox.close(reason);
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
        let keys = SessionKeys::new(session);
        let mut conn = self.conn.clone();
        let now = now_ms();
        let mut invocation = scripts::CLAIM.prepare_invoke();
        invocation
            .key(&keys.owner)
            .key(&keys.epoch)
            .arg(&self.pod.name)
            .arg(&self.inst)
            .arg(mailbox.id)
            .arg(self.lease_ms())
            .arg(now);
        let (epoch, prev_pod, prev_inst, prev_conn): (u64, String, String, String) = self
            .call("claim", invocation.invoke_async(&mut conn))
            .await?;
        let previous = self.sessions.insert(
            session.clone(),
            LocalOwner {
                epoch,
                mailbox: mailbox.clone(),
                connected_at_ms: now,
            },
        );
        if let Some(previous) = previous
            && previous.mailbox.id != mailbox.id
        {
            previous.mailbox.close(CloseReason::TakenOver);
        }
        let elsewhere = !prev_pod.is_empty() && (prev_inst != self.inst);
        if elsewhere {
            self.notify_owner(&prev_pod, "x", session, &prev_inst, &prev_conn)
                .await;
        }
        Ok(Claim {
            epoch,
            holder: Holder {
                instance: u64::from_str_radix(&self.inst, 16).unwrap_or_default(),
                conn: mailbox.id,
            },
        })
    }

    async fn release(&self, session: &SessionId, claim: Claim) {
        let removed = self
            .sessions
            .remove_if(session, |_, o| o.epoch == claim.epoch);
        let Some((_, owner)) = removed else { return };
        let keys = SessionKeys::new(session);
        let mut conn = self.conn.clone();
        let mut invocation = scripts::RELEASE.prepare_invoke();
        invocation
            .key(&keys.owner)
            .arg(&self.inst)
            .arg(owner.mailbox.id);
        // On failure the lease runs out by itself.
        let _ = self
            .call::<i64>("release", invocation.invoke_async(&mut conn))
            .await;
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%session))]
    async fn send_to_session(&self, session: &SessionId, msg: Outgoing<'_>) -> Result<Offset> {
        let keys = SessionKeys::new(session);
        let idem = msg
            .idempotency_key
            .map(|k| SessionKeys::idempotency(session, k));
        let (offset, prev, targets) = self
            .append(&keys.log, &keys.head, idem, &keys.owner, "s", &msg)
            .await?;
        self.metrics
            .messages_accepted
            .with_label_values(&["session"])
            .inc();
        let Some(targets) = targets else {
            return Ok(offset);
        };
        let (Some(pod), Some(inst)) = (targets.first(), targets.get(1)) else {
            return Ok(offset); // not connected: delivered on connect
        };
        let accepted = now_ms();
        if *pod == self.pod.name && *inst == self.inst {
            let from = msg.from.map(|s| s.as_str()).unwrap_or("");
            if let Some(d) = self.delivery(None, offset, prev, msg.data.get(), from, accepted) {
                self.deliver_local_session(session, &d);
            }
        } else {
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
            ];
            self.route(pod, &fields, "session").await;
        }
        Ok(offset)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%channel))]
    async fn publish(&self, channel: &ChannelName, msg: Outgoing<'_>) -> Result<Offset> {
        let keys = ChannelKeys::new(channel);
        let idem = msg
            .idempotency_key
            .map(|k| ChannelKeys::idempotency(channel, k));
        let (offset, prev, pods) = self
            .append(&keys.log, &keys.head, idem, &keys.pods, "c", &msg)
            .await?;
        self.metrics
            .messages_accepted
            .with_label_values(&["channel"])
            .inc();
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
        ];
        let mut remote = Vec::new();
        for pod in &pods {
            if *pod == self.pod.name {
                if let Some(d) =
                    self.delivery(Some(channel), offset, prev, msg.data.get(), "", accepted)
                {
                    self.deliver_local_channel(channel, &d);
                }
            } else {
                remote.push(self.route(pod, &fields, "channel"));
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
            let mut subscribers = self.channels.entry(channel.clone()).or_default();
            if !subscribers.iter().any(|m| m.id == mailbox.id) {
                subscribers.push(mailbox.clone());
            }
        }
        match self.join_channel(channel).await {
            Ok((head, _)) => Ok(head),
            Err(e) => {
                self.unsubscribe(channel, mailbox.id).await;
                Err(e)
            }
        }
    }

    async fn unsubscribe(&self, channel: &ChannelName, conn_id: ConnId) {
        if let Some(mut subscribers) = self.channels.get_mut(channel) {
            subscribers.retain(|m| m.id != conn_id);
        }
        let emptied = self
            .channels
            .remove_if(channel, |_, s| s.is_empty())
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
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.opts.upstream_stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(UPSTREAM_MAXLEN)
            .arg("*")
            .arg("event")
            .arg(event_json);
        self.call::<String>("xadd_upstream", cmd.query_async(&mut conn))
            .await?;
        Ok(true)
    }

    async fn check(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        self.call::<String>("ping", redis::cmd("PING").query_async(&mut conn))
            .await?;
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
}

/// Every lease/3: publish this pod's status, keep its inbox alive, renew the
/// leases of its sessions (closing those another connection took) and of
/// its channel memberships.
async fn upkeep(bus: Arc<RedisBus>, shutdown: CancellationToken) {
    let period = (bus.opts.lease / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        upkeep_once(&bus).await;
    }
    // Leaving the fleet view at once is kinder than waiting for the lease.
    let mut conn = bus.conn.clone();
    let _ = bus
        .call::<i64>("hdel", conn.hdel(keys::FLEET, &bus.pod.name))
        .await;
}

async fn upkeep_once(bus: &RedisBus) {
    let mut conn = bus.conn.clone();
    let status = bus.status_json();
    if bus
        .call::<i64>("hset", conn.hset(keys::FLEET, &bus.pod.name, status))
        .await
        .is_err()
    {
        return; // Redis is away; try again next tick
    }
    let _ = bus
        .call::<i64>(
            "pexpire",
            conn.pexpire(&bus.inbox, (bus.lease_ms() * 20) as i64),
        )
        .await;

    let owned: Vec<(SessionId, u64, ConnId, u64)> = bus
        .sessions
        .iter()
        .map(|e| (e.key().clone(), e.epoch, e.mailbox.id, e.connected_at_ms))
        .collect();
    for chunk in owned.chunks(512) {
        let renewals = chunk
            .iter()
            .map(|(session, epoch, conn_id, at)| async move {
                let keys = SessionKeys::new(session);
                let mut conn = bus.conn.clone();
                let mut invocation = scripts::RENEW.prepare_invoke();
                invocation
                    .key(&keys.owner)
                    .arg(&bus.pod.name)
                    .arg(&bus.inst)
                    .arg(*conn_id)
                    .arg(*epoch)
                    .arg(bus.lease_ms())
                    .arg(*at);
                let outcome = bus
                    .call::<i64>("renew", invocation.invoke_async(&mut conn))
                    .await;
                (session, conn_id, outcome)
            });
        for (session, conn_id, outcome) in join_all(renewals).await {
            match outcome {
                Ok(-1) => {
                    // Someone else holds the session now: this connection is stale.
                    tracing::info!(%session, "lost the session to a newer claim; closing 4409");
                    bus.close_local(
                        session,
                        &bus.inst.clone(),
                        &conn_id.to_string(),
                        CloseReason::TakenOver,
                    );
                }
                Ok(2) => {
                    // The owner record was gone (Redis lost data): messages
                    // sent meanwhile were not routed here. Catch up from the log.
                    if let Some(owner) = bus.sessions.get(session) {
                        owner.mailbox.offer(&Arc::new(Delivery::resync(None)));
                    }
                }
                _ => {}
            }
        }
    }

    let channels: Vec<ChannelName> = bus.channels.iter().map(|e| e.key().clone()).collect();
    for channel in channels {
        // A membership that was missing means Redis lost it (restarted
        // empty): publishes since then never reached this pod.
        if let Ok((_, true)) = bus.join_channel(&channel).await {
            bus.deliver_local_channel(&channel, &Arc::new(Delivery::resync(Some(channel.clone()))));
        }
    }

    let pending: std::result::Result<Vec<redis::Value>, _> = bus
        .call("xpending", async {
            redis::cmd("XPENDING")
                .arg(&bus.inbox)
                .arg(keys::INBOX_GROUP)
                .query_async(&mut conn)
                .await
        })
        .await;
    if let Ok(summary) = pending
        && let Some(redis::Value::Int(n)) = summary.first()
    {
        bus.bus_metrics.pending.set(*n);
    }
}
