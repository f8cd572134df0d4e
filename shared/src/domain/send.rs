//! Validation of send requests, shared by the HTTP route and the AMQP consumer so both accept
//! and refuse exactly the same jobs.

use serde::Serialize;
use uuid::Uuid;

use super::phone::PhoneNumber;
use super::sms::SmsText;
use crate::amqp::contracts::SendJob;

pub const MIN_MESSAGE_EXPIRY_SECS: u32 = 5;
/// Plivo's limit is "less than 10,800" (three hours): 10,800 itself is refused.
pub const MAX_MESSAGE_EXPIRY_SECS: u32 = 10_799;
/// A sender of 3 to this many digits and no `+` is a short code.
pub const MAX_SHORT_CODE_DIGITS: usize = 8;

/// Whether `raw` (trimmed) is a short code: digits only, 3–8 of them.
pub fn is_short_code(raw: &str) -> bool {
    (3..=MAX_SHORT_CODE_DIGITS).contains(&raw.len()) && raw.chars().all(|c| c.is_ascii_digit())
}
pub const MAX_METADATA_BYTES: usize = 4096;
/// A callback URL longer than this is refused (browsers and proxies agree on about 2 KiB).
pub const MAX_CALLBACK_URL_BYTES: usize = 2048;

/// Who the message is from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Sender {
    Number(PhoneNumber),
    ShortCode(String),
    Alphanumeric(String),
    Powerpack(String),
}

impl Sender {
    /// What is stored as the message's sender and matched against opt-outs.
    pub fn as_str(&self) -> &str {
        match self {
            Sender::Number(n) => n.as_str(),
            Sender::ShortCode(s) | Sender::Alphanumeric(s) | Sender::Powerpack(s) => s,
        }
    }

    /// A sender as a job or an operator writes it (Powerpacks are given apart, by UUID).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.starts_with('+') {
            return PhoneNumber::parse(raw).map(Sender::Number).map_err(|e| e.to_string());
        }
        if is_short_code(raw) {
            return Ok(Sender::ShortCode(raw.to_owned()));
        }
        if (1..=11).contains(&raw.len())
            && raw.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ')
            && raw.chars().any(|c| c.is_ascii_alphabetic())
        {
            return Ok(Sender::Alphanumeric(raw.to_owned()));
        }
        Err("must be an E.164 number (+14155550100), a short code (3–8 digits) or an alphanumeric sender ID (1–11 letters, digits, spaces)".into())
    }
}

/// A job that passed validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidSend {
    pub id: Uuid,
    pub to: PhoneNumber,
    pub text: String,
    pub sms: SmsText,
    pub sender: Sender,
    pub message_expiry: Option<u32>,
    pub metadata: serde_json::Value,
    pub callback: Option<String>,
    /// See [`ValidSend::fingerprint`].
    #[serde(skip)]
    fingerprint: [u8; 32],
}

/// A refused field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError { field, message: message.into() }
}

