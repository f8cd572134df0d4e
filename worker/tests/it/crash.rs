//! The worker binary killed with SIGKILL — mid-batch, and during a Plivo call — and restarted:
//! the final state equals a clean run, and no job is sent twice. Then SIGTERM: exit 0.

use std::time::Duration;

use plivo_sim::ScriptedAnswer;
use shared::testing::{TEST_AUTH_TOKEN, TestBroker};
use sqlx::PgPool;

use crate::helpers::{
    TEST_AUTH_ID, assert_stories, count_events, publish_events, publish_job, publisher_for, send_job, settings_for,
    start_plivo, start_worker_on, story, use_plivo, wait_for_events, wait_for_status,
};
use shared::testing::database_url;

fn spawn_worker(broker: &TestBroker, database_url: &str) -> tokio::process::Child {
    spawn_worker_with(broker, database_url, &[])
}

fn spawn_worker_with(broker: &TestBroker, database_url: &str, extra: &[(&str, &str)]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_smsflow-worker"))
        .env("SMSFLOW_PLIVO__AUTH_ID", TEST_AUTH_ID)
        .envs(extra.iter().copied())
        .env("SMSFLOW_PLIVO__AUTH_TOKEN", TEST_AUTH_TOKEN)
        .env("SMSFLOW_DATABASE__URL", database_url)
        .envs(broker.amqp_env())
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

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_worker_killed_during_the_plivo_call_never_calls_plivo_again_for_that_job(pool: PgPool) {
    let plivo = start_plivo().await;
    plivo.script(&[ScriptedAnswer { delay_ms: 10_000, ..ScriptedAnswer::accept() }]).await;
    let broker = TestBroker::new().await;
    let settings = settings_for(&broker);
    let (publisher, _publisher_shutdown) = publisher_for(&settings).await;
    let job = send_job("killed mid-call");
    publish_job(&publisher, &job).await;

    let plivo_url = plivo.url.clone();
    let mut first = spawn_worker_with(
        &broker,
        &database_url(&pool),
        &[
            ("SMSFLOW_PLIVO__API_BASE_URL", plivo_url.as_str()),
            ("SMSFLOW_PLIVO__AUTH_ID", TEST_AUTH_ID),
            ("SMSFLOW_PLIVO__REQUEST_TIMEOUT_MS", "30000"),
        ],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while plivo.requests().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the worker never called Plivo");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.start_kill().unwrap(); // SIGKILL while Plivo has the request and we have no answer
    first.wait().await.unwrap();

    let restarted = start_worker_on(broker, pool.clone(), |s| use_plivo(s, &plivo)).await;
    let (_, reason) = wait_for_status(&pool, job.id, "unknown").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert!(reason.unwrap_or_default().contains("not resent"));
    assert_eq!(plivo.requests().await.len(), 1, "Plivo was called exactly once");
    restarted.stop().await.unwrap();
}
