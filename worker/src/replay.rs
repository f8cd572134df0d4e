//! `replay-dead-letters`: after an operator fixed the cause, moves dead-lettered messages back
//! to their work queue. A dry run only counts them by reason.
//!
//! Neither ever returns a message to the dead-letter queue with `nack(requeue)`: a quorum queue
//! counts that as a failed delivery, and RabbitMQ 4 drops a message after 20 of them (its
//! default delivery limit). The dry run instead puts an identical copy back through the
//! dead-letter exchange, confirmed by the broker, before it acks the one it read: the queue
//! holds the same messages, in the same order, each as fresh as before.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::AMQPValue;
use lapin::types::FieldTable;
use shared::amqp::headers::{get_int, get_str};
use shared::amqp::topology::{DEAD_LETTER_REASON_HEADER, REPLAY_COUNT_HEADER, RETRY_COUNT_HEADER};
use shared::amqp::{Publisher, Stream, Topology};
use shared::config::AmqpSettings;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages seen, by dead-letter reason.
    pub by_reason: BTreeMap<String, u64>,
    /// Messages moved back to the work queue (0 in a dry run).
    pub replayed: u64,
}

/// Replays (or with `dry_run` counts) the messages dead-lettered from `stream`'s queue. Only
/// the messages present at the start are touched, so a message that fails again is not looped.
pub async fn replay_dead_letters(
    settings: &AmqpSettings,
    stream: Stream,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    let topology = Topology::from_settings(settings);
    let connection = shared::amqp::connect(settings, "smsflow-worker replay").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    let dead = topology.dead_letter_queue(stream);
    // Messages ready in the dead-letter queue (a passive declare only reads the count).
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let waiting = channel.queue_declare(dead.as_str().into(), passive, FieldTable::default()).await?.message_count();

    let shutdown = CancellationToken::new();
    let publisher = Publisher::start(settings.clone(), topology.clone(), "smsflow-worker replay", shutdown.clone());
    if !publisher.wait_ready(Duration::from_millis(settings.connect_timeout_ms)).await {
        anyhow::bail!("cannot open a publishing connection to RabbitMQ");
    }
    let mut report = ReplayReport::default();
    for _ in 0..waiting {
        let Some(message) = channel.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false }).await? else {
            break;
        };
        let headers = message.delivery.properties.headers().clone();
        let reason = get_str(headers.as_ref(), DEAD_LETTER_REASON_HEADER)
            .map(str::to_owned)
            .or_else(|| get_str(headers.as_ref(), "x-first-death-reason").map(|r| format!("broker: {r}")))
            .unwrap_or_else(|| "unknown".to_owned());
        *report.by_reason.entry(reason).or_default() += 1;
        if dry_run {
            let properties = message.delivery.properties.clone();
            publisher
                .publish_to(&topology.dead_letter_exchange(), stream.name(), &message.delivery.data, properties)
                .await?;
            message.delivery.acker.ack(BasicAckOptions::default()).await?;
            continue;
        }
        let mut headers = headers.unwrap_or_default();
        let mut cleaned = FieldTable::default();
        for (key, value) in headers.inner() {
            if ![DEAD_LETTER_REASON_HEADER, RETRY_COUNT_HEADER, REPLAY_COUNT_HEADER].contains(&key.as_str())
                && !key.as_str().starts_with("x-death")
            {
                cleaned.insert(key.clone(), value.clone());
            }
        }
        let replays = get_int(Some(&headers), REPLAY_COUNT_HEADER).unwrap_or(0) + 1;
        cleaned.insert(REPLAY_COUNT_HEADER.into(), AMQPValue::LongLongInt(replays));
        headers = cleaned;
        let properties = message.delivery.properties.clone().with_headers(headers);
        publisher.publish(stream.routing_key(), &message.delivery.data, properties).await?;
        message.delivery.acker.ack(BasicAckOptions::default()).await?;
        report.replayed += 1;
    }
    shutdown.cancel();
    publisher.close().await;
    let _ = connection.close(200, "replay done".into()).await;
    Ok(report)
}
