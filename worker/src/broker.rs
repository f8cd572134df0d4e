//! The worker's side of RabbitMQ: consuming sessions, and moving deliveries it cannot finish
//! now to the retry ladder or the dead-letter queue (always with a publisher confirm, before
//! the original delivery is acked).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;

use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::options::BasicQosOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, Consumer};
use shared::amqp::headers::get_int;
use shared::amqp::topology::{DEAD_LETTER_REASON_HEADER, RETRY_COUNT_HEADER};
use shared::amqp::{PublishError, Publisher, Stream, Topology};
use shared::config::AmqpSettings;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A connection with one consuming channel.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
    pub consumer: Consumer,
}

impl Session {
    pub async fn open(
        settings: &AmqpSettings,
        topology: &Topology,
        stream: Stream,
        prefetch: u16,
    ) -> anyhow::Result<Self> {
        let connection = shared::amqp::connect(settings, &format!("smsflow-worker {}", stream.name())).await?;
        let setup = async {
            let channel = connection.create_channel().await?;
            topology.declare(&channel).await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    topology.queue(stream).into(),
                    format!("smsflow-worker-{}-{}", stream.name(), uuid::Uuid::new_v4().simple()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok((channel, consumer))
        };
        let (channel, consumer) = shared::amqp::set_up(settings, &connection, setup).await?;
        Ok(Self { connection, channel, consumer })
    }

    /// The next delivery, or why the session is over. The connection is also checked every
    /// second: a consumer stream that stays silent after its connection died (lapin has had
    /// such bugs) must not stall the worker.
    pub async fn next_delivery(&mut self) -> anyhow::Result<Delivery> {
        loop {
            tokio::select! {
                next = self.consumer.next() => return match next {
                    Some(Ok(delivery)) => Ok(delivery),
                    Some(Err(e)) => Err(e.into()),
                    None => Err(anyhow::anyhow!("consumer cancelled")),
                },
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if !self.connection.status().connected() || !self.channel.status().connected() {
                        return Err(anyhow::anyhow!("RabbitMQ connection lost"));
                    }
                }
            }
        }
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.connection.close(200, "shutting down".into())).await;
    }
}

