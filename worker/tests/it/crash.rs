//! The worker binary killed with SIGKILL mid-batch and restarted: the final state equals a
//! clean run. Then SIGTERM: a graceful exit 0.

use std::time::Duration;

use shared::testing::TestBroker;
use sqlx::PgPool;

use crate::helpers::{
    assert_stories, count_events, publish_events, publisher_for, settings_for, story, wait_for_events,
};
use crate::infra::database_url;

fn spawn_worker(broker: &TestBroker, database_url: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_smsflow-worker"))
        .env("SMSFLOW_PLIVO__AUTH_TOKEN", "test-token")
        .env("SMSFLOW_DATABASE__URL", database_url)
        .env("SMSFLOW_AMQP__URL", shared::testing::amqp_url())
        .env("SMSFLOW_AMQP__PREFIX", &broker.prefix)
        .env("SMSFLOW_AMQP__DELIVERY_LIMIT", "5")
        .env("SMSFLOW_AMQP__RETRY_DELAYS_MS", "[200, 400]")
        .env("SMSFLOW_WORKER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("SMSFLOW_WORKER__BATCH_SIZE", "100")
        .env("SMSFLOW_AMQP__PREFETCH", "200")
        .env("SMSFLOW_TELEMETRY__LOG_FILTER", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("worker binary starts")
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn sigkill_mid_batch_then_restart_ends_like_a_clean_run(pool: PgPool) {
    let broker = TestBroker::new().await;
    let settings = settings_for(&broker);
    let (publisher, _publisher_shutdown) = publisher_for(&settings).await;
    let messages = 1000;
    let events: Vec<_> = (0..messages).flat_map(|i| story(i).1).collect();
    publish_events(&publisher, &events).await;
    let url = database_url(&pool);

    let mut first = spawn_worker(&broker, &url);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = count_events(&pool).await;
        if n > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "worker made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    let at_kill = count_events(&pool).await;
    assert!(at_kill < (messages * 3) as i64, "killed before the end ({at_kill} events)");

    let mut second = spawn_worker(&broker, &url);
    wait_for_events(&pool, (messages * 3) as i64, Duration::from_secs(120)).await;
    assert_stories(&pool, messages).await;

    let pid = second.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), second.wait()).await.expect("exits").unwrap();
    assert_eq!(status.code(), Some(0), "graceful exit on SIGTERM");
}
