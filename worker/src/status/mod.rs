//! Status events: consume in batches, write once, ack once.

pub mod event;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use shared::amqp::{Stream, Topology};
use shared::config::WorkerSettings;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{Rerouter, Session};
use crate::storage::{self, BatchOutcome};

/// Everything the status pipeline needs.
pub struct StatusPipeline {
    pub settings: WorkerSettings,
    pub topology: Topology,
    pub pool: PgPool,
    pub rerouter: Rerouter,
    /// True while a consumer is attached (the admin server's readiness).
    pub consuming: Arc<AtomicBool>,
}

enum SessionEnd {
    Shutdown,
    Lost { was_consuming: bool, error: anyhow::Error },
}

impl StatusPipeline {
    /// Consumes until shutdown. A lost broker connection is rebuilt with backoff; if it cannot
    /// be rebuilt within `amqp.reconnect_give_up_ms` this returns an error so the process exits
    /// and the orchestrator restarts it (lapin's own recovery can hang).
    pub async fn run(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let give_up = Duration::from_millis(self.settings.amqp.reconnect_give_up_ms);
        let mut down_since = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.session(&shutdown).await {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Lost { was_consuming, error } => {
                    self.consuming.store(false, Ordering::Relaxed);
                    if was_consuming {
                        down_since = Instant::now();
                        delay = Duration::from_millis(100);
                    }
                    if down_since.elapsed() > give_up {
                        return Err(error.context(format!("RabbitMQ not recovered within {} ms", give_up.as_millis())));
                    }
                    tracing::warn!(error = %format!("{error:#}"), "status consumer lost its broker session; reconnecting");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&self, shutdown: &CancellationToken) -> SessionEnd {
        let mut session = match Session::open(&self.settings.amqp, &self.topology, Stream::Status).await {
            Ok(session) => session,
            Err(error) => return SessionEnd::Lost { was_consuming: false, error },
        };
        self.consuming.store(true, Ordering::Relaxed);
        tracing::info!(queue = %self.topology.queue(Stream::Status), "consuming status events");
        let batch_size = self.settings.worker.batch_size;
        let batch_wait = Duration::from_millis(self.settings.worker.batch_wait_ms);
        let end = loop {
            let mut batch: Vec<Delivery> = Vec::with_capacity(batch_size);
            let mut stream_end = None;
            let first = tokio::select! {
                () = shutdown.cancelled() => break SessionEnd::Shutdown,
                next = session.consumer.next() => next,
            };
            match first {
                Some(Ok(delivery)) => batch.push(delivery),
                Some(Err(e)) => break SessionEnd::Lost { was_consuming: true, error: e.into() },
                None => break SessionEnd::Lost { was_consuming: true, error: anyhow::anyhow!("consumer cancelled") },
            }
            let deadline = Instant::now() + batch_wait;
            while batch.len() < batch_size && stream_end.is_none() {
                tokio::select! {
                    next = session.consumer.next() => match next {
                        Some(Ok(delivery)) => batch.push(delivery),
                        Some(Err(e)) => stream_end = Some(anyhow::Error::from(e)),
                        None => stream_end = Some(anyhow::anyhow!("consumer cancelled")),
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    // Finish the batch in hand now rather than waiting out the window.
                    () = shutdown.cancelled() => break,
                }
            }
            if let Err(error) = self.process(&batch).await {
                break SessionEnd::Lost { was_consuming: true, error };
            }
            if let Some(error) = stream_end {
                break SessionEnd::Lost { was_consuming: true, error };
            }
            if shutdown.is_cancelled() {
                break SessionEnd::Shutdown;
            }
        };
        self.consuming.store(false, Ordering::Relaxed);
        session.close().await;
        end
    }

    /// Writes a batch and acks it with one multiple-ack. Poison goes to the dead-letter queue,
    /// transient failures to the retry ladder (both confirmed before the ack). An error here
    /// means nothing was acked: the broker will redeliver, and every write is idempotent.
    async fn process(&self, batch: &[Delivery]) -> anyhow::Result<()> {
        let Some(last) = batch.last() else { return Ok(()) };
        let mut parsed = Vec::with_capacity(batch.len());
        for delivery in batch {
            match event::parse(&delivery.data) {
                Ok(update) => parsed.push((delivery, update)),
                Err(poison) => self.rerouter.dead_letter(Stream::Status, delivery, &poison.to_string()).await?,
            }
        }
        let updates: Vec<_> = parsed.iter().map(|(_, u)| u.clone()).collect();
        match self.write(&updates).await {
            Ok(outcome) => {
                tracing::debug!(events = updates.len(), recorded = outcome.events_recorded, "status batch committed")
            }
            Err(e) if storage::is_transient(&e) => {
                for (delivery, _) in &parsed {
                    self.rerouter.retry_later(Stream::Status, delivery, &format!("database unavailable: {e}")).await?;
                }
            }
            Err(e) => {
                // Something in the batch is refused by the database: find it, write the rest.
                tracing::warn!(error = %e, "status batch refused; writing its events one by one");
                for (delivery, update) in &parsed {
                    match self.write(std::slice::from_ref(update)).await {
                        Ok(_) => {}
                        Err(e) if storage::is_transient(&e) => {
                            self.rerouter
                                .retry_later(Stream::Status, delivery, &format!("database unavailable: {e}"))
                                .await?
                        }
                        Err(e) => {
                            self.rerouter
                                .dead_letter(Stream::Status, delivery, &format!("refused by the database: {e}"))
                                .await?
                        }
                    }
                }
            }
        }
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        Ok(())
    }

    /// A few quick in-process retries for transient failures; longer outages go to the ladder.
    async fn write(&self, updates: &[event::StatusUpdate]) -> Result<BatchOutcome, sqlx::Error> {
        (|| storage::apply_status_batch(&self.pool, updates))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(self.settings.worker.in_process_retries)
                    .with_jitter(),
            )
            .when(storage::is_transient)
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "status batch failed; retrying"))
            .await
    }
}
