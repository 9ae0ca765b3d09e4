//! Repair of the routing hop: a message accepted into its log reaches the
//! live connection within `--delivery-repair-ms` even when its inbox entry
//! never reaches the owning pod (traps 1 and 16: the log is the truth,
//! routing is a hint, and a failed hint is repaired by time, not by the
//! next message, which for the last message of a quiet session never comes).
//!
//! How each failure of the hop is repaired:
//! * **The sender's inbox XADD fails** (an error, a timeout, or nil because
//!   the inbox does not exist): the sender queues a *repair hint* naming the
//!   log for the target pod. Every period it writes the queued hints of each
//!   pod to that pod's hint set `wsf:repair:{<pod>}` (one pipelined SADD +
//!   PEXPIRE per pod with hints); hints it cannot write stay queued for the
//!   next period.
//! * **Every period each pod takes its hint set** (SPOP, pipelined with an
//!   XLEN of its inbox: one round trip, O(1) when there is nothing to do, so
//!   the upkeep does not grow with idle connections, trap 17) and catches
//!   each named log up from the log: a session's connection gets a resync
//!   notice and reads its log after its cursor; a channel is read once for
//!   the whole pod (`fanout.rs`).
//! * **The reader lost a reply** after Redis had marked entries delivered
//!   (timeout): they sit in the pending list; the reader re-reads its
//!   pending entries (id 0) after every error (`inbox.rs`).
//! * **An inbox entry vanished after it was written** (the inbox trimmed,
//!   an entry deleted: nothing failed that a hint could name): every route
//!   also names its log in the pod's routed set `wsf:routed:{<pod>}` (same
//!   slot and round trip as the XADD). Every period the pod takes that set
//!   and, one period later (so entries still on their way have arrived),
//!   compares each named log's head with what it handed to its local
//!   connections: a session's newest offered offset, a channel's fan-out
//!   cursor. A log behind is caught up from the log. The cost is one GET
//!   per log routed here in the period, never per idle connection (trap 17).
//! * **The inbox lost entries**: deleted or Redis restarted empty (NOGROUP,
//!   `inbox.rs`), or so far behind that it would be trimmed: past
//!   [`INBOX_BACKLOG`] unread entries the pod drops its backlog itself and
//!   catches every local connection up from the logs, before senders'
//!   `MAXLEN` backstop could drop entries unnoticed.
//!
//! The bound: a hint queued at `t` is written by `t + period` and taken by
//! the owner by `t + 2 * period`; a log routed at `t` is taken by
//! `t + period` and checked by `t + 2 * period`. So the period is half the
//! configured bound (plus the round trips and the log read).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio_util::sync::CancellationToken;

use super::{RedisBus, keys, parse_offset};
use crate::bus::Delivery;
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId};
use crate::telemetry::Metrics;

/// Unread inbox entries past which the pod drops its backlog and catches up
/// from the logs instead. Half the senders' `MAXLEN` backstop, so the pod
/// acts before any sender trims.
pub(super) const INBOX_BACKLOG: u64 = (super::INBOX_MAXLEN / 2) as u64;
/// Hints queued for one pod before they collapse into "catch up everything".
const MAX_HINTS_PER_POD: usize = 10_000;
/// Hints taken from the hint set per SPOP.
const TAKE_BATCH: usize = 1_000;
/// Head reads in flight at once during a head check.
const HEAD_READS_IN_FLIGHT: usize = 256;

/// What a pod must catch up, as stored in its hint set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Hint {
    /// A direct message to this session was not routed.
    Session(SessionId),
    /// A message of this channel was not routed.
    Channel(ChannelName),
    /// A control notice (takeover `x`, kick `k`) was not routed.
    Notice {
        kind: NoticeKind,
        inst: String,
        conn: String,
        session: SessionId,
    },
    /// Too much was lost to name it: catch every connection up.
    Everything,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum NoticeKind {
    TakenOver,
    Kicked,
}

impl NoticeKind {
    /// The one-letter tag inbox entries and hints carry: `x` taken over,
    /// `k` kicked (anything else is treated as kicked).
    pub fn from_tag(tag: &str) -> Self {
        if tag == "x" {
            NoticeKind::TakenOver
        } else {
            NoticeKind::Kicked
        }
    }

