//! Offsets: the position of a message in one session's or one channel's log.
//!
//! An offset is written `<ms>-<seq>`, the same shape as a Redis stream id, so
//! that embedded mode and cluster mode hand clients the same kind of value and
//! a client library needs one comparison rule: by `ms`, then by `seq`.
//! Offsets of different logs are never compared with each other.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// A position in one log. Ordered; strictly increasing within a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    /// Milliseconds since the Unix epoch when the entry was appended (or the
    /// previous entry's value, if the clock went backwards).
    pub ms: u64,
    /// Sequence number within one millisecond.
    pub seq: u64,
}

impl Offset {
    pub const ZERO: Offset = Offset { ms: 0, seq: 0 };

    /// The offset to give the entry appended after `last` at wall-clock time
    /// `now_ms`. Never goes backwards, even when the clock does (trap 6).
    pub fn next_after(last: Option<Offset>, now_ms: u64) -> Offset {
        match last {
            Some(last) if now_ms <= last.ms => Offset {
                ms: last.ms,
                seq: last.seq + 1,
            },
            _ => Offset { ms: now_ms, seq: 0 },
        }
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a string is not an offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("offset must look like <ms>-<seq> (two unsigned integers), got {0:?}")]
pub struct BadOffset(pub String);

impl FromStr for Offset {
    type Err = BadOffset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadOffset(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(Offset {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for Offset {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for text in ["0-0", "1700000000000-0", "5-18446744073709551615"] {
            let offset: Offset = text.parse().expect(text);
            assert_eq!(offset.to_string(), text);
        }
    }

    #[test]
    fn rejects_malformed() {
        for text in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "a-1",
            "1-b",
            "1-2-3",
            " 1-2",
            "+1-2",
            "99999999999999999999999-0",
        ] {
            assert!(
                text.parse::<Offset>().is_err(),
                "{text:?} should be rejected"
            );
        }
    }

    #[test]
    fn orders_by_ms_then_seq() {
        let a: Offset = "10-5".parse().unwrap();
        let b: Offset = "11-0".parse().unwrap();
        let c: Offset = "11-1".parse().unwrap();
        assert!(a < b && b < c);
    }

    #[test]
    fn next_never_goes_backwards() {
        // (last, now) -> expected
        let cases = [
            (None, 100, "100-0"),
            (Some("100-0"), 100, "100-1"),
            (Some("100-7"), 101, "101-0"),
            (Some("100-7"), 50, "100-8"), // clock went backwards
        ];
        for (last, now, want) in cases {
            let last = last.map(|l| l.parse::<Offset>().unwrap());
            let next = Offset::next_after(last, now);
            assert_eq!(next.to_string(), want);
            if let Some(last) = last {
                assert!(next > last);
            }
        }
    }
}
