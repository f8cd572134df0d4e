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

    /// The first value of a field.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A request to send one SMS (`smsflow.send-job` version 1; JSON Schema in
/// `docs/schemas/send-job.v1.json`). `id` is the idempotency key: one id is at most one SMS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendJob {
    pub id: uuid::Uuid,
    /// Recipient in E.164 (`+14155550100`).
    pub to: String,
    pub text: String,
    /// Sender: E.164 number, short code or alphanumeric ID; defaults to `plivo.default_sender`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub powerpack_uuid: Option<String>,
    /// Seconds Plivo may queue the message before failing it with 420.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_expiry: Option<u32>,
    /// Stored with the message and returned as-is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Reserved: a URL to notify of status changes (accepted and validated, not yet called).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<String>,
}

impl SendJob {
    pub const SCHEMA: &'static str = "smsflow.send-job";
    pub const VERSION: u32 = 1;
}
