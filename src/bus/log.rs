//! A retained log of messages: what embedded mode keeps per session and per
//! channel. Pure: time comes in as an argument, so retention is testable
//! without sleeping.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use super::{Delivery, Replay};
use crate::protocol::{ChannelName, Offset};

/// How much of a log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many messages per log.
    pub max_messages: usize,
    /// Drop messages older than this.
    pub max_age_ms: u64,
}

/// Estimated heap bytes one retained entry costs beside its frame: the
/// `Arc<Delivery>` allocation with its counters, allocator headers and
/// rounding, and the entry's slot in the queue with its growth slack.
/// Checked against RSS by `tests/memory_budget.rs`.
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Delivery>() + 64;

/// What one retained entry costs, frame included.
pub fn entry_cost(frame_len: usize) -> usize {
    frame_len + ENTRY_OVERHEAD
}

/// One session's or one channel's messages, oldest first.
#[derive(Debug, Default)]
pub struct Log {
    entries: VecDeque<Arc<Delivery>>,
    /// Estimated heap bytes of `entries` ([`entry_cost`] each).
    bytes: usize,
    /// The newest offset ever appended, kept after trimming so offsets never
    /// repeat and `prev` links stay right.
    head: Option<Offset>,
    /// The newest offset trimmed away; a reader asking for anything before
    /// it has a gap.
    trimmed_through: Option<Offset>,
}

impl Log {
    /// Appends one message. `render` builds the frame once the offset is known.
    pub fn append(
        &mut self,
        now_ms: u64,
        channel: Option<&ChannelName>,
        trace: Option<Box<str>>,
        render: impl FnOnce(Offset) -> String,
    ) -> Arc<Delivery> {
        let offset = Offset::next_after(self.head, now_ms);
        // Exactly sized: a rendered String keeps its growth slack, which
        // would be retained unaccounted for the whole retention (and makes
        // `Bytes` allocate a second header).
        let frame = String::from(render(offset).into_boxed_str());
        self.bytes += entry_cost(frame.len());
        let delivery = Arc::new(Delivery {
            offset,
            prev: self.head,
            channel: channel.cloned(),
            frame: Utf8Bytes::from(frame),
            accepted_ms: now_ms,
            trace,
            resync: false,
        });
        self.head = Some(offset);
        self.entries.push_back(delivery.clone());
        delivery
    }

    /// Drops what retention no longer keeps: beyond `retention`'s count or
    /// age, or beyond `max_bytes` (oldest first, but never the newest
    /// entry, so one message larger than the cap is still kept). Returns
    /// how many were dropped.
    pub fn trim(&mut self, retention: Retention, max_bytes: usize, now_ms: u64) -> usize {
        let mut dropped = 0;
        while let Some(oldest) = self.entries.front() {
            let too_many = self.entries.len() > retention.max_messages;
            let too_old = now_ms.saturating_sub(oldest.accepted_ms) > retention.max_age_ms;
            let too_big = self.bytes > max_bytes && self.entries.len() > 1;
            if !too_many && !too_old && !too_big {
                break;
            }
            self.trimmed_through = Some(oldest.offset);
            self.bytes -= entry_cost(oldest.frame.len());
            self.entries.pop_front();
            dropped += 1;
        }
        if dropped > 0 && self.entries.capacity() > 2 * self.entries.len() + 8 {
            // A burst's queue would otherwise keep its size after retention
            // emptied it.
            self.entries.shrink_to(self.entries.len() + 4);
        }
        dropped
    }

    /// Estimated heap bytes held by the entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Retained entries after `after` (all when `None`).
    pub fn after(&self, after: Option<Offset>) -> Replay {
        let Some(after) = after else {
            return Replay {
                entries: self.entries.iter().cloned().collect(),
                gap: false,
            };
        };
        let start = self.entries.partition_point(|d| d.offset <= after);
        Replay {
            entries: self.entries.range(start..).cloned().collect(),
            gap: self.trimmed_through.is_some_and(|t| t > after),
        }
    }

