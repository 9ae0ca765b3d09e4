//! Embedded mode: the whole fleet's routing inside one process.
//!
//! Each session and each channel is one entry of a sharded map. Appending a
//! message and handing it to the owner (or the subscribers) happen under that
//! entry's lock, so live deliveries leave in offset order and a claim can
//! never slip between the two. Handing over is `try_send`, so the lock is
//! never held across a wait.
//!
//! Memory is bounded by configuration: every entry knows the estimated heap
//! bytes it holds (messages, idempotency keys, its map slot) and has added
//! them to one global [`Budget`]; a new message that would take the budget
//! past `--max-retained-bytes` is refused with [`BusError::Full`], and each
//! log is trimmed oldest first beyond `--max-log-bytes`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::log::entry_cost;
use super::{
    Bus, BusError, Claim, ConnId, Delivery, Holder, Log, Mailbox, Offer, Outgoing, Replay, Result,
    Retention, SessionInfo, now_ms,
};
use crate::pod::{LocalPod, PodStatus};
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId, frame};
use crate::telemetry::{Metrics, otel};

/// The longest idempotency key accepted (HTTP 400 beyond).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Byte limits of embedded mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// All retained messages, idempotency keys and session/channel entries
    /// together (`--max-retained-bytes`); new messages are refused beyond.
    pub max_retained_bytes: usize,
    /// One session's or channel's log (`--max-log-bytes`); its oldest
    /// messages are trimmed beyond, like retention by count.
    pub max_log_bytes: usize,
}

impl MemoryLimits {
    /// No limit: for tests of other behaviour.
    pub const UNLIMITED: MemoryLimits = MemoryLimits {
        max_retained_bytes: usize::MAX,
        max_log_bytes: usize::MAX,
    };
}

pub struct MemoryBus {
    pod: Arc<LocalPod>,
    /// Random per bus: with the connection id it names a claim's holder, an
    /// identity that never repeats even when a session's entry (and with it
    /// its epoch counter) is removed and recreated (trap 15).
    instance: u64,
    /// The bus's clock in ms: wall time that never goes backwards. Offsets
    /// and retention ages both read it, so an entry is removed only after
    /// the clock passed its newest offset, and a recreated log's first
    /// offset is greater than any the session had before (trap 6).
    clock_ms: AtomicU64,
    /// Where wall time comes from; tests turn it by hand.
    wall: WallClock,
    retention: Retention,
    max_log_bytes: usize,
    budget: Budget,
    sessions: DashMap<SessionId, SessionState>,
    channels: DashMap<ChannelName, ChannelState>,
    metrics: Arc<Metrics>,
}

/// Estimated heap bytes of one map entry beside its messages and keys: the
/// slot (twice its size, as a hash table grows by doubling and keeps empty
/// slots), the name's allocation and allocator headers.
const fn entry_overhead<K, V>() -> usize {
    2 * std::mem::size_of::<(K, V)>() + 64
}

/// Estimated heap bytes of one remembered idempotency key beside its text.
const KEY_OVERHEAD: usize = 2 * std::mem::size_of::<(Box<str>, (Offset, u64))>() + 32;

#[derive(Default)]
struct SessionState {
    log: Log,
    owner: Option<Owner>,
    /// Bumped by every claim.
    epoch: u64,
    idempotency: IdempotencyKeys,
    /// What this entry has added to the budget.
    accounted: usize,
}

impl SessionState {
    fn footprint(&self, name: &SessionId) -> usize {
        entry_overhead::<SessionId, SessionState>()
            + name.len()
            + self.log.bytes()
            + self.idempotency.bytes
    }
}

struct Owner {
    /// Release matches this, never the epoch alone.
    holder: Holder,
    mailbox: Mailbox,
    connected_at: OffsetDateTime,
}

#[derive(Default)]
struct ChannelState {
    log: Log,
    subscribers: Vec<Mailbox>,
    idempotency: IdempotencyKeys,
    /// What this entry has added to the budget.
    accounted: usize,
}

impl ChannelState {
    fn footprint(&self, name: &ChannelName) -> usize {
        entry_overhead::<ChannelName, ChannelState>()
            + name.len()
            + self.log.bytes()
            + self.idempotency.bytes
            + self.subscribers.capacity() * std::mem::size_of::<Mailbox>()
    }
}

