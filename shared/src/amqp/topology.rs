//! The broker topology, declared idempotently by one function that both services call at
//! start and after every reconnect.
//!
//! ```text
//!  {p} (topic) ──callback.status──► {p}.status ──(rejected / delivery limit)──► {p}.dead ──► {p}.status.dead
//!              ──callback.inbound─► {p}.inbound                                         ──► {p}.inbound.dead
//!              ──send.job─────────► {p}.send                                            ──► {p}.send.dead
//!              ──webhook.delivery─► {p}.webhook                                         ──► {p}.webhook.dead
//!  {p}.status.retry.N (TTL = retry_delays_ms[N-1]) ──expires──► {p}.status   (likewise for each stream)
//! ```
//! Every queue is a quorum queue (replicated, and required for at-least-once dead-lettering).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpSettings;

/// A kind of work, each with its own queue, dead-letter queue and retry ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Plivo message status callbacks.
    Status,
    /// Plivo inbound SMS webhooks.
    Inbound,
    /// Send jobs from HTTP clients and internal publishers.
    Send,
    /// Signed webhooks to deliver: one per status event of a message with a callback URL,
    /// handed over by the event relay.
    Webhook,
}

impl Stream {
    pub const ALL: [Stream; 4] = [Stream::Status, Stream::Inbound, Stream::Send, Stream::Webhook];

    pub fn name(self) -> &'static str {
        match self {
            Stream::Status => "status",
            Stream::Inbound => "inbound",
            Stream::Send => "send",
            Stream::Webhook => "webhook",
        }
    }

    /// The routing key publishers use on the main exchange.
    pub fn routing_key(self) -> &'static str {
        match self {
            Stream::Status => "callback.status",
            Stream::Inbound => "callback.inbound",
            Stream::Send => "send.job",
            Stream::Webhook => "webhook.delivery",
        }
    }
}

/// Names and arguments of every exchange and queue, derived from the settings.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
    retry_delays_ms: Vec<u64>,
    /// 0: queues never expire.
    idle_expiry_ms: u64,
}

impl Topology {
    pub fn new(prefix: impl Into<String>, delivery_limit: u32, retry_delays_ms: Vec<u64>) -> Self {
        Self { prefix: prefix.into(), delivery_limit, retry_delays_ms, idle_expiry_ms: 0 }
    }

    /// Queues that RabbitMQ deletes after `ms` without use, for throwaway topologies; every
    /// declarer of one topology must agree, or RabbitMQ refuses the declaration.
    pub fn with_idle_expiry(mut self, ms: u64) -> Self {
        self.idle_expiry_ms = ms;
        self
    }

    pub fn from_settings(settings: &AmqpSettings) -> Self {
        Self::new(&settings.prefix, settings.delivery_limit, settings.retry_delays_ms.clone())
            .with_idle_expiry(settings.idle_queue_expiry_ms)
    }

    pub fn idle_expiry_ms(&self) -> u64 {
        self.idle_expiry_ms
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The topic exchange every publisher uses.
    pub fn exchange(&self) -> String {
        self.prefix.clone()
    }

    /// The topic exchange of status events, inbound SMS and opt-outs, for services to bind
    /// their own queues to (`message.status.*`, `inbound.received`, `optout.*`).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Where rejected messages and messages over the delivery limit go.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    pub fn queue(&self, stream: Stream) -> String {
        format!("{}.{}", self.prefix, stream.name())
    }

    pub fn dead_letter_queue(&self, stream: Stream) -> String {
        format!("{}.{}.dead", self.prefix, stream.name())
    }

    /// The delay queue for the `attempt`-th retry (1-based), or `None` past the last rung.
    pub fn retry_queue(&self, stream: Stream, attempt: usize) -> Option<String> {
        (1..=self.retry_delays_ms.len())
            .contains(&attempt)
            .then(|| format!("{}.{}.retry.{attempt}", self.prefix, stream.name()))
    }

    pub fn retry_delays_ms(&self) -> &[u64] {
        &self.retry_delays_ms
    }

    /// Declares everything; declaring again with the same settings changes nothing.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel.exchange_declare(self.exchange().into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        channel
            .exchange_declare(self.dead_letter_exchange().into(), ExchangeKind::Direct, durable, FieldTable::default())
            .await?;
        channel
            .exchange_declare(self.events_exchange().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        for stream in Stream::ALL {
            self.declare_stream(channel, stream).await?;
        }
        Ok(())
    }

