//! The status API's delivery statistics over a time window.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::auth::Caller;
use super::db_error;
use super::query::{ApiQuery, parse_time};
use crate::AppState;
use crate::error::{CallerRefusals, DatabaseRefusals, ErrorBody, IngressError};
use crate::storage::{self, GroupBy};

/// Delivery statistics over `from`..`to`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Stats)]
pub struct StatsView {
    #[serde(with = "time::serde::rfc3339")]
    from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    to: OffsetDateTime,
    #[schema(value_type = GroupBy)]
    group_by: String,
    total: i64,
    groups: Vec<storage::StatsGroup>,
    delivered: i64,
    /// Messages that reached a final status in the window.
    terminal: i64,
    /// `delivered / terminal`; `None` without any final status.
    delivery_rate: Option<f64>,
}

/// `GET /v1/stats`'s parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Start of the window (RFC 3339; default: a day before `to`).
    #[param(format = DateTime)]
    from: Option<String>,
    /// End of the window (RFC 3339; default: now).
    #[param(format = DateTime)]
    to: Option<String>,
    /// How the counts are grouped (default `status`).
    #[param(value_type = Option<GroupBy>)]
    group_by: Option<String>,
}

/// Counts and delivery rate over a window
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "Status",
    params(StatsQuery),
    responses(
        (status = 200, description = "Counts", body = StatsView),
        (status = 400, description = "A parameter is invalid", body = ErrorBody),
        CallerRefusals,
        DatabaseRefusals,
    )
)]
pub async fn stats(
    State(state): State<AppState>,
    _: Caller,
    ApiQuery(params): ApiQuery<StatsQuery>,
) -> Result<Json<StatsView>, IngressError> {
    let until = parse_time(params.to.as_deref(), "to")?.unwrap_or_else(OffsetDateTime::now_utc);
    let since = parse_time(params.from.as_deref(), "from")?.unwrap_or(until - time::Duration::days(1));
    if since >= until {
        return Err(IngressError::BadRequest("from must be before to".into()));
    }
    let group_by_name = params.group_by.as_deref().unwrap_or("status");
    let group_by = match group_by_name {
        "status" => GroupBy::Status,
        "error_code" => GroupBy::ErrorCode,
        "hour" => GroupBy::Hour,
        _ => return Err(IngressError::BadRequest("group_by must be status, error_code or hour".into())),
    };
    let groups = storage::stats(&state.db, since, until, group_by).await.map_err(db_error)?;
    let (delivered, terminal) = storage::delivery_counts(&state.db, since, until).await.map_err(db_error)?;
    let total: i64 = groups.iter().map(|g| g.count).sum();
    let delivery_rate = (terminal > 0).then(|| delivered as f64 / terminal as f64);
    Ok(Json(StatsView {
        from: since,
        to: until,
        group_by: group_by_name.to_owned(),
        total,
        groups,
        delivered,
        terminal,
        delivery_rate,
    }))
}