/// Offsets already given to idempotency keys, forgotten with retention.
#[derive(Default)]
struct IdempotencyKeys {
    /// key -> (offset, expires at ms)
    keys: HashMap<Box<str>, (Offset, u64)>,
    /// Estimated heap bytes of `keys`.
    bytes: usize,
}

fn key_cost(key: &str) -> usize {
    key.len() + KEY_OVERHEAD
}

impl IdempotencyKeys {
    fn get(&self, key: &str, now_ms: u64) -> Option<Offset> {
        self.keys
            .get(key)
            .filter(|(_, expires)| *expires > now_ms)
            .map(|(o, _)| *o)
    }

    /// Remembers `key`; keeps at most `cap` keys so one client cannot grow
    /// the map without bound.
    fn insert(&mut self, key: &str, offset: Offset, expires_ms: u64, now_ms: u64, cap: usize) {
        if self.keys.len() >= cap {
            self.expire(now_ms);
        }
        if self.keys.len() >= cap {
            let oldest = self
                .keys
                .iter()
                .min_by_key(|(_, (o, _))| *o)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.keys.remove(&oldest);
                self.bytes -= key_cost(&oldest);
            }
        }
        if self.keys.insert(key.into(), (offset, expires_ms)).is_none() {
            self.bytes += key_cost(key);
        }
    }

    fn expire(&mut self, now_ms: u64) {
        let mut freed = 0;
        self.keys.retain(|k, (_, expires)| {
            let keep = *expires > now_ms;
            if !keep {
                freed += key_cost(k);
            }
            keep
        });
        self.bytes -= freed;
        if self.keys.is_empty() {
            // An empty map keeps its table otherwise.
            self.keys = HashMap::new();
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The global budget of retained bytes, shared by every entry.
///
/// A new message reserves its cost first and is refused if that would pass
/// the limit; every other change (trims, expiry, claims, removals) settles
/// the entry's actual footprint afterwards, so the count is exact to the
/// estimate and returns to zero when everything has expired.
struct Budget {
    limit: usize,
    held: AtomicUsize,
    /// Set while refusing, so the warning is logged once per episode.
    full: AtomicBool,
}

impl Budget {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            held: AtomicUsize::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Takes `bytes` from the budget for a new message, or refuses.
    fn reserve(&self, bytes: usize, metrics: &Metrics) -> Result<()> {
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) <= self.limit {
            return Ok(());
        }
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        metrics
            .bus_refusals
            .with_label_values(&["max_retained_bytes"])
            .inc();
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                limit = self.limit,
                held = before,
                "embedded bus full: refusing new messages until retention frees memory (--max-retained-bytes)"
            );
        }
        Err(BusError::Full(format!(
            "retained messages reached --max-retained-bytes ({} bytes); retry later or raise the limit",
            self.limit
        )))
    }

    /// Brings an entry's share to `footprint`, `reserved` of which was
    /// already taken by [`Budget::reserve`].
    fn settle(&self, accounted: &mut usize, footprint: usize, reserved: usize) {
        let taken = *accounted + reserved;
        if footprint > taken {
            self.held.fetch_add(footprint - taken, Ordering::Relaxed);
        } else if taken > footprint {
            self.give_back(taken - footprint);
        }
        *accounted = footprint;
    }

    /// Returns bytes of a trimmed or removed entry.
    fn give_back(&self, bytes: usize) {
        let before = self.held.fetch_sub(bytes, Ordering::Relaxed);
        if before.saturating_sub(bytes) < self.limit {
            self.full.store(false, Ordering::Relaxed);
        }
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The source of wall-clock time.
#[derive(Debug, Clone)]
pub enum WallClock {
    System,
    /// Milliseconds set by a test.
    Manual(Arc<AtomicU64>),
}

impl WallClock {
    fn now_ms(&self) -> u64 {
        match self {
            WallClock::System => now_ms(),
            WallClock::Manual(ms) => ms.load(Ordering::Relaxed),
        }
    }
}

impl MemoryBus {
    pub fn new(
        pod: Arc<LocalPod>,
        retention: Retention,
        limits: MemoryLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::with_clock(pod, retention, limits, metrics, WallClock::System)
    }

    pub fn with_clock(
        pod: Arc<LocalPod>,
        retention: Retention,
        limits: MemoryLimits,
        metrics: Arc<Metrics>,
        wall: WallClock,
    ) -> Self {
        Self {
            pod,
            instance: rand::random(),
            clock_ms: AtomicU64::new(0),
            wall,
            retention,
            max_log_bytes: limits.max_log_bytes,
            budget: Budget::new(limits.max_retained_bytes),
            sessions: DashMap::new(),
            channels: DashMap::new(),
            metrics,
        }
    }

    /// Trims logs by age and forgets sessions and channels with nothing left
    /// in them, once a second until `shutdown`. Without it an embedded fleet
    /// would keep every session it ever saw.
    pub fn spawn_sweeper(self: &Arc<Self>, shutdown: CancellationToken) {
        let bus = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(bus) = bus.upgrade() else { return };
                bus.sweep(bus.now_ms());
            }
        });
    }

    /// The bus's clock: never behind any time it has returned or swept at.
    fn now_ms(&self) -> u64 {
        let wall = self.wall.now_ms();
        self.clock_ms.fetch_max(wall, Ordering::Relaxed).max(wall)
    }

    /// One pass of the sweeper at `now_ms`, which also advances the bus's
    /// clock (a sweep is a reading of the clock); public for tests.
    pub fn sweep(&self, now_ms: u64) {
        let now_ms = self
            .clock_ms
            .fetch_max(now_ms, Ordering::Relaxed)
            .max(now_ms);
        let retention = self.retention;
        let max_log_bytes = self.max_log_bytes;
        let budget = &self.budget;
        let mut trimmed = 0;
        self.sessions.retain(|name, s| {
            trimmed += s.log.trim(retention, max_log_bytes, now_ms);
            s.idempotency.expire(now_ms);
            let keep = s.owner.is_some() || !s.log.is_empty() || !s.idempotency.is_empty();
            if keep {
                let footprint = s.footprint(name);
                budget.settle(&mut s.accounted, footprint, 0);
            } else {
                budget.give_back(s.accounted);
            }
            keep
        });
        self.channels.retain(|name, c| {
            trimmed += c.log.trim(retention, max_log_bytes, now_ms);
            c.idempotency.expire(now_ms);
            c.subscribers.retain(|m| !m.is_closed());
            let keep = !c.subscribers.is_empty() || !c.log.is_empty() || !c.idempotency.is_empty();
            if keep {
                let footprint = c.footprint(name);
                budget.settle(&mut c.accounted, footprint, 0);
            } else {
                budget.give_back(c.accounted);
            }
            keep
        });
        // A table keeps its size after its entries go: give the memory of
        // a burst of sessions back once most of them have expired.
        if self.sessions.capacity() > 4 * self.sessions.len() + 1024 {
            self.sessions.shrink_to_fit();
        }
        if self.channels.capacity() > 4 * self.channels.len() + 1024 {
            self.channels.shrink_to_fit();
        }
        self.metrics.retention_trims.inc_by(trimmed as u64);
        self.record_held();
    }

    /// How many sessions and channels are held in memory (for tests of the sweeper).
    pub fn sizes(&self) -> (usize, usize) {
        (self.sessions.len(), self.channels.len())
    }

    /// Estimated heap bytes retained now (the `wsfleet_retained_bytes` gauge).
    pub fn retained_bytes(&self) -> usize {
        self.budget.held()
    }

    fn record_held(&self) {
        self.metrics
            .retained_bytes
            .set(i64::try_from(self.budget.held()).unwrap_or(i64::MAX));
    }

    fn idempotency_cap(&self) -> usize {
        self.retention.max_messages.max(16)
    }

    fn record_offer(&self, offer: Offer) {
        if offer == Offer::Overflow {
            self.metrics.queue_overflows.inc();
        }
    }

    /// What a new message will add: its entry, its key, and the map entry
    /// if this is the log's first.
    fn message_cost(frame_len: usize, key: Option<&str>, new_entry: usize) -> usize {
        entry_cost(frame_len) + key.map_or(0, key_cost) + new_entry
    }
}

