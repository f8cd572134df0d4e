//! An inbound SMS as stored: the columns of `inbound_messages` that the worker writes and the
//! status API reads, in one type.

use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InboundSms {
    /// Plivo's MessageUUID: the message is stored once under it.
    pub message_uuid: String,
    /// Who wrote, in E.164 (a short code or sender id as written).
    pub sender: String,
    /// Which of our numbers it was sent to, written as the send path writes senders.
    pub recipient: String,
    pub body: Option<String>,
    /// `sms` or `mms`.
    pub message_type: String,
    pub units: Option<i32>,
    /// Plivo's `MessageIntent`, lowercased (`optout`, `optin`).
    pub intent: Option<String>,
    pub received_at: OffsetDateTime,
}
