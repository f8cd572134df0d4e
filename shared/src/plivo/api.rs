//! Plivo's Send Message API (`POST /v1/Account/{auth_id}/Message/`, docs/plivo.md §4): the
//! request the worker sends and the simulator reads, and the answers.

use serde::{Deserialize, Serialize};

/// The request body (JSON). Exactly one of `src` and `powerpack_uuid` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMessageRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub powerpack_uuid: Option<String>,
    /// The recipient's digits (several joined by `<` for a bulk send).
    #[serde(default)]
    pub dst: String,
    #[serde(default)]
    pub text: String,
    /// Where Plivo sends the message's status callbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The callbacks' method, `POST` or `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Seconds Plivo may hold the message before giving up on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_expiry: Option<u32>,
}

/// The answer to an accepted request (202): one MessageUUID per recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendMessageResponse {
    #[serde(default)]
    pub api_id: String,
    #[serde(default)]
    pub message: String,
    pub message_uuid: Vec<String>,
}

/// The answer to a refused request: `error` is usually a string, sometimes an object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub api_id: String,
    pub error: serde_json::Value,
}
