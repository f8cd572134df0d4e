//! The opt-out list, for operators: read, add and lift the opt-outs of one number.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::domain::PhoneNumber;

use super::auth::Caller;
use super::db_error;
use super::query::ApiQuery;
use crate::AppState;
use crate::error::IngressError;
use crate::storage;

/// `DELETE /v1/opt-outs/{number}`'s parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutDeleteQuery {
    sender: Option<String>,
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
    ApiQuery(params): ApiQuery<OptOutDeleteQuery>,
) -> Result<StatusCode, IngressError> {
    let recipient = parse_number(&number)?;
    let sender = params.sender.as_deref().map(|s| parse_sender(Some(s))).transpose()?;
    let removed = storage::delete_opt_outs(&state.db, &recipient, sender.as_deref()).await.map_err(db_error)?;
    if removed == 0 { Err(IngressError::NotFoundOptOut) } else { Ok(StatusCode::NO_CONTENT) }
}