    async fn declare_stream(&self, channel: &Channel, stream: Stream) -> lapin::Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let work = self.queue(stream);
        let dead = self.dead_letter_queue(stream);

        channel.queue_declare(dead.as_str().into(), durable, self.queue_args(quorum_args())).await?;
        channel
            .queue_bind(
                dead.as_str().into(),
                self.dead_letter_exchange().into(),
                stream.name().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut args = dead_lettering_args(&self.dead_letter_exchange(), stream.name());
        // Without an explicit limit RabbitMQ 4 drops a message after 20 redeliveries.
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(self.delivery_limit.into()));
        channel.queue_declare(work.as_str().into(), durable, self.queue_args(args)).await?;
        channel
            .queue_bind(
                work.as_str().into(),
                self.exchange().into(),
                stream.routing_key().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        for (rung, delay_ms) in self.retry_delays_ms.iter().enumerate() {
            let Some(retry) = self.retry_queue(stream, rung + 1) else {
                continue;
            };
            // Expired messages go straight back to the work queue through the default exchange.
            let mut args = dead_lettering_args("", &work);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(*delay_ms as i64));
            channel.queue_declare(retry.as_str().into(), durable, self.queue_args(args)).await?;
        }
        Ok(())
    }

    fn queue_args(&self, mut args: FieldTable) -> FieldTable {
        if self.idle_expiry_ms > 0 {
            args.insert("x-expires".into(), AMQPValue::LongLongInt(self.idle_expiry_ms as i64));
        }
        args
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args
}

/// Quorum-queue dead-lettering that cannot lose a message on the way (at-least-once, which
/// RabbitMQ only allows together with reject-publish overflow).
fn dead_lettering_args(exchange: &str, routing_key: &str) -> FieldTable {
    let mut args = quorum_args();
    args.insert("x-dead-letter-exchange".into(), long_string(exchange));
    args.insert("x-dead-letter-routing-key".into(), long_string(routing_key));
    args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
    args.insert("x-overflow".into(), long_string("reject-publish"));
    args
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The header that says why a message was dead-lettered by smsflow itself.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-smsflow-dead-reason";
/// How many times a message went through the retry ladder.
pub const RETRY_COUNT_HEADER: &str = "x-smsflow-retry-count";
/// How many times a webhook went round the ladder because its endpoint was busy (not an
/// attempt: the retry count is unchanged).
pub const DEFERRAL_COUNT_HEADER: &str = "x-smsflow-deferrals";
/// On a send job going round the retry ladder after Plivo accepted it: Plivo's MessageUUID
/// (empty if its answer had none). The redelivery records the submission; it never resends.
pub const PLIVO_ACCEPTED_HEADER: &str = "x-smsflow-plivo-accepted";
/// How many times an operator replayed the message from its dead-letter queue: it was
/// processed before, so a send job found in `sending` was interrupted, not in progress.
pub const REPLAY_COUNT_HEADER: &str = "x-smsflow-replay-count";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_the_ladder_has_one_queue_per_rung() {
        let t = Topology::new("p1", 5, vec![10, 20]);
        assert_eq!(t.queue(Stream::Status), "p1.status");
        assert_eq!(t.dead_letter_queue(Stream::Send), "p1.send.dead");
        assert_eq!(t.retry_queue(Stream::Inbound, 1).as_deref(), Some("p1.inbound.retry.1"));
        assert_eq!(t.retry_queue(Stream::Inbound, 2).as_deref(), Some("p1.inbound.retry.2"));
        assert_eq!(t.retry_queue(Stream::Inbound, 3), None);
        assert_eq!(t.retry_queue(Stream::Inbound, 0), None);
    }

    #[test]
    fn queues_expire_only_when_an_idle_expiry_is_set() {
        let expires = |t: &Topology| {
            t.queue_args(FieldTable::default())
                .inner()
                .iter()
                .find(|(k, _)| k.as_str() == "x-expires")
                .map(|(_, v)| v.clone())
        };
        assert_eq!(expires(&Topology::new("p", 5, vec![]).with_idle_expiry(0)), None);
        assert_eq!(expires(&Topology::new("p", 5, vec![])), None);
        assert_eq!(
            expires(&Topology::new("p", 5, vec![]).with_idle_expiry(3_600_000)),
            Some(AMQPValue::LongLongInt(3_600_000))
        );
    }
}