/// A frame's length before it is rendered: the envelope around `data` is
/// bounded by the names and the offset, so this over-estimates by a little.
fn frame_len_estimate(data_len: usize, name_len: usize, from_len: usize) -> usize {
    // {"type":"message","channel":"<name>","offset":"<20>-<20>","from":"<from>","data":}
    96 + name_len + from_len + data_len
}

#[async_trait]
impl Bus for MemoryBus {
    async fn claim(&self, session: &SessionId, mailbox: &Mailbox) -> Result<Claim> {
        let holder = Holder {
            instance: self.instance,
            conn: mailbox.id,
        };
        let mut state = self.sessions.entry(session.clone()).or_default();
        state.epoch += 1;
        let epoch = state.epoch;
        let previous = state.owner.replace(Owner {
            holder,
            mailbox: mailbox.clone(),
            connected_at: OffsetDateTime::now_utc(),
        });
        if let Some(previous) = previous {
            previous.mailbox.close(CloseReason::TakenOver);
        }
        // A connected session is counted but never refused: connections
        // are bounded by --max-connections.
        let footprint = state.footprint(session);
        self.budget.settle(&mut state.accounted, footprint, 0);
        drop(state);
        self.record_held();
        Ok(Claim { epoch, holder })
    }

    async fn release(&self, session: &SessionId, claim: Claim) {
        if let Some(mut state) = self.sessions.get_mut(session)
            && state
                .owner
                .as_ref()
                .is_some_and(|o| o.holder == claim.holder)
        {
            state.owner = None;
        }
        let removed = self.sessions.remove_if(session, |_, s| {
            s.owner.is_none() && s.log.is_empty() && s.idempotency.is_empty()
        });
        if let Some((_, state)) = removed {
            self.budget.give_back(state.accounted);
            self.record_held();
        }
    }

