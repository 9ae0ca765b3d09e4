//! Inbound frame rate limit per connection: a token bucket small enough to
//! live inside every connection's task (12 bytes), and the policy for a
//! client that keeps exceeding it.
//!
//! Every inbound frame takes a token: text, binary, unparsable, unknown and
//! control frames alike, because each costs the pod a read and a decision.
//! Answers to refused frames are bounded too: at most one `rate_limited`
//! error per second, so a flood cannot make the pod write a flood back.
//! A client over its rate for [`STRIKES_TO_CLOSE`] seconds in a row is
//! closed with 1008.

use tokio::time::Instant;

/// Consecutive seconds over the rate after which the connection is closed.
pub const STRIKES_TO_CLOSE: u8 = 5;

#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens left, in thousandths, so refills need no floats.
    milli_tokens: u32,
    /// Last refill, relative to the bucket's creation, in milliseconds.
    last_ms: u32,
    /// Tokens per second, which is also the burst size.
    rate: u32,
}

impl TokenBucket {
    pub fn new(rate: u32) -> Self {
        Self {
            milli_tokens: rate.saturating_mul(1000),
            last_ms: 0,
            rate,
        }
    }

    /// Takes one token at `elapsed_ms` since the connection started.
    /// False when the connection is over its rate.
    pub fn take(&mut self, elapsed_ms: u32) -> bool {
        let dt = elapsed_ms.saturating_sub(self.last_ms);
        self.last_ms = elapsed_ms;
        let cap = self.rate.saturating_mul(1000);
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(dt.saturating_mul(self.rate))
            .min(cap);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// What to do with one inbound frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: handle it.
    Allow,
    /// Over the rate: drop it and tell the client (first refusal this second).
    Refuse,
    /// Over the rate, already told this second: drop it silently.
    Drop,
    /// Over the rate for too long: close the connection (1008).
    Close,
}

/// The token bucket plus the memory of recent refusals.
#[derive(Debug)]
pub struct RateGuard {
    bucket: TokenBucket,
    /// The second (since the connection started) of the last refusal.
    last_refusal_s: u32,
    /// Consecutive seconds with refusals, ending at `last_refusal_s`.
    strikes: u8,
}

impl RateGuard {
    pub fn new(rate: u32) -> Self {
        Self {
            bucket: TokenBucket::new(rate),
            last_refusal_s: 0,
            strikes: 0,
        }
    }

    pub fn check(&mut self, elapsed_ms: u32) -> Verdict {
        if self.bucket.take(elapsed_ms) {
            return Verdict::Allow;
        }
        let second = elapsed_ms / 1000;
        if self.strikes > 0 && second == self.last_refusal_s {
            return Verdict::Drop;
        }
        self.strikes = if self.strikes > 0 && second == self.last_refusal_s + 1 {
            self.strikes.saturating_add(1)
        } else {
            1
        };
        self.last_refusal_s = second;
        if self.strikes >= STRIKES_TO_CLOSE {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

/// Milliseconds since `start`, saturating at `u32::MAX` (49 days).
pub fn elapsed_ms(start: Instant) -> u32 {
    u32::try_from(start.elapsed().as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refills_at_the_rate() {
        let mut bucket = TokenBucket::new(10);
        let burst = (0..20).filter(|_| bucket.take(0)).count();
        assert_eq!(burst, 10);
        assert!(!bucket.take(50), "half a token after 50 ms");
        assert!(bucket.take(100), "one token after 100 ms");
        assert!(!bucket.take(100));
        let after_a_long_pause = (0..20).filter(|_| bucket.take(100_000)).count();
        assert_eq!(after_a_long_pause, 10, "refill is capped at the burst size");
    }

    /// Sends `per_second` frames evenly in each of `seconds` seconds, starting
    /// at `from_s`, and tallies the verdicts.
    fn flood(guard: &mut RateGuard, from_s: u32, seconds: u32, per_second: u32) -> Vec<Verdict> {
        let mut out = Vec::new();
        for s in from_s..from_s + seconds {
            for i in 0..per_second {
                out.push(guard.check(s * 1000 + i * 1000 / per_second));
            }
        }
        out
    }

    fn count(v: &[Verdict], which: Verdict) -> usize {
        v.iter().filter(|x| **x == which).count()
    }

    #[test]
    fn within_the_rate_everything_is_allowed() {
        let mut guard = RateGuard::new(10);
        let v = flood(&mut guard, 0, 30, 10);
        assert_eq!(count(&v, Verdict::Allow), v.len());
    }

    #[test]
    fn a_short_burst_is_refused_once_per_second_and_never_closed() {
        let mut guard = RateGuard::new(10);
        // 100 frames in one second, then calm.
        let burst = flood(&mut guard, 0, 1, 100);
        assert_eq!(
            count(&burst, Verdict::Refuse),
            1,
            "one error reply per second"
        );
        assert!(count(&burst, Verdict::Drop) > 70);
        let calm = flood(&mut guard, 2, 10, 5);
        assert_eq!(count(&calm, Verdict::Allow), calm.len());
        // A later burst starts counting strikes from one again.
        let later = flood(&mut guard, 20, STRIKES_TO_CLOSE as u32 - 1, 100);
        assert_eq!(count(&later, Verdict::Close), 0);
    }

    #[test]
    fn a_sustained_flood_is_closed_after_the_strikes() {
        let mut guard = RateGuard::new(10);
        let v = flood(&mut guard, 0, STRIKES_TO_CLOSE as u32, 100);
        assert_eq!(count(&v, Verdict::Close), 1);
        let closed_at = v.iter().position(|x| *x == Verdict::Close).unwrap();
        assert!(closed_at >= v.len() - 100, "closed in the last second");
        assert_eq!(count(&v, Verdict::Refuse), STRIKES_TO_CLOSE as usize - 1);
    }

    #[test]
    fn a_gap_second_resets_the_strikes() {
        let mut guard = RateGuard::new(10);
        let mut v = flood(&mut guard, 0, STRIKES_TO_CLOSE as u32 - 1, 100);
        v.extend(flood(&mut guard, STRIKES_TO_CLOSE as u32, 1, 5)); // a calm second
        v.extend(flood(
            &mut guard,
            STRIKES_TO_CLOSE as u32 + 1,
            STRIKES_TO_CLOSE as u32 - 1,
            100,
        ));
        assert_eq!(count(&v, Verdict::Close), 0);
    }
}
