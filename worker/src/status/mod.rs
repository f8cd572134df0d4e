//! Status events: consume in batches, write once, ack once.

pub mod event;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use backon::Retryable as _;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use shared::amqp::contracts::CallbackEvent;
use shared::amqp::headers::{CALLBACK_COUNT_HEADER, SCHEMA_VERSION_HEADER, get_int};
use shared::amqp::{Stream, Topology};
use shared::config::WorkerSettings;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::broker::{self, DeadReason, Disposition, Rerouter, RetryCause, Session, SessionEnd};
use crate::storage::{self, BatchOutcome};

/// Writes queued status callbacks (their message bodies) as the status pipeline writes a batch,
/// without a broker: the load generator measures the database's ceiling with it. Poison is an
/// error here, not a dead letter.
pub async fn write_payloads<P: AsRef<[u8]>>(pool: &PgPool, payloads: &[P]) -> anyhow::Result<u64> {
    let mut updates: Vec<event::StatusUpdate> = Vec::with_capacity(payloads.len());
    for payload in payloads {
        for item in event::parse_delivery(payload.as_ref(), None)? {
            updates.push(item.update?);
        }
    }
    Ok(storage::apply_status_batch(pool, &updates).await?.events_recorded)
}

/// A readable delivery: the range of its callbacks' updates in the batch, each one's own body
/// when it came in a batch message, and its poison callbacks (body, reason).
struct Readable<'d> {
    delivery: &'d Delivery,
    updates: std::ops::Range<usize>,
    alone: Vec<Option<&'d [u8]>>,
    poison: Vec<(&'d [u8], DeadReason)>,
}

/// The callbacks a delivery holds, as its header says (at least one; the body is read later).
fn callbacks_in(delivery: &Delivery) -> usize {
    let count = get_int(delivery.properties.headers().as_ref(), CALLBACK_COUNT_HEADER).unwrap_or(1);
    usize::try_from(count).unwrap_or(1).clamp(1, shared::config::MAX_CALLBACK_BATCH)
}

/// `smsflow_events_processed_total` and `smsflow_delivery_errors_total` for written updates.
fn count(updates: &[event::StatusUpdate]) {
    for update in updates {
        metrics::counter!("smsflow_events_processed_total", "status" => update.status.as_str()).increment(1);
        if let Some(code) = update.error_code {
            // Bounded: Plivo's error-code table has a few dozen entries.
            metrics::counter!("smsflow_delivery_errors_total", "error_code" => code.to_string()).increment(1);
        }
    }
}

/// Everything the status pipeline needs.
pub struct StatusPipeline {
    pub settings: WorkerSettings,
    pub topology: Topology,
    pub pool: PgPool,
    pub rerouter: Rerouter,
    /// One per status consumer (`worker.status_consumers`): true while it is attached (the
    /// admin server's readiness).
    pub consuming: Vec<Arc<AtomicBool>>,
}

