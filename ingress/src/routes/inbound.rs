//! The status API's inbound SMS, newest first, with filters and keyset pagination.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use shared::domain::InboundSms;

use super::auth::Caller;
use super::query::{ApiQuery, Page, decode_cursor, encode_cursor, parse_limit, parse_phone, parse_time};
use super::{db_error, shown_phone};
use crate::AppState;
use crate::error::{CallerRefusals, DatabaseRefusals, ErrorBody, IngressError};
use crate::storage::{self, InboundFilter};

/// An inbound SMS as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Inbound)]
pub struct InboundView {
    message_uuid: String,
    /// In full for a full-read token, else masked.
    sender: Option<String>,
    recipient: String,
    /// Full-read tokens only.
    text: Option<String>,
    #[serde(rename = "type")]
    message_type: String,
    units: Option<i32>,
    intent: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    received_at: time::OffsetDateTime,
}

impl InboundView {
    fn new(row: InboundSms, full: bool) -> Self {
        Self {
            sender: shown_phone(Some(&row.sender), full),
            message_uuid: row.message_uuid,
            recipient: row.recipient,
            text: if full { row.body } else { None },
            message_type: row.message_type,
            units: row.units,
            intent: row.intent,
            received_at: row.received_at,
        }
    }
}

/// `GET /v1/inbound`'s parameters. Values are read as text and checked by the handler, so a
/// refusal names the parameter and what it expects.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InboundListQuery {
    /// E.164.
    sender: Option<String>,
    /// E.164: one of our numbers.
    recipient: Option<String>,
    /// Received at or after (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Received before (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// Rows per page (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Inbound SMS, newest first
#[utoipa::path(
    get,
    path = "/v1/inbound",
    tag = "Inbound",
    params(InboundListQuery),
    responses(
        (status = 200, description = "A page", body = Page<InboundView>),
        (status = 400, description = "A parameter is invalid", body = ErrorBody),
        CallerRefusals,
        DatabaseRefusals,
    )
)]
pub async fn list_inbound(
    State(state): State<AppState>,
    token: Caller,
    ApiQuery(params): ApiQuery<InboundListQuery>,
) -> Result<Json<Page<InboundView>>, IngressError> {
    let limit = parse_limit(params.limit.as_deref())?;
    let filter = InboundFilter {
        sender: parse_phone(params.sender.as_deref(), "sender")?,
        recipient: parse_phone(params.recipient.as_deref(), "recipient")?,
        since: parse_time(params.since.as_deref(), "since")?,
        until: parse_time(params.until.as_deref(), "until")?,
        after: params.cursor.as_deref().map(decode_cursor).transpose()?,
        limit: limit + 1,
    };
    let rows = storage::inbound(&state.db, &filter).await.map_err(db_error)?;
    Ok(Json(Page::from_rows(
        rows,
        limit,
        |r| encode_cursor(r.received_at, &r.message_uuid),
        |r| InboundView::new(r, token.full_read),
    )))
}
