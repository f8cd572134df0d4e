//! The status API's inbound SMS, newest first, with filters and keyset pagination.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::query::{ApiQuery, decode_cursor, encode_cursor, parse_limit, parse_phone, parse_time};
use super::{db_error, phone, rfc3339};
use crate::AppState;
use crate::error::IngressError;
use crate::storage::{self, InboundFilter};

/// `GET /v1/inbound`'s parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundListQuery {
    sender: Option<String>,
    recipient: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

pub async fn list_inbound(
    State(state): State<AppState>,
    token: Caller,
    ApiQuery(params): ApiQuery<InboundListQuery>,
) -> Result<Json<Value>, IngressError> {
    let limit = parse_limit(params.limit.as_deref())?;
    let filter = InboundFilter {
        sender: parse_phone(params.sender.as_deref(), "sender")?,
        recipient: parse_phone(params.recipient.as_deref(), "recipient")?,
        since: parse_time(params.since.as_deref(), "since")?,
        until: parse_time(params.until.as_deref(), "until")?,
        after: params.cursor.as_deref().map(decode_cursor).transpose()?,
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
