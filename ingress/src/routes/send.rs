//! The send API: `POST /v1/messages` (and `POST /send-sms`, the Express guide's route, as an
//! alias). A 202 means the job is durably queued; the worker sends it.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shared::amqp::Stream;
use shared::amqp::contracts::{SendJob, SendRequest};
use shared::amqp::headers::json_message;
use shared::domain::MessageStatus;
use shared::domain::sms::Encoding;
use uuid::Uuid;

use super::auth::Caller;
use crate::AppState;
use crate::error::{BodyRefusals, BrokerRefusals, CallerRefusals, ErrorBody, IngressError};

/// The answer to a queued send job (202).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    id: Uuid,
    /// Always `accepted`.
    status: MessageStatus,
    encoding: Encoding,
    #[schema(minimum = 1)]
    segments: u16,
    /// Where the message's status can be read.
    location: String,
}

/// The largest send request: 1,600 characters of text written as JSON escapes, the largest
/// metadata and a callback URL fit with room to spare.
pub const SEND_BODY_LIMIT: usize = 32 * 1024;

const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_9c2a_5b7d_4e3f_8a10_2c4b_6d8e_0f12);
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Send one SMS
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "Sending",
    params((
        "Idempotency-Key" = Option<String>,
        Header,
        description = "The same key (per token) with the same content is the same message: sent once",
        min_length = 1,
        max_length = 255
    )),
    request_body = SendRequest,
    responses(
        (
            status = 202,
            description = "Durably queued",
            body = Accepted,
            headers(("Location" = String, description = "The message's status URL"))
        ),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = ErrorBody),
        (
            status = 422,
            description = "A field is refused (error.field names it), or the Idempotency-Key was already used with other content",
            body = ErrorBody
        ),
        CallerRefusals,
        BodyRefusals,
        BrokerRefusals,
    )
)]
pub async fn create_message(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> Result<Response, IngressError> {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(IngressError::UnsupportedMediaType { expected: "application/json" });
    }
    let body = super::read_body(&headers, body, SEND_BODY_LIMIT).await?;
    let mut request = SendRequest::from_json(&body).map_err(|e| IngressError::from_json(&e))?;
    if request.callback.is_none() {
        request.callback.clone_from(&caller.default_callback);
    }
    let idempotency_key = headers.get("idempotency-key");
    let id = match idempotency_key {
        None => Uuid::now_v7(),
        Some(value) => {
            let key =
                value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY).ok_or_else(|| {
                    IngressError::BadRequest(format!(
                        "Idempotency-Key must be 1–{MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ))
                })?;
            Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, format!("{}:{key}", caller.fingerprint).as_bytes())
        }
    };
    let job = request.into_job(id);
    let valid = job
        .validate(&state.default_sender)
        .map_err(|e| IngressError::InvalidField { field: Some(e.field.to_owned()), message: e.to_string() })?;
    if idempotency_key.is_some() {
        refuse_reused_key(&state, &valid).await?;
    }

    let payload = serde_json::to_vec(&job).map_err(|e| IngressError::BadRequest(format!("cannot encode job: {e}")))?;
    let properties = json_message(SendJob::SCHEMA, SendJob::VERSION, &id.to_string(), Default::default());
    state
        .publisher
        .publish(Stream::Send.routing_key(), &payload, properties)
        .await
        .map_err(|e| IngressError::Unavailable { reason: e.to_string(), retry_after_secs: state.retry_after_secs })?;
    tracing::info!(message_id = %id, to = %valid.to.masked(), segments = valid.sms.segments, "send job queued");

    let location = format!("/v1/messages/{id}");
    let body = Accepted {
        id,
        status: MessageStatus::Accepted,
        encoding: valid.sms.encoding,
        segments: valid.sms.segments,
        location: location.clone(),
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// A key reused with other content is refused when the first job is already recorded. The
/// worker checks again when it records the job, so one that overtakes the first (both still
/// queued) is dead-lettered there, never sent; this check only answers the client directly. A
/// database that cannot answer does not hold up sends: the worker's check still stands.
async fn refuse_reused_key(state: &AppState, valid: &shared::domain::send::ValidSend) -> Result<(), IngressError> {
    let lookup = crate::storage::job_fingerprint(&state.db, valid.id);
    match tokio::time::timeout(IDEMPOTENCY_LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(Some(stored))) if stored != valid.fingerprint() => Err(IngressError::IdempotencyKeyReused),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "idempotency check skipped: database unavailable");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("idempotency check skipped: database too slow");
            Ok(())
        }
    }
}

const IDEMPOTENCY_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);
