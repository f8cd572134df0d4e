//! In-process backoff, not the retry ladder (the broker's delay queues): a few quick, jittered,
//! exponentially spaced attempts, never minutes; longer outages go through the delay queues
//! without holding deliveries.

use std::time::Duration;

use backon::ExponentialBuilder;

/// `times` retries starting after `first_delay`, each at most 2 s apart.
pub fn quick(first_delay: Duration, times: usize) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(first_delay)
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(times)
        .with_jitter()
}
