//! The ingress's one error type and its HTTP rendering: `{"error": {"code", "message"}}`
//! (plus `field` for a refused field). Messages name the problem but never echo secrets,
//! phone numbers or message text.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("{0}")]
    MissingSignature(String),
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("content type must be {expected}")]
    UnsupportedMediaType { expected: &'static str },
    #[error("{0}")]
    BadRequest(String),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{message}")]
    InvalidField { field: Option<String>, message: String },
    #[error("{0}")]
    RateLimited(String, u64),
    #[error(
        "this Idempotency-Key was already used for a message with other content (recipient, sender, text or \
         options); use a new key for a new message"
    )]
    IdempotencyKeyReused,
    /// `allow`: the methods the route takes, for the `Allow` header.
    #[error("{message}")]
    MethodNotAllowed { message: &'static str, allow: &'static str },
    #[error("no such route")]
    NotFound,
    #[error("no message with this id or MessageUUID")]
    NotFoundMessage,
    #[error("this number has no opt-out")]
    NotFoundOptOut,
    #[error("database unavailable; retry later")]
    DatabaseUnavailable(String),
    #[error("internal error")]
    Internal(String),
    /// The broker's own error stays in the log: it can name hosts and users.
    #[error("message broker unavailable; retry later")]
    Unavailable { reason: String, retry_after_secs: u32 },
}

impl IngressError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingSignature(_) | Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::InvalidSignature(_) | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BadRequest(_) | Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::InvalidField { .. } | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound | Self::NotFoundMessage | Self::NotFoundOptOut => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::DatabaseUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingSignature(_) => "missing_signature",
            Self::InvalidSignature(_) => "invalid_signature",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::BadRequest(_) => "bad_request",
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidField { .. } => "invalid_field",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::RateLimited(..) => "rate_limited",
            Self::NotFound | Self::NotFoundMessage | Self::NotFoundOptOut => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::DatabaseUnavailable(_) => "database_unavailable",
            Self::Internal(_) => "internal",
            Self::Unavailable { .. } => "unavailable",
        }
    }
}

impl IngressError {
    /// A JSON body that does not parse (400) or does not fit the schema (422), described
    /// without the refused value.
    pub fn from_json(e: &serde_json::Error) -> Self {
        let message = shared::redact::json_error(e);
        match e.classify() {
            serde_json::error::Category::Data => Self::InvalidField { field: None, message },
            _ => Self::MalformedJson(message),
        }
    }
}

/// Every error's body: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ErrorDetail<'a> {
    /// Stable, for programs: `invalid_signature`, `invalid_field`, …
    code: &'static str,
    /// For people: names the problem, never echoes secrets, numbers or text.
    message: String,
    /// The refused field, for `invalid_field`.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::DatabaseUnavailable(detail) | Self::Internal(detail) | Self::Unavailable { reason: detail, .. } =
            &self
        {
            // The detail stays in the log; the client gets the generic text.
            tracing::warn!(error = %self, detail, "request failed");
        } else if status.is_server_error() {
            tracing::warn!(error = %self, "request not accepted");
        } else {
            tracing::debug!(error = %self, status = status.as_u16(), "request rejected");
        }
        let retry_after = match &self {
            Self::Unavailable { retry_after_secs, .. } => Some(u64::from(*retry_after_secs)),
            Self::DatabaseUnavailable(_) => Some(5),
            Self::RateLimited(_, secs) => Some(*secs),
            _ => None,
        };
        let field = match &self {
            Self::InvalidField { field, .. } => field.as_deref(),
            _ => None,
        };
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message: self.to_string(), field } };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::MethodNotAllowed { allow, .. } = &self {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// The refusals of every route that takes an API token, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
pub enum CallerRefusals {
    #[response(status = 401, description = "No bearer token")]
    Unauthorized(ErrorBody<'static>),
    #[response(status = 403, description = "Token not accepted")]
    Forbidden(ErrorBody<'static>),
    #[response(
        status = 429,
        description = "This token's request rate is exceeded",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    RateLimited(ErrorBody<'static>),
}

/// A Plivo webhook's answers, but for those of its body and the broker, for the OpenAPI
/// document.
#[derive(utoipa::IntoResponses)]
pub enum WebhookAnswers {
    #[response(status = 200, description = "Verified and durable in RabbitMQ (publisher confirm received)")]
    Queued,
    #[response(status = 400, description = "Form or query not decodable, or no callback fields")]
    BadRequest(ErrorBody<'static>),
    #[response(status = 401, description = "Signature headers missing")]
    Missing(ErrorBody<'static>),
    #[response(status = 403, description = "Signature does not match")]
    Invalid(ErrorBody<'static>),
    #[response(
        status = 429,
        description = "Too many requests failing verification, or an identical callback is being queued",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    RateLimited(ErrorBody<'static>),
}

/// The refusals of every route that reads the database, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
pub enum DatabaseRefusals {
    #[response(
        status = 503,
        description = "Database unavailable",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    Unavailable(ErrorBody<'static>),
    #[response(status = 500, description = "Internal error")]
    Internal(ErrorBody<'static>),
}

/// The refusals of every route that reads a request body, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
pub enum BodyRefusals {
    #[response(status = 408, description = "Request took longer than http.request_timeout_ms")]
    Timeout,
    #[response(status = 413, description = "Body over the route's limit")]
    TooLarge(ErrorBody<'static>),
    #[response(status = 415, description = "Not the route's content type")]
    WrongMediaType(ErrorBody<'static>),
}

/// The refusals of a route that publishes to the broker, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
pub enum BrokerRefusals {
    #[response(
        status = 503,
        description = "Broker unavailable or did not confirm in time; retry (Plivo does)",
        headers(("Retry-After" = u64, description = "Seconds to wait"))
    )]
    Unavailable(ErrorBody<'static>),
}
