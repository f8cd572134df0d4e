//! The status API: what happened to a message, lists with filters and keyset pagination,
//! delivery statistics, inbound SMS and the opt-out list. Answers 503 while the database is
//! down; callback ingestion never depends on it.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::domain::{MessageStatus, PhoneNumber};
use shared::plivo::errors::classify;
use shared::redact;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::auth::Caller;
use crate::AppState;
use crate::error::IngressError;
use crate::storage::{self, GroupBy, InboundFilter, MessageFilter, MessageRow};

pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 200;

type Params = Query<HashMap<String, String>>;

fn db_error(e: sqlx::Error) -> IngressError {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
            IngressError::DatabaseUnavailable(e.to_string())
        }
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57")) => {
            IngressError::DatabaseUnavailable(db.to_string())
        }
        other => IngressError::Internal(other.to_string()),
    }
}

fn rfc3339(t: Option<OffsetDateTime>) -> Value {
    t.and_then(|t| t.format(&Rfc3339).ok()).map(Value::from).unwrap_or(Value::Null)
}

fn phone(raw: Option<&str>, full: bool) -> Value {
    match raw {
        Some(n) if full => n.into(),
        Some(n) => redact::phone(n).into(),
        None => Value::Null,
    }
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

fn parse_uuid(raw: &str, what: &str) -> Result<Uuid, IngressError> {
    Uuid::parse_str(raw).map_err(|_| IngressError::BadRequest(format!("{what} must be a UUID")))
}

fn parse_time(params: &HashMap<String, String>, key: &str) -> Result<Option<OffsetDateTime>, IngressError> {
    params.get(key).map(|v| OffsetDateTime::parse(v, &Rfc3339)).transpose().map_err(|_| {
        IngressError::BadRequest(format!("{key} must be an RFC 3339 timestamp (e.g. 2026-11-27T10:00:00Z)"))
    })
}

fn parse_limit(params: &HashMap<String, String>) -> Result<i64, IngressError> {
    match params.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| IngressError::BadRequest(format!("limit must be an integer from 1 to {MAX_PAGE}"))),
    }
}

fn parse_phone(params: &HashMap<String, String>, key: &str) -> Result<Option<String>, IngressError> {
    params
        .get(key)
        .map(|v| PhoneNumber::parse(v).map(|p| p.as_str().to_owned()))
        .transpose()
        .map_err(|e| IngressError::BadRequest(format!("{key} {e}")))
}

fn reject_unknown(params: &HashMap<String, String>, known: &[&str]) -> Result<(), IngressError> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => {
            Err(IngressError::BadRequest(format!("unknown query parameter {unknown:?}; known: {}", known.join(", "))))
        }
        None => Ok(()),
    }
}

/// Opaque keyset cursor: the last row's (time, key).
fn encode_cursor(time: OffsetDateTime, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{key}", time.unix_timestamp_nanos()))
}

fn decode_cursor(raw: &str) -> Result<(OffsetDateTime, String), IngressError> {
    let invalid = || IngressError::BadRequest("cursor is not one this API returned".into());
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?).map_err(|_| invalid())?;
    let (nanos, key) = text.split_once('|').ok_or_else(invalid)?;
    let time =
        OffsetDateTime::from_unix_timestamp_nanos(nanos.parse().map_err(|_| invalid())?).map_err(|_| invalid())?;
    Ok((time, key.to_owned()))
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
    Query(params): Params,
) -> Result<Json<Value>, IngressError> {
    reject_unknown(
        &params,
        &["status", "recipient", "since", "until", "metadata_key", "metadata_value", "limit", "cursor"],
    )?;
    let status = params
        .get("status")
        .map(|s| s.parse::<MessageStatus>().map(|s| s.as_str().to_owned()))
        .transpose()
        .map_err(|_| IngressError::BadRequest("status must be one of accepted, sending, unknown, submitted, queued, sent, delivered, undelivered, failed, rejected".into()))?;
    let metadata = match (params.get("metadata_key"), params.get("metadata_value")) {
        (Some(k), Some(v)) if !k.is_empty() => Some((k.clone(), v.clone())),
        (None, None) => None,
        _ => return Err(IngressError::BadRequest("metadata_key and metadata_value go together".into())),
    };
    let after = params
        .get("cursor")
        .map(|c| {
            let (time, id) = decode_cursor(c)?;
            Ok::<_, IngressError>((time, parse_uuid(&id, "cursor")?))
        })
        .transpose()?;
    let limit = parse_limit(&params)?;
    let filter = MessageFilter {
        status,
        recipient: parse_phone(&params, "recipient")?,
        since: parse_time(&params, "since")?,
        until: parse_time(&params, "until")?,
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

pub async fn stats(
    State(state): State<AppState>,
    _: Caller,
    Query(params): Params,
) -> Result<Json<Value>, IngressError> {
    reject_unknown(&params, &["from", "to", "group_by"])?;
    let until = parse_time(&params, "to")?.unwrap_or_else(OffsetDateTime::now_utc);
    let since = parse_time(&params, "from")?.unwrap_or(until - time::Duration::days(1));
    if since >= until {
        return Err(IngressError::BadRequest("from must be before to".into()));
    }
    let group_by = match params.get("group_by").map(String::as_str).unwrap_or("status") {
        "status" => GroupBy::Status,
        "error_code" => GroupBy::ErrorCode,
        "hour" => GroupBy::Hour,
        _ => return Err(IngressError::BadRequest("group_by must be status, error_code or hour".into())),
    };
    let groups = storage::stats(&state.db, since, until, group_by).await.map_err(db_error)?;
    let (delivered, terminal) = storage::delivery_counts(&state.db, since, until).await.map_err(db_error)?;
    let total: i64 = groups.iter().map(|g| g.count).sum();
    Ok(Json(json!({
        "from": rfc3339(Some(since)),
        "to": rfc3339(Some(until)),
        "group_by": params.get("group_by").map(String::as_str).unwrap_or("status"),
        "total": total,
        "groups": groups,
        "delivered": delivered,
        "terminal": terminal,
        "delivery_rate": if terminal > 0 { Some(delivered as f64 / terminal as f64) } else { None },
    })))
}

pub async fn list_inbound(
    State(state): State<AppState>,
    token: Caller,
    Query(params): Params,
) -> Result<Json<Value>, IngressError> {
    reject_unknown(&params, &["sender", "recipient", "since", "until", "limit", "cursor"])?;
    let limit = parse_limit(&params)?;
    let filter = InboundFilter {
        sender: parse_phone(&params, "sender")?,
        recipient: parse_phone(&params, "recipient")?,
        since: parse_time(&params, "since")?,
        until: parse_time(&params, "until")?,
        after: params.get("cursor").map(|c| decode_cursor(c)).transpose()?,
        limit: limit + 1,
    };
    let mut rows = storage::inbound(&state.db, &filter).await.map_err(db_error)?;
    let next = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| encode_cursor(r.received_at, &r.message_uuid))
    });
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "message_uuid": r.message_uuid,
                "sender": phone(Some(&r.sender), token.full_read),
                "recipient": r.recipient,
                "text": if token.full_read { r.body.clone() } else { None },
                "type": r.message_type,
                "units": r.units,
                "intent": r.intent,
                "received_at": rfc3339(Some(r.received_at)),
            })
        })
        .collect();
    Ok(Json(json!({ "data": data, "next_cursor": next.flatten() })))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OptOutBody {
    /// Our number the recipient opted out of; `*` (the default) for all of them.
    #[serde(default)]
    pub sender: Option<String>,
}

