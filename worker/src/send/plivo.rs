//! Plivo's Send Message API (docs/plivo.md §4). Plivo has no idempotency key, so every outcome
//! is classified by whether a message may have been created.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use shared::config::{CallbackUrlSettings, PlivoSettings, SendingSettings};
use shared::domain::send::{Sender, ValidSend};
use shared::plivo::api::{SendMessageRequest, SendMessageResponse};
use tracing::Instrument as _;

/// What one call to Plivo means for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Plivo queued the message.
    Accepted { message_uuid: Option<String> },
    /// Plivo refused it for good (400/401/403/404/422 …): sending again fails the same way.
    Refused { status: u16, error: String },
    /// No message was created (connect error, 429), or the operator chose to treat a 5xx so
    /// (`sending.retry_statuses`): retried.
    NotSent { reason: String },
    /// The request may have reached Plivo but the answer was lost: a retry could duplicate it.
    Unknown { reason: String },
}

#[derive(Clone)]
pub struct PlivoClient {
    http: reqwest::Client,
    endpoint: String,
    auth_id: String,
    auth_token: SecretString,
    callback_base: String,
    retry_statuses: Vec<u16>,
    /// For spans: the API host, never the full URL (it carries the account id).
    host: String,
}

impl PlivoClient {
    pub fn new(plivo: &PlivoSettings, http: &CallbackUrlSettings, sending: &SendingSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(plivo.connect_timeout_ms))
            .timeout(Duration::from_millis(plivo.request_timeout_ms))
            .user_agent(concat!("smsflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http: client,
            endpoint: format!("{}/v1/Account/{}/Message/", plivo.api_base_url, plivo.auth_id),
            auth_id: plivo.auth_id.clone(),
            auth_token: plivo.auth_token.clone(),
            callback_base: format!("{}/plivo/callback", http.public_base_url),
            retry_statuses: sending.retry_statuses.clone(),
            host: plivo
                .api_base_url
                .split("://")
                .nth(1)
                .unwrap_or_default()
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// The callback URL carries our id, so every callback correlates to our row and the `ref`
    /// is covered by Plivo's signature.
    pub fn callback_url(&self, job: &ValidSend) -> String {
        format!("{}?ref={}", self.callback_base, job.id)
    }

    pub async fn send(&self, job: &ValidSend) -> SendOutcome {
        let (src, powerpack_uuid) = match &job.sender {
            Sender::Powerpack(uuid) => (None, Some(uuid.clone())),
            Sender::Number(number) => (Some(number.plivo_digits().to_owned()), None),
            Sender::ShortCode(s) | Sender::Alphanumeric(s) => (Some(s.clone()), None),
        };
        let body = SendMessageRequest {
            src,
            powerpack_uuid,
            dst: job.to.plivo_digits().to_owned(),
            text: job.text.clone(),
            url: Some(self.callback_url(job)),
            method: Some("POST".into()),
            message_expiry: job.message_expiry,
        };
        let span = tracing::info_span!(
            "plivo send message",
            otel.name = "POST /v1/Account/{auth_id}/Message/",
            otel.kind = "client",
            http.request.method = "POST",
            server.address = %self.host,
            url.template = "/v1/Account/{auth_id}/Message/",
            http.response.status_code = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let outcome = self.call(&body).instrument(span.clone()).await;
        let label = match &outcome {
            SendOutcome::Accepted { .. } => "accepted",
            SendOutcome::Refused { .. } => "refused",
            SendOutcome::NotSent { .. } => "not_sent",
            SendOutcome::Unknown { .. } => "unknown",
        };
        metrics::counter!("smsflow_plivo_calls_total", "outcome" => label).increment(1);
        metrics::histogram!("smsflow_plivo_call_seconds", "outcome" => label).record(started.elapsed().as_secs_f64());
        outcome
    }

    async fn call(&self, body: &SendMessageRequest) -> SendOutcome {
        let response = self
            .http
            .post(&self.endpoint)
            .basic_auth(&self.auth_id, Some(self.auth_token.expose_secret()))
            .json(body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            // Connect errors (including connect timeouts) never wrote the request.
            Err(e) if e.is_connect() => {
                return SendOutcome::NotSent { reason: format!("cannot connect to Plivo: {}", describe(&e)) };
            }
            Err(e) => return SendOutcome::Unknown { reason: format!("no answer from Plivo: {}", describe(&e)) },
        };
        let status = response.status().as_u16();
        tracing::Span::current().record("http.response.status_code", status);
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) if (200..300).contains(&status) => {
                tracing::warn!(error = %describe(&e), "Plivo accepted the message but its answer was cut");
                return SendOutcome::Accepted { message_uuid: None };
            }
            Err(_) => String::new(),
        };
        if (200..300).contains(&status) {
            let accepted = serde_json::from_str::<SendMessageResponse>(&text).ok();
            return SendOutcome::Accepted { message_uuid: accepted.and_then(|a| a.message_uuid.into_iter().next()) };
        }
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        match status {
            code if self.retry_statuses.contains(&code) => {
                SendOutcome::NotSent { reason: format!("Plivo answered {code}: {}", error_text(&json, &text)) }
            }
            400..=499 => SendOutcome::Refused { status, error: error_text(&json, &text) },
            code => SendOutcome::Unknown { reason: format!("Plivo answered {code}: {}", error_text(&json, &text)) },
        }
    }
}

/// Plivo's `error` is usually a string, possibly an object; keep it short and printable, and
/// mask any phone number it quotes: it ends up in logs, dead-letter reasons and the status API.
fn error_text(json: &serde_json::Value, raw: &str) -> String {
    let text = match &json["error"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => raw.to_owned(),
        other => other.to_string(),
    };
    let text: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    if text.is_empty() { "no error text".into() } else { shared::redact::numbers_in(&text) }
}

/// reqwest errors print the URL, which carries the account id: keep it out of logs and rows,
/// and name the cause underneath instead ("error sending request" alone says nothing).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(i) = text.find(" for url (") {
        text.truncate(i);
    }
    let mut cause = std::error::Error::source(e);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plivos_error_text_is_kept_short_and_without_phone_numbers() {
        let json = serde_json::json!({"api_id": "a", "error": "dst +14155550123 is not a valid number"});
        assert_eq!(error_text(&json, ""), "dst ***0123 is not a valid number");
        let object = serde_json::json!({"error": {"dst": "14155550123 invalid"}});
        assert!(!error_text(&object, "").contains("14155550123"), "{}", error_text(&object, ""));
        assert_eq!(error_text(&serde_json::Value::Null, "upstream\nfailure 14155550123"), "upstreamfailure ***0123");
        assert_eq!(error_text(&serde_json::Value::Null, ""), "no error text");
        assert_eq!(error_text(&serde_json::Value::Null, &"x".repeat(1000)).len(), 300);
    }

    #[tokio::test]
    async fn a_transport_error_names_its_cause_but_not_the_account_in_the_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let error = reqwest::Client::new()
            .post(format!("http://{closed}/v1/Account/MAACCOUNTSECRET01/Message/"))
            .send()
            .await
            .unwrap_err();
        let described = describe(&error);
        assert!(!described.contains("MAACCOUNTSECRET01"), "{described}");
        assert!(described.len() > "error sending request".len(), "the cause is named: {described}");
    }
}