    pub fn tag(self) -> char {
        match self {
            NoticeKind::TakenOver => 'x',
            NoticeKind::Kicked => 'k',
        }
    }
}

impl Hint {
    pub fn encode(&self) -> String {
        match self {
            Hint::Session(s) => format!("s:{s}"),
            Hint::Channel(c) => format!("c:{c}"),
            Hint::Notice {
                kind,
                inst,
                conn,
                session,
            } => {
                let k = kind.tag();
                // The session last: it may contain ':'.
                format!("{k}:{inst}:{conn}:{session}")
            }
            Hint::Everything => "*".to_string(),
        }
    }

    pub fn decode(s: &str) -> Option<Hint> {
        if s == "*" {
            return Some(Hint::Everything);
        }
        let (kind, rest) = s.split_once(':')?;
        match kind {
            "s" => SessionId::parse(rest).ok().map(Hint::Session),
            "c" => ChannelName::parse(rest).ok().map(Hint::Channel),
            "x" | "k" => {
                let mut parts = rest.splitn(3, ':');
                let (inst, conn, session) = (parts.next()?, parts.next()?, parts.next()?);
                Some(Hint::Notice {
                    kind: NoticeKind::from_tag(kind),
                    inst: inst.to_string(),
                    conn: conn.to_string(),
                    session: SessionId::parse(session).ok()?,
                })
            }
            _ => None,
        }
    }
}

/// Hints this pod owes other pods, until they are written.
#[derive(Debug, Default)]
pub(super) struct HintQueue {
    pods: Mutex<HashMap<String, HashSet<Hint>>>,
}

impl HintQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<Hint>>> {
        // Every update is one insert or one take: nothing half done to poison.
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `hint` for `pod`; returns the number of hints now queued.
    pub fn push(&self, pod: &str, hint: Hint) -> usize {
        let mut pods = self.lock();
        let hints = pods.entry(pod.to_string()).or_default();
        if !hints.contains(&Hint::Everything) {
            if hints.len() >= MAX_HINTS_PER_POD {
                hints.clear();
                hints.insert(Hint::Everything);
            } else {
                hints.insert(hint);
            }
        }
        pods.values().map(HashSet::len).sum()
    }

    fn take(&self) -> HashMap<String, HashSet<Hint>> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back hints that could not be written.
    fn restore(&self, pod: String, hints: HashSet<Hint>) {
        for hint in hints {
            self.push(&pod, hint);
        }
    }

    fn len(&self) -> usize {
        self.lock().values().map(HashSet::len).sum()
    }
}

/// The repair path's metrics.
#[derive(Clone)]
pub(super) struct RepairMetrics {
    /// Inbox XADDs that failed, timed out or found no inbox, by kind.
    pub route_failures: IntCounterVec,
    /// Repairs, by reason: `route_failed` (a hint was taken), `pending`
    /// (entries re-read from the pending list), `hole` (a channel caught up
    /// from its log), `inbox_lost` (the inbox or its group was gone),
    /// `inbox_backlog` (the pod dropped a backlog and caught up).
    pub repairs: IntCounterVec,
    /// Hints queued, not yet written.
    pub hints_queued: IntGauge,
    /// Logs whose head the periodic head check compared with what this pod
    /// handed to its connections.
    pub heads_checked: prometheus::IntCounter,
}

