//! The status API's messages: what happened to one message (with its events), and lists with
//! filters and keyset pagination. Answers 503 while the database is down; callback ingestion
//! never depends on it.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::domain::MessageStatus;
use shared::plivo::errors::{ErrorCodeInfo, classify};
use time::OffsetDateTime;
use uuid::Uuid;

use super::auth::Caller;
use super::query::{ApiQuery, Page, decode_cursor, encode_cursor, parse_limit, parse_phone, parse_time, parse_uuid};
use super::{db_error, shown_phone};
use crate::AppState;
use crate::error::{CallerRefusals, DatabaseRefusals, ErrorBody, IngressError};
use crate::storage::{self, EventRow, MessageFilter, MessageRow};

/// `GET /v1/messages`'s parameters. Values are read as text and checked by the handler, so a
/// refusal names the parameter and what it expects.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MessageListQuery {
    #[param(value_type = Option<MessageStatus>)]
    status: Option<String>,
    /// E.164.
    recipient: Option<String>,
    /// Created at or after (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Created before (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// With `metadata_value`: messages whose metadata has this key with this string value.
    metadata_key: Option<String>,
    metadata_value: Option<String>,
    /// Rows per page (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A message as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Message)]
pub struct MessageView {
    id: Uuid,
    /// Plivo's id, once Plivo accepted the message.
    message_uuid: Option<String>,
    #[schema(value_type = MessageStatus)]
    status: String,
    status_reason: Option<String>,
    error: Option<ErrorCodeInfo>,
    sender: Option<String>,
    /// In full for a full-read token, else masked.
    recipient: Option<String>,
    encoding: Option<String>,
    segments: Option<i16>,
    units: Option<i32>,
    amount: Option<String>,
    attempts: i32,
    /// The send job's metadata, as given.
    #[schema(value_type = Object)]
    metadata: Value,
    #[serde(with = "time::serde::rfc3339::option")]
    accepted_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    submitted_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    last_event_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    terminal_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    /// Only in the view of one message.
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<Vec<EventView>>,
    /// Only in the view of one message: every attempt to deliver its status events to its
    /// callback URL, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_attempts: Option<Vec<storage::WebhookAttemptRow>>,
}

/// One callback of a message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = MessageEvent)]
pub struct EventView {
    #[schema(value_type = MessageStatus)]
    status: String,
    sequence: Option<i64>,
    error_code: Option<i32>,
    #[serde(with = "time::serde::rfc3339")]
    received_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    recorded_at: OffsetDateTime,
    /// Every field Plivo sent: full-read tokens only (it holds numbers and text).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    params: Option<Value>,
}

impl MessageView {
    fn new(row: MessageRow, full: bool) -> Self {
        let error = row.error_code.map(|code| classify(code.unsigned_abs()));
        Self {
            id: row.id,
            message_uuid: row.message_uuid,
            status: row.status,
            status_reason: row.status_reason,
            error,
            sender: row.sender,
            recipient: shown_phone(row.recipient.as_deref(), full),
            encoding: row.encoding,
            segments: row.segments,
            units: row.units,
            amount: row.amount,
            attempts: row.attempts,
            metadata: row.metadata,
            accepted_at: row.accepted_at,
            submitted_at: row.submitted_at,
            last_event_at: row.last_event_at,
            terminal_at: row.terminal_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
            events: None,
            webhook_attempts: None,
        }
    }
}

impl EventView {
    fn new(row: EventRow, full: bool) -> Self {
        Self {
            status: row.status,
            sequence: row.sequence,
            error_code: row.error_code,
            received_at: row.received_at,
            recorded_at: row.recorded_at,
            params: full.then_some(row.params),
        }
    }
}

/// One message with its event history, by our id or Plivo's MessageUUID
#[utoipa::path(
    get,
    path = "/v1/messages/{id}",
    tag = "Status",
    params(("id" = String, Path, description = "Our message id or Plivo's MessageUUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The message", body = MessageView),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        CallerRefusals,
        DatabaseRefusals,
    )
)]
pub async fn get_message(
    State(state): State<AppState>,
    token: Caller,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, IngressError> {
    let id = parse_uuid(&id, "the message id (ours or Plivo's MessageUUID)")?;
    let row = storage::message(&state.db, id).await.map_err(db_error)?.ok_or(IngressError::NotFoundMessage)?;
    let events = storage::events(&state.db, row.id).await.map_err(db_error)?;
    let webhook_attempts = storage::webhook_attempts(&state.db, row.id).await.map_err(db_error)?;
    let mut view = MessageView::new(row, token.full_read);
    view.events = Some(events.into_iter().map(|e| EventView::new(e, token.full_read)).collect());
    view.webhook_attempts = Some(webhook_attempts);
    Ok(Json(view))
}

/// List messages, newest first
#[utoipa::path(
    get,
    path = "/v1/messages",
    tag = "Status",
    params(MessageListQuery),
    responses(
        (status = 200, description = "A page", body = Page<MessageView>),
        (status = 400, description = "A parameter is invalid (named in the message)", body = ErrorBody),
        CallerRefusals,
        DatabaseRefusals,
    )
)]
pub async fn list_messages(
    State(state): State<AppState>,
    token: Caller,
    ApiQuery(params): ApiQuery<MessageListQuery>,
) -> Result<Json<Page<MessageView>>, IngressError> {
    let status = params
        .status
        .as_deref()
        .map(|s| s.parse::<MessageStatus>().map(|s| s.as_str().to_owned()))
        .transpose()
        .map_err(|_| IngressError::BadRequest("status must be one of accepted, sending, unknown, submitted, queued, sent, delivered, undelivered, failed, rejected".into()))?;
    let metadata = match (&params.metadata_key, &params.metadata_value) {
        (Some(k), Some(v)) if !k.is_empty() => Some((k.clone(), v.clone())),
        (None, None) => None,
        _ => return Err(IngressError::BadRequest("metadata_key and metadata_value go together".into())),
    };
    let after = params
        .cursor
        .as_deref()
        .map(|c| {
            let (time, id) = decode_cursor(c)?;
            Ok::<_, IngressError>((time, parse_uuid(&id, "cursor")?))
        })
        .transpose()?;
    let limit = parse_limit(params.limit.as_deref())?;
    let filter = MessageFilter {
        status,
        recipient: parse_phone(params.recipient.as_deref(), "recipient")?,
        since: parse_time(params.since.as_deref(), "since")?,
        until: parse_time(params.until.as_deref(), "until")?,
        metadata,
        after,
        limit: limit + 1,
    };
    let rows = storage::list(&state.db, &filter).await.map_err(db_error)?;
    Ok(Json(Page::from_rows(
        rows,
        limit,
        |r| encode_cursor(r.created_at, &r.id.to_string()),
        |r| MessageView::new(r, token.full_read),
    )))
}
