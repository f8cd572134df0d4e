//! Inbound SMS: stored once per Plivo MessageUUID, and the opt-out list kept from them.
//!
//! STOP-family keywords (STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT) and Plivo's
//! `MessageIntent=optout` add the sender to `opt_outs` for the number it wrote to (STOPALL: for
//! all our numbers); START/UNSTOP and `MessageIntent=optin` remove the opt-out from the number it
//! was sent to. An action is applied only the first time its message is stored, so a replay
//! never undoes a later change, and in the order the recipient sent them (`sent_at`), not the
//! order they reached us: a START that Plivo retried after a later STOP does not lift it. In
//! doubt (equal times) the number stays opted out; a START never lifts a STOPALL, which holds for
//! every number until an operator lifts it.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use lapin::message::Delivery;
use shared::amqp::contracts::CallbackEvent;
use shared::amqp::{Stream, Topology};
use shared::config::WorkerSettings;
use shared::domain::InboundSms;
use shared::domain::phone::{party_identity, their_identity};
use shared::plivo::callback::{self, field, non_empty};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, DeadReason, Disposition, Rerouter, Session, SessionEnd};
use crate::storage;

/// What an inbound message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consent {
    /// Stop messages from `sender` (`*`: from all of our numbers).
    OptOut {
        sender: String,
        source: &'static str,
    },
    /// Allow messages from `sender` again.
    OptIn {
        sender: String,
    },
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    /// What the status API shows of it.
    pub sms: InboundSms,
    pub amount: Option<String>,
    pub params: serde_json::Value,
    /// When the recipient sent it: Plivo's `MessageTime` if given, else the time inside a
    /// time-based MessageUUID, else when the ingress received it.
    pub sent_at: OffsetDateTime,
    pub consent: Consent,
}

const STOP_WORDS: [&str; 6] = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"];
const START_WORDS: [&str; 2] = ["START", "UNSTOP"];

/// The time inside a time-based (version 1) UUID, as Plivo's MessageUUIDs are.
fn uuid_time(raw: &str) -> Option<OffsetDateTime> {
    let uuid = uuid::Uuid::parse_str(raw).ok().filter(|u| u.get_version_num() == 1)?;
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(secs) * 1_000_000_000 + i128::from(nanos)).ok()
}

pub fn parse(payload: &[u8]) -> Result<InboundMessage, DeadReason> {
    let event: CallbackEvent = serde_json::from_slice(payload)
        .map_err(|e| DeadReason::NotJson(format!("not a JSON callback event: {}", shared::redact::json_error(&e))))?;
    if event.schema != CallbackEvent::SCHEMA || event.version != CallbackEvent::VERSION {
        return Err(DeadReason::Schema(format!("unsupported schema {:?} version {}", event.schema, event.version)));
    }
    let value = |key: &str| non_empty(event.param(key));
    let required =
        |key: &str| value(key).ok_or_else(|| DeadReason::MissingField(format!("inbound message has no {key}")));
    let message_uuid = required(field::MESSAGE_UUID)?.to_owned();
    let sender = their_identity(required(field::FROM)?);
    let recipient = party_identity(required(field::TO)?);
    let sent_at = value(field::MESSAGE_TIME)
        .and_then(callback::parse_time)
        .or_else(|| uuid_time(&message_uuid))
        .unwrap_or(event.received_at);
    let body = event.param(field::TEXT).or_else(|| event.param(field::BODY)).map(str::to_owned);
    let intent = value(field::MESSAGE_INTENT).map(str::to_ascii_lowercase);
    let keyword = body
        .as_deref()
        .and_then(|t| t.split_whitespace().next())
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_ascii_uppercase());
    let consent = match (intent.as_deref(), keyword.as_deref()) {
        (_, Some("STOPALL")) => Consent::OptOut { sender: "*".into(), source: "keyword" },
        (_, Some(word)) if STOP_WORDS.contains(&word) => {
            Consent::OptOut { sender: recipient.clone(), source: "keyword" }
        }
        (Some("optout"), _) => Consent::OptOut { sender: recipient.clone(), source: "intent" },
        (_, Some(word)) if START_WORDS.contains(&word) => Consent::OptIn { sender: recipient.clone() },
        (Some("optin"), _) => Consent::OptIn { sender: recipient.clone() },
        _ => Consent::None,
    };
    // Stored as status callbacks' are: a repeated field keeps every value.
    let params = serde_json::from_str(&callback::fields_json(&event.params)).unwrap_or_default();
    Ok(InboundMessage {
        sms: InboundSms {
            message_uuid,
            sender,
            recipient,
            body,
            message_type: value(field::TYPE).unwrap_or("sms").to_owned(),
            units: value(field::UNITS).and_then(|u| u.parse().ok()),
            intent,
            received_at: event.received_at,
        },
        amount: callback::plausible_amount(value(field::TOTAL_AMOUNT)),
        params,
        sent_at,
        consent,
    })
}