    async fn send_to_session(&self, session: &SessionId, msg: Outgoing<'_>) -> Result<Offset> {
        // Embedded: append and route are one step, one span; the socket
        // write of the owner joins it through the delivery's trace.
        let span = tracing::info_span!(target: otel::TARGET, "append", session = %session, log = "session");
        let _entered = span.enter();
        let mut state = self.sessions.entry(session.clone()).or_default();
        // Read under the entry's lock, so that appends to one log see the
        // clock in order and an entry's offsets all trail the clock.
        let now = self.now_ms();
        if let Some(offset) = msg
            .idempotency_key
            .and_then(|k| state.idempotency.get(k, now))
        {
            return Ok(offset);
        }
        let from = msg.from.map(|s| s.as_str());
        let new_entry = if state.accounted == 0 {
            entry_overhead::<SessionId, SessionState>() + session.len()
        } else {
            0
        };
        let estimate = frame_len_estimate(msg.data.get().len(), 0, from.map_or(0, str::len));
        let reserved = Self::message_cost(estimate, msg.idempotency_key, new_entry);
        if let Err(full) = self.budget.reserve(reserved, &self.metrics) {
            let empty = state.accounted == 0;
            drop(state);
            if empty {
                // Do not leave an empty entry behind for a refused message.
                self.sessions.remove_if(session, |_, s| {
                    s.accounted == 0 && s.owner.is_none() && s.log.is_empty()
                });
            }
            tracing::debug!(%session, "message refused: --max-retained-bytes reached");
            return Err(full);
        }
        let delivery = state.log.append(
            now,
            None,
            otel::traceparent(&span).map(Into::into),
            |offset| frame::session_message(offset, from, msg.data),
        );
        let trimmed = state.log.trim(self.retention, self.max_log_bytes, now);
        if let Some(key) = msg.idempotency_key {
            let expires = now + self.retention.max_age_ms;
            let cap = self.idempotency_cap();
            state
                .idempotency
                .insert(key, delivery.offset, expires, now, cap);
        }
        let footprint = state.footprint(session);
        self.budget
            .settle(&mut state.accounted, footprint, reserved);
        if let Some(owner) = &state.owner {
            self.record_offer(owner.mailbox.offer(&delivery));
        }
        drop(state);
        self.record_held();
        self.metrics.retention_trims.inc_by(trimmed as u64);
        self.metrics
            .messages_accepted
            .with_label_values(&["session"])
            .inc();
        Ok(delivery.offset)
    }

