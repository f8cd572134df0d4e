//! Outbound rate per sender: a token bucket each, waited on before every Plivo call.
//!
//! The configured rate is the sender's rate across every worker: each worker takes its share,
//! the rate divided by the number of consumers on the send queue (one per worker), which the
//! broker reports and `monitor::share_send_rate` keeps up to date.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::ratelimit::TokenBucket;

pub struct SenderRateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Shared>,
}

struct Shared {
    /// How many workers share the configured rate.
    workers: u32,
    /// Per sender, with when it was last used: senders come from jobs, so the map is bounded by
    /// dropping idle buckets once it holds `MAX_BUCKETS` (an idle bucket is full anyway).
    buckets: HashMap<String, (Arc<TokenBucket>, Instant)>,
    /// The earliest time of the next sweep for idle buckets: a full map of busy senders is
    /// swept at most once per `SWEEP_EVERY`, not on every new sender.
    next_sweep: Instant,
}

const MAX_BUCKETS: usize = 10_000;
const IDLE: Duration = Duration::from_secs(60);
const SWEEP_EVERY: Duration = Duration::from_secs(5);

impl SenderRateLimiter {
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        Self {
            rate: rate_per_second,
            burst: burst.into(),
            state: Mutex::new(Shared { workers: 1, buckets: HashMap::new(), next_sweep: Instant::now() }),
        }
    }

    /// Splits the configured rate (and burst) between `workers` workers from now on. The
    /// buckets keep what they hold (capped): a change of share is not a fresh burst.
    pub fn share_between(&self, workers: u32) {
        let workers = workers.max(1);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.workers != workers {
            tracing::info!(workers, "sender rates shared between {workers} worker(s)");
            state.workers = workers;
            let (rate, burst) = self.share(workers);
            for (bucket, _) in state.buckets.values() {
                bucket.set_rate(rate, burst);
            }
        }
    }

    fn share(&self, workers: u32) -> (f64, f64) {
        let share = f64::from(workers);
        (self.rate / share, (self.burst / share).max(1.0))
    }

    /// Waits until `sender` may send one more message; returns how long it waited.
    pub async fn acquire(&self, sender: &str) -> Duration {
        let bucket = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (rate, burst) = self.share(state.workers);
            let now = Instant::now();
            if state.buckets.len() >= MAX_BUCKETS && now >= state.next_sweep && !state.buckets.contains_key(sender) {
                state.buckets.retain(|_, (_, used)| now.duration_since(*used) < IDLE);
                state.next_sweep = now + SWEEP_EVERY;
            }
            let entry = state
                .buckets
                .entry(sender.to_owned())
                .or_insert_with(|| (Arc::new(TokenBucket::new(rate, burst)), now));
            entry.1 = now;
            entry.0.clone()
        };
        let started = tokio::time::Instant::now();
        while let Err(wait) = bucket.try_take() {
            tokio::time::sleep(wait).await;
        }
        started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_map_of_senders_stays_bounded() {
        let limiter = SenderRateLimiter::new(1000.0, 10);
        for i in 0..MAX_BUCKETS + 500 {
            limiter.acquire(&format!("sender-{i}")).await;
        }
        // Nothing is idle yet, so none could go: the cap is reached and passed only by the
        // senders active within the last minute (and swept for idle ones once, not per sender).
        let held = limiter.state.lock().unwrap().buckets.len();
        assert_eq!(held, MAX_BUCKETS + 500);
        {
            let mut state = limiter.state.lock().unwrap();
            let long_ago = Instant::now() - IDLE * 2;
            for (_, used) in state.buckets.values_mut() {
                *used = long_ago;
            }
            // The sweep done at the cap is a while ago too.
            state.next_sweep = Instant::now();
        }
        limiter.acquire("a-new-sender").await;
        assert_eq!(limiter.state.lock().unwrap().buckets.len(), 1, "idle buckets were dropped");
    }
}
