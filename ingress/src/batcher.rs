//! Micro-batched publishing of status callbacks. Every callback is a persistent message in a
//! quorum queue before its request is answered 200, but under load the callbacks that arrive
//! while a publish is in flight share one message (`smsflow.plivo-callback` version 2): the
//! broker then pays for one message, one confirm and one delivery per batch instead of per
//! callback. Each request waits for the confirm of the message holding its callback, so a
//! failed publish answers every request of that batch 503, and a crash answers none of them.
//!
//! A callback never waits while the broker has room: with fewer than
//! `amqp.callback_batch_slots` publishes in flight it is published at once, with whatever was
//! already waiting. Otherwise callbacks gather until a publish ends and frees a slot, the batch
//! is full (`amqp.callback_batch_max`), `amqp.callback_batch_window_us` has passed, or nobody
//! else can come: every open HTTP connection already has a callback waiting or in flight (an
//! HTTP/1.1 connection carries one request at a time). Open connections include idle keep-alive
//! ones, which may still send a callback; a batch waits for them only until a slot frees or the
//! window ends. The batch size follows the load, as a database's group commit does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shared::amqp::contracts::{CallbackBatch, CallbackEvent};
use shared::amqp::headers::{CALLBACK_COUNT_HEADER, TraceContext, continue_and_link, current_context, json_message};
use shared::amqp::{PublishError, Publisher};
use tokio::sync::{Notify, mpsc, oneshot};
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
    /// How long a batch gathers, at most, before it is published anyway.
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
    /// Starts the gathering task; it ends when every clone is dropped. `connections`: the HTTP
    /// connections open now, as the server counts them (0: not counted, e.g. a router served
    /// by a test harness; batches then end on size and window only).
    pub fn start(
        publisher: Publisher,
        exchange: Arc<str>,
        routing_key: &'static str,
        settings: BatchSettings,
        connections: Arc<AtomicUsize>,
    ) -> Self {
        let (queue, pending) = mpsc::channel(settings.max.max(1) * 64);
        // Every series at zero from the start, as the other counters.
        for reason in CLOSED_BY {
            metrics::counter!("smsflow_callback_batches_total", "closed_by" => reason).increment(0);
        }
        tokio::spawn(gather(pending, publisher, exchange, routing_key, settings, connections));
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

/// Publishes and callbacks in flight (published, not yet confirmed).
#[derive(Default)]
struct InFlight {
    publishes: AtomicUsize,
    callbacks: AtomicUsize,
    /// Signalled when a publish ends: a gathering batch then checks for a free slot.
    ended: Notify,
}

/// One publish in flight, counted until it ends, also when its task panics or is aborted (a
/// count left behind would make every later callback wait for company that never comes).
struct Flight {
    in_flight: Arc<InFlight>,
    callbacks: usize,
}

impl Flight {
    fn start(in_flight: &Arc<InFlight>, callbacks: usize) -> Self {
        in_flight.publishes.fetch_add(1, Ordering::Relaxed);
        in_flight.callbacks.fetch_add(callbacks, Ordering::Relaxed);
        Self { in_flight: in_flight.clone(), callbacks }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.in_flight.callbacks.fetch_sub(self.callbacks, Ordering::Relaxed);
        self.in_flight.publishes.fetch_sub(1, Ordering::Relaxed);
        self.in_flight.ended.notify_one();
    }
}

/// Why a batch went: `smsflow_callback_batches_total{closed_by}`.
const CLOSED_BY: [&str; 5] = ["free_slot", "full", "everyone_in", "window", "shutdown"];

async fn gather(
    mut pending: mpsc::Receiver<Pending>,
    publisher: Publisher,
    exchange: Arc<str>,
    routing_key: &'static str,
    settings: BatchSettings,
    connections: Arc<AtomicUsize>,
) {
    let in_flight = Arc::new(InFlight::default());
    let slots = settings.slots.max(1);
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < settings.max {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // Why the batch ends (`smsflow_callback_batches_total{closed_by}`): mostly `window` under
        // steady load means callbacks waited for connections that stayed idle.
        let closed_by = if in_flight.publishes.load(Ordering::Relaxed) < slots {
            "free_slot"
        } else {
            let deadline = tokio::time::Instant::now() + settings.window;
            loop {
                let open = connections.load(Ordering::Relaxed);
                let flying = in_flight.callbacks.load(Ordering::Relaxed);
                if let Some(reason) = gathered(batch.len(), settings.max, flying, open) {
                    break reason;
                }
                // The broker has room again: waiting longer would only add latency.
                if in_flight.publishes.load(Ordering::Relaxed) < slots {
                    break "free_slot";
                }
                tokio::select! {
                    biased;
                    next = pending.recv() => match next {
                        Some(next) => batch.push(next),
                        None => break "shutdown",
                    },
                    // A publish ended (or a stale signal): check again.
                    () = in_flight.ended.notified() => {}
                    () = tokio::time::sleep_until(deadline) => break "window",
                }
            }
        };
        metrics::counter!("smsflow_callback_batches_total", "closed_by" => closed_by).increment(1);
        let count = batch.len();
        let flight = Flight::start(&in_flight, count);
        let (publisher, exchange) = (publisher.clone(), exchange.clone());
        tokio::spawn(async move {
            let mut events = Vec::with_capacity(count);
            let mut waiting = Vec::with_capacity(count);
            for Pending { event, context, answer } in batch {
                events.push(event);
                waiting.push((context, answer));
            }
            let contexts = waiting.iter().map(|(context, _)| context.clone());
            let result = publish(&publisher, &exchange, routing_key, events, contexts).await.map_err(|e| e.to_string());
            drop(flight);
            metrics::histogram!("smsflow_callback_batch_size").record(count as f64);
            for (_, answer) in waiting {
                let _ = answer.send(result.clone());
            }
        });
    }
}

/// Whether a gathering batch of `batch` callbacks should go now, and why: it is full, or every
/// one of the `open` connections has its callback in it or among the `in_flight` ones (an
/// HTTP/1.1 connection carries one request at a time, so nobody else can come). `open` = 0:
/// connections are not counted, and only size and window end a batch.
fn gathered(batch: usize, max: usize, in_flight: usize, open: usize) -> Option<&'static str> {
    if batch >= max {
        Some("full")
    } else if open > 0 && batch + in_flight >= open {
        Some("everyone_in")
    } else {
        None
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
        let mut headers = lapin::types::FieldTable::default();
        if count > 1 {
            headers.insert(CALLBACK_COUNT_HEADER.into(), lapin::types::AMQPValue::LongLongInt(count as i64));
        }
        let properties = json_message(CallbackEvent::SCHEMA, version, &message_id, headers);
        publisher.publish(routing_key, &payload, properties).await
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::gathered;

    #[test]
    fn a_batch_goes_when_full_or_when_nobody_else_can_come() {
        assert_eq!(gathered(32, 32, 0, 100), Some("full"));
        assert_eq!(gathered(7, 32, 1, 8), Some("everyone_in"), "7 waiting + 1 in flight of 8 connections");
        assert_eq!(gathered(3, 32, 5, 8), Some("everyone_in"));
        assert_eq!(gathered(6, 32, 1, 8), None, "one connection may still send a callback");
        assert_eq!(gathered(1, 32, 0, 2), None, "an idle keep-alive connection may still send one");
        assert_eq!(gathered(5, 32, 0, 0), None, "uncounted connections: only size and window end it");
        assert_eq!(gathered(40, 32, 0, 0), Some("full"));
    }
}
