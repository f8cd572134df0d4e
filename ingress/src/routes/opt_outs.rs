//! The opt-out list, for operators: read, add and lift the opt-outs of one number.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shared::domain::PhoneNumber;

use super::auth::Caller;
use super::db_error;
use super::query::ApiQuery;
use crate::AppState;
use crate::error::{CallerRefusals, DatabaseRefusals, ErrorBody, IngressError};
use crate::storage;

/// `DELETE /v1/opt-outs/{number}`'s parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OptOutDeleteQuery {
    /// Lift only the opt-out of this sender (`*`: the one from all senders); default: all.
    sender: Option<String>,
}

/// `PUT /v1/opt-outs/{number}`'s body (optional).
#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OptOutBody {
    /// Our number the recipient opted out of; `*` (the default) for all of them.
    #[serde(default)]
    pub sender: Option<String>,
}

/// A number's opt-outs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = OptOuts)]
pub struct OptOutList {
    recipient: String,
    opt_outs: Vec<storage::OptOutRow>,
}

/// The `{number}` of an opt-out route, for the OpenAPI document.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct NumberParam {
    /// E.164, URL-encoded (`%2B14155552671`).
    #[param(pattern = "^\\+[1-9][0-9]{6,14}$")]
    number: String,
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

/// A number's opt-outs
#[utoipa::path(
    get,
    path = "/v1/opt-outs/{number}",
    tag = "Inbound",
    params(NumberParam),
    responses(
        (status = 200, description = "Its opt-outs", body = OptOutList),
        (status = 400, description = "Not an E.164 number", body = ErrorBody),
        (status = 404, description = "No opt-out", body = ErrorBody),
        CallerRefusals,
        DatabaseRefusals,
    )
)]
pub async fn get_opt_outs(
    State(state): State<AppState>,
    _: Caller,
    Path(number): Path<String>,
) -> Result<Json<OptOutList>, IngressError> {
    let recipient = parse_number(&number)?;
    let rows = storage::opt_outs(&state.db, &recipient).await.map_err(db_error)?;
    if rows.is_empty() {
        return Err(IngressError::NotFoundOptOut);
    }
    Ok(Json(OptOutList { recipient, opt_outs: rows }))
}

/// The most an opt-out body (`{"sender": …}`) needs.
const OPT_OUT_BODY_LIMIT: usize = 1024;

/// Add an opt-out (operator)
#[utoipa::path(
    put,
    path = "/v1/opt-outs/{number}",
    tag = "Inbound",
    params(NumberParam),
    request_body(content = Option<OptOutBody>, description = "Without a body: from all senders"),
    responses(
        (status = 201, description = "Added", body = OptOutList),
        (status = 200, description = "Already there", body = OptOutList),
        (status = 400, description = "Not an E.164 number or malformed JSON", body = ErrorBody),
        (status = 413, description = "Body over the route's limit", body = ErrorBody),
        (status = 422, description = "Invalid sender", body = ErrorBody),
        CallerRefusals,
        DatabaseRefusals,
    )
)]
pub async fn put_opt_out(
    State(state): State<AppState>,
    // Taken first: nothing of the body is read before the caller is known.
    _: Caller,
    Path(number): Path<String>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<OptOutList>), IngressError> {
    let (parts, body) = request.into_parts();
    let body = super::read_body(&parts.headers, body, OPT_OUT_BODY_LIMIT).await?;
    let recipient = parse_number(&number)?;
    // No body, or `null` (as the document allows): from all senders.
    let body: OptOutBody = if body.is_empty() {
        OptOutBody::default()
    } else {
        serde_json::from_slice::<Option<OptOutBody>>(&body)
            .map_err(|e| IngressError::from_json(&e))?
            .unwrap_or_default()
    };
    let sender = parse_sender(body.sender.as_deref())?;
    let created = storage::put_opt_out(&state.db, &recipient, &sender).await.map_err(db_error)?;
    let rows = storage::opt_outs(&state.db, &recipient).await.map_err(db_error)?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(OptOutList { recipient, opt_outs: rows })))
}

/// Remove opt-outs (operator)
#[utoipa::path(
    delete,
    path = "/v1/opt-outs/{number}",
    tag = "Inbound",
    params(NumberParam, OptOutDeleteQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Not an E.164 number", body = ErrorBody),
        (status = 404, description = "No opt-out", body = ErrorBody),
        (status = 422, description = "Invalid sender", body = ErrorBody),
        CallerRefusals,
        DatabaseRefusals,
    )
)]
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
