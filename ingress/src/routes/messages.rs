//! The status API's messages: what happened to one message (with its events), and lists with
//! filters and keyset pagination. Answers 503 while the database is down; callback ingestion
//! never depends on it.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::domain::MessageStatus;
use shared::plivo::errors::classify;

use super::auth::Caller;
use super::query::{ApiQuery, decode_cursor, encode_cursor, parse_limit, parse_phone, parse_time, parse_uuid};
use super::{db_error, phone, rfc3339};
use crate::AppState;
use crate::error::IngressError;
use crate::storage::{self, MessageFilter, MessageRow};

/// `GET /v1/messages`'s parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageListQuery {
    status: Option<String>,
    recipient: Option<String>,
    since: Option<String>,
    until: Option<String>,
    metadata_key: Option<String>,
    metadata_value: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn message_json(row: &MessageRow, full: bool) -> Value {
    let error = row.error_code.map(|code| {
        let info = classify(code.unsigned_abs());
        json!({ "code": code, "reason": info.reason, "retryability": info.retryability })
    });
    json!({
        "id": row.id,
        "message_uuid": row.message_uuid,
        "status": row.status,
        "status_reason": row.status_reason,
        "error": error,
        "sender": row.sender,
        "recipient": phone(row.recipient.as_deref(), full),
        "encoding": row.encoding,
        "segments": row.segments,
        "units": row.units,
        "amount": row.amount,
        "attempts": row.attempts,
        "metadata": row.metadata,
        "accepted_at": rfc3339(row.accepted_at),
        "submitted_at": rfc3339(row.submitted_at),
        "last_event_at": rfc3339(row.last_event_at),
        "terminal_at": rfc3339(row.terminal_at),
        "created_at": rfc3339(Some(row.created_at)),
        "updated_at": rfc3339(Some(row.updated_at)),
    })
}

pub async fn get_message(
    State(state): State<AppState>,
    token: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, IngressError> {
    let id = parse_uuid(&id, "the message id (ours or Plivo's MessageUUID)")?;
    let row = storage::message(&state.db, id).await.map_err(db_error)?.ok_or(IngressError::NotFoundMessage)?;
    let events = storage::events(&state.db, row.id).await.map_err(db_error)?;
    let mut body = message_json(&row, token.full_read);
    body["events"] = events
        .iter()
        .map(|e| {
            let mut event = json!({
                "status": e.status,
                "sequence": e.sequence,
                "error_code": e.error_code,
                "received_at": rfc3339(Some(e.received_at)),
                "recorded_at": rfc3339(Some(e.recorded_at)),
            });
            if token.full_read {
                event["params"] = e.params.clone();
            }
            event
        })
        .collect();
    Ok(Json(body))
}

pub async fn list_messages(
    State(state): State<AppState>,
    token: Caller,
    ApiQuery(params): ApiQuery<MessageListQuery>,
) -> Result<Json<Value>, IngressError> {
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
    let mut rows = storage::list(&state.db, &filter).await.map_err(db_error)?;
    let next = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| encode_cursor(r.created_at, &r.id.to_string()))
    });
    let data: Vec<Value> = rows.iter().map(|r| message_json(r, token.full_read)).collect();
    Ok(Json(json!({ "data": data, "next_cursor": next.flatten() })))
}
