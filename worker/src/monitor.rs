//! Queue depth and consumer counts as metrics (`smsflow_queue_messages`,
//! `smsflow_queue_consumers`), polled from the broker: the consumer lag a dashboard shows and
//! an autoscaler (KEDA) reads.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use shared::amqp::{Publisher, Stream, Topology};
use shared::config::AmqpSettings;
use tokio_util::sync::CancellationToken;

use crate::send::ratelimit::SenderRateLimiter;

/// Polls once the topology exists (`declared`, the publisher that declares it, is connected): a
/// passive declare of a queue not declared yet is refused by the broker, which lapin logs as an
/// error, on every fresh start.
pub async fn poll_queue_depths(
    settings: AmqpSettings,
    topology: Topology,
    declared: Publisher,
    every: Duration,
    shutdown: CancellationToken,
) {
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = topology_declared(&declared) => {}
    }
    let mut connection = None;
    loop {
        if connection.as_ref().is_none_or(|c: &lapin::Connection| !c.status().connected()) {
            connection = shared::amqp::connect(&settings, "smsflow-worker monitor").await.ok();
        }
        if let Some(connection) = &connection {
            for stream in Stream::ALL {
                for queue in [topology.queue(stream), topology.dead_letter_queue(stream)] {
                    if let Some((messages, consumers)) = queue_counts(connection, &queue).await {
                        metrics::gauge!("smsflow_queue_messages", "queue" => queue.clone()).set(f64::from(messages));
                        metrics::gauge!("smsflow_queue_consumers", "queue" => queue).set(f64::from(consumers));
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if let Some(connection) = connection {
        let _ = connection.close(200, "shutting down".into()).await;
    }
}

/// Keeps `limiter`'s share of every sender's rate: the configured rate divided by the consumers
/// on the send queue (each worker has one), so N workers together hold the configured rate.
pub async fn share_send_rate(
    settings: AmqpSettings,
    topology: Topology,
    limiter: Arc<SenderRateLimiter>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let queue = topology.queue(Stream::Send);
    let mut connection = None;
    loop {
        // First wait: `initial_send_share` counted this worker before its consumer existed.
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        if connection.as_ref().is_none_or(|c: &lapin::Connection| !c.status().connected()) {
            connection = shared::amqp::connect(&settings, "smsflow-worker rate share").await.ok();
        }
        if let Some(connection) = &connection
            && let Some((_, consumers)) = queue_counts(connection, &queue).await
        {
            limiter.share_between(consumers);
        }
    }
    if let Some(connection) = connection {
        let _ = connection.close(200, "shutting down".into()).await;
    }
}

/// How many workers will share the send rate once this one consumes: the send queue's consumers
/// now, plus this worker (not yet among them). Read once before consuming starts, so that a
/// worker added by the autoscaler does not send at the whole rate until the first poll.
pub async fn initial_send_share(settings: &AmqpSettings, topology: &Topology) -> Option<u32> {
    let read = async {
        let connection = shared::amqp::connect(settings, "smsflow-worker rate share").await.ok()?;
        let counts = queue_counts(&connection, &topology.queue(Stream::Send)).await;
        let _ = connection.close(200, "read".into()).await;
        counts.map(|(_, consumers)| consumers + 1)
    };
    tokio::time::timeout(Duration::from_millis(settings.connect_timeout_ms.saturating_mul(2)), read).await.ok()?
}

/// Returns once `publisher` has connected, which it does only after declaring the topology.
pub async fn topology_declared(publisher: &Publisher) {
    while !publisher.wait_ready(Duration::from_secs(60)).await {}
}

/// Ready messages and consumers of `queue`, from a passive declare.
async fn queue_counts(connection: &lapin::Connection, queue: &str) -> Option<(u32, u32)> {
    // A passive declare of a missing queue closes its channel: one channel each.
    let channel = connection.create_channel().await.ok()?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.ok()?;
    let _ = channel.close(200, "polled".into()).await;
    Some((declared.message_count(), declared.consumer_count()))
}
