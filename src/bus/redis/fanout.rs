//! A channel's fan-out on this pod: its local subscribers and the newest
//! offset handed to them, so that every subscriber here is offered the
//! channel's messages in log order with nothing missing.
//!
//! Routed entries reach a pod out of order (publishes through different
//! pods race to its inbox, the local fast path races the inbox) and some
//! never arrive (trap 16). Left to each connection, every such hole costs
//! one log read *per subscriber*, hundreds at once for one late entry; under
//! load those reads time out and a connection that cannot fill its hole
//! delivers past it and loses what was inside (the fan-out loss measured in
//! BENCHMARKS.md). Here the pod fills a hole once, from the log, for all of
//! its subscribers (trap 9), and never offers anything past a hole it has
//! not filled: an entry beyond the hole is dropped (the log has it) and the
//! catch-up reads it back in order. A catch-up that fails is retried by the
//! repair loop every period (`repair.rs`).

use std::sync::Arc;

use super::RedisBus;
use crate::bus::{Bus, Delivery, Mailbox, Offer};
use crate::protocol::{ChannelName, Offset};

/// What this pod knows about one channel it has subscribers for.
#[derive(Debug, Default)]
pub(super) struct LocalChannel {
    pub subscribers: Vec<Mailbox>,
    /// The newest offset offered to the subscribers here; everything before
    /// it in the log was offered too (or predates every subscription here).
    /// `None` before the first subscribe's head is known, and after it when
    /// the log was empty then: every entry is to offer.
    cursor: Option<Offset>,
    /// The first subscribe's head is known: `cursor` is a reference point.
    started: bool,
    /// The newest offset seen beyond a hole: a catch-up from the log is due.
    ahead: Option<Offset>,
    /// A catch-up was asked for (a repair hint, a lost inbox) since the
    /// running catch-up last read the log, or before one could start.
    due: bool,
    /// A catch-up task is reading the log for this channel.
    catching_up: bool,
}

/// How a routed delivery fits after what was offered already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fit {
    /// The next entry (or no reference yet): offer it.
    Next,
    /// At or before the cursor: offered already (a late or repeated entry).
    Seen,
    /// Something between the cursor and it has not arrived: read the log.
    Hole,
}

/// Where `offset` (whose predecessor in the log is `prev`) falls relative
/// to `cursor`, the newest offset offered; `started`: the cursor is a
/// reference point (before the first subscribe's head is known, anything
/// is offered and the connections dedupe).
pub(super) fn fit(
    started: bool,
    cursor: Option<Offset>,
    offset: Offset,
    prev: Option<Offset>,
) -> Fit {
    match cursor {
        None if !started => Fit::Next,
        // Nothing offered yet from a log that was empty at the first
        // subscribe: only its first entry has nothing before it.
        None if prev.is_none() => Fit::Next,
        None => Fit::Hole,
        Some(c) if offset <= c => Fit::Seen,
        // `prev` absent: the log's first entry ever (or its head was lost).
        Some(c) if prev.is_none_or(|p| p <= c) => Fit::Next,
        Some(_) => Fit::Hole,
    }
}

impl LocalChannel {
    /// Offers `delivery` to every subscriber, dropping the gone ones.
    fn offer(&mut self, delivery: &Arc<Delivery>, overflows: &prometheus::IntCounter) {
        self.subscribers.retain(|m| match m.offer(delivery) {
            Offer::Queued => true,
            Offer::Overflow => {
                overflows.inc();
                true
            }
            Offer::Closed => false,
        });
        if !delivery.resync {
            self.cursor = Some(delivery.offset);
        }
    }

    /// Sets the starting point from the first subscribe's head (unless a
    /// delivery set one meanwhile). Later subscribers start at their own
    /// head on the connection side and drop what they were offered before it.
    pub fn start_at(&mut self, head: Option<Offset>) {
        if !self.started {
            self.started = true;
            if self.cursor.is_none() {
                self.cursor = head;
            }
        }
    }

    /// True when a catch-up is due and none is running; marks it running.
    fn begin_catch_up(&mut self) -> bool {
        if self.catching_up {
            return false;
        }
        self.catching_up = true;
        true
    }

    /// The log's head is past what was offered here (and a reference point
    /// is known: before it, anything is offered).
    pub fn behind(&self, head: Offset) -> bool {
        self.started && self.cursor.is_none_or(|c| head > c)
    }

    /// A hole waits to be filled or a catch-up was asked for, and none
    /// runs: the repair loop retries.
    pub fn stalled(&self) -> bool {
        (self.ahead.is_some() || self.due) && !self.catching_up
    }
}

impl RedisBus {
    /// Hands a channel message to every local subscriber, in log order: a
    /// message past a hole starts a catch-up from the log instead.
    pub(super) fn deliver_channel(&self, channel: &ChannelName, delivery: &Arc<Delivery>) {
        let start = {
            let Some(mut local) = self.channels.get_mut(channel) else {
                return;
            };
            match fit(local.started, local.cursor, delivery.offset, delivery.prev) {
                Fit::Next => {
                    local.offer(delivery, &self.metrics.queue_overflows);
                    false
                }
                Fit::Seen => false,
                Fit::Hole => {
                    local.ahead = local.ahead.max(Some(delivery.offset));
                    local.begin_catch_up()
                }
            }
        };
        if start {
            self.spawn_catch_up(channel.clone(), "hole");
        }
    }

    /// Reads the channel's log after what this pod offered and offers the
    /// rest, once for all local subscribers. `reason` labels the repair.
    pub(super) fn catch_up_channel(&self, channel: &ChannelName, reason: &'static str) {
        let start = match self.channels.get_mut(channel) {
            Some(mut local) => {
                // Also when one runs: its read may predate what is asked for.
                local.due = true;
                // Before the first head is known there is no point to read
                // after; the repair loop asks again next period.
                local.started && local.begin_catch_up()
            }
            None => false,
        };
        if start {
            self.spawn_catch_up(channel.clone(), reason);
        }
    }