impl SendJob {
    /// Checks every field; `default_sender` stands in for a missing `from`.
    pub fn validate(&self, default_sender: &str) -> Result<ValidSend, FieldError> {
        let to = PhoneNumber::parse(&self.to).map_err(|e| field("to", e.to_string()))?;
        let sms = SmsText::analyse(&self.text).map_err(|e| field("text", e.to_string()))?;
        // PostgreSQL text cannot hold NUL: refused here, not after the 202.
        if self.text.contains('\0') {
            return Err(field("text", "must not contain NUL characters (U+0000)"));
        }
        let sender = match (&self.from, &self.powerpack_uuid) {
            (Some(_), Some(_)) => return Err(field("from", "set either from or powerpack_uuid, not both")),
            (None, Some(pp)) => match Uuid::try_parse(pp.trim()) {
                // Hyphenated and lower-case, as Plivo writes them: one Powerpack, one identity.
                Ok(uuid) => Sender::Powerpack(uuid.hyphenated().to_string()),
                Err(_) => return Err(field("powerpack_uuid", "must be a UUID (as Plivo shows it)")),
            },
            (Some(from), None) => Sender::parse(from).map_err(|e| field("from", e))?,
            (None, None) if default_sender.is_empty() => {
                return Err(field("from", "is required: no default sender is configured (plivo.default_sender)"));
            }
            (None, None) => Sender::parse(default_sender).map_err(|e| field("from", format!("default sender {e}")))?,
        };
        if let Sender::Number(number) = &sender
            && *number == to
        {
            return Err(field("to", "must differ from the sender"));
        }
        if let Some(expiry) = self.message_expiry
            && !(MIN_MESSAGE_EXPIRY_SECS..=MAX_MESSAGE_EXPIRY_SECS).contains(&expiry)
        {
            return Err(field(
                "message_expiry",
                format!("must be between {MIN_MESSAGE_EXPIRY_SECS} and {MAX_MESSAGE_EXPIRY_SECS} seconds"),
            ));
        }
        let metadata = serde_json::Value::Object(self.metadata.clone().unwrap_or_default());
        if metadata.to_string().len() > MAX_METADATA_BYTES {
            return Err(field("metadata", format!("must be at most {MAX_METADATA_BYTES} bytes of JSON")));
        }
        // jsonb refuses NUL in a key or a string.
        if contains_nul(&metadata) {
            return Err(field("metadata", "must not contain NUL characters (U+0000)"));
        }
        if let Some(callback) = &self.callback {
            check_callback(callback)?;
        }
        // The sender as the job gave it: a default sender that differs between the ingress and
        // the worker, or changes between a request and its retry, is not a different message.
        let given_sender = match (&self.from, &self.powerpack_uuid) {
            (None, None) => None,
            _ => Some(&sender),
        };
        let fingerprint = fingerprint(&to, given_sender, &self.text, self.message_expiry, &metadata, &self.callback);
        Ok(ValidSend {
            id: self.id,
            to,
            text: self.text.clone(),
            sms,
            sender,
            message_expiry: self.message_expiry,
            metadata,
            callback: self.callback.clone(),
            fingerprint,
        })
    }
}

/// A callback must be an absolute http(s) URL with a host, no credentials and no fragment: the
/// worker POSTs the message's status events to it. Which addresses it may reach is the
/// worker's decision (`webhooks.allow_private_addresses`), made on every attempt.
pub fn check_callback(callback: &str) -> Result<(), FieldError> {
    if callback.len() > MAX_CALLBACK_URL_BYTES {
        return Err(field("callback", format!("must be at most {MAX_CALLBACK_URL_BYTES} bytes")));
    }
    // The URL parser would quietly drop tabs and newlines and repair `http:/host`: what is
    // called must be what was written.
    let scheme = callback.get(..8).unwrap_or(callback).to_ascii_lowercase();
    let not_http = || field("callback", "must be an http:// or https:// URL");
    if !(scheme.starts_with("http://") || scheme.starts_with("https://"))
        || callback.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(not_http());
    }
    let url = url::Url::parse(callback).map_err(|_| not_http())?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(field("callback", "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(field("callback", "must not carry credentials (user:password@); put a token in the query"));
    }
    if url.fragment().is_some() {
        return Err(field("callback", "must not carry a fragment (#…)"));
    }
    Ok(())
}

fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