/// A consumer span for deliveries (messaging semantic conventions): the first delivery's trace
/// (from its `traceparent` header) is the parent, the others are linked.
pub fn consumer_span(operation: &'static str, queue: &str, deliveries: &[&Delivery]) -> tracing::Span {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!(
        "consume",
        otel.name = %format!("{operation} {queue}"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.name = operation,
        messaging.destination.name = %queue,
        messaging.batch.message_count = deliveries.len(),
        messaging.message.id = tracing::field::Empty,
        smsflow.message_id = tracing::field::Empty,
        plivo.message_uuid = tracing::field::Empty,
    );
    if let [single] = deliveries
        && let Some(id) = single.properties.message_id()
    {
        span.record("messaging.message.id", id.as_str());
    }
    let mut contexts =
        deliveries.iter().map(|d| shared::amqp::headers::extract_context(d.properties.headers().as_ref()));
    if let Some(first) = contexts.next() {
        let _ = span.set_parent(first);
    }
    for context in contexts {
        let linked = context.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
    span
}

/// How a consuming session ended.
pub enum SessionEnd {
    Shutdown,
    Lost(anyhow::Error),
}

/// Runs `consume` on fresh sessions until shutdown. A lost broker connection is rebuilt with
/// backoff; if it cannot be rebuilt within `amqp.reconnect_give_up_ms` this returns an error so
/// the process exits and the orchestrator restarts it (lapin's own recovery can hang).
pub async fn consume_with_reconnect(
    settings: &AmqpSettings,
    topology: &Topology,
    stream: Stream,
    prefetch: u16,
    consuming: &AtomicBool,
    shutdown: &CancellationToken,
    mut consume: impl for<'s> FnMut(&'s mut Session) -> BoxFuture<'s, SessionEnd>,
) -> anyhow::Result<()> {
    let give_up = Duration::from_millis(settings.reconnect_give_up_ms);
    let mut down_since = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match Session::open(settings, topology, stream, prefetch).await {
            Ok(mut session) => {
                consuming.store(true, Ordering::Relaxed);
                tracing::info!(queue = %topology.queue(stream), "consuming");
                let end = consume(&mut session).await;
                consuming.store(false, Ordering::Relaxed);
                session.close().await;
                down_since = Instant::now();
                delay = Duration::from_millis(100);
                match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost(error) => error,
                }
            }
            Err(error) => error,
        };
        if down_since.elapsed() > give_up {
            return Err(error.context(format!("RabbitMQ not recovered within {} ms", give_up.as_millis())));
        }
        tracing::warn!(stream = stream.name(), error = %format!("{error:#}"), "broker session lost; reconnecting");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Where `retry_later` sent a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rerouted {
    RetryScheduled { attempt: i64 },
    DeadLettered,
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
        self.publish_dead(stream, delivery, reason, &[(DEAD_LETTER_REASON_HEADER, header_text(reason))]).await
    }

    async fn publish_dead(
        &self,
        stream: Stream,
        delivery: &Delivery,
        reason: &str,
        headers: &[(&str, AMQPValue)],
    ) -> Result<(), PublishError> {
        tracing::warn!(stream = stream.name(), reason, "dead-lettering a message");
        metrics::counter!("smsflow_dead_letters_total", "stream" => stream.name(), "reason" => reason_kind(reason))
            .increment(1);
        let properties = with_headers(delivery, headers);
        self.publisher
            .publish_to(&self.topology.dead_letter_exchange(), stream.name(), &delivery.data, properties)
            .await
    }

    /// Sends a delivery to the next rung of the retry ladder, or dead-letters it past the last.
    pub async fn retry_later(
        &self,
        stream: Stream,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<Rerouted, PublishError> {
        self.retry_later_with(stream, delivery, reason, &[]).await
    }

    /// `retry_later`, adding headers that the delivery carries from now on.
    pub async fn retry_later_with(
        &self,
        stream: Stream,
        delivery: &Delivery,
        reason: &str,
        extra: &[(&str, AMQPValue)],
    ) -> Result<Rerouted, PublishError> {
        let attempt = get_int(delivery.properties.headers().as_ref(), RETRY_COUNT_HEADER).unwrap_or(0) + 1;
        match self.topology.retry_queue(stream, attempt as usize) {
            Some(queue) => {
                tracing::info!(stream = stream.name(), attempt, reason, "retrying a message later");
                metrics::counter!("smsflow_retries_total", "stream" => stream.name(), "reason" => reason_kind(reason))
                    .increment(1);
                let mut headers = vec![
                    (RETRY_COUNT_HEADER, AMQPValue::LongLongInt(attempt)),
                    (DEAD_LETTER_REASON_HEADER, header_text(reason)),
                ];
                headers.extend(extra.iter().cloned());
                let properties = with_headers(delivery, &headers);
                self.publisher.publish_to("", &queue, &delivery.data, properties).await?;
                Ok(Rerouted::RetryScheduled { attempt })
            }
            None => {
                let reason = format!("gave up after {} retries: {reason}", attempt - 1);
                let mut headers = vec![(DEAD_LETTER_REASON_HEADER, header_text(&reason))];
                headers.extend(extra.iter().cloned());
                self.publish_dead(stream, delivery, &reason, &headers).await?;
                Ok(Rerouted::DeadLettered)
            }
        }
    }
}

/// Every dead-letter series at zero from the start: an alert on `increase()` sees the first
/// dead letter, which a series born at 1 would hide.
pub fn register_metrics() {
    for stream in Stream::ALL {
        for kind in DEAD_LETTER_KINDS.iter().map(|(_, kind)| *kind).chain(["other"]) {
            metrics::counter!("smsflow_dead_letters_total", "stream" => stream.name(), "reason" => kind).increment(0);
        }
    }
}

/// A bounded label for a free-text reason (metrics must not grow a series per message).
fn reason_kind(reason: &str) -> &'static str {
    DEAD_LETTER_KINDS.iter().find(|(prefix, _)| reason.starts_with(prefix)).map_or("other", |(_, kind)| kind)
}

const DEAD_LETTER_KINDS: [(&str, &str); 12] = [
    ("idempotency conflict", "idempotency_conflict"),
    ("not a JSON", "not_json"),
    ("unsupported", "schema"),
    ("callback has no", "missing_field"),
    ("inbound message has no", "missing_field"),
    ("unknown status", "unknown_status"),
    ("invalid send job", "invalid_job"),
    ("not a valid send job", "invalid_job"),
    ("refused by the database", "database_refused"),
    ("database", "database_unavailable"),
    ("gave up after", "retries_exhausted"),
    ("Plivo", "plivo"),
];

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
