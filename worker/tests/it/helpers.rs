use std::time::Duration;

use futures_util::StreamExt as _;
use plivo_sim::story::StoryWeights;
use plivo_sim::{SimConfig, Simulator};
use shared::amqp::contracts::CallbackEvent;
use shared::amqp::headers::json_message;
use shared::amqp::{Publisher, Stream};
use shared::config::WorkerSettings;
use shared::testing::{TEST_AUTH_TOKEN, TestBroker, base_worker_settings};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub struct TestWorker {
    pub broker: TestBroker,
    pub publisher: Publisher,
    pub settings: WorkerSettings,
    publisher_shutdown: CancellationToken,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A status callback as the ingress would queue it.
pub fn callback(message_uuid: &str, status: &str, sequence: u32) -> CallbackEvent {
    let sequence = sequence.to_string();
    shared::testing::callback_event(&[
        ("MessageUUID", message_uuid),
        ("Status", status),
        ("To", "14155550199"),
        ("From", "14155550123"),
        ("Units", "1"),
        ("TotalAmount", "0.00650"),
        ("TotalRate", "0.00650"),
        ("Sequence", &sequence),
        ("ErrorCode", if status == "undelivered" { "30" } else { "" }),
    ])
}

pub fn settings_for(broker: &TestBroker) -> WorkerSettings {
    let mut settings = base_worker_settings();
    settings.amqp = broker.amqp_settings();
    settings.worker.batch_wait_ms = 10;
    settings
}

/// Starts the worker in-process on `pool` with a fresh topology.
pub async fn start_worker(pool: &PgPool, adjust: impl FnOnce(&mut WorkerSettings)) -> TestWorker {
    start_worker_on(TestBroker::new().await, pool.clone(), adjust).await
}

/// Worker logs in test output when TEST_LOG is set (e.g. TEST_LOG=debug).
fn init_test_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
    });
}

pub async fn start_worker_on(broker: TestBroker, pool: PgPool, adjust: impl FnOnce(&mut WorkerSettings)) -> TestWorker {
    init_test_logs();
    let mut settings = settings_for(&broker);
    adjust(&mut settings);
    let (publisher, publisher_shutdown) = publisher_for(&settings).await;
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker::run_with(settings.clone(), pool, None, shutdown.clone()));
    TestWorker { broker, publisher, settings, publisher_shutdown, shutdown, handle: Some(handle) }
}

pub async fn publisher_for(settings: &WorkerSettings) -> (Publisher, CancellationToken) {
    let shutdown = CancellationToken::new();
    let topology = shared::amqp::Topology::from_settings(&settings.amqp);
    let publisher = Publisher::start(settings.amqp.clone(), topology, "test publisher", shutdown.clone());
    assert!(publisher.wait_ready(Duration::from_secs(10)).await, "test publisher connects");
    (publisher, shutdown)
}

pub async fn publish_events(publisher: &Publisher, events: &[CallbackEvent]) {
    futures_util::stream::iter(events)
        .for_each_concurrent(200, |event| async move {
            publish_raw(publisher, &serde_json::to_vec(event).unwrap(), CallbackEvent::SCHEMA, CallbackEvent::VERSION)
                .await
        })
        .await;
}

pub async fn publish_raw(publisher: &Publisher, payload: &[u8], schema: &str, version: u32) {
    let properties = json_message(schema, version, &Uuid::now_v7().to_string(), Default::default());
    publisher.publish(Stream::Status.routing_key(), payload, properties).await.expect("test publish confirmed");
}

impl TestWorker {
    pub async fn publish(&self, events: &[CallbackEvent]) {
        publish_events(&self.publisher, events).await;
    }

    /// Stops the worker gracefully and returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let result = self.handle.take().expect("running").await.expect("worker task");
        self.publisher_shutdown.cancel();
        result
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.publisher_shutdown.cancel();
    }
}

pub async fn count_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM message_events"#).fetch_one(pool).await.unwrap()
}

/// Polls until `message_events` holds `expected` rows; panics after `timeout`.
pub async fn wait_for_events(pool: &PgPool, expected: i64, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = count_events(pool).await;
        if n == expected {
            return;
        }
        assert!(n < expected, "more events than expected: {n} > {expected}");
        assert!(tokio::time::Instant::now() < deadline, "timed out with {n} of {expected} events");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (status, error_code) of a message by Plivo MessageUUID.
pub async fn state_of(pool: &PgPool, message_uuid: &str) -> (String, Option<i32>) {
    let row = sqlx::query!("SELECT status, error_code FROM messages WHERE message_uuid = $1", message_uuid)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("message {message_uuid}: {e}"));
    (row.status, row.error_code)
}

