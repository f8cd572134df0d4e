//! What a service subscribed to `{prefix}.events` must have received: for every message, each
//! committed status change once (by event id), the chain linked by `previous_status` from
//! `accepted` (for a message sent as a job; else the status its first callback created) to
//! the status in the database.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt as _;
use shared::amqp::contracts::Event;
use sqlx::PgPool;

/// How the subscriber's copy may differ from one event per change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    /// No relay crashed: every event arrives exactly once.
    Never,
    /// A relay crashed: an event may arrive again, always with its id (and the same content).
    SameIdOnly,
}

/// Waits for the outbox to drain, reads everything the subscriber got, and checks every
/// message's chain against the database. Returns how many duplicates arrived.
pub async fn check_status_events(pool: &PgPool, consumer: &mut lapin::Consumer, duplicates: Duplicates) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM event_outbox").fetch_one(pool).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} events still in the outbox after 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (id, status, whether a send job created it: then its chain starts at `accepted`)
    let rows: Vec<(uuid::Uuid, String, bool)> =
        sqlx::query_as("SELECT id, status, accepted_at IS NOT NULL FROM messages WHERE status <> 'sending'")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut chains: HashMap<String, Vec<Event>> = HashMap::new();
    let mut seen: HashMap<uuid::Uuid, Vec<u8>> = HashMap::new();
    let mut repeated = 0;
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
        let data = delivery.unwrap().data;
        let event: Event = serde_json::from_slice(&data).unwrap();
        if !event.kind.starts_with("message.status.") {
            continue;
        }
        if let Some(first) = seen.get(&event.id) {
            assert_eq!(duplicates, Duplicates::SameIdOnly, "event {} received twice without a relay crash", event.id);
            assert_eq!(first, &data, "a redelivered event {} is the same event", event.id);
            repeated += 1;
            continue;
        }
        seen.insert(event.id, data);
        chains.entry(event.data["message_id"].as_str().unwrap().to_owned()).or_default().push(event);
    }
    let mut broken = Vec::new();
    for (id, status, from_job) in &rows {
        let chain = chains.get(&id.to_string()).map(Vec::as_slice).unwrap_or_default();
        let statuses: Vec<&str> = chain.iter().map(|e| e.data["status"].as_str().unwrap_or("?")).collect();
        let linked = chain.iter().enumerate().all(|(i, e)| {
            let previous = e.data["previous_status"].as_str();
            previous == i.checked_sub(1).map(|p| statuses[p]) && e.kind == format!("message.status.{}", statuses[i])
        });
        let start_ok = !from_job || statuses.first() == Some(&"accepted");
        if !linked || !start_ok || statuses.last() != Some(&status.as_str()) {
            broken.push(format!("{id}: database {status}, events {statuses:?}"));
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {} messages' events disagree with the database:\n{}",
        broken.len(),
        rows.len(),
        broken[..broken.len().min(20)].join("\n")
    );
    let messages: HashSet<String> = rows.iter().map(|(id, ..)| id.to_string()).collect();
    let strays: Vec<&String> = chains.keys().filter(|id| !messages.contains(*id)).collect();
    assert!(strays.is_empty(), "events for messages not in the database: {strays:?}");
    repeated
}
