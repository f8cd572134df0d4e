//! Outbound rate per sender: a token bucket each, waited on before every Plivo call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::ratelimit::TokenBucket;

pub struct SenderRateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
}

impl SenderRateLimiter {
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        Self { rate: rate_per_second, burst: burst.into(), buckets: Mutex::new(HashMap::new()) }
    }

    /// Waits until `sender` may send one more message; returns how long it waited.
    pub async fn acquire(&self, sender: &str) -> Duration {
        let bucket = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            buckets
                .entry(sender.to_owned())
                .or_insert_with(|| Arc::new(TokenBucket::new(self.rate, self.burst)))
                .clone()
        };
        let started = tokio::time::Instant::now();
        while let Err(wait) = bucket.try_take() {
            tokio::time::sleep(wait).await;
        }
        started.elapsed()
    }
}