    async fn publish(&self, channel: &ChannelName, msg: Outgoing<'_>) -> Result<Offset> {
        let span = tracing::info_span!(target: otel::TARGET, "append", channel = %channel, log = "channel", subscribers = tracing::field::Empty);
        let _entered = span.enter();
        let mut state = self.channels.entry(channel.clone()).or_default();
        // Read under the entry's lock, so that appends to one log see the
        // clock in order and an entry's offsets all trail the clock.
        let now = self.now_ms();
        if let Some(offset) = msg
            .idempotency_key
            .and_then(|k| state.idempotency.get(k, now))
        {
            return Ok(offset);
        }
        let new_entry = if state.accounted == 0 {
            entry_overhead::<ChannelName, ChannelState>() + channel.len()
        } else {
            0
        };
        let estimate = frame_len_estimate(msg.data.get().len(), channel.len(), 0);
        let reserved = Self::message_cost(estimate, msg.idempotency_key, new_entry);
        if let Err(full) = self.budget.reserve(reserved, &self.metrics) {
            let empty = state.accounted == 0;
            drop(state);
            if empty {
                self.channels.remove_if(channel, |_, c| {
                    c.accounted == 0 && c.subscribers.is_empty() && c.log.is_empty()
                });
            }
            tracing::debug!(%channel, "publish refused: --max-retained-bytes reached");
            return Err(full);
        }
        let delivery: Arc<Delivery> = state.log.append(now, Some(channel), None, |offset| {
            frame::channel_message(channel, offset, msg.data)
        });
        let trimmed = state.log.trim(self.retention, self.max_log_bytes, now);
        if let Some(key) = msg.idempotency_key {
            let expires = now + self.retention.max_age_ms;
            let cap = self.idempotency_cap();
            state
                .idempotency
                .insert(key, delivery.offset, expires, now, cap);
        }
        let mut offers = Vec::new();
        span.record("subscribers", state.subscribers.len());
        state.subscribers.retain(|m| {
            let offer = m.offer(&delivery);
            offers.push(offer);
            offer != Offer::Closed
        });
        let footprint = state.footprint(channel);
        self.budget
            .settle(&mut state.accounted, footprint, reserved);
        drop(state);
        self.record_held();
        for offer in offers {
            self.record_offer(offer);
        }
        self.metrics.retention_trims.inc_by(trimmed as u64);
        self.metrics
            .messages_accepted
            .with_label_values(&["channel"])
            .inc();
        Ok(delivery.offset)
    }

    async fn session_log(&self, session: &SessionId, after: Option<Offset>) -> Result<Replay> {
        Ok(self
            .sessions
            .get(session)
            .map(|s| s.log.after(after))
            .unwrap_or_default())
    }

    async fn channel_log(&self, channel: &ChannelName, after: Option<Offset>) -> Result<Replay> {
        Ok(self
            .channels
            .get(channel)
            .map(|c| c.log.after(after))
            .unwrap_or_default())
    }

    async fn subscribe(&self, channel: &ChannelName, mailbox: &Mailbox) -> Result<Option<Offset>> {
        let mut state = self.channels.entry(channel.clone()).or_default();
        if !state.subscribers.iter().any(|m| m.id == mailbox.id) {
            state.subscribers.push(mailbox.clone());
        }
        let footprint = state.footprint(channel);
        self.budget.settle(&mut state.accounted, footprint, 0);
        let head = state.log.head();
        drop(state);
        self.record_held();
        Ok(head)
    }

    async fn unsubscribe(&self, channel: &ChannelName, conn: ConnId) {
        if let Some(mut state) = self.channels.get_mut(channel) {
            state.subscribers.retain(|m| m.id != conn);
        }
        let removed = self.channels.remove_if(channel, |_, c| {
            c.subscribers.is_empty() && c.log.is_empty() && c.idempotency.is_empty()
        });
        if let Some((_, state)) = removed {
            self.budget.give_back(state.accounted);
            self.record_held();
        }
    }

