//! Per-connection limits that need state: the publish token bucket and the bad-frame
//! counter. Size limits are enforced by the WebSocket layer and the send queue.

use std::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        Self {
            rate_per_sec,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            refilled_at: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&mut self, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What kind of bad frame a client sent; decides the close code once it repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFrame {
    /// Not JSON at all (closes with 1007 when repeated).
    Malformed,
    /// JSON, but not a known frame or not allowed now (closes with 1008 when repeated).
    Misuse,
}

/// Counts bad frames; the one after `tolerated` closes the connection.
#[derive(Debug)]
pub struct BadFrameCounter {
    tolerated: u32,
    seen: u32,
}

impl BadFrameCounter {
    /// A counter allowing `tolerated` bad frames.
    pub fn new(tolerated: u32) -> Self {
        Self { tolerated, seen: 0 }
    }

    /// Records one bad frame; true when the connection must now be closed.
    pub fn record(&mut self) -> bool {
        self.seen += 1;
        self.seen > self.tolerated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3);
        bucket.refilled_at = start;
        assert!((0..3).all(|_| bucket.try_take_at(start)));
        assert!(!bucket.try_take_at(start));
        assert!(bucket.try_take_at(start + Duration::from_millis(100)));
        assert!(!bucket.try_take_at(start + Duration::from_millis(100)));
    }

    #[test]
    fn bad_frames_close_after_the_tolerated_count() {
        let mut counter = BadFrameCounter::new(2);
        assert!(!counter.record());
        assert!(!counter.record());
        assert!(counter.record());
    }
}
