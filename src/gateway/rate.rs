//! Inbound frame rate limit per connection: a token bucket small enough to
//! live inside every connection's task (12 bytes).

use std::time::Instant;

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
}
