//! From a queued Plivo callback to a status update, or to the reason it is poison.

use sha2::{Digest, Sha256};
use shared::amqp::contracts::CallbackEvent;
use shared::domain::MessageStatus;
use shared::domain::phone::{party_identity, their_identity};
use shared::plivo::callback::{self, field, non_empty};
use shared::plivo::errors::parse_error_code;
use time::OffsetDateTime;
use uuid::Uuid;

/// One distinct callback, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// Our message id from `ref`, when the callback carries one.
    pub reference: Option<Uuid>,
    pub message_uuid: String,
    pub status: MessageStatus,
    /// Plivo's `Sequence`: generation order of callbacks for one message.
    pub sequence: Option<i64>,
    pub error_code: Option<i32>,
    pub units: Option<i32>,
    /// `TotalAmount` as Plivo wrote it (a decimal string).
    pub amount: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    /// When the status happened according to Plivo, when the callback says. Part of the
    /// status precedence, which only callback parameters may decide.
    pub plivo_time: Option<OffsetDateTime>,
    /// `plivo_time`, else when the ingress received the callback.
    pub event_at: OffsetDateTime,
    pub received_at: OffsetDateTime,
    /// SHA-256 of the sorted parameters: a Plivo retry (new nonce, same fields) is the same event.
    pub dedupe_key: [u8; 32],
    /// The parameters as the text of a JSON object (a repeated key holds an array of its
    /// values): written once, as text, instead of built and cloned as a tree per event.
    pub params: String,
}

/// Why an event can never be processed; it goes to the dead-letter queue with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    #[error("not a JSON callback event: {0}")]
    NotJson(String),
    #[error("unsupported schema {schema:?} version {version} (expected {expected:?} version {expected_version})")]
    WrongSchema { schema: String, version: u32, expected: &'static str, expected_version: u32 },
    #[error("callback has no MessageUUID")]
    NoMessageUuid,
    #[error("callback has no Status")]
    NoStatus,
    #[error("unknown status {0:?}")]
    UnknownStatus(String),
}

impl From<Poison> for crate::broker::DeadReason {
    fn from(poison: Poison) -> Self {
        let text = poison.to_string();
        match poison {
            Poison::NotJson(_) => Self::NotJson(text),
            Poison::WrongSchema { .. } => Self::Schema(text),
            Poison::NoMessageUuid | Poison::NoStatus => Self::MissingField(text),
            Poison::UnknownStatus(_) => Self::UnknownStatus(text),
        }
    }
}

/// One callback of a delivery: its update or why it is poison, and, inside a batch, its own
/// version-1 body (to dead-letter it alone: its neighbours are processed), borrowed from the
/// delivery.
#[derive(Debug)]
pub struct Item<'a> {
    pub update: Result<StatusUpdate, Poison>,
    pub alone: Option<&'a [u8]>,
}

/// A version-2 body with its callbacks left as text: each is read from its own text, which is
/// also the version-1 body it is dead-lettered as (nothing is serialized again per callback).
#[derive(serde::Deserialize)]
struct RawBatch<'a> {
    schema: String,
    version: u32,
    #[serde(borrow)]
    callbacks: Vec<&'a serde_json::value::RawValue>,
}

/// Reads a delivery: one callback (version 1) or a batch of them (version 2). `version` is what
/// the message's `x-smsflow-schema-version` header says: that reading is tried first, the other
/// one after it, so a wrong header costs a second parse, and the error reported is the one of
/// the reading the header named. An error: the message as a whole is unreadable, and is
/// dead-lettered whole (also a batch whose text is not valid UTF-8: its parts cannot be told
/// apart).
pub fn parse_delivery(payload: &[u8], version: Option<u32>) -> Result<Vec<Item<'_>>, Poison> {
    let single = || serde_json::from_slice::<CallbackEvent>(payload).map(|event| vec![Item::alone_in(event)]);
    if version == Some(CallbackEvent::BATCH_VERSION) {
        return match parse_batch(payload) {
            Ok(items) => items,
            Err(batch_error) => single().map_err(|_| not_json(&batch_error)),
        };
    }
    single().or_else(|e| parse_batch(payload).unwrap_or_else(|_| Err(not_json(&e))))
}