/// A deterministic shuffle (no RNG crate needed for a fixed test order).
pub fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        items.swap(i, (seed >> 33) as usize % (i + 1));
    }
}

/// The story of message `i` in the bulk tests: queued, sent, then delivered or undelivered; two
/// of the callbacks arrive twice (as Plivo retries would).
pub fn story(i: usize) -> (String, Vec<CallbackEvent>, &'static str) {
    let uuid = format!("bulk-{i:05}");
    let last = if i.is_multiple_of(4) { "undelivered" } else { "delivered" };
    let events = vec![
        callback(&uuid, "queued", 1),
        callback(&uuid, "sent", 2),
        callback(&uuid, last, 3),
        callback(&uuid, "sent", 2),
        callback(&uuid, last, 3),
    ];
    (uuid, events, last)
}

/// Asserts every bulk message ended as its story says.
pub async fn assert_stories(pool: &PgPool, messages: usize) {
    let rows = sqlx::query!(r#"SELECT message_uuid AS "message_uuid!", status, error_code FROM messages"#)
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), messages, "one row per message");
    for row in rows {
        let i: usize = row.message_uuid.trim_start_matches("bulk-").parse().unwrap();
        let (_, _, last) = story(i);
        assert_eq!(row.status, last, "{}", row.message_uuid);
        assert_eq!(row.error_code, (last == "undelivered").then_some(30), "{}", row.message_uuid);
    }
}

pub const TEST_AUTH_ID: &str = "MATESTACCOUNT000000001";

/// A valid send job to a US number.
pub fn send_job(text: &str) -> shared::amqp::contracts::SendJob {
    shared::amqp::contracts::SendJob {
        id: Uuid::now_v7(),
        to: "+14155552671".into(),
        text: text.into(),
        from: Some("+14155550100".into()),
        powerpack_uuid: None,
        message_expiry: None,
        metadata: Some(serde_json::json!({"order": 42}).as_object().unwrap().clone()),
        callback: None,
    }
}

pub async fn publish_job(publisher: &Publisher, job: &shared::amqp::contracts::SendJob) {
    use shared::amqp::contracts::SendJob;
    let properties = json_message(SendJob::SCHEMA, SendJob::VERSION, &job.id.to_string(), Default::default());
    publisher
        .publish(Stream::Send.routing_key(), &serde_json::to_vec(job).unwrap(), properties)
        .await
        .expect("job publish confirmed");
}

/// The Plivo simulator with the test account's credentials: it accepts every message (unless a
/// test scripts otherwise) and plays a short delivered story to the callback URL.
pub async fn start_plivo() -> Simulator {
    Simulator::start(SimConfig {
        auth_id: TEST_AUTH_ID.into(),
        auth_token: TEST_AUTH_TOKEN.into(),
        rate_limit: 10_000.0,
        weights: StoryWeights { delivered: 1, undelivered: 0, failed: 0, sent_only: 0 },
        latency_ms: 0,
        duplicate_share: 0.0,
        out_of_order_share: 0.0,
        time_scale: 0.001,
    })
    .await
}

/// Where the simulator sends the delivery callbacks of these tests: nothing listens there, so
/// each attempt fails at once (a test domain would hold a DNS lookup, and the test's end, for
/// seconds).
pub const CALLBACK_BASE_URL: &str = "http://127.0.0.1:9";

/// Points the worker at the simulator and makes retries quick.
pub fn use_plivo(settings: &mut WorkerSettings, plivo: &Simulator) {
    settings.plivo.api_base_url = plivo.url.clone();
    settings.http.public_base_url = CALLBACK_BASE_URL.into();
    settings.plivo.auth_id = TEST_AUTH_ID.into();
    settings.plivo.request_timeout_ms = 2000;
    settings.sending.sender_rate_per_second = 1000.0;
    settings.sending.sender_burst = 1000;
}

/// Polls a message's status until it is `expected`; panics after 20 s.
pub async fn wait_for_status(pool: &PgPool, id: Uuid, expected: &str) -> (String, Option<String>) {
    for _ in 0..200 {
        let row = sqlx::query!("SELECT status, status_reason FROM messages WHERE id = $1", id)
            .fetch_optional(pool)
            .await
            .unwrap();
        if let Some(row) = row
            && row.status == expected
        {
            return (row.status, row.status_reason);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = sqlx::query_scalar!("SELECT status FROM messages WHERE id = $1", id).fetch_optional(pool).await.unwrap();
    panic!("message {id} did not reach {expected} (now {now:?})");
}
