//! The event relay: publishes the transactional outbox (`event_outbox`, written by triggers in
//! the same transaction as each change) to the `{prefix}.events` topic exchange, with publisher
//! confirms, and deletes what the broker confirmed. At least once: a crash between the confirm
//! and the delete publishes those events again, with the same event id.
//!
//! One relay is active per database (a session advisory lock held on its own connection, which
//! also runs every statement of the relay: a relay that lost the lock can no longer delete). It
//! reads in id order, and publishes one subject's events (a message, a number) one after the
//! other, so a subject's events leave in the order their changes committed; different
//! subjects' events are published concurrently.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use shared::amqp::contracts::{Event, WebhookJob};
use shared::amqp::headers::json_message;
use shared::amqp::{PublishError, Publisher, Stream, Topology};
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Connection as _, PgPool};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The advisory lock key of the relay's leadership (any constant unique in the database).
pub const RELAY_LOCK: i64 = 0x736d_7366_6c6f_7701;
const NOTIFY_CHANNEL: &str = "smsflow_event_outbox";

/// How the relay runs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Events read and published per round.
    pub batch_size: i64,
    /// How often an idle relay looks without being notified, and a standby tries to lead.
    pub poll_interval: Duration,
}

impl From<&shared::config::WorkerTuning> for RelaySettings {
    fn from(tuning: &shared::config::WorkerTuning) -> Self {
        Self {
            batch_size: tuning.event_batch_size.into(),
            poll_interval: Duration::from_millis(tuning.event_poll_interval_ms),
        }
    }
}

/// One row of the outbox.
#[derive(Debug, sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    event_id: Uuid,
    routing_key: String,
    subject: String,
    data: serde_json::Value,
    traceparent: Option<String>,
    occurred_at: OffsetDateTime,
    created_at: OffsetDateTime,
    /// The message's callback URL, for a status event of a message that has one.
    webhook_url: Option<String>,
}

/// Relays until `shutdown`: leads when it can, stands by when another worker leads.
pub async fn run(
    pool: PgPool,
    publisher: Publisher,
    topology: Topology,
    settings: RelaySettings,
    shutdown: CancellationToken,
) {
    let mut backoff = shared::amqp::reconnect_backoff();
    while !shutdown.is_cancelled() {
        match lead(&pool, &publisher, &topology, &settings, &shutdown).await {
            Ok(Leadership::Held) => backoff = shared::amqp::reconnect_backoff(),
            Ok(Leadership::Elsewhere) => {
                metrics::gauge!("smsflow_event_relay_leader").set(0.0);
                sleep_or_shutdown(settings.poll_interval, &shutdown).await;
            }
            Err(error) => {
                metrics::gauge!("smsflow_event_relay_leader").set(0.0);
                tracing::warn!(error = %error, "event relay interrupted; retrying");
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                sleep_or_shutdown(wait, &shutdown).await;
            }
        }
    }
}

enum Leadership {
    /// This relay led until shutdown.
    Held,
    /// Another relay leads.
    Elsewhere,
}

async fn lead(
    pool: &PgPool,
    publisher: &Publisher,
    topology: &Topology,
    settings: &RelaySettings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Leadership> {
    // A connection of its own: the session lock lives and dies with it.
    let mut connection = pool.acquire().await?.detach();
    let leading: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(RELAY_LOCK).fetch_one(&mut connection).await?;
    if !leading {
        let _ = connection.close().await;
        return Ok(Leadership::Elsewhere);
    }
    metrics::gauge!("smsflow_event_relay_leader").set(1.0);
    tracing::info!("event relay leading");
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    let mut last_gauges = tokio::time::Instant::now() - settings.poll_interval;
    loop {
        if shutdown.is_cancelled() {
            let _ = connection.close().await;
            return Ok(Leadership::Held);
        }
        if last_gauges.elapsed() >= settings.poll_interval {
            record_depth(&mut connection).await?;
            last_gauges = tokio::time::Instant::now();
        }
        let relayed = relay_once(&mut connection, publisher, topology, settings.batch_size).await?;
        if relayed < settings.batch_size as usize {
            // Caught up: wait for a commit's notification, or poll.
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = tokio::time::timeout(settings.poll_interval, listener.recv()) => {}
            }
        }
    }
}