pub struct InboundPipeline {
    pub settings: WorkerSettings,
    pub topology: Topology,
    pub pool: PgPool,
    pub rerouter: Rerouter,
    pub consuming: Arc<AtomicBool>,
}

impl InboundPipeline {
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        broker::consume_with_reconnect(
            &self.settings.amqp,
            &self.topology,
            Stream::Inbound,
            100,
            &self.consuming,
            &shutdown,
            |session| Box::pin(self.clone().consume(session, shutdown.clone())),
        )
        .await
    }

    async fn consume(self: Arc<Self>, session: &mut Session, shutdown: CancellationToken) -> SessionEnd {
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return SessionEnd::Shutdown,
                next = session.next_delivery() => next,
            };
            let delivery = match next {
                Ok(delivery) => delivery,
                Err(e) => return SessionEnd::Lost(e),
            };
            if let Err(error) = self.process(&delivery).await {
                return SessionEnd::Lost(error);
            }
        }
    }

    async fn process(&self, delivery: &Delivery) -> anyhow::Result<()> {
        let disposition = match parse(&delivery.data) {
            Err(reason) => Disposition::Dead(reason),
            Ok(message) => match storage::inbound::record(&self.pool, &message).await {
                Ok(first_time) => {
                    if first_time && message.consent != Consent::None {
                        tracing::info!(sender = %shared::redact::phone(&message.sms.sender), consent = ?message.consent, "consent recorded");
                    }
                    Disposition::Done
                }
                Err(e) => storage::disposition_of(e),
            },
        };
        self.rerouter.dispose(Stream::Inbound, delivery, disposition).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str, intent: &str) -> Vec<u8> {
        let params = [
            ("From", "14155552671"),
            ("To", "14155559999"),
            ("Text", text),
            ("MessageUUID", "in-1"),
            ("MessageIntent", intent),
        ];
        serde_json::to_vec(&shared::testing::callback_event(&params)).unwrap()
    }

    #[test]
    fn keywords_and_intents_become_consent() {
        let ours = "+14155559999".to_string();
        assert_eq!(
            parse(&event("stop", "")).unwrap().consent,
            Consent::OptOut { sender: ours.clone(), source: "keyword" }
        );
        assert_eq!(
            parse(&event("  Unsubscribe please", "")).unwrap().consent,
            Consent::OptOut { sender: ours.clone(), source: "keyword" }
        );
        assert_eq!(
            parse(&event("STOPALL", "")).unwrap().consent,
            Consent::OptOut { sender: "*".into(), source: "keyword" }
        );
        assert_eq!(
            parse(&event("no more", "optout")).unwrap().consent,
            Consent::OptOut { sender: ours.clone(), source: "intent" }
        );
        assert_eq!(parse(&event("START", "")).unwrap().consent, Consent::OptIn { sender: ours.clone() });
        assert_eq!(parse(&event("hi", "optin")).unwrap().consent, Consent::OptIn { sender: ours });
        assert_eq!(parse(&event("stopping by later", "")).unwrap().consent, Consent::None);
        assert_eq!(parse(&event("hello", "")).unwrap().sms.sender, "+14155552671");
    }

    #[test]
    fn a_short_code_is_stored_as_the_send_path_writes_it() {
        let params = [("From", "14155552671"), ("To", "12345"), ("Text", "STOP"), ("MessageUUID", "in-2")];
        let message = parse(&serde_json::to_vec(&shared::testing::callback_event(&params)).unwrap()).unwrap();
        assert_eq!(message.consent, Consent::OptOut { sender: "12345".into(), source: "keyword" });
        assert_eq!(message.sms.recipient, "12345");
    }

    #[test]
    fn the_message_time_comes_from_plivo_when_it_can() {
        let with = |uuid: &str, extra: &[(&'static str, &'static str)]| {
            let mut params = vec![("From", "14155552671"), ("To", "14155559999"), ("Text", "START")];
            params.push(("MessageUUID", uuid));
            params.extend_from_slice(extra);
            parse(&serde_json::to_vec(&shared::testing::callback_event(&params)).unwrap()).unwrap()
        };
        // A version-1 UUID made at 2012-04-05 ~12:58 UTC (Plivo's documented example).
        let from_uuid = with("db3ce55a-7f1d-11e1-8ea7-1231380bc196", &[]);
        assert_eq!(from_uuid.sent_at.date().year(), 2012);
        let explicit = with("db3ce55a-7f1d-11e1-8ea7-1231380bc196", &[("MessageTime", "2024-05-14 09:12:44.319284")]);
        assert_eq!(explicit.sent_at.unix_timestamp(), 1_715_677_964);
        let neither = with("not-a-uuid", &[]);
        assert_eq!(neither.sent_at, neither.sms.received_at);
    }
}
