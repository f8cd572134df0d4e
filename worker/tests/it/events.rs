//! Status events out: the outbox the triggers fill, and the relay that publishes it to the
//! `{prefix}.events` exchange. Committed events survive a worker that died before publishing
//! them, and a relay killed mid-batch publishes again only what it had not deleted, under the
//! same event ids.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt as _;
use shared::amqp::Publisher;
use shared::amqp::contracts::Event;
use shared::testing::TestBroker;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use worker::events::RelaySettings;
use worker::status::event::{StatusUpdate, parse};
use worker::storage::apply_status_batch;

/// Status callbacks for `messages` messages, each queued → sent → delivered: one batch per
/// status, so that each is a change of its own (within one batch only the winner is written).
fn batches(messages: usize) -> Vec<Vec<StatusUpdate>> {
    let uuids: Vec<String> = (0..messages).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    ["queued", "sent", "delivered"]
        .iter()
        .enumerate()
        .map(|(sequence, status)| {
            let callback = |uuid: &String| crate::helpers::callback(uuid, status, sequence as u32 + 1);
            uuids.iter().map(|uuid| parse(&serde_json::to_vec(&callback(uuid)).unwrap()).unwrap()).collect()
        })
        .collect()
}

async fn outbox_ids(pool: &PgPool) -> Vec<(uuid::Uuid, String)> {
    sqlx::query_as("SELECT event_id, subject FROM event_outbox ORDER BY id").fetch_all(pool).await.unwrap()
}

/// A relay, as a worker runs it, until `shutdown` (or until its task is dropped: a crash).
fn spawn_relay(
    pool: &PgPool,
    publisher: &Publisher,
    broker: &TestBroker,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let settings = RelaySettings { batch_size: 200, poll_interval: Duration::from_millis(50) };
    tokio::spawn(worker::events::run(pool.clone(), publisher.clone(), broker.topology.clone(), settings, shutdown))
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn committed_events_are_published_after_a_crash_and_duplicates_keep_their_id(pool: PgPool) {
    let broker = TestBroker::new().await;
    let settings = crate::helpers::settings_for(&broker);
    let (publisher, publisher_shutdown) = crate::helpers::publisher_for(&settings).await;
    let mut consumer = broker.subscribe_to_events("#").await;

    // The worker committed these changes and died before its relay published any of them.
    for batch in batches(400) {
        apply_status_batch(&pool, &batch).await.unwrap();
    }
    let committed = outbox_ids(&pool).await;
    // Per message: queued, sent, delivered (the row is created by its first callback).
    assert_eq!(committed.len(), 1200);

    // Relays that crash mid-work (the task dropped: its connection, and its lock, go with it) …
    for lifetime_ms in [15, 40, 80] {
        let relay = spawn_relay(&pool, &publisher, &broker, CancellationToken::new());
        tokio::time::sleep(Duration::from_millis(lifetime_ms)).await;
        relay.abort();
        let _ = relay.await;
    }
    // … and one that is left to finish.
    let shutdown = CancellationToken::new();
    let relay = spawn_relay(&pool, &publisher, &broker, shutdown.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !outbox_ids(&pool).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the outbox did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Everything committed arrived; a duplicate is the same event, byte for byte.
    let mut first_seen: HashMap<uuid::Uuid, Vec<u8>> = HashMap::new();
    let mut order: BTreeMap<String, Vec<uuid::Uuid>> = BTreeMap::new();
    let mut duplicates = 0;
    while first_seen.len() < committed.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("every committed event arrives")
            .unwrap()
            .unwrap();
        let event: Event = serde_json::from_slice(&delivery.data).unwrap();
        match first_seen.get(&event.id) {
            Some(body) => {
                assert_eq!(body, &delivery.data, "a duplicate differs from the first copy");
                duplicates += 1;
            }
            None => {
                first_seen.insert(event.id, delivery.data.clone());
                order.entry(event.data["message_id"].as_str().unwrap().to_owned()).or_default().push(event.id);
            }
        }
    }
    let published: HashSet<uuid::Uuid> = first_seen.keys().copied().collect();
    let expected: HashSet<uuid::Uuid> = committed.iter().map(|(id, _)| *id).collect();
    assert_eq!(published, expected, "exactly the committed events");
    // Per message, first copies arrive in commit order.
    let mut committed_order: BTreeMap<String, Vec<uuid::Uuid>> = BTreeMap::new();
    for (id, subject) in &committed {
        committed_order.entry(subject.clone()).or_default().push(*id);
    }
    assert_eq!(order, committed_order, "per message, events in the order they committed");
    println!("{} events, {duplicates} duplicates after 3 crashed relays", committed.len());

    shutdown.cancel();
    relay.await.unwrap();
    publisher_shutdown.cancel();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn one_relay_leads_and_a_standby_takes_over_when_it_stops(pool: PgPool) {
    let broker = TestBroker::new().await;
    let settings = crate::helpers::settings_for(&broker);
    let (publisher, publisher_shutdown) = crate::helpers::publisher_for(&settings).await;
    let mut consumer = broker.subscribe_to_events("message.status.delivered").await;
    let (first, second) = (CancellationToken::new(), CancellationToken::new());
    let leader = spawn_relay(&pool, &publisher, &broker, first.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let standby = spawn_relay(&pool, &publisher, &broker, second.clone());
    let leaders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(leaders, 1, "one relay holds the lead");

    first.cancel();
    leader.await.unwrap();
    for batch in batches(1) {
        apply_status_batch(&pool, &batch).await.unwrap();
    }
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the standby took over and published")
        .unwrap()
        .unwrap();
    let event: Event = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(
        (event.kind.as_str(), event.data["previous_status"].as_str()),
        ("message.status.delivered", Some("sent"))
    );

    second.cancel();
    standby.await.unwrap();
    publisher_shutdown.cancel();
}