/// Publishes one batch; returns how many events it read.
async fn relay_once(
    connection: &mut PgConnection,
    publisher: &Publisher,
    topology: &Topology,
    batch_size: i64,
) -> anyhow::Result<usize> {
    // Both statements are planned for each round, never from a cached generic plan: one made
    // while the outbox was nearly empty scans and sorts the whole table (and searches the id
    // array per row) every round, which would slow the relay most when a backlog builds up
    // (see the status batch's MessageUUID lookup in worker::storage).
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT id, event_id, routing_key, subject, data, traceparent, occurred_at, created_at, webhook_url
         FROM event_outbox ORDER BY id LIMIT $1",
    )
    .bind(batch_size)
    .persistent(false)
    .fetch_all(&mut *connection)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let read = rows.len();
    let mut subjects: BTreeMap<&str, Vec<&OutboxRow>> = BTreeMap::new();
    for row in &rows {
        subjects.entry(row.subject.as_str()).or_default().push(row);
    }
    // Each subject in order; a failure stops that subject (its later events wait for the next
    // round, behind the one that failed).
    let published = join_all(subjects.into_values().map(|events| async move {
        let mut confirmed = Vec::with_capacity(events.len());
        for row in events {
            match publish(publisher, topology, row).await {
                Ok(()) => confirmed.push(row.id),
                Err(error) => {
                    tracing::warn!(error = %error, event_id = %row.event_id, "event not published; retrying");
                    return (confirmed, Some(error));
                }
            }
        }
        (confirmed, None)
    }))
    .await;
    let mut confirmed = Vec::with_capacity(read);
    let mut failure = None;
    for (ids, error) in published {
        confirmed.extend(ids);
        failure = failure.or(error);
    }
    sqlx::query("DELETE FROM event_outbox WHERE id = ANY($1)")
        .bind(&confirmed)
        .persistent(false)
        .execute(&mut *connection)
        .await?;
    metrics::counter!("smsflow_events_published_total").increment(confirmed.len() as u64);
    match failure {
        None => Ok(read),
        Some(error) => Err(error.into()),
    }
}

/// Publishes one event, and its webhook job when its message has a callback URL: both
/// confirmed, or an error (and the row stays for the next round; a second copy of either then
/// carries the same event id).
async fn publish(publisher: &Publisher, topology: &Topology, row: &OutboxRow) -> Result<(), PublishError> {
    let event = Event::new(row.event_id, &row.routing_key, row.occurred_at, row.created_at, row.data.clone());
    let payload = serde_json::to_vec(&event).expect("an event serializes");
    let properties = |schema, version| {
        let mut headers = lapin::types::FieldTable::default();
        if let Some(traceparent) = &row.traceparent {
            headers.insert("traceparent".into(), lapin::types::AMQPValue::LongString(traceparent.as_str().into()));
        }
        json_message(schema, version, &row.event_id.to_string(), headers)
    };
    let properties_of_event = properties(Event::SCHEMA, Event::VERSION);
    // No service subscribed to this kind of event: the broker drops it, nothing to deliver.
    let events = topology.events_exchange();
    publisher.publish_with(&events, &row.routing_key, &payload, properties_of_event, false).await?;
    let (Some(url), Ok(message_id)) = (&row.webhook_url, row.subject.parse::<Uuid>()) else {
        return Ok(());
    };
    let job = serde_json::to_vec(&WebhookJob::new(url.clone(), message_id, event)).expect("a webhook job serializes");
    let properties_of_job = properties(WebhookJob::SCHEMA, WebhookJob::VERSION);
    publisher.publish_to(&topology.exchange(), Stream::Webhook.routing_key(), &job, properties_of_job).await
}

/// `smsflow_event_outbox_depth` and `smsflow_event_outbox_oldest_seconds`.
async fn record_depth(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    let (depth, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at))::float8 FROM event_outbox",
    )
    .fetch_one(&mut *connection)
    .await?;
    metrics::gauge!("smsflow_event_outbox_depth").set(depth as f64);
    metrics::gauge!("smsflow_event_outbox_oldest_seconds").set(oldest.unwrap_or(0.0));
    Ok(())
}

async fn sleep_or_shutdown(wait: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(wait) => {}
    }
}
