//! The worker's side of RabbitMQ: consuming sessions, and moving deliveries it cannot finish
//! now to the retry ladder or the dead-letter queue (always with a publisher confirm, before
//! the original delivery is acked).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, Consumer};
use shared::amqp::headers::{CALLBACK_COUNT_HEADER, get_int};
use shared::amqp::topology::{DEAD_LETTER_REASON_HEADER, DEFERRAL_COUNT_HEADER, RETRY_COUNT_HEADER};
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
    let contexts = deliveries.iter().map(|d| shared::amqp::headers::extract_context(d.properties.headers().as_ref()));
    shared::amqp::headers::continue_and_link(&span, contexts);
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
    let mut backoff = shared::amqp::reconnect_backoff();
    loop {
        let error = match Session::open(settings, topology, stream, prefetch).await {
            Ok(mut session) => {
                consuming.store(true, Ordering::Relaxed);
                tracing::info!(queue = %topology.queue(stream), "consuming");
                let end = consume(&mut session).await;
                consuming.store(false, Ordering::Relaxed);
                session.close().await;
                down_since = Instant::now();
                backoff = shared::amqp::reconnect_backoff();
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
            () = tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5))) => {}
        }
    }
}

/// Handles each delivery in a task of its own until shutdown or the session is lost (the
/// prefetch bounds how many are in progress); those in progress finish before this returns. A
/// task's error (a delivery it could not reroute or ack) ends the session: the broker
/// redelivers what was not acked.
pub async fn consume_concurrently<F>(
    session: &mut Session,
    shutdown: &CancellationToken,
    queue: &str,
    handle: impl Fn(Delivery) -> F,
) -> SessionEnd
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use tracing::Instrument as _;
    let mut in_progress: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => break SessionEnd::Shutdown,
            Some(done) = in_progress.join_next() => {
                if let Some(error) = task_error(done) {
                    break SessionEnd::Lost(error);
                }
            }
            next = session.next_delivery() => match next {
                Ok(delivery) => {
                    let span = consumer_span("process", queue, &[&delivery]);
                    in_progress.spawn(handle(delivery).instrument(span));
                }
                Err(e) => break SessionEnd::Lost(e),
            },
        }
    };
    while let Some(done) = in_progress.join_next().await {
        if let Some(error) = task_error(done) {
            tracing::warn!(queue, error = %format!("{error:#}"), "delivery left unacked; it will be redelivered");
        }
    }
    end
}

fn task_error(done: Result<anyhow::Result<()>, tokio::task::JoinError>) -> Option<anyhow::Error> {
    match done {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(anyhow::anyhow!("task failed: {e}")),
    }
}

/// Why a delivery is retried later. `label` is the `reason` of `smsflow_retries_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryCause {
    DatabaseUnavailable(String),
    /// Plivo's answer (or its absence) did not settle the job; the text says what happened.
    Plivo(String),
    /// At-least-once: a worker stopped during the Plivo call, so the job is sent again.
    InterruptedCall,
    /// A webhook's receiver did not answer 2xx; the text says what it did.
    Webhook(String),
}

impl RetryCause {
    pub const LABELS: [&'static str; 4] = ["database_unavailable", "plivo", "interrupted_call", "webhook"];

    pub fn label(&self) -> &'static str {
        match self {
            Self::DatabaseUnavailable(_) => Self::LABELS[0],
            Self::Plivo(_) => Self::LABELS[1],
            Self::InterruptedCall => Self::LABELS[2],
            Self::Webhook(_) => Self::LABELS[3],
        }
    }
}

impl std::fmt::Display for RetryCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DatabaseUnavailable(error) => write!(f, "database unavailable: {error}"),
            Self::Plivo(what) | Self::Webhook(what) => f.write_str(what),
            Self::InterruptedCall => f.write_str("interrupted call; at-least-once"),
        }
    }
}