    async fn session_info(&self, session: &SessionId) -> Result<Option<SessionInfo>> {
        Ok(self.sessions.get(session).and_then(|s| {
            s.owner.as_ref().map(|o| SessionInfo {
                session: session.clone(),
                pod: self.pod.name.clone(),
                connected_at: o.connected_at,
            })
        }))
    }

    async fn disconnect(&self, session: &SessionId) -> Result<bool> {
        let owner = self
            .sessions
            .get(session)
            .and_then(|s| s.owner.as_ref().map(|o| o.mailbox.clone()));
        Ok(match owner {
            Some(mailbox) => {
                mailbox.close(CloseReason::Kicked);
                true
            }
            None => false,
        })
    }

    async fn fleet(&self) -> Result<Vec<PodStatus>> {
        Ok(vec![self.pod.status()])
    }

    async fn append_upstream(&self, _event_json: &str) -> Result<bool> {
        Ok(false)
    }

    async fn check(&self) -> Result<()> {
        Ok(())
    }

    fn close_local_connections(&self, reason: CloseReason) -> usize {
        // Embedded mode: every owner is on this pod.
        let mut asked = 0;
        for state in self.sessions.iter() {
            if let Some(owner) = &state.owner {
                owner.mailbox.close(reason);
                asked += 1;
            }
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
            .filter_map(|s| s.owner.as_ref().map(|o| (o.holder.conn, o.mailbox.clone())))
            .collect();
        crate::bus::shed_oldest(local, count, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::mailbox;
    use serde_json::value::RawValue;

    fn bus(max_messages: usize) -> MemoryBus {
        let pod = Arc::new(LocalPod::new("pod-test".into(), 10));
        let retention = Retention {
            max_messages,
            max_age_ms: 60_000,
        };
        MemoryBus::new(
            pod,
            retention,
            MemoryLimits::UNLIMITED,
            Arc::new(Metrics::new()),
        )
    }

    fn data(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_string()).unwrap()
    }

    fn msg<'a>(data: &'a RawValue, key: Option<&'a str>) -> Outgoing<'a> {
        Outgoing {
            data,
            from: None,
            idempotency_key: key,
        }
    }

    #[tokio::test]
    async fn a_newer_claim_closes_the_older_connection_and_fences_its_release() {
        let bus = bus(10);
        let s = SessionId::parse("s").unwrap();
        let (old, old_inbox) = mailbox(1, 4);
        let (new, new_inbox) = mailbox(2, 4);
        let first = bus.claim(&s, &old).await.unwrap();
        let second = bus.claim(&s, &new).await.unwrap();
        assert!(second.epoch > first.epoch);
        assert_eq!(old_inbox.close_reason(), Some(CloseReason::TakenOver));
        assert_eq!(new_inbox.close_reason(), None);
        // The old connection's late release must not free the new owner.
        bus.release(&s, first).await;
        assert!(bus.session_info(&s).await.unwrap().is_some());
        bus.release(&s, second).await;
        assert!(bus.session_info(&s).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_late_release_never_frees_the_owner_of_a_recreated_entry() {
        let bus = bus(10);
        let s = SessionId::parse("s").unwrap();
        let (a, _a_inbox) = mailbox(1, 4);
        let (b, _b_inbox) = mailbox(2, 4);
        let (c, _c_inbox) = mailbox(3, 4);
        let stale = bus.claim(&s, &a).await.unwrap();
        let taken_over = bus.claim(&s, &b).await.unwrap();
        bus.release(&s, taken_over).await;
        assert_eq!(bus.sizes(), (0, 0), "an idle session's entry is removed");
        let live = bus.claim(&s, &c).await.unwrap();
        assert_eq!(
            live.epoch, stale.epoch,
            "the recreated entry restarts its epoch"
        );
        bus.release(&s, stale).await;
        assert!(
            bus.session_info(&s).await.unwrap().is_some(),
            "the old connection's late release removed the newer owner"
        );
        bus.release(&s, live).await;
        assert!(bus.session_info(&s).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_recreated_log_gives_offsets_above_every_earlier_one() {
        let wall = Arc::new(AtomicU64::new(1_000_000));
        let pod = Arc::new(LocalPod::new("pod-test".into(), 10));
        let retention = Retention {
            max_messages: 10,
            max_age_ms: 60_000,
        };
        let bus = MemoryBus::with_clock(
            pod,
            retention,
            MemoryLimits::UNLIMITED,
            Arc::new(Metrics::new()),
            WallClock::Manual(wall.clone()),
        );
        let s = SessionId::parse("s").unwrap();
        let d = data("1");
        let first = bus.send_to_session(&s, msg(&d, None)).await.unwrap();
        let last = bus.send_to_session(&s, msg(&d, None)).await.unwrap();
        // The clock runs past retention, the entry goes, then the clock
        // steps back (NTP) before the next message.
        bus.sweep(1_000_000 + 120_000);
        assert_eq!(bus.sizes(), (0, 0));
        wall.store(1_000_000, Ordering::Relaxed);
        let next = bus.send_to_session(&s, msg(&d, None)).await.unwrap();
        assert!(next > last && last > first, "{first} {last} then {next}");
        // A client resuming with `last` gets it instead of deduping it away.
        let replay = bus.session_log(&s, Some(last)).await.unwrap();
        assert_eq!(replay.entries.len(), 1);
        assert_eq!(replay.entries[0].offset, next);
    }

    fn limited_bus(limits: MemoryLimits) -> MemoryBus {
        let pod = Arc::new(LocalPod::new("pod-test".into(), 10));
        let retention = Retention {
            max_messages: 1000,
            max_age_ms: 60_000,
        };
        MemoryBus::new(pod, retention, limits, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn the_budget_refuses_new_messages_and_is_returned_on_expiry() {
        let limit = 64 * 1024;
        let bus = limited_bus(MemoryLimits {
            max_retained_bytes: limit,
            max_log_bytes: usize::MAX,
        });
        let connected = SessionId::parse("connected").unwrap();
        let (mb, _inbox) = mailbox(1, 4);
        let claim = bus.claim(&connected, &mb).await.unwrap();
        let d = data(r#""hello""#);
        let mut accepted = 0;
        let refusal = loop {
            let s = SessionId::parse(&format!("offline-{accepted}")).unwrap();
            let key = format!("key-{accepted}");
            match bus.send_to_session(&s, msg(&d, Some(&key))).await {
                Ok(_) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted < 10_000, "the budget never refused");
        };
        assert!(matches!(refusal, BusError::Full(_)), "{refusal:?}");
        assert!(
            refusal.to_string().contains("--max-retained-bytes"),
            "{refusal}"
        );
        assert!(bus.retained_bytes() <= limit);
        // Empty-ish sessions cost what they hold: at least their entry and key.
        let per_session = limit / accepted;
        assert!(
            per_session >= 300,
            "{per_session} bytes per session is too little"
        );
        assert_eq!(
            bus.sizes().0,
            accepted + 1,
            "a refused message leaves no entry"
        );
        assert_eq!(
            bus.metrics
                .bus_refusals
                .with_label_values(&["max_retained_bytes"])
                .get(),
            1
        );
        // The connected session keeps its claim and can be taken over.
        let (mb2, _inbox2) = mailbox(2, 4);
        let claim2 = bus.claim(&connected, &mb2).await.unwrap();
        bus.release(&connected, claim).await;
        assert!(bus.session_info(&connected).await.unwrap().is_some());
        // Expiry gives everything back, and messages are accepted again.
        bus.sweep(now_ms() + 120_000);
        bus.release(&connected, claim2).await;
        assert_eq!(bus.retained_bytes(), 0);
        assert_eq!(bus.metrics.retained_bytes.get(), 0);
        let s = SessionId::parse("after").unwrap();
        bus.send_to_session(&s, msg(&d, None)).await.unwrap();
        let c = ChannelName::parse("c").unwrap();
        bus.publish(&c, msg(&d, None)).await.unwrap();
        assert!(bus.retained_bytes() > 0);
    }

    #[tokio::test]
    async fn a_log_beyond_its_byte_cap_trims_its_oldest_messages() {
        let bus = limited_bus(MemoryLimits {
            max_retained_bytes: usize::MAX,
            max_log_bytes: 4 * 1024,
        });
        let s = SessionId::parse("s").unwrap();
        let big = data(&format!(r#""{}""#, "x".repeat(1000)));
        let mut sent = Vec::new();
        for _ in 0..20 {
            sent.push(bus.send_to_session(&s, msg(&big, None)).await.unwrap());
        }
        let replay = bus.session_log(&s, Some(sent[0])).await.unwrap();
        assert!(replay.gap, "trimmed messages are reported as a gap");
        let kept: Vec<_> = replay.entries.iter().map(|d| d.offset).collect();
        assert!((2..=4).contains(&kept.len()), "kept {}", kept.len());
        assert_eq!(kept, sent[sent.len() - kept.len()..], "the newest are kept");
        assert!(bus.retained_bytes() < 4 * 1024 + 2048);
    }

    #[tokio::test]
    async fn messages_reach_the_owner_in_order_and_stay_in_the_log() {
        let bus = bus(10);
        let s = SessionId::parse("s").unwrap();
        let (mb, mut inbox) = mailbox(1, 16);
        bus.claim(&s, &mb).await.unwrap();
        let d = data("1");
        let mut sent = Vec::new();
        for _ in 0..5 {
            sent.push(bus.send_to_session(&s, msg(&d, None)).await.unwrap());
        }
        for want in &sent {
            match inbox.next().await {
                crate::bus::Event::Deliver(got) => assert_eq!(got.offset, *want),
                other => panic!("expected a delivery, got {other:?}"),
            }
        }
        let replay = bus.session_log(&s, Some(sent[1])).await.unwrap();
        let offsets: Vec<_> = replay.entries.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, sent[2..]);
    }

    #[tokio::test]
    async fn idempotency_key_returns_the_first_offset() {
        let bus = bus(10);
        let s = SessionId::parse("s").unwrap();
        let d = data("{}");
        let a = bus.send_to_session(&s, msg(&d, Some("k1"))).await.unwrap();
        let b = bus.send_to_session(&s, msg(&d, Some("k1"))).await.unwrap();
        let c = bus.send_to_session(&s, msg(&d, Some("k2"))).await.unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(bus.session_log(&s, None).await.unwrap().entries.len(), 2);
    }

    #[tokio::test]
    async fn a_full_queue_closes_only_that_connection_and_never_blocks() {
        let bus = bus(100);
        let c = ChannelName::parse("c").unwrap();
        let (slow, slow_inbox) = mailbox(1, 2);
        let (fast, fast_inbox) = mailbox(2, 64);
        bus.subscribe(&c, &slow).await.unwrap();
        bus.subscribe(&c, &fast).await.unwrap();
        let d = data("0");
        for _ in 0..10 {
            bus.publish(&c, msg(&d, None)).await.unwrap();
        }
        assert_eq!(slow_inbox.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(fast_inbox.close_reason(), None);
        assert_eq!(fast_inbox.queued(), 10);
        assert!(bus.metrics.queue_overflows.get() >= 1);
    }

    #[tokio::test]
    async fn subscribe_reports_the_channel_head() {
        let bus = bus(10);
        let c = ChannelName::parse("c").unwrap();
        let d = data("0");
        let (mb, _inbox) = mailbox(1, 4);
        assert_eq!(bus.subscribe(&c, &mb).await.unwrap(), None);
        let o = bus.publish(&c, msg(&d, None)).await.unwrap();
        assert_eq!(bus.subscribe(&c, &mb).await.unwrap(), Some(o));
    }

    #[tokio::test]
    async fn sweeper_forgets_idle_sessions_and_channels() {
        let bus = bus(10);
        let s = SessionId::parse("s").unwrap();
        let c = ChannelName::parse("c").unwrap();
        let d = data("0");
        bus.send_to_session(&s, msg(&d, Some("k"))).await.unwrap();
        bus.publish(&c, msg(&d, None)).await.unwrap();
        bus.sweep(now_ms());
        assert_eq!(bus.sizes(), (1, 1), "retained messages keep their entries");
        bus.sweep(now_ms() + 120_000);
        assert_eq!(bus.sizes(), (0, 0), "expired entries are forgotten");
    }
}
