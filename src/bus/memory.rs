//! Embedded mode: the whole fleet's routing inside one process.
//!
//! Each session and each channel is one entry of a sharded map. Appending a
//! message and handing it to the owner (or the subscribers) happen under that
//! entry's lock, so live deliveries leave in offset order and a claim can
//! never slip between the two. Handing over is `try_send`, so the lock is
//! never held across a wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{
    Bus, Claim, ConnId, Delivery, Holder, Log, Mailbox, Offer, Outgoing, Replay, Result, Retention,
    SessionInfo, now_ms,
};
use crate::pod::{LocalPod, PodStatus};
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId, frame};
use crate::telemetry::Metrics;

/// The longest idempotency key accepted (HTTP 400 beyond).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

pub struct MemoryBus {
    pod: Arc<LocalPod>,
    retention: Retention,
    sessions: DashMap<SessionId, SessionState>,
    channels: DashMap<ChannelName, ChannelState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct SessionState {
    log: Log,
    owner: Option<Owner>,
    /// Bumped by every claim.
    epoch: u64,
    idempotency: IdempotencyKeys,
}

struct Owner {
    epoch: u64,
    mailbox: Mailbox,
    connected_at: OffsetDateTime,
}

#[derive(Default)]
struct ChannelState {
    log: Log,
    subscribers: Vec<Mailbox>,
    idempotency: IdempotencyKeys,
}

/// Offsets already given to idempotency keys, forgotten with retention.
#[derive(Default)]
struct IdempotencyKeys {
    /// key -> (offset, expires at ms)
    keys: HashMap<Box<str>, (Offset, u64)>,
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
            }
        }
        self.keys.insert(key.into(), (offset, expires_ms));
    }

    fn expire(&mut self, now_ms: u64) {
        self.keys.retain(|_, (_, expires)| *expires > now_ms);
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl MemoryBus {
    pub fn new(pod: Arc<LocalPod>, retention: Retention, metrics: Arc<Metrics>) -> Self {
        Self {
            pod,
            retention,
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
                bus.sweep(now_ms());
            }
        });
    }

    /// One pass of the sweeper; public for tests that control time.
    pub fn sweep(&self, now_ms: u64) {
        let retention = self.retention;
        let mut trimmed = 0;
        self.sessions.retain(|_, s| {
            trimmed += s.log.trim(retention, now_ms);
            s.idempotency.expire(now_ms);
            s.owner.is_some() || !s.log.is_empty() || !s.idempotency.is_empty()
        });
        self.channels.retain(|_, c| {
            trimmed += c.log.trim(retention, now_ms);
            c.idempotency.expire(now_ms);
            c.subscribers.retain(|m| !m.is_closed());
            !c.subscribers.is_empty() || !c.log.is_empty() || !c.idempotency.is_empty()
        });
        self.metrics.retention_trims.inc_by(trimmed as u64);
    }

    /// How many sessions and channels are held in memory (for tests of the sweeper).
    pub fn sizes(&self) -> (usize, usize) {
        (self.sessions.len(), self.channels.len())
    }

    fn idempotency_cap(&self) -> usize {
        self.retention.max_messages.max(16)
    }

    fn record_offer(&self, offer: Offer) {
        if offer == Offer::Overflow {
            self.metrics.queue_overflows.inc();
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn claim(&self, session: &SessionId, mailbox: &Mailbox) -> Result<Claim> {
        let mut state = self.sessions.entry(session.clone()).or_default();
        state.epoch += 1;
        let epoch = state.epoch;
        let previous = state.owner.replace(Owner {
            epoch,
            mailbox: mailbox.clone(),
            connected_at: OffsetDateTime::now_utc(),
        });
        if let Some(previous) = previous {
            previous.mailbox.close(CloseReason::TakenOver);
        }
        Ok(Claim {
            epoch,
            holder: Holder {
                instance: 0,
                conn: mailbox.id,
            },
        })
    }

    async fn release(&self, session: &SessionId, claim: Claim) {
        if let Some(mut state) = self.sessions.get_mut(session)
            && state.owner.as_ref().is_some_and(|o| o.epoch == claim.epoch)
        {
            state.owner = None;
        }
        self.sessions.remove_if(session, |_, s| {
            s.owner.is_none() && s.log.is_empty() && s.idempotency.is_empty()
        });
    }

    async fn send_to_session(&self, session: &SessionId, msg: Outgoing<'_>) -> Result<Offset> {
        let now = now_ms();
        let mut state = self.sessions.entry(session.clone()).or_default();
        if let Some(offset) = msg
            .idempotency_key
            .and_then(|k| state.idempotency.get(k, now))
        {
            return Ok(offset);
        }
        let from = msg.from.map(|s| s.as_str());
        let delivery = state.log.append(now, None, |offset| {
            frame::session_message(offset, from, msg.data)
        });
        let trimmed = state.log.trim(self.retention, now);
        if let Some(key) = msg.idempotency_key {
            let expires = now + self.retention.max_age_ms;
            let cap = self.idempotency_cap();
            state
                .idempotency
                .insert(key, delivery.offset, expires, now, cap);
        }
        if let Some(owner) = &state.owner {
            self.record_offer(owner.mailbox.offer(&delivery));
        }
        drop(state);
        self.metrics.retention_trims.inc_by(trimmed as u64);
        self.metrics
            .messages_accepted
            .with_label_values(&["session"])
            .inc();
        Ok(delivery.offset)
    }

    async fn publish(&self, channel: &ChannelName, msg: Outgoing<'_>) -> Result<Offset> {
        let now = now_ms();
        let mut state = self.channels.entry(channel.clone()).or_default();
        if let Some(offset) = msg
            .idempotency_key
            .and_then(|k| state.idempotency.get(k, now))
        {
            return Ok(offset);
        }
        let delivery: Arc<Delivery> = state.log.append(now, Some(channel), |offset| {
            frame::channel_message(channel, offset, msg.data)
        });
        let trimmed = state.log.trim(self.retention, now);
        if let Some(key) = msg.idempotency_key {
            let expires = now + self.retention.max_age_ms;
            let cap = self.idempotency_cap();
            state
                .idempotency
                .insert(key, delivery.offset, expires, now, cap);
        }
        let mut offers = Vec::new();
        state.subscribers.retain(|m| {
            let offer = m.offer(&delivery);
            offers.push(offer);
            offer != Offer::Closed
        });
        drop(state);
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
        Ok(state.log.head())
    }

    async fn unsubscribe(&self, channel: &ChannelName, conn: ConnId) {
        if let Some(mut state) = self.channels.get_mut(channel) {
            state.subscribers.retain(|m| m.id != conn);
        }
        self.channels.remove_if(channel, |_, c| {
            c.subscribers.is_empty() && c.log.is_empty() && c.idempotency.is_empty()
        });
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
        MemoryBus::new(pod, retention, Arc::new(Metrics::new()))
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