/// Why a delivery can never be processed. `label` is the `reason` of
/// `smsflow_dead_letters_total` (from the type, never from the text); the text, which names the
/// problem, goes into the dead letter's reason header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadReason {
    /// Not JSON, or JSON that is not the stream's contract.
    NotJson(String),
    /// A schema or version this worker does not read.
    Schema(String),
    /// A field every event of the stream needs is absent.
    MissingField(String),
    UnknownStatus(String),
    /// A send job whose content is invalid (recipient, sender, text, options).
    InvalidJob(String),
    /// A job id or idempotency key reused with other content: never sent.
    IdempotencyConflict(String),
    /// The database refused the write for good (a constraint, not an outage).
    DatabaseRefused(String),
    /// Past the last rung of the retry ladder.
    RetriesExhausted {
        retries: i64,
        cause: RetryCause,
    },
    /// A webhook that can never be delivered as asked: its URL reaches an address that is not
    /// allowed, is not an http(s) URL, or nothing is configured to sign it with.
    WebhookRefused(String),
}

impl DeadReason {
    pub const LABELS: [&'static str; 9] = [
        "not_json",
        "schema",
        "missing_field",
        "unknown_status",
        "invalid_job",
        "idempotency_conflict",
        "database_refused",
        "retries_exhausted",
        "webhook_refused",
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Self::NotJson(_) => Self::LABELS[0],
            Self::Schema(_) => Self::LABELS[1],
            Self::MissingField(_) => Self::LABELS[2],
            Self::UnknownStatus(_) => Self::LABELS[3],
            Self::InvalidJob(_) => Self::LABELS[4],
            Self::IdempotencyConflict(_) => Self::LABELS[5],
            Self::DatabaseRefused(_) => Self::LABELS[6],
            Self::RetriesExhausted { .. } => Self::LABELS[7],
            Self::WebhookRefused(_) => Self::LABELS[8],
        }
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotJson(text)
            | Self::Schema(text)
            | Self::MissingField(text)
            | Self::UnknownStatus(text)
            | Self::InvalidJob(text)
            | Self::IdempotencyConflict(text)
            | Self::WebhookRefused(text) => f.write_str(text),
            Self::DatabaseRefused(error) => write!(f, "refused by the database: {error}"),
            Self::RetriesExhausted { retries, cause } => write!(f, "gave up after {retries} retries: {cause}"),
        }
    }
}