impl ValidSend {
    /// SHA-256 of everything that decides what is sent and told: recipient, the sender as given
    /// (none: the default), text, options, metadata, callback. Two jobs with one id and
    /// different fingerprints are two different messages under one idempotency key. Metadata
    /// keys are sorted (serde_json's map), so the order a client wrote them in does not matter.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

fn fingerprint(
    to: &PhoneNumber,
    sender: Option<&Sender>,
    text: &str,
    message_expiry: Option<u32>,
    metadata: &serde_json::Value,
    callback: &Option<String>,
) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    #[derive(Serialize)]
    struct Content<'a> {
        /// Changes whenever what is hashed changes, so old and new fingerprints never meet.
        version: u8,
        to: &'a str,
        sender: Option<&'a Sender>,
        text: &'a str,
        message_expiry: Option<u32>,
        metadata: &'a serde_json::Value,
        callback: Option<&'a str>,
    }
    let content =
        Content { version: 1, to: to.as_str(), sender, text, message_expiry, metadata, callback: callback.as_deref() };
    Sha256::digest(serde_json::to_vec(&content).expect("plain data serializes")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(to: &str, text: &str) -> SendJob {
        SendJob {
            id: Uuid::now_v7(),
            to: to.into(),
            text: text.into(),
            from: None,
            powerpack_uuid: None,
            message_expiry: None,
            metadata: None,
            callback: None,
        }
    }

    #[test]
    fn a_valid_job_gets_the_default_sender_and_its_segments() {
        let valid = job("+14155552671", "hello").validate("+14155550100").unwrap();
        assert_eq!(valid.sender.as_str(), "+14155550100");
        assert_eq!(valid.sms.segments, 1);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (job("14155552671", "hi"), "", "to"),
            (job("+14155552671", ""), "+14155550100", "text"),
            (job("+14155552671", "hi"), "", "from"),
            (SendJob { from: Some("not a sender!".into()), ..job("+14155552671", "hi") }, "", "from"),
            (SendJob { message_expiry: Some(2), ..job("+14155552671", "hi") }, "+14155550100", "message_expiry"),
            (SendJob { message_expiry: Some(10_800), ..job("+14155552671", "hi") }, "+14155550100", "message_expiry"),
            (job("+14155552671", "a\0b"), "+14155550100", "text"),
            (
                SendJob {
                    metadata: Some(serde_json::from_str(r#"{"k\u0000": "v"}"#).unwrap()),
                    ..job("+14155552671", "hi")
                },
                "+14155550100",
                "metadata",
            ),
            (
                SendJob {
                    metadata: Some(serde_json::from_str(r#"{"k": ["v\u0000"]}"#).unwrap()),
                    ..job("+14155552671", "hi")
                },
                "+14155550100",
                "metadata",
            ),
            (
                SendJob {
                    powerpack_uuid: Some("pp".into()),
                    from: Some("+14155550100".into()),
                    ..job("+14155552671", "hi")
                },
                "",
                "from",
            ),
            (SendJob { powerpack_uuid: Some("not-a-uuid".into()), ..job("+14155552671", "hi") }, "", "powerpack_uuid"),
            (SendJob { powerpack_uuid: Some("".into()), ..job("+14155552671", "hi") }, "", "powerpack_uuid"),
        ];
        let with_callback = |url: &str| SendJob { callback: Some(url.into()), ..job("+14155552671", "hi") };
        let long = format!("https://example.com/{}", "a".repeat(MAX_CALLBACK_URL_BYTES));
        for bad in [
            "http://",
            "ftp://example.com/",
            "example.com/cb",
            "https://u:p@example.com/",
            "https://example.com/#x",
            &long,
        ] {
            assert_eq!(with_callback(bad).validate("+14155550100").unwrap_err().field, "callback", "{bad}");
        }
        assert!(with_callback("https://hooks.example.com:8443/sms?token=abc").validate("+14155550100").is_ok());
        for (job, default_sender, expected) in cases {
            assert_eq!(job.validate(default_sender).unwrap_err().field, expected, "{job:?}");
        }
    }

    #[test]
    fn the_fingerprint_follows_the_content_not_the_writing() {
        let base = SendJob {
            metadata: Some(serde_json::from_str(r#"{"a": 1, "b": 2}"#).unwrap()),
            ..job("+14155552671", "hello")
        };
        let reordered =
            SendJob { metadata: Some(serde_json::from_str(r#"{"b": 2, "a": 1}"#).unwrap()), ..base.clone() };
        let fingerprint = |job: &SendJob| job.validate("+14155550100").unwrap().fingerprint();
        assert_eq!(fingerprint(&base), fingerprint(&reordered));
        assert_eq!(fingerprint(&base), fingerprint(&SendJob { to: " +14155552671".into(), ..base.clone() }));
        let with_other_default = base.validate("+14155550111").unwrap().fingerprint();
        assert_eq!(fingerprint(&base), with_other_default, "the default sender is not part of the content");
        for other in [
            SendJob { text: "hello!".into(), ..base.clone() },
            SendJob { to: "+14155552672".into(), ..base.clone() },
            SendJob { from: Some("12345".into()), ..base.clone() },
            SendJob { message_expiry: Some(60), ..base.clone() },
            SendJob { metadata: None, ..base.clone() },
            SendJob { callback: Some("https://example.com/cb".into()), ..base.clone() },
        ] {
            assert_ne!(fingerprint(&base), fingerprint(&other), "{other:?}");
        }
    }
}
