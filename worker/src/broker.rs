//! The worker's side of RabbitMQ: consuming sessions, and moving deliveries it cannot finish
//! now to the retry ladder or the dead-letter queue (always with a publisher confirm, before
//! the original delivery is acked).

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::options::BasicQosOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, Consumer};
use shared::amqp::headers::get_int;
use shared::amqp::topology::{DEAD_LETTER_REASON_HEADER, RETRY_COUNT_HEADER};
use shared::amqp::{PublishError, Publisher, Stream, Topology};
use shared::config::AmqpSettings;

/// A connection with one consuming channel.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
    pub consumer: Consumer,
}

impl Session {
    pub async fn open(settings: &AmqpSettings, topology: &Topology, stream: Stream) -> anyhow::Result<Self> {
        let connection = shared::amqp::connect(settings, &format!("smsflow-worker {}", stream.name())).await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                topology.queue(stream).into(),
                format!("smsflow-worker-{}-{}", stream.name(), uuid::Uuid::new_v4().simple()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self { connection, channel, consumer })
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.connection.close(200, "shutting down".into())).await;
    }
}

/// Publishes deliveries to the retry ladder or the dead-letter queue.
#[derive(Clone)]
pub struct Rerouter {
    pub publisher: Publisher,
    pub topology: Topology,
}

impl Rerouter {
    /// Parks a delivery that can never be processed, with the reason in a header.
    pub async fn dead_letter(&self, stream: Stream, delivery: &Delivery, reason: &str) -> Result<(), PublishError> {
        tracing::warn!(stream = stream.name(), reason, "dead-lettering a message");
        let properties = with_headers(delivery, &[(DEAD_LETTER_REASON_HEADER, header_text(reason))]);
        self.publisher
            .publish_to(&self.topology.dead_letter_exchange(), stream.name(), &delivery.data, properties)
            .await
    }

    /// Sends a delivery to the next rung of the retry ladder, or dead-letters it past the last.
    pub async fn retry_later(&self, stream: Stream, delivery: &Delivery, reason: &str) -> Result<(), PublishError> {
        let attempt = get_int(delivery.properties.headers().as_ref(), RETRY_COUNT_HEADER).unwrap_or(0) + 1;
        match self.topology.retry_queue(stream, attempt as usize) {
            Some(queue) => {
                tracing::info!(stream = stream.name(), attempt, reason, "retrying a message later");
                let properties = with_headers(
                    delivery,
                    &[
                        (RETRY_COUNT_HEADER, AMQPValue::LongLongInt(attempt)),
                        (DEAD_LETTER_REASON_HEADER, header_text(reason)),
                    ],
                );
                self.publisher.publish_to("", &queue, &delivery.data, properties).await
            }
            None => {
                let reason = format!("gave up after {} retries: {reason}", attempt - 1);
                self.dead_letter(stream, delivery, &reason).await
            }
        }
    }
}

fn header_text(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn with_headers(delivery: &Delivery, extra: &[(&str, AMQPValue)]) -> lapin::BasicProperties {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    for (key, value) in extra {
        headers.insert((*key).into(), value.clone());
    }
    delivery.properties.clone().with_headers(headers)
}
