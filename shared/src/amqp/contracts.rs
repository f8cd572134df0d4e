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