impl RepairMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let this = Self {
            route_failures: IntCounterVec::new(
                Opts::new(
                    "wsfleet_route_failures_total",
                    "Inbox entries that could not be written (error, timeout or no inbox), by kind",
                ),
                &["kind"],
            )
            .expect("counter"),
            repairs: IntCounterVec::new(
                Opts::new(
                    "wsfleet_route_repairs_total",
                    "Deliveries repaired from the logs after the routing hop failed, by reason",
                ),
                &["reason"],
            )
            .expect("counter"),
            hints_queued: IntGauge::new(
                "wsfleet_route_repair_hints_queued",
                "Repair hints for other pods not yet written to Redis",
            )
            .expect("gauge"),
            heads_checked: prometheus::IntCounter::new(
                "wsfleet_route_heads_checked_total",
                "Logs routed to this pod whose head was compared with what its connections were handed",
            )
            .expect("counter"),
        };
        let r = metrics.registry();
        for c in [
            Box::new(this.route_failures.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(this.repairs.clone()),
            Box::new(this.hints_queued.clone()),
            Box::new(this.heads_checked.clone()),
        ] {
            if let Err(e) = r.register(c) {
                tracing::error!(error = %e, "registering a repair metric failed");
            }
        }
        // Zeros from the start, so dashboards show "no repairs", not "no data".
        for kind in ["session", "channel"] {
            this.route_failures.with_label_values(&[kind]);
        }
        for reason in [
            "route_failed",
            "pending",
            "hole",
            "inbox_lost",
            "inbox_backlog",
            "head_check",
        ] {
            this.repairs.with_label_values(&[reason]);
        }
        this
    }
}

/// Every half `--delivery-repair-ms`: write queued hints, take this pod's
/// hints and repair what they name, retry stalled channel catch-ups, watch
/// the inbox backlog, and check the heads of the logs routed here.
pub async fn run(bus: Arc<RedisBus>, shutdown: CancellationToken) {
    let period = (bus.opts.delivery_repair / 2).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Logs taken from the routed set last period: checked this period.
    let mut due: HashSet<Hint> = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        write_hints(&bus).await;
        take_hints(&bus).await;
        retry_stalled_channels(&bus);
        check_heads(&bus, std::mem::take(&mut due)).await;
        due = take_routed(&bus).await;
    }
}

/// Takes the set of logs routed to this pod since the last take.
async fn take_routed(bus: &RedisBus) -> HashSet<Hint> {
    let key = keys::routed(&bus.pod.name);
    let mut taken = HashSet::new();
    loop {
        let mut conn = bus.conn.clone();
        let mut spop = redis::cmd("SPOP");
        spop.arg(&key).arg(TAKE_BATCH);
        let members: Vec<String> = match bus.call("spop_routed", spop.query_async(&mut conn)).await
        {
            Ok(m) => m,
            // Left in the set: taken next period.
            Err(_) => return taken,
        };
        let full = members.len() >= TAKE_BATCH;
        taken.extend(members.iter().filter_map(|m| Hint::decode(m)));
        if !full {
            return taken;
        }
    }
}

/// What one head check found behind for one log.
enum Behind {
    Session(SessionId),
    Channel(ChannelName),
}

/// Compares the head of each routed log (that still has a connection
/// here) with what this pod handed to its connections, and catches up the
/// ones behind: their inbox entry was lost after it was written.
async fn check_heads(bus: &RedisBus, due: HashSet<Hint>) {
    let logs: Vec<Hint> = due
        .into_iter()
        .filter(|hint| match hint {
            Hint::Session(s) => bus.sessions.contains_key(s),
            Hint::Channel(c) => bus.channels.contains_key(c),
            _ => false,
        })
        .collect();
    if logs.is_empty() {
        return;
    }
    let mut behind = Vec::new();
    for chunk in logs.chunks(HEAD_READS_IN_FLIGHT) {
        let reads = chunk.iter().map(|hint| async move {
            let key = match hint {
                Hint::Session(s) => keys::SessionKeys::new(s).head,
                Hint::Channel(c) => keys::ChannelKeys::new(c).head,
                _ => return None,
            };
            let mut conn = bus.conn.clone();
            let head: Option<String> = bus
                .call(
                    "get_head",
                    redis::cmd("GET").arg(&key).query_async(&mut conn),
                )
                .await
                .ok()?;
            Some((hint, head.as_deref().and_then(parse_offset)?))
        });
        for (hint, head) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
        {
            if let Some(b) = is_behind(bus, hint, head) {
                behind.push(b);
            }
        }
    }
    bus.repair_metrics.heads_checked.inc_by(logs.len() as u64);
    if behind.is_empty() {
        return;
    }
    let (mut sessions, mut channels) = (0usize, 0usize);
    for b in behind {
        match b {
            Behind::Session(session) => {
                if let Some(owner) = bus.sessions.get(&session) {
                    owner.mailbox.offer(&Arc::new(Delivery::resync(None)));
                    sessions += 1;
                }
            }
            Behind::Channel(channel) => {
                bus.catch_up_channel(&channel, "head_check");
                channels += 1;
            }
        }
    }
    bus.repair_metrics
        .repairs
        .with_label_values(&["head_check"])
        .inc_by(sessions as u64);
    tracing::info!(
        sessions,
        channels,
        "logs routed here are ahead of what their connections got: catching up from the logs"
    );
}