impl Item<'_> {
    /// The only callback of a version-1 delivery.
    fn alone_in(event: CallbackEvent) -> Self {
        Self { update: parse_event(event), alone: None }
    }
}

/// A body that is not JSON of the expected shape, named without quoting its values.
fn not_json(error: &serde_json::Error) -> Poison {
    Poison::NotJson(shared::redact::json_error(error))
}

/// A version-2 body's callbacks; the parse error when the body is not shaped as one.
fn parse_batch(payload: &[u8]) -> Result<Result<Vec<Item<'_>>, Poison>, serde_json::Error> {
    let batch = serde_json::from_slice::<RawBatch<'_>>(payload)?;
    if let Err(poison) = check_schema(&batch.schema, batch.version, CallbackEvent::BATCH_VERSION) {
        return Ok(Err(poison));
    }
    Ok(Ok(batch
        .callbacks
        .into_iter()
        .map(|raw| {
            let text = raw.get();
            let update = serde_json::from_str::<CallbackEvent>(text).map_err(|e| not_json(&e)).and_then(parse_event);
            Item { update, alone: Some(text.as_bytes()) }
        })
        .collect()))
}

/// Reads a single callback (version 1).
pub fn parse(payload: &[u8]) -> Result<StatusUpdate, Poison> {
    let event: CallbackEvent = serde_json::from_slice(payload).map_err(|e| not_json(&e))?;
    parse_event(event)
}

fn check_schema(schema: &str, version: u32, expected_version: u32) -> Result<(), Poison> {
    if schema != CallbackEvent::SCHEMA || version != expected_version {
        let schema = schema.to_owned();
        return Err(Poison::WrongSchema { schema, version, expected: CallbackEvent::SCHEMA, expected_version });
    }
    Ok(())
}

fn parse_event(event: CallbackEvent) -> Result<StatusUpdate, Poison> {
    check_schema(&event.schema, event.version, CallbackEvent::VERSION)?;
    let message_uuid = non_empty(event.param(field::MESSAGE_UUID)).ok_or(Poison::NoMessageUuid)?.to_owned();
    let raw_status = non_empty(event.param(field::STATUS)).ok_or(Poison::NoStatus)?;
    let status =
        MessageStatus::from_callback(raw_status).ok_or_else(|| Poison::UnknownStatus(raw_status.to_owned()))?;
    let reference = event.reference.as_deref().and_then(|r| match Uuid::parse_str(r) {
        Ok(id) => Some(id),
        Err(_) => {
            // Not ours (a hand-made callback URL); correlate by MessageUUID instead.
            tracing::warn!(message_uuid, "callback ref is not a message id; ignored");
            None
        }
    });
    let plivo_time =
        field::STATUS_TIMES.iter().find_map(|key| non_empty(event.param(key)).and_then(callback::parse_time));
    Ok(StatusUpdate {
        reference,
        message_uuid,
        status,
        sequence: non_empty(event.param(field::SEQUENCE)).and_then(|v| v.parse().ok()),
        error_code: parse_error_code(event.param(field::ERROR_CODE)).and_then(|c| i32::try_from(c).ok()),
        units: non_empty(event.param(field::UNITS)).and_then(|v| v.parse().ok()),
        amount: callback::plausible_amount(event.param(field::TOTAL_AMOUNT)),
        sender: non_empty(event.param(field::FROM)).map(party_identity),
        recipient: non_empty(event.param(field::TO)).map(their_identity),
        plivo_time,
        event_at: plivo_time.unwrap_or(event.received_at),
        received_at: event.received_at,
        dedupe_key: dedupe_key(&event.params),
        params: callback::fields_json(&event.params),
    })
}