    fn spawn_catch_up(&self, channel: ChannelName, reason: &'static str) {
        match self.me.upgrade() {
            Some(bus) => {
                tokio::spawn(async move { bus.catch_up(channel, reason).await });
            }
            // The bus is being dropped: nobody is left to deliver to.
            None => {
                if let Some(mut local) = self.channels.get_mut(&channel) {
                    local.catching_up = false;
                }
            }
        }
    }

    async fn catch_up(&self, channel: ChannelName, reason: &'static str) {
        let started = std::time::Instant::now();
        let mut offered = 0usize;
        loop {
            let after = match self.channels.get_mut(&channel) {
                Some(mut local) => {
                    local.due = false;
                    local.cursor
                }
                None => return,
            };
            let replay = self.channel_log(&channel, after).await;
            let Some(mut local) = self.channels.get_mut(&channel) else {
                return;
            };
            let entries = match replay {
                // Only for holes: the other catch-ups also follow Redis
                // losing the log, which the ownership path answers (1012).
                Ok(r) if r.gap && reason == "hole" => {
                    // Retention dropped entries this pod had not offered
                    // yet: every subscriber here missed them. Each is closed
                    // 1013 and resubscribes with `since`, whose ack reports
                    // the gap; offering past it would hide the loss.
                    for subscriber in &local.subscribers {
                        subscriber.close(crate::protocol::close::CloseReason::SlowConsumer);
                    }
                    self.metrics
                        .replay_gaps
                        .with_label_values(&["channel"])
                        .inc();
                    tracing::warn!(%channel, subscribers = local.subscribers.len(), "entries of a hole were trimmed from the channel log before this pod offered them; closing its subscribers so they resume and learn of the gap");
                    r.entries
                }
                Ok(r) => r.entries,
                Err(e) => {
                    // The hole stays marked; the repair loop tries again
                    // next period.
                    local.catching_up = false;
                    tracing::warn!(%channel, error = %e, "cannot read the channel log to fill a hole; retrying next repair period");
                    return;
                }
            };
            let mut this_round = 0;
            for entry in &entries {
                if local.cursor.is_none_or(|c| entry.offset > c) {
                    local.offer(entry, &self.metrics.queue_overflows);
                    this_round += 1;
                }
            }
            offered += this_round;
            let still_ahead = local
                .ahead
                .is_some_and(|a| local.cursor.is_none_or(|c| a > c));
            if local.due || (still_ahead && this_round > 0) {
                continue; // more was asked for or arrived past the part just read
            }
            if still_ahead {
                // The log no longer has what lies between: retention
                // dropped it before it was read (a gap). New entries
                // start the next catch-up.
                tracing::warn!(%channel, "entries of a hole were trimmed from the channel log before they could be read");
            }
            local.ahead = None;
            local.catching_up = false;
            break;
        }
        self.repair_metrics
            .repairs
            .with_label_values(&[reason])
            .inc();
        let took_ms = started.elapsed().as_millis() as u64;
        // Holes are routine under load (routes race); other repairs are news.
        if reason == "hole" {
            tracing::debug!(%channel, reason, offered, took_ms, "channel caught up from its log");
        } else {
            tracing::info!(%channel, reason, offered, took_ms, "channel caught up from its log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(ms: u64) -> Offset {
        Offset { ms, seq: 0 }
    }

    #[test]
    fn fit_table() {
        // (cursor, offset, prev, expected)
        let table = [
            // The log was empty at the first subscribe.
            (None, 5, Some(4), Fit::Hole),
            (None, 5, None, Fit::Next),
            (Some(4), 5, Some(4), Fit::Next),
            (Some(4), 5, None, Fit::Next),
            (Some(4), 4, Some(3), Fit::Seen),
            (Some(5), 4, Some(3), Fit::Seen),
            (Some(3), 5, Some(4), Fit::Hole),
            // A predecessor before the cursor cannot happen in one log, but
            // offering is the safe answer: nothing is skipped.
            (Some(4), 6, Some(3), Fit::Next),
        ];
        for (cursor, offset, prev, want) in table {
            assert_eq!(
                fit(true, cursor.map(o), o(offset), prev.map(o)),
                want,
                "cursor {cursor:?} offset {offset} prev {prev:?}"
            );
        }
        // Before the first head is known: offer anything.
        assert_eq!(fit(false, None, o(5), Some(o(4))), Fit::Next);
        assert_eq!(fit(false, None, o(5), None), Fit::Next);
    }

    #[test]
    fn a_hole_is_marked_once_and_a_stalled_one_is_visible() {
        let mut local = LocalChannel::default();
        local.start_at(None);
        local.start_at(Some(o(9)));
        assert_eq!(
            local.cursor, None,
            "the first head wins, even an empty log's"
        );
        local.cursor = Some(o(1));
        assert!(local.begin_catch_up());
        assert!(!local.begin_catch_up(), "one catch-up at a time");
        local.ahead = Some(o(3));
        assert!(!local.stalled());
        local.catching_up = false;
        assert!(local.stalled());
    }

    #[test]
    fn behind_the_head_only_once_a_reference_point_is_known() {
        let mut local = LocalChannel::default();
        assert!(
            !local.behind(o(5)),
            "before the first head: anything is offered"
        );
        local.start_at(Some(o(5)));
        assert!(!local.behind(o(5)));
        assert!(local.behind(o(6)));
        let mut empty = LocalChannel::default();
        empty.start_at(None);
        assert!(
            empty.behind(o(1)),
            "an empty log's first entry not offered yet"
        );
    }
}
