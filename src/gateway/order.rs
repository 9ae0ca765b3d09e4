//! What one connection has written, per log, and what to do with the next
//! delivery: the ordering and ownership state of a connection, kept pure so
//! every interleaving of replay, live delivery, loss and resync is a table
//! test (see the tests below) rather than a race in the socket loop.
//!
//! The rules (traps.md 2 and 16):
//! * a connection claims its session first, replays the log after the
//!   client's `last`, then goes live; a live delivery at or below the cursor
//!   was already written by the replay and is dropped (dedupe);
//! * a live delivery whose `prev` is beyond the cursor means an entry in
//!   between is late or was lost on its way: the log after the cursor fills
//!   the hole, in order, and the cursor moves past everything written;
//! * a resync notice (the bus may have dropped deliveries) reads the log
//!   after the cursor the same way;
//! * cursors only move forward, except when the client explicitly asks for
//!   a replay again (`subscribe` with `since`).

use crate::bus::Claim;
use crate::protocol::{ChannelName, Offset};

/// The logs one connection reads, with how far it has written each.
#[derive(Debug, Default)]
pub struct Order {
    /// Set once the session is claimed; the identity release must match.
    claim: Option<Claim>,
    /// Offset of the newest direct message written to the socket.
    session: Option<Offset>,
    /// One per subscribed channel; a handful per connection, so a vector
    /// beats a map in both memory and lookup time.
    channels: Vec<ChannelCursor>,
}

#[derive(Debug)]
struct ChannelCursor {
    channel: ChannelName,
    /// Offset of the newest message of this channel written to the socket.
    cursor: Option<Offset>,
}

/// Which log a delivery belongs to.
#[derive(Debug, Clone, Copy)]
pub enum LogId<'a> {
    Session,
    Channel(&'a ChannelName),
}

/// What is known about a delivery when it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    pub log: LogId<'a>,
    pub offset: Offset,
    /// The offset appended just before it in its log, if known.
    pub prev: Option<Offset>,
    /// Live from the bus (`false` while replaying the log itself).
    pub live: bool,
    /// Not a message but a notice to catch up from the log.
    pub resync: bool,
}

/// What the connection does with an arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A channel this connection no longer subscribes to.
    NotSubscribed,
    /// At or below the cursor: written already.
    Duplicate,
    /// Next in order: write it, then [`Order::advance`].
    Write,
    /// Read the log after `after` and write every entry beyond the cursor.
    Fill { after: Option<Offset> },
}

impl Order {
    /// Starts at the offset the client says it has (`?last=`).
    pub fn new(last: Option<Offset>) -> Self {
        Self {
            claim: None,
            session: last,
            channels: Vec::new(),
        }
    }

    pub fn set_claim(&mut self, claim: Claim) {
        self.claim = Some(claim);
    }

    /// The claim to release when the connection ends (once).
    pub fn take_claim(&mut self) -> Option<Claim> {
        self.claim.take()
    }

    pub fn cursor(&self, log: LogId<'_>) -> Option<Offset> {
        match log {
            LogId::Session => self.session,
            LogId::Channel(c) => self.channels.iter().find(|s| s.channel == *c)?.cursor,
        }
    }

    pub fn is_subscribed(&self, channel: &ChannelName) -> bool {
        self.channels.iter().any(|s| s.channel == *channel)
    }

    pub fn subscription_count(&self) -> usize {
        self.channels.len()
    }

    pub fn channels(&self) -> impl Iterator<Item = &ChannelName> {
        self.channels.iter().map(|s| &s.channel)
    }

    /// Records a subscription. A new one starts at `since`, else at the
    /// channel's head when it subscribed; a repeated one with `since` asks
    /// for the replay again, so its cursor moves back to `since`.
    pub fn subscribe(
        &mut self,
        channel: &ChannelName,
        since: Option<Offset>,
        head: Option<Offset>,
    ) {
        match self.channels.iter_mut().find(|s| s.channel == *channel) {
            Some(existing) => {
                if since.is_some() {
                    existing.cursor = since;
                }
            }
            None => self.channels.push(ChannelCursor {
                channel: channel.clone(),
                cursor: since.or(head),
            }),
        }
    }

