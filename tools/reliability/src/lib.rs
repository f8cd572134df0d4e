//! The reliability harness: the whole system (ingress, worker, Plivo simulator) against the
//! real RabbitMQ and PostgreSQL, with steady traffic, one injected fault, and exact counts
//! afterwards. Scenarios live in `tests/suite.rs`; `SMSFLOW_RELIABILITY=long` runs the long
//! profile (more traffic, the full outage durations).
//!
//! Faults are injected from outside the services, as in production: the broker and the
//! database sit behind TCP proxies that can cut every connection, the simulator plays Plivo's
//! failures, and a service is stopped either gracefully (its shutdown signal) or abruptly (its
//! task aborted: connections drop, nothing is flushed, like SIGKILL from the broker's and the
//! database's point of view).
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::time::Duration;

use plivo_sim::{SimConfig, SimMessage};
use shared::testing::TEST_AUTH_TOKEN;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub mod events;
pub mod report;
pub mod stack;
pub mod system;
pub mod traffic;

pub use report::Outcome;
pub use shared::testing::Probe;
pub use stack::{API_TOKEN, SIM_AUTH_ID, Stack};
pub use system::{BrokerStopped, System, rabbitmqctl};
pub use traffic::{Callbacks, Traffic};

/// Short (CI) or long (on demand) profile.
pub fn long_profile() -> bool {
    std::env::var("SMSFLOW_RELIABILITY").is_ok_and(|v| v == "long")
}

/// Runs one scenario on a multi-threaded runtime of its own, as the services run in
/// production, against the fresh database `#[sqlx::test]` created. (sqlx's test runtime has a
/// single thread: there, one blocking call anywhere in the system under test stops every
/// timer and the scenario hangs instead of failing.) The scenario must finish within a bound,
/// so a stuck scenario fails with its progress lines instead of holding the run.
pub async fn run_scenario<F, Fut>(database: PgConnectOptions, scenario: F)
where
    F: FnOnce(PgPool) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let limit = Duration::from_secs(if long_profile() { 1200 } else { 300 });
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the scenario");
        runtime.block_on(async move {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect_with(database)
                .await
                .expect("connect to the scenario's database");
            if tokio::time::timeout(limit, scenario(pool)).await.is_err() {
                panic!("the scenario did not finish within {} s (see its progress lines)", limit.as_secs());
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(5));
    });
    let joined = tokio::task::spawn_blocking(move || thread.join()).await.expect("join the scenario thread");
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
}

/// Distinct callbacks (MessageUUID, Sequence) the ingress answered 2xx.
fn acknowledged(truth: &[SimMessage]) -> HashSet<(String, i64)> {
    truth
        .iter()
        .flat_map(|m| {
            m.callbacks.iter().filter(|c| c.acknowledged).map(|c| (m.message_uuid.clone(), i64::from(c.sequence)))
        })
        .collect()
}

/// The simulator as the suite uses it: Plivo's stories and retry schedule, compressed.
pub fn sim_config() -> SimConfig {
    SimConfig {
        auth_id: SIM_AUTH_ID.into(),
        auth_token: TEST_AUTH_TOKEN.into(),
        rate_limit: 5000.0,
        weights: plivo_sim::story::StoryWeights { delivered: 80, undelivered: 8, failed: 6, sent_only: 6 },
        latency_ms: 1000,
        duplicate_share: 0.05,
        out_of_order_share: 0.05,
        // Plivo's retries after 60/120/240 s become 6/12/24 s: a 20-30 s outage is survived.
        time_scale: 0.1,
    }
}