/// What a pipeline decided for one delivery; `Rerouter::dispose` carries it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Processed: acked.
    Done,
    /// Not now: the next rung of the retry ladder (past the last, the dead-letter queue), the
    /// delivery carrying `headers` from now on.
    Retry { cause: RetryCause, headers: Vec<(&'static str, AMQPValue)> },
    /// Never: the dead-letter queue.
    Dead(DeadReason),
}

impl Disposition {
    pub fn retry(cause: RetryCause) -> Self {
        Self::Retry { cause, headers: Vec::new() }
    }
}

/// Carries out dispositions: the one place a delivery is rerouted (to the retry ladder or the
/// dead-letter queue, publisher-confirmed) and then acked.
#[derive(Clone)]
pub struct Rerouter {
    pub publisher: Publisher,
    pub topology: Topology,
}

impl Rerouter {
    /// Reroutes the delivery as `disposition` says, then acks it (alone: other deliveries of
    /// the channel may still be in progress). An error means it was not acked.
    pub async fn dispose(&self, stream: Stream, delivery: &Delivery, disposition: Disposition) -> anyhow::Result<()> {
        self.reroute(stream, delivery, disposition).await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// `dispose` for a batch from one channel, in any order: every delivery rerouted as it
    /// says, then one multiple-ack up to the batch's latest delivery.
    pub async fn dispose_batch<'d>(
        &self,
        stream: Stream,
        batch: impl IntoIterator<Item = (&'d Delivery, Disposition)>,
    ) -> anyhow::Result<()> {
        let mut latest: Option<&Delivery> = None;
        for (delivery, disposition) in batch {
            self.reroute(stream, delivery, disposition).await?;
            latest = latest.filter(|l| l.delivery_tag > delivery.delivery_tag).or(Some(delivery));
        }
        if let Some(latest) = latest {
            latest.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }

    /// Puts a delivery that could not start yet (it did not fail) through the retry ladder, its
    /// `deferrals`-th time on rung `deferrals` (the last rung past it), with its retry count
    /// unchanged, then acks it; false (and nothing done) when there is no ladder.
    pub async fn defer(&self, stream: Stream, delivery: &Delivery, deferrals: i64) -> anyhow::Result<bool> {
        let rung = (deferrals.max(1) as usize).min(self.topology.retry_delays_ms().len());
        let Some(queue) = self.topology.retry_queue(stream, rung) else {
            return Ok(false);
        };
        let properties = with_headers(delivery, &[(DEFERRAL_COUNT_HEADER, AMQPValue::LongLongInt(deferrals))], &[]);
        self.publisher.publish_to("", &queue, &delivery.data, properties).await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(true)
    }

    /// Whether this delivery has used every rung of the retry ladder: retrying it now would
    /// dead-letter it.
    pub fn retries_exhausted(&self, stream: Stream, delivery: &Delivery) -> bool {
        self.topology.retry_queue(stream, attempt(delivery) as usize).is_none()
    }

    /// Publishes the delivery where `disposition` says (confirmed), without acking it: for a
    /// pipeline that must record something between the reroute and the ack.
    pub async fn reroute(
        &self,
        stream: Stream,
        delivery: &Delivery,
        disposition: Disposition,
    ) -> Result<(), PublishError> {
        let (cause, extra) = match disposition {
            Disposition::Done => return Ok(()),
            Disposition::Dead(reason) => return self.publish_dead(stream, delivery, &reason, Vec::new()).await,
            Disposition::Retry { cause, headers } => (cause, headers),
        };
        let attempt = attempt(delivery);
        let Some(queue) = self.topology.retry_queue(stream, attempt as usize) else {
            let reason = DeadReason::RetriesExhausted { retries: attempt - 1, cause };
            return self.publish_dead(stream, delivery, &reason, extra).await;
        };
        let reason = cause.to_string();
        tracing::info!(stream = stream.name(), attempt, reason, "retrying a message later");
        metrics::counter!("smsflow_retries_total", "stream" => stream.name(), "reason" => cause.label()).increment(1);
        let mut headers = vec![
            (RETRY_COUNT_HEADER, AMQPValue::LongLongInt(attempt)),
            (DEAD_LETTER_REASON_HEADER, header_text(&reason)),
        ];
        headers.extend(extra);
        self.publisher.publish_to("", &queue, &delivery.data, with_headers(delivery, &headers, &[])).await
    }

    /// Publishes one part of a delivery (a poison callback inside a batch message) alone to
    /// the dead-letter queue, confirmed, without acking the delivery; `headers` replace the
    /// delivery's where the part differs (its schema version), and the batch's callback count
    /// is dropped (a part holds one callback). The part's message id is
    /// derived from its content: published again after a crash before the ack, it is
    /// recognisably the same dead letter.
    pub async fn dead_letter_part(
        &self,
        stream: Stream,
        delivery: &Delivery,
        part: &[u8],
        reason: &DeadReason,
        headers: Vec<(&'static str, AMQPValue)>,
    ) -> Result<(), PublishError> {
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, part).to_string();
        self.publish_dead_with(stream, delivery, part, Some(id), reason, headers).await
    }

    async fn publish_dead(
        &self,
        stream: Stream,
        delivery: &Delivery,
        reason: &DeadReason,
        extra: Vec<(&'static str, AMQPValue)>,
    ) -> Result<(), PublishError> {
        self.publish_dead_with(stream, delivery, &delivery.data, None, reason, extra).await
    }

    async fn publish_dead_with(
        &self,
        stream: Stream,
        delivery: &Delivery,
        payload: &[u8],
        // Some: `payload` is one part of the delivery, published under this id.
        part_id: Option<String>,
        reason: &DeadReason,
        extra: Vec<(&'static str, AMQPValue)>,
    ) -> Result<(), PublishError> {
        let text = reason.to_string();
        tracing::warn!(stream = stream.name(), reason = %text, "dead-lettering a message");
        metrics::counter!("smsflow_dead_letters_total", "stream" => stream.name(), "reason" => reason.label())
            .increment(1);
        let mut headers = vec![(DEAD_LETTER_REASON_HEADER, header_text(&text))];
        headers.extend(extra);
        // A part (it has an id of its own) holds one callback: the batch's count goes.
        let dropped: &[&str] = if part_id.is_some() { &[CALLBACK_COUNT_HEADER] } else { &[] };
        let mut properties = with_headers(delivery, &headers, dropped);
        if let Some(id) = part_id {
            properties = properties.with_message_id(id.into());
        }
        self.publisher.publish_to(&self.topology.dead_letter_exchange(), stream.name(), payload, properties).await
    }
}

/// This delivery's attempt number if it is retried now (its first retry is attempt 1).
fn attempt(delivery: &Delivery) -> i64 {
    get_int(delivery.properties.headers().as_ref(), RETRY_COUNT_HEADER).unwrap_or(0) + 1
}

/// Every dead-letter and retry series at zero from the start: an alert on `increase()` sees
/// the first one, which a series born at 1 would hide.
pub fn register_metrics() {
    for stream in Stream::ALL {
        for reason in DeadReason::LABELS {
            metrics::counter!("smsflow_dead_letters_total", "stream" => stream.name(), "reason" => reason).increment(0);
        }
        for reason in RetryCause::LABELS {
            metrics::counter!("smsflow_retries_total", "stream" => stream.name(), "reason" => reason).increment(0);
        }
    }
}

fn header_text(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// The delivery's properties with `extra` headers set and the `dropped` ones removed.
fn with_headers(delivery: &Delivery, extra: &[(&str, AMQPValue)], dropped: &[&str]) -> lapin::BasicProperties {
    let mut headers = delivery.properties.headers().as_ref().map(|h| h.inner().clone()).unwrap_or_default();
    for key in dropped {
        headers.remove(*key);
    }
    for (key, value) in extra {
        headers.insert((*key).into(), value.clone());
    }
    delivery.properties.clone().with_headers(headers.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each reason's metric label comes from its type, whatever its text says.
    #[test]
    fn every_dead_reason_has_its_own_label() {
        let text = || "database unavailable: Plivo said so".to_owned();
        let cases = [
            (DeadReason::NotJson(text()), "not_json"),
            (DeadReason::Schema(text()), "schema"),
            (DeadReason::MissingField(text()), "missing_field"),
            (DeadReason::UnknownStatus(text()), "unknown_status"),
            (DeadReason::InvalidJob(text()), "invalid_job"),
            (DeadReason::IdempotencyConflict(text()), "idempotency_conflict"),
            (DeadReason::DatabaseRefused(text()), "database_refused"),
            (DeadReason::RetriesExhausted { retries: 5, cause: RetryCause::Plivo(text()) }, "retries_exhausted"),
            (DeadReason::WebhookRefused(text()), "webhook_refused"),
        ];
        let labels: std::collections::BTreeSet<&str> = cases.iter().map(|(reason, _)| reason.label()).collect();
        assert_eq!(labels.len(), DeadReason::LABELS.len(), "one label per reason");
        for (reason, label) in &cases {
            assert_eq!(reason.label(), *label, "{reason:?}");
            assert!(DeadReason::LABELS.contains(label), "{label} is registered at zero");
        }
        assert_eq!(
            DeadReason::DatabaseRefused("duplicate key".into()).to_string(),
            "refused by the database: duplicate key"
        );
        let exhausted =
            DeadReason::RetriesExhausted { retries: 5, cause: RetryCause::DatabaseUnavailable("gone".into()) };
        assert_eq!(exhausted.to_string(), "gave up after 5 retries: database unavailable: gone");
    }

    #[test]
    fn every_retry_cause_has_its_own_label() {
        let cases = [
            (RetryCause::DatabaseUnavailable("x".into()), "database_unavailable"),
            (RetryCause::Plivo("cannot connect to Plivo".into()), "plivo"),
            (RetryCause::InterruptedCall, "interrupted_call"),
            (RetryCause::Webhook("the receiver answered 500".into()), "webhook"),
        ];
        for (cause, label) in &cases {
            assert_eq!(cause.label(), *label);
            assert!(RetryCause::LABELS.contains(label));
        }
    }
}