/// Whether the log named by `hint` has entries past what this pod handed
/// over; a session's offered offset moves to the head, so one loss costs
/// one catch-up.
fn is_behind(bus: &RedisBus, hint: &Hint, head: Offset) -> Option<Behind> {
    match hint {
        Hint::Session(s) => {
            let mut owner = bus.sessions.get_mut(s)?;
            if owner.offered.is_some_and(|o| o >= head) {
                return None;
            }
            owner.offered = Some(head);
            Some(Behind::Session(s.clone()))
        }
        Hint::Channel(c) => bus
            .channels
            .get(c)?
            .behind(head)
            .then(|| Behind::Channel(c.clone())),
        _ => None,
    }
}

async fn write_hints(bus: &RedisBus) {
    let queued = bus.hints.take();
    for (pod, hints) in queued {
        let key = keys::repair(&pod);
        let mut pipe = redis::pipe();
        let sadd = pipe.cmd("SADD").arg(&key);
        for hint in &hints {
            sadd.arg(hint.encode());
        }
        // A dead pod never takes its hints: they go with its lease.
        pipe.cmd("PEXPIRE").arg(&key).arg(bus.lease_ms() * 2);
        let mut conn = bus.conn.clone();
        match bus
            .call::<(i64, i64)>("sadd_repair", pipe.query_async(&mut conn))
            .await
        {
            Ok(_) => tracing::debug!(pod, hints = hints.len(), "repair hints written"),
            Err(e) => {
                tracing::warn!(pod, hints = hints.len(), error = %e, "cannot write repair hints; retrying next period");
                bus.hints.restore(pod, hints);
            }
        }
    }
    bus.repair_metrics.hints_queued.set(bus.hints.len() as i64);
}

async fn take_hints(bus: &RedisBus) {
    let key = keys::repair(&bus.pod.name);
    let mut first = true;
    loop {
        let mut pipe = redis::pipe();
        pipe.cmd("SPOP").arg(&key).arg(TAKE_BATCH);
        if first {
            pipe.cmd("XLEN").arg(&bus.inbox);
        }
        let mut conn = bus.conn.clone();
        let reply: Vec<redis::Value> =
            match bus.call("spop_repair", pipe.query_async(&mut conn)).await {
                Ok(r) => r,
                Err(_) => return, // Redis is away: try next period
            };
        let members: Vec<String> = reply
            .first()
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or_default();
        if first
            && let Some(redis::Value::Int(backlog)) = reply.get(1)
            && *backlog as u64 > INBOX_BACKLOG
        {
            drop_backlog(bus, *backlog as u64).await;
        }
        first = false;
        let full = members.len() >= TAKE_BATCH;
        apply_hints(bus, &members);
        if !full {
            return;
        }
    }
}

