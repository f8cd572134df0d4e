//! Message contracts on the broker. Each has a schema name and version, carried both in the
//! body and in the `x-smsflow-schema*` headers, so consumers can reject what they do not know.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A verified Plivo webhook (status callback or inbound SMS), exactly as received.
///
/// The ingress parses nothing into domain types: every parameter travels, in wire order with
/// duplicates, so fields Plivo adds later are kept and the worker decides what is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackEvent {
    pub schema: String,
    pub version: u32,
    /// The callback's fields: the form body of a POST, the query of a GET (without `ref`).
    pub params: Vec<(String, String)>,
    /// Every decoded query parameter of the URL Plivo called (including `ref`).
    #[serde(default)]
    pub query: Vec<(String, String)>,
    /// Our message id, from the `ref` query parameter the worker puts into callback URLs.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub method: String,
    /// Which signature scheme authenticated it (`v3` or `v2`).
    pub signature: String,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub request_id: String,
}

impl CallbackEvent {
    pub const SCHEMA: &'static str = "smsflow.plivo-callback";
    pub const VERSION: u32 = 1;
    /// A [`CallbackBatch`]: several callbacks in one message.
    pub const BATCH_VERSION: u32 = 2;

    /// The first value of a field.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Several verified callbacks in one persistent message (`smsflow.plivo-callback` version 2):
/// under load the ingress publishes the callbacks that arrive within a short window together,
/// and answers each request once this message is confirmed. Each element is a whole version-1
/// body, so one that cannot be processed is dead-lettered alone, as a version-1 message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackBatch {
    pub schema: String,
    pub version: u32,
    pub callbacks: Vec<CallbackEvent>,
}

impl CallbackBatch {
    pub fn new(callbacks: Vec<CallbackEvent>) -> Self {
        Self { schema: CallbackEvent::SCHEMA.into(), version: CallbackEvent::BATCH_VERSION, callbacks }
    }
}

/// One SMS to send, with or without its id: the fields are written once, here, for the send
/// job on the broker ([`SendJob`]) and the HTTP send API's body ([`SendRequest`]), which has no
/// id (the service assigns one, or derives it from the `Idempotency-Key` header).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(
        as = SendRequest,
        bound = "",
        description = "One SMS to send. The service assigns its id, or derives it from the Idempotency-Key header."
    )
)]
#[serde(deny_unknown_fields)]
pub struct SendMessage<Id> {
    /// The OpenAPI document describes the HTTP body, which has none.
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub id: Id,
    /// Recipient in E.164 (`+14155550100`).
    #[cfg_attr(feature = "openapi", schema(examples("+14155552671")))]
    pub to: String,
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub text: String,
    /// Sender: E.164 number, short code or alphanumeric ID; defaults to `plivo.default_sender`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(format = Uuid))]
    pub powerpack_uuid: Option<String>,
    /// Seconds Plivo may queue the message before failing it with 420.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 5, maximum = 10799))]
    pub message_expiry: Option<u32>,
    /// Stored with the message and returned as-is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// An http(s) URL that receives each status change of the message as a signed webhook
    /// (Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 2048, pattern = "^[Hh][Tt][Tt][Pp][Ss]?://"))]
    pub callback: Option<String>,
}

/// A request to send one SMS (`smsflow.send-job` version 1; JSON Schema in
/// `docs/schemas/send-job.v1.json`). `id` is the idempotency key: one id is at most one SMS.
pub type SendJob = SendMessage<uuid::Uuid>;

/// The HTTP send API's body: a send job without its id. A body that names one is refused.
pub type SendRequest = SendMessage<Option<Unassigned>>;

/// Where an id would be that the caller may not give: absent deserializes to `None`, any
/// value is an error that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unassigned {}

const ID_REFUSAL: &str = "id is assigned by smsflow; to choose it, send an Idempotency-Key header instead";

impl<'de> Deserialize<'de> for Unassigned {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(ID_REFUSAL))
    }
}

impl Serialize for Unassigned {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        match *self {}
    }
}

impl SendRequest {
    /// Reads the HTTP body, refusing any `id` in it: serde reads `"id": null` as an absent
    /// `Option`, so the keys are looked at too.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        let request: Self = serde_json::from_slice(body)?;
        let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> = serde_json::from_slice(body)?;
        if keys.contains_key("id") {
            return Err(serde::de::Error::custom(ID_REFUSAL));
        }
        Ok(request)
    }

    /// The send job this request becomes under `id`.
    pub fn into_job(self, id: uuid::Uuid) -> SendJob {
        let SendMessage { id: _, to, text, from, powerpack_uuid, message_expiry, metadata, callback } = self;
        SendMessage { id, to, text, from, powerpack_uuid, message_expiry, metadata, callback }
    }
}

impl SendJob {
    pub const SCHEMA: &'static str = "smsflow.send-job";
    pub const VERSION: u32 = 1;
}

/// An event for subscribing services (`smsflow.event` version 1; JSON Schema in
/// `docs/schemas/event.v1.json`), published to the `{prefix}.events` topic exchange with its
/// type as the routing key. At least once: `id` is stable across redeliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub schema: String,
    pub version: u32,
    pub id: uuid::Uuid,
    /// `message.status.<status>`, `inbound.received`, `optout.added` or `optout.removed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the change happened: Plivo's time of a status when it gave one, else when smsflow
    /// recorded it.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// When smsflow committed the change.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    pub data: serde_json::Value,
}

impl Event {
    pub const SCHEMA: &'static str = "smsflow.event";
    pub const VERSION: u32 = 1;

    /// An event as stored in the outbox, with the meaning of its Plivo error code added.
    pub fn new(
        id: uuid::Uuid,
        kind: &str,
        occurred_at: OffsetDateTime,
        recorded_at: OffsetDateTime,
        mut data: serde_json::Value,
    ) -> Self {
        let code = data.get("error_code").and_then(serde_json::Value::as_u64);
        if let (Some(code), Some(fields)) = (code, data.as_object_mut()) {
            let info = crate::plivo::errors::classify(code as u32);
            fields.insert("error".into(), serde_json::json!(info));
        }
        Self {
            schema: Self::SCHEMA.into(),
            version: Self::VERSION,
            id,
            kind: kind.to_owned(),
            occurred_at,
            recorded_at,
            data,
        }
    }
}

/// A webhook to deliver (`smsflow.webhook` version 1): the event relay publishes one per status
/// event of a message that has a callback URL, in the same round as the event itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookJob {
    pub schema: String,
    pub version: u32,
    /// The message's callback URL.
    pub url: String,
    pub message_id: uuid::Uuid,
    /// The body of the POST, as subscribers over AMQP receive it.
    pub event: Event,
}

impl WebhookJob {
    pub const SCHEMA: &'static str = "smsflow.webhook";
    pub const VERSION: u32 = 1;

    pub fn new(url: String, message_id: uuid::Uuid, event: Event) -> Self {
        Self { schema: Self::SCHEMA.into(), version: Self::VERSION, url, message_id, event }
    }
}
