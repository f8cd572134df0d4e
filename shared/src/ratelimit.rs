//! A token bucket: `rate` tokens per second, holding at most `burst`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl State {
    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate_per_sec).min(self.burst);
        self.last = now;
    }
}

impl TokenBucket {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        Self { state: Mutex::new(State { rate_per_sec, burst, tokens: burst, last: Instant::now() }) }
    }

    /// Takes a token if one is available now; otherwise says how long until one will be.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.refill(Instant::now());
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - state.tokens) / state.rate_per_sec))
        }
    }

    /// Changes the rate from now on, keeping what was earned so far (never above the new burst):
    /// a change is not a fresh burst.
    pub fn set_rate(&self, rate_per_sec: f64, burst: f64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.refill(Instant::now());
        state.rate_per_sec = rate_per_sec;
        state.burst = burst;
        state.tokens = state.tokens.min(burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refuses_until_refilled() {
        let bucket = TokenBucket::new(1.0, 3.0);
        assert!((0..3).all(|_| bucket.try_take().is_ok()));
        let wait = bucket.try_take().unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn a_new_rate_keeps_the_tokens_earned_and_no_more_than_the_new_burst() {
        let bucket = TokenBucket::new(1.0, 3.0);
        bucket.set_rate(0.5, 1.0);
        assert!(bucket.try_take().is_ok(), "one token kept of three");
        let wait = bucket.try_take().unwrap_err();
        assert!(wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2), "at the new rate: {wait:?}");
    }
}