/// Repairs what each hint names.
fn apply_hints(bus: &RedisBus, members: &[String]) {
    if members.is_empty() {
        return;
    }
    let (mut sessions, mut channels, mut notices) = (0usize, 0usize, 0usize);
    for member in members {
        match Hint::decode(member) {
            Some(Hint::Session(session)) => {
                if let Some(owner) = bus.sessions.get(&session) {
                    owner.mailbox.offer(&Arc::new(Delivery::resync(None)));
                    sessions += 1;
                }
            }
            Some(Hint::Channel(channel)) => {
                bus.catch_up_channel(&channel, "route_failed");
                channels += 1;
            }
            Some(Hint::Notice {
                kind,
                inst,
                conn,
                session,
            }) => {
                let reason = match kind {
                    NoticeKind::TakenOver => CloseReason::TakenOver,
                    NoticeKind::Kicked => CloseReason::Kicked,
                };
                bus.close_local(&session, &inst, &conn, reason);
                notices += 1;
            }
            Some(Hint::Everything) => {
                super::inbox::resync_everyone(bus);
                sessions += bus.sessions.len();
            }
            None => tracing::warn!(hint = member.as_str(), "unknown repair hint; skipped"),
        }
    }
    // Channel catch-ups count themselves when they finish.
    bus.repair_metrics
        .repairs
        .with_label_values(&["route_failed"])
        .inc_by((sessions + notices) as u64);
    tracing::info!(
        hints = members.len(),
        sessions,
        channels,
        notices,
        "repairing deliveries whose routing failed: catching up from the logs"
    );
}

/// The inbox holds more unread entries than the pod will ever catch up
/// with entry by entry: drop them and read the logs instead.
async fn drop_backlog(bus: &RedisBus, backlog: u64) {
    let mut conn = bus.conn.clone();
    let mut trim = redis::cmd("XTRIM");
    trim.arg(&bus.inbox).arg("MAXLEN").arg(0);
    if let Err(e) = bus
        .call::<i64>("xtrim_inbox", trim.query_async(&mut conn))
        .await
    {
        tracing::warn!(error = %e, backlog, "cannot drop the inbox backlog");
        return;
    }
    // After the trim: every log read below sees what the dropped entries carried.
    super::inbox::resync_everyone(bus);
    bus.repair_metrics
        .repairs
        .with_label_values(&["inbox_backlog"])
        .inc();
    tracing::warn!(
        backlog,
        "inbox backlog too long; dropped it and caught every connection up from the logs"
    );
}

fn retry_stalled_channels(bus: &RedisBus) {
    let stalled: Vec<ChannelName> = bus
        .channels
        .iter()
        .filter(|e| e.stalled())
        .map(|e| e.key().clone())
        .collect();
    for channel in stalled {
        bus.catch_up_channel(&channel, "hole");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip() {
        let table = [
            Hint::Session(SessionId::parse("user:42").unwrap()),
            Hint::Channel(ChannelName::parse("chat.room-1").unwrap()),
            Hint::Notice {
                kind: NoticeKind::TakenOver,
                inst: "00ff".into(),
                conn: "17".into(),
                session: SessionId::parse("a:b:c").unwrap(),
            },
            Hint::Notice {
                kind: NoticeKind::Kicked,
                inst: "1".into(),
                conn: "2".into(),
                session: SessionId::parse("s").unwrap(),
            },
            Hint::Everything,
        ];
        for hint in table {
            assert_eq!(Hint::decode(&hint.encode()), Some(hint.clone()), "{hint:?}");
        }
        for junk in ["", "s:", "q:x", "x:1:2", "s:{bad}"] {
            assert_eq!(Hint::decode(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_full_queue_collapses_into_everything() {
        let queue = HintQueue::default();
        for i in 0..MAX_HINTS_PER_POD {
            let s = SessionId::parse(&format!("s{i}")).unwrap();
            queue.push("pod-b", Hint::Session(s));
        }
        assert_eq!(queue.len(), MAX_HINTS_PER_POD);
        queue.push("pod-b", Hint::Channel(ChannelName::parse("c").unwrap()));
        assert_eq!(queue.len(), 1);
        let taken = queue.take();
        assert_eq!(
            taken["pod-b"].iter().collect::<Vec<_>>(),
            vec![&Hint::Everything]
        );
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn hints_that_could_not_be_written_are_kept() {
        let queue = HintQueue::default();
        let s = Hint::Session(SessionId::parse("s").unwrap());
        queue.push("pod-b", s.clone());
        let mut taken = queue.take();
        queue.push("pod-b", Hint::Channel(ChannelName::parse("c").unwrap()));
        queue.restore("pod-b".into(), taken.remove("pod-b").unwrap());
        assert_eq!(queue.len(), 2);
    }
}