impl StatusPipeline {
    /// Consumes until shutdown, reconnecting as needed, with `worker.status_consumers`
    /// consumers: each writes its own batches, so one commits while another reads and writes
    /// (the status rule does not depend on which batch a callback lands in, nor on their order).
    /// One consumer failing for good stops the others after their batch in hand (they are not
    /// cut off mid-batch), and its error is returned.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stop = shutdown.child_token();
        let consumers = self.consuming.iter().map(|consuming| {
            let (pipeline, stop) = (self.clone(), stop.clone());
            async move {
                let amqp = &pipeline.settings.amqp;
                let result = broker::consume_with_reconnect(
                    amqp,
                    &pipeline.topology,
                    Stream::Status,
                    amqp.prefetch,
                    consuming,
                    &stop,
                    |session| Box::pin(pipeline.clone().consume_batches(session, stop.clone())),
                )
                .await;
                if result.is_err() {
                    stop.cancel();
                }
                result
            }
        });
        futures_util::future::join_all(consumers).await.into_iter().collect()
    }

    async fn consume_batches(self: Arc<Self>, session: &mut Session, shutdown: CancellationToken) -> SessionEnd {
        // Counted in callbacks, not messages: a batch message holds many.
        let batch_size = self.settings.worker.batch_size;
        let batch_wait = Duration::from_millis(self.settings.worker.batch_wait_ms);
        loop {
            let mut batch: Vec<Delivery> = Vec::new();
            let mut callbacks = 0;
            let mut stream_end = None;
            let first = tokio::select! {
                () = shutdown.cancelled() => return SessionEnd::Shutdown,
                next = session.next_delivery() => next,
            };
            match first {
                Ok(delivery) => {
                    callbacks += callbacks_in(&delivery);
                    batch.push(delivery);
                }
                Err(e) => return SessionEnd::Lost(e),
            }
            let deadline = Instant::now() + batch_wait;
            while callbacks < batch_size && stream_end.is_none() {
                tokio::select! {
                    next = session.next_delivery() => match next {
                        Ok(delivery) => {
                            callbacks += callbacks_in(&delivery);
                            batch.push(delivery);
                        }
                        Err(e) => stream_end = Some(e),
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    // Finish the batch in hand now rather than waiting out the window.
                    () = shutdown.cancelled() => break,
                }
            }
            let span = broker::consumer_span(
                "process",
                &self.topology.queue(Stream::Status),
                &batch.iter().collect::<Vec<_>>(),
            );
            if let Err(error) = self.process(&batch).instrument(span).await {
                return SessionEnd::Lost(error);
            }
            if let Some(error) = stream_end {
                return SessionEnd::Lost(error);
            }
            if shutdown.is_cancelled() {
                return SessionEnd::Shutdown;
            }
        }
    }

    /// Writes a batch, then disposes of it: poison to the dead-letter queue (a poison callback
    /// inside a batch message alone, once the rest of its message is written), transient
    /// failures to the retry ladder, one multiple-ack. An error here means nothing was acked:
    /// the broker will redeliver, and every write is idempotent.
    async fn process(&self, batch: &[Delivery]) -> anyhow::Result<()> {
        let mut dispositions = Vec::with_capacity(batch.len());
        let mut readable: Vec<Readable<'_>> = Vec::with_capacity(batch.len());
        let mut updates: Vec<event::StatusUpdate> = Vec::with_capacity(batch.len());
        'deliveries: for delivery in batch {
            let version = get_int(delivery.properties.headers().as_ref(), SCHEMA_VERSION_HEADER);
            let items = match event::parse_delivery(&delivery.data, version.and_then(|v| u32::try_from(v).ok())) {
                Ok(items) => items,
                Err(poison) => {
                    dispositions.push((delivery, Disposition::Dead(poison.into())));
                    continue;
                }
            };
            let first = updates.len();
            let mut parts = Readable { delivery, updates: first..first, alone: Vec::new(), poison: Vec::new() };
            for item in items {
                match (item.update, item.alone) {
                    (Ok(update), alone) => {
                        updates.push(update);
                        parts.alone.push(alone);
                    }
                    (Err(poison), Some(alone)) => parts.poison.push((alone, poison.into())),
                    // A single callback (version 1, the delivery's only item) that is poison:
                    // the whole delivery is.
                    (Err(poison), None) => {
                        dispositions.push((delivery, Disposition::Dead(poison.into())));
                        continue 'deliveries;
                    }
                }
            }
            parts.updates = first..updates.len();
            readable.push(parts);
        }
        metrics::histogram!("smsflow_status_batch_size").record(updates.len() as f64);
        let started = std::time::Instant::now();
        match self.write(&updates).await {
            Ok(outcome) => {
                metrics::histogram!("smsflow_status_batch_commit_seconds").record(started.elapsed().as_secs_f64());
                count(&updates);
                metrics::counter!("smsflow_events_recorded_total").increment(outcome.events_recorded);
                tracing::debug!(events = updates.len(), recorded = outcome.events_recorded, "status batch committed");
                for parts in &readable {
                    self.dead_letter_poison(parts).await?;
                    dispositions.push((parts.delivery, Disposition::Done));
                }
            }
            Err(e) if storage::is_transient(&e) => {
                // Poison inside a message waits with it: it is dead-lettered, once, when the
                // rest of its message is written.
                let cause = RetryCause::DatabaseUnavailable(e.to_string());
                dispositions.extend(readable.iter().map(|parts| (parts.delivery, Disposition::retry(cause.clone()))));
            }
            Err(e) => {
                // Something in the batch is refused by the database: find it, write the rest.
                tracing::warn!(error = %e, "status batch refused; writing its events one by one");
                for mut parts in readable {
                    let disposition = self.write_alone(&mut parts, &updates).await;
                    if disposition == Disposition::Done {
                        self.dead_letter_poison(&parts).await?;
                    }
                    dispositions.push((parts.delivery, disposition));
                }
            }
        }
        self.rerouter.dispose_batch(Stream::Status, dispositions).await
    }

    /// Writes one delivery's callbacks one by one. A callback the database refuses becomes
    /// poison of its own inside a batch message; a single callback's refusal is its delivery's.
    async fn write_alone(&self, parts: &mut Readable<'_>, updates: &[event::StatusUpdate]) -> Disposition {
        for (update, alone) in updates[parts.updates.clone()].iter().zip(&parts.alone) {
            match self.write(std::slice::from_ref(update)).await {
                Ok(_) => count(std::slice::from_ref(update)),
                Err(e) if storage::is_transient(&e) => return storage::disposition_of(e),
                Err(e) => match alone {
                    Some(alone) => parts.poison.push((*alone, storage::refusal(e))),
                    None => return storage::disposition_of(e),
                },
            }
        }
        Disposition::Done
    }

    /// Publishes each poison callback of a batch message alone to the dead-letter queue
    /// (confirmed), before its message is acked.
    async fn dead_letter_poison(&self, parts: &Readable<'_>) -> anyhow::Result<()> {
        for (alone, reason) in &parts.poison {
            let version = AMQPValue::LongLongInt(CallbackEvent::VERSION.into());
            let headers = vec![(SCHEMA_VERSION_HEADER, version)];
            self.rerouter.dead_letter_part(Stream::Status, parts.delivery, alone, reason, headers).await?;
        }
        Ok(())
    }

    /// A few quick in-process retries for transient failures; longer outages go to the ladder.
    async fn write(&self, updates: &[event::StatusUpdate]) -> Result<BatchOutcome, sqlx::Error> {
        let span = tracing::info_span!(
            "db transaction",
            otel.name = "apply_status_batch messages",
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "apply_status_batch",
            db.collection.name = "messages",
            db.operation.batch.size = updates.len(),
        );
        (|| storage::apply_status_batch(&self.pool, updates).instrument(span.clone()))
            .retry(crate::backoff::quick(Duration::from_millis(100), self.settings.worker.in_process_retries))
            .when(storage::is_transient)
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "status batch failed; retrying"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldTable, LongString};

    fn delivery_with(count: Option<AMQPValue>) -> Delivery {
        let mut headers = FieldTable::default();
        if let Some(count) = count {
            headers.insert(CALLBACK_COUNT_HEADER.into(), count);
        }
        let mut delivery = Delivery::mock(1, "".into(), "".into(), false, Vec::new());
        delivery.properties = lapin::BasicProperties::default().with_headers(headers);
        delivery
    }

    /// The count header only sizes batches: whatever a producer writes there, a delivery counts
    /// as at least one callback and at most the largest batch an ingress may publish.
    #[test]
    fn a_delivery_counts_as_its_header_says_within_bounds() {
        let max = shared::config::MAX_CALLBACK_BATCH;
        let cases = [
            (None, 1),
            (Some(AMQPValue::LongLongInt(12)), 12),
            (Some(AMQPValue::LongLongInt(0)), 1),
            (Some(AMQPValue::LongLongInt(-5)), 1),
            (Some(AMQPValue::LongLongInt(1_000_000)), max),
            (Some(AMQPValue::LongString(LongString::from("7"))), 7),
            (Some(AMQPValue::LongString(LongString::from("many"))), 1),
            (Some(AMQPValue::Boolean(true)), 1),
        ];
        for (header, expected) in cases {
            assert_eq!(callbacks_in(&delivery_with(header.clone())), expected, "{header:?}");
        }
    }
}
