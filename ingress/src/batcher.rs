//! Micro-batched publishing of status callbacks. Every callback is a persistent message in a
//! quorum queue before its request is answered 200, but under load the callbacks that arrive
//! while a publish is in flight share one message (`smsflow.plivo-callback` version 2): the
//! broker then pays for one message, one confirm and one delivery per batch instead of per
//! callback. Each request waits for the confirm of the message holding its callback, so a
//! failed publish answers every request of that batch 503, and a crash answers none of them.
//!
//! A callback never waits on a timer while the broker has room: with fewer than
//! `amqp.callback_batch_slots` publishes in flight it is published at once, with whatever was
//! already waiting. Only when every slot is busy do callbacks gather, until a slot frees, the
//! batch is full (`amqp.callback_batch_max`) or `amqp.callback_batch_window_us` has passed
//! (then it is published anyway): the batch size follows the load, as a database's group
//! commit does.

use std::sync::Arc;
use std::time::Duration;

use shared::amqp::contracts::{CallbackBatch, CallbackEvent};
use shared::amqp::headers::{TraceContext, continue_and_link, current_context, json_message};
use shared::amqp::{PublishError, Publisher};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument as _;

/// A callback waiting for its message to be confirmed.
struct Pending {
    event: CallbackEvent,
    /// The request's trace: the message's publish span continues the first request's and
    /// links the others.
    context: TraceContext,
    answer: oneshot::Sender<Result<(), String>>,
}

/// How callbacks are gathered into messages.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Callbacks per message at most.
    pub max: usize,
    /// How long a batch waits for a free slot before it is published anyway.
    pub window: Duration,
    /// Publishes in flight before callbacks wait for company.
    pub slots: usize,
}

impl From<&shared::config::AmqpSettings> for BatchSettings {
    fn from(amqp: &shared::config::AmqpSettings) -> Self {
        Self {
            max: amqp.callback_batch_max,
            window: Duration::from_micros(amqp.callback_batch_window_us),
            slots: amqp.callback_batch_slots,
        }
    }
}

/// Cheap to clone; all clones feed one gathering task.
#[derive(Clone)]
pub struct CallbackBatcher {
    queue: mpsc::Sender<Pending>,
}

impl CallbackBatcher {
    /// Starts the gathering task; it ends when every clone is dropped.
    pub fn start(publisher: Publisher, exchange: Arc<str>, routing_key: &'static str, settings: BatchSettings) -> Self {
        let (queue, pending) = mpsc::channel(settings.max.max(1) * 64);
        tokio::spawn(gather(pending, publisher, exchange, routing_key, settings));
        Self { queue }
    }

    /// Publishes the callback, alone or with others, and returns once the broker confirmed the
    /// message that holds it; the error says why it is not stored.
    pub async fn publish(&self, event: CallbackEvent) -> Result<(), String> {
        let stopped = || "the publisher has stopped".to_owned();
        let (answer, answered) = oneshot::channel();
        let context = current_context();
        self.queue.send(Pending { event, context, answer }).await.map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

async fn gather(
    mut pending: mpsc::Receiver<Pending>,
    publisher: Publisher,
    exchange: Arc<str>,
    routing_key: &'static str,
    settings: BatchSettings,
) {
    // Publishes in flight at once before callbacks wait for company: like a database's group
    // commit, a batch forms while the broker confirms the ones before it, never on a timer
    // while a slot is free.
    let slots = Arc::new(Semaphore::new(settings.slots.max(1)));
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < settings.max {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            // Every slot busy: gather until one frees, the batch is full, or the window ends.
            Err(_) => {
                let deadline = tokio::time::Instant::now() + settings.window;
                loop {
                    if batch.len() >= settings.max {
                        break None;
                    }
                    tokio::select! {
                        biased;
                        slot = slots.clone().acquire_owned() => break slot.ok(),
                        next = pending.recv() => match next {
                            Some(next) => batch.push(next),
                            None => break None,
                        },
                        () = tokio::time::sleep_until(deadline) => break None,
                    }
                }
            }
        };
        let (publisher, exchange) = (publisher.clone(), exchange.clone());
        tokio::spawn(async move {
            let mut events = Vec::with_capacity(batch.len());
            let mut waiting = Vec::with_capacity(batch.len());
            for Pending { event, context, answer } in batch {
                events.push(event);
                waiting.push((context, answer));
            }
            let contexts = waiting.iter().map(|(context, _)| context.clone());
            let result = publish(&publisher, &exchange, routing_key, events, contexts).await.map_err(|e| e.to_string());
            drop(slot);
            metrics::histogram!("smsflow_callback_batch_size").record(waiting.len() as f64);
            for (_, answer) in waiting {
                let _ = answer.send(result.clone());
            }
        });
    }
}

/// One message: a single callback as version 1 (what every consumer reads), several as a
/// version-2 batch.
async fn publish(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &'static str,
    mut events: Vec<CallbackEvent>,
    contexts: impl IntoIterator<Item = TraceContext>,
) -> Result<(), PublishError> {
    let count = events.len();
    let (payload, version) = match events.len() {
        1 => (serde_json::to_vec(&events.pop()), CallbackEvent::VERSION),
        _ => (serde_json::to_vec(&CallbackBatch::new(events)), CallbackEvent::BATCH_VERSION),
    };
    let payload = payload.expect("callbacks serialize");
    let message_id = uuid::Uuid::now_v7().to_string();
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        otel.name = %format!("publish {exchange}"),
        messaging.system = "rabbitmq",
        messaging.operation.name = "publish",
        messaging.destination.name = %exchange,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.id = %message_id,
        messaging.batch.message_count = count,
    );
    continue_and_link(&span, contexts);
    async {
        let properties = json_message(CallbackEvent::SCHEMA, version, &message_id, Default::default());
        publisher.publish(routing_key, &payload, properties).await
    }
    .instrument(span)
    .await
}