    /// False when it was not subscribed.
    pub fn unsubscribe(&mut self, channel: &ChannelName) -> bool {
        match self.channels.iter().position(|s| s.channel == *channel) {
            Some(i) => {
                self.channels.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Removes every subscription, returning the channels.
    pub fn drain_channels(&mut self) -> Vec<ChannelName> {
        self.channels.drain(..).map(|s| s.channel).collect()
    }

    /// Decides what to do with an arrival.
    pub fn step(&self, arrival: Arrival<'_>) -> Step {
        if let LogId::Channel(c) = arrival.log
            && !self.is_subscribed(c)
        {
            return Step::NotSubscribed;
        }
        let cursor = self.cursor(arrival.log);
        if arrival.resync {
            return Step::Fill { after: cursor };
        }
        if cursor.is_some_and(|c| arrival.offset <= c) {
            return Step::Duplicate;
        }
        let hole = arrival.live && arrival.prev.is_some_and(|p| cursor.is_none_or(|c| p > c));
        if hole {
            Step::Fill { after: cursor }
        } else {
            Step::Write
        }
    }

    /// Whether an entry read from the log while filling is still to write.
    pub fn wants(&self, log: LogId<'_>, offset: Offset) -> bool {
        self.cursor(log).is_none_or(|c| offset > c)
    }

    /// Moves the log's cursor to `offset` after it was written; never back.
    pub fn advance(&mut self, log: LogId<'_>, offset: Offset) {
        let slot = match log {
            LogId::Session => &mut self.session,
            LogId::Channel(c) => match self.channels.iter_mut().find(|s| s.channel == *c) {
                Some(s) => &mut s.cursor,
                None => return,
            },
        };
        if slot.is_none_or(|c| offset > c) {
            *slot = Some(offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Holder;

    fn o(s: &str) -> Offset {
        s.parse().unwrap()
    }

    fn ch(name: &str) -> ChannelName {
        ChannelName::parse(name).unwrap()
    }

    fn live(offset: &str, prev: Option<&str>) -> Arrival<'static> {
        Arrival {
            log: LogId::Session,
            offset: o(offset),
            prev: prev.map(o),
            live: true,
            resync: false,
        }
    }

    #[test]
    fn session_arrivals_against_the_cursor() {
        /// (cursor, offset, prev, live, resync) -> step
        type Case<'a> = (Option<&'a str>, &'a str, Option<&'a str>, bool, bool, Step);
        let cases: &[Case] = &[
            // next in order
            (None, "1-0", None, true, false, Step::Write),
            (Some("1-0"), "2-0", Some("1-0"), true, false, Step::Write),
            // replay and live overlap: written already
            (
                Some("2-0"),
                "2-0",
                Some("1-0"),
                true,
                false,
                Step::Duplicate,
            ),
            (
                Some("3-0"),
                "2-0",
                Some("1-0"),
                true,
                false,
                Step::Duplicate,
            ),
            // the entry between was lost or is late: fill from the cursor
            (
                Some("1-0"),
                "3-0",
                Some("2-0"),
                true,
                false,
                Step::Fill {
                    after: Some(o("1-0")),
                },
            ),
            // a fresh connection (no cursor) seeing an entry with a prev: the
            // first live message has a predecessor it never saw
            (
                None,
                "3-0",
                Some("2-0"),
                true,
                false,
                Step::Fill { after: None },
            ),
            // while replaying the log itself, prev is not a hole
            (Some("1-0"), "3-0", Some("2-0"), false, false, Step::Write),
            // a resync always reads the log, whatever the offset says
            (
                Some("5-0"),
                "0-0",
                None,
                true,
                true,
                Step::Fill {
                    after: Some(o("5-0")),
                },
            ),
            (None, "0-0", None, true, true, Step::Fill { after: None }),
        ];
        for &(cursor, offset, prev, is_live, resync, want) in cases {
            let order = Order::new(cursor.map(o));
            let got = order.step(Arrival {
                log: LogId::Session,
                offset: o(offset),
                prev: prev.map(o),
                live: is_live,
                resync,
            });
            assert_eq!(got, want, "cursor {cursor:?} offset {offset} prev {prev:?}");
        }
    }

    #[test]
    fn channel_arrivals_need_a_subscription_and_use_their_own_cursor() {
        let (a, b) = (ch("a"), ch("b"));
        let mut order = Order::new(Some(o("9-0")));
        assert_eq!(
            order.step(Arrival {
                log: LogId::Channel(&a),
                offset: o("1-0"),
                prev: None,
                live: true,
                resync: false
            }),
            Step::NotSubscribed
        );
        order.subscribe(&a, None, Some(o("4-0")));
        order.subscribe(&b, Some(o("1-0")), Some(o("7-0")));
        let on = |log, offset: &str, prev: Option<&str>| Arrival {
            log,
            offset: o(offset),
            prev: prev.map(o),
            live: true,
            resync: false,
        };
        // a started at its head, 4-0: 4-0 is old, 5-0 after it is next
        assert_eq!(
            order.step(on(LogId::Channel(&a), "4-0", None)),
            Step::Duplicate
        );
        assert_eq!(
            order.step(on(LogId::Channel(&a), "5-0", Some("4-0"))),
            Step::Write
        );
        // b started at since 1-0: a live 7-0 whose prev is 6-0 has a hole
        assert_eq!(
            order.step(on(LogId::Channel(&b), "7-0", Some("6-0"))),
            Step::Fill {
                after: Some(o("1-0"))
            }
        );
        // the session cursor is untouched by channels
        assert_eq!(order.cursor(LogId::Session), Some(o("9-0")));
        assert!(order.unsubscribe(&a));
        assert!(!order.unsubscribe(&a));
        assert_eq!(
            order.step(on(LogId::Channel(&a), "6-0", Some("5-0"))),
            Step::NotSubscribed
        );
    }

    #[test]
    fn cursors_only_move_forward_except_on_an_explicit_replay() {
        let c = ch("c");
        let mut order = Order::new(None);
        order.advance(LogId::Session, o("5-0"));
        order.advance(LogId::Session, o("3-0"));
        assert_eq!(order.cursor(LogId::Session), Some(o("5-0")));
        order.subscribe(&c, None, Some(o("8-0")));
        order.advance(LogId::Channel(&c), o("6-0"));
        assert_eq!(order.cursor(LogId::Channel(&c)), Some(o("8-0")));
        // subscribe again without since: nothing moves
        order.subscribe(&c, None, Some(o("9-0")));
        assert_eq!(order.cursor(LogId::Channel(&c)), Some(o("8-0")));
        // subscribe again with since: the client asks for the replay again
        order.subscribe(&c, Some(o("2-0")), Some(o("9-0")));
        assert_eq!(order.cursor(LogId::Channel(&c)), Some(o("2-0")));
        assert_eq!(order.subscription_count(), 1);
        // advancing an unsubscribed channel is a no-op, not a new cursor
        let d = ch("d");
        order.advance(LogId::Channel(&d), o("1-0"));
        assert!(!order.is_subscribed(&d));
    }

    /// Claim, replay, live with every interleaving of a replayed entry, its
    /// live copy, a lost entry and a late one: each offset is written once,
    /// in order, whatever the arrival order.
    #[test]
    fn every_interleaving_writes_each_offset_once_in_order() {
        let log = ["1-0", "2-0", "3-0", "4-0"];
        // The live copies the bus routes (prev is the entry before it); 3-0
        // is lost on its way.
        let routed = [("2-0", "1-0"), ("4-0", "3-0")];
        // Possible arrival orders of the live copies around the replay,
        // which read the log up to `replayed`.
        for replayed in 0..=log.len() {
            for live_first in [false, true] {
                let mut order = Order::new(Some(o("0-1")));
                let mut written: Vec<Offset> = Vec::new();
                let mut apply = |order: &mut Order, arrival: Arrival<'_>| match order.step(arrival)
                {
                    Step::Write => {
                        written.push(arrival.offset);
                        order.advance(arrival.log, arrival.offset);
                    }
                    Step::Fill { after } => {
                        for e in log.iter().map(|e| o(e)) {
                            if after.is_none_or(|a| e > a) && order.wants(LogId::Session, e) {
                                written.push(e);
                                order.advance(LogId::Session, e);
                            }
                        }
                    }
                    Step::Duplicate | Step::NotSubscribed => {}
                };
                let live_arrivals: Vec<_> = routed.iter().map(|(x, p)| live(x, Some(p))).collect();
                if live_first {
                    for a in &live_arrivals {
                        apply(&mut order, *a);
                    }
                }
                let mut prev = None;
                for e in &log[..replayed] {
                    apply(
                        &mut order,
                        Arrival {
                            log: LogId::Session,
                            offset: o(e),
                            prev,
                            live: false,
                            resync: false,
                        },
                    );
                    prev = Some(o(e));
                }
                if !live_first {
                    for a in &live_arrivals {
                        apply(&mut order, *a);
                    }
                }
                let sorted = {
                    let mut s = written.clone();
                    s.sort();
                    s.dedup();
                    s
                };
                assert_eq!(
                    written, sorted,
                    "in order, once: replayed {replayed}, live first {live_first}"
                );
                assert_eq!(
                    written.last(),
                    Some(&o("4-0")),
                    "the newest entry arrives: replayed {replayed}, live first {live_first}"
                );
                assert_eq!(
                    written.len(),
                    log.len(),
                    "nothing missing: replayed {replayed}, live first {live_first}, wrote {written:?}"
                );
            }
        }
    }

    #[test]
    fn the_claim_is_released_once() {
        let mut order = Order::new(None);
        let claim = Claim {
            epoch: 3,
            holder: Holder {
                instance: 7,
                conn: 9,
            },
        };
        assert_eq!(order.take_claim(), None);
        order.set_claim(claim);
        assert_eq!(order.take_claim(), Some(claim));
        assert_eq!(order.take_claim(), None);
    }
}