    pub fn head(&self) -> Option<Offset> {
        self.head
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP_3_FOR_1S: Retention = Retention {
        max_messages: 3,
        max_age_ms: 1000,
    };

    fn log_at(times: &[u64]) -> Log {
        let mut log = Log::default();
        for &t in times {
            log.append(t, None, None, |o| o.to_string());
        }
        log
    }

    fn offsets(replay: &Replay) -> Vec<String> {
        replay
            .entries
            .iter()
            .map(|d| d.offset.to_string())
            .collect()
    }

    #[test]
    fn offsets_increase_and_link_to_the_previous_entry() {
        let log = log_at(&[10, 10, 9, 11]);
        let all = log.after(None);
        assert_eq!(offsets(&all), ["10-0", "10-1", "10-2", "11-0"]);
        assert_eq!(all.entries[0].prev, None);
        for pair in all.entries.windows(2) {
            assert_eq!(pair[1].prev, Some(pair[0].offset));
        }
        assert_eq!(&*all.entries[1].frame, "10-1");
    }

    #[test]
    fn trims_by_count_and_by_age() {
        // (append times, now, retained offsets)
        let cases: [(&[u64], u64, &[&str]); 4] = [
            (&[1, 2, 3], 3, &["1-0", "2-0", "3-0"]),
            (&[1, 2, 3, 4, 5], 5, &["3-0", "4-0", "5-0"]),
            (&[1, 2, 1500], 1500, &["1500-0"]),
            (&[1, 2], 5000, &[]),
        ];
        for (times, now, want) in cases {
            let mut log = log_at(times);
            let dropped = log.trim(KEEP_3_FOR_1S, usize::MAX, now);
            assert_eq!(offsets(&log.after(None)), want, "times {times:?} now {now}");
            assert_eq!(dropped, times.len() - want.len());
        }
    }

    #[test]
    fn trims_by_bytes_oldest_first_but_keeps_the_newest() {
        let mut log = Log::default();
        let keep_many = Retention {
            max_messages: 100,
            max_age_ms: 1000,
        };
        for t in 1..=4 {
            log.append(t, None, None, |_| "x".repeat(100));
        }
        let one = entry_cost(100);
        assert_eq!(log.bytes(), 4 * one);
        // (byte cap, entries left)
        let cases = [(4 * one, 4), (3 * one + 1, 3), (2 * one, 2), (1, 1)];
        for (cap, left) in cases {
            log.trim(keep_many, cap, 4);
            assert_eq!(log.len(), left, "cap {cap}");
            assert_eq!(log.bytes(), left * one);
        }
        assert!(log.after(Some("1-0".parse().unwrap())).gap);
        log.trim(keep_many, usize::MAX, 5000);
        assert_eq!(
            (log.len(), log.bytes()),
            (0, 0),
            "expiry returns every byte"
        );
    }

    #[test]
    fn after_returns_the_tail_and_reports_gaps() {
        let mut log = log_at(&[1, 2, 3, 4, 5]);
        log.trim(KEEP_3_FOR_1S, usize::MAX, 5); // keeps 3-0, 4-0, 5-0
        // (after, expected offsets, gap)
        let cases: [(&str, &[&str], bool); 5] = [
            ("1-0", &["3-0", "4-0", "5-0"], true), // 2-0 is gone
            ("2-0", &["3-0", "4-0", "5-0"], false),
            ("3-0", &["4-0", "5-0"], false),
            ("5-0", &[], false),
            ("9-0", &[], false),
        ];
        for (after, want, gap) in cases {
            let replay = log.after(Some(after.parse().unwrap()));
            assert_eq!(offsets(&replay), want, "after {after}");
            assert_eq!(replay.gap, gap, "gap after {after}");
        }
    }

    #[test]
    fn head_survives_trimming_so_offsets_never_repeat() {
        let mut log = log_at(&[7, 7]);
        log.trim(KEEP_3_FOR_1S, usize::MAX, 5000);
        assert!(log.is_empty());
        let next = log.append(7, None, None, |o| o.to_string());
        assert_eq!(next.offset.to_string(), "7-2");
        assert_eq!(next.prev.map(|o| o.to_string()).as_deref(), Some("7-1"));
    }
}