#[derive(Debug, Serialize)]
struct OptOutList {
    recipient: String,
    opt_outs: Vec<storage::OptOutRow>,
}

fn parse_number(raw: &str) -> Result<String, IngressError> {
    PhoneNumber::parse(raw)
        .map(|p| p.as_str().to_owned())
        .map_err(|e| IngressError::BadRequest(format!("the number {e}")))
}

/// Written as the send path writes senders, so that the opt-out matches the sends it stops.
fn parse_sender(raw: Option<&str>) -> Result<String, IngressError> {
    match raw.map(str::trim) {
        None | Some("*") => Ok("*".into()),
        Some(s) => shared::domain::send::Sender::parse(s).map(|sender| sender.as_str().to_owned()).map_err(|e| {
            IngressError::InvalidField { field: Some("sender".into()), message: format!("sender {e}, or *") }
        }),
    }
}

pub async fn get_opt_outs(
    State(state): State<AppState>,
    _: Caller,
    Path(number): Path<String>,
) -> Result<Json<Value>, IngressError> {
    let recipient = parse_number(&number)?;
    let rows = storage::opt_outs(&state.db, &recipient).await.map_err(db_error)?;
    if rows.is_empty() {
        return Err(IngressError::NotFoundOptOut);
    }
    Ok(Json(serde_json::to_value(OptOutList { recipient, opt_outs: rows }).unwrap_or_default()))
}

/// The most an opt-out body (`{"sender": …}`) needs.
const OPT_OUT_BODY_LIMIT: usize = 1024;

pub async fn put_opt_out(
    State(state): State<AppState>,
    // Taken first: nothing of the body is read before the caller is known.
    _: Caller,
    Path(number): Path<String>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<Value>), IngressError> {
    let (parts, body) = request.into_parts();
    let body = super::read_body(&parts.headers, body, OPT_OUT_BODY_LIMIT).await?;
    let recipient = parse_number(&number)?;
    let body: OptOutBody = if body.is_empty() {
        OptOutBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| IngressError::from_json(&e))?
    };
    let sender = parse_sender(body.sender.as_deref())?;
    let created = storage::put_opt_out(&state.db, &recipient, &sender).await.map_err(db_error)?;
    let rows = storage::opt_outs(&state.db, &recipient).await.map_err(db_error)?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::to_value(OptOutList { recipient, opt_outs: rows }).unwrap_or_default())))
}

pub async fn delete_opt_outs(
    State(state): State<AppState>,
    _: Caller,
    Path(number): Path<String>,
    Query(params): Params,
) -> Result<StatusCode, IngressError> {
    reject_unknown(&params, &["sender"])?;
    let recipient = parse_number(&number)?;
    let sender = params.get("sender").map(|s| parse_sender(Some(s))).transpose()?;
    let removed = storage::delete_opt_outs(&state.db, &recipient, sender.as_deref()).await.map_err(db_error)?;
    if removed == 0 { Err(IngressError::NotFoundOptOut) } else { Ok(StatusCode::NO_CONTENT) }
}