/// Length-prefixed so that no two different parameter sets hash the same text.
pub fn dedupe_key(params: &[(String, String)]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    shared::plivo::form::hash_fields(&mut hasher, params);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::amqp::contracts::CallbackBatch;

    fn event(params: &[(&str, &str)]) -> Vec<u8> {
        serde_json::to_vec(&shared::testing::callback_event(params)).unwrap()
    }

    #[test]
    fn parses_a_full_callback() {
        let update = parse(&event(&[
            ("MessageUUID", "u1"),
            ("Status", "undelivered"),
            ("ErrorCode", "30"),
            ("Sequence", "4"),
            ("Units", "2"),
            ("TotalAmount", "0.01300"),
            ("DeliveryReportTime", "2024-05-14 09:12:49.750186"),
            ("To", "14155559292"),
        ]))
        .unwrap();
        assert_eq!(update.recipient.as_deref(), Some("+14155559292"), "numbers are stored in E.164");
        assert_eq!(update.status, MessageStatus::Undelivered);
        assert_eq!((update.error_code, update.sequence, update.units), (Some(30), Some(4), Some(2)));
        assert_eq!(update.amount.as_deref(), Some("0.01300"));
        assert_eq!(update.event_at.unix_timestamp(), 1_715_677_969);
    }

    #[test]
    fn poison_is_recognised_with_its_reason() {
        assert!(matches!(parse(b"not json"), Err(Poison::NotJson(_))));
        assert_eq!(parse(&event(&[("Status", "sent")])), Err(Poison::NoMessageUuid));
        assert_eq!(parse(&event(&[("MessageUUID", "u")])), Err(Poison::NoStatus));
        assert_eq!(
            parse(&event(&[("MessageUUID", "u"), ("Status", "lost")])),
            Err(Poison::UnknownStatus("lost".into()))
        );
    }

    #[test]
    fn a_batch_is_read_callback_by_callback_and_its_poison_kept_alone() {
        let good = shared::testing::callback_event(&[("MessageUUID", "u1"), ("Status", "sent")]);
        let poison = shared::testing::callback_event(&[("MessageUUID", "u2"), ("Status", "lost")]);
        let batch = CallbackBatch::new(vec![good.clone(), poison.clone(), good]);
        let body = serde_json::to_vec(&batch).unwrap();
        let items = parse_delivery(&body, Some(2)).unwrap();
        assert_eq!(parse_delivery(&body, None).unwrap().len(), 3, "the body decides, not the header");
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].update.as_ref().unwrap().status, MessageStatus::Sent);
        assert_eq!(items[1].update, Err(Poison::UnknownStatus("lost".into())));
        let alone: CallbackEvent = serde_json::from_slice(items[1].alone.unwrap()).unwrap();
        assert_eq!(alone, poison, "the poison is dead-lettered as the version-1 message it was");
        let single_body = event(&[("MessageUUID", "u1"), ("Status", "sent")]);
        for hint in [None, Some(1), Some(2)] {
            let single = parse_delivery(&single_body, hint).unwrap();
            assert!(single.len() == 1 && single[0].alone.is_none(), "version 1 is still read ({hint:?})");
            assert!(matches!(parse_delivery(b"[1]", hint), Err(Poison::NotJson(_))));
        }
        let broken = br#"{"schema":"smsflow.plivo-callback","version":2,"callbacks":[{"schema":1}]}"#;
        let items = parse_delivery(broken, Some(2)).unwrap();
        assert!(matches!(items[0].update, Err(Poison::NotJson(_))), "an unreadable part is poison alone");
        let unknown = serde_json::json!({"schema": "smsflow.plivo-callback", "version": 3, "callbacks": []});
        assert!(matches!(
            parse_delivery(unknown.to_string().as_bytes(), None),
            Err(Poison::WrongSchema { version: 3, .. })
        ));
    }

    #[test]
    fn the_dedupe_key_ignores_wire_order_but_not_content() {
        let a = dedupe_key(&[("a".into(), "1".into()), ("b".into(), "2".into())]);
        let b = dedupe_key(&[("b".into(), "2".into()), ("a".into(), "1".into())]);
        let c = dedupe_key(&[("a".into(), "12".into()), ("b".into(), "".into())]);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
