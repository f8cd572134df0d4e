//! The status API's query strings: typed (an unknown parameter is a 400 naming it), and the
//! values read with messages that say what is expected.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use shared::domain::PhoneNumber;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::error::IngressError;

pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 200;

/// One page of a list, and the cursor of the next (`None`: this is the last).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page of `limit` from `rows`, which were fetched `limit + 1` at most: a row past the
    /// limit says there is a next page, whose cursor is the last shown row's (`cursor`).
    pub fn from_rows<R>(mut rows: Vec<R>, limit: i64, cursor: impl Fn(&R) -> String, view: impl FnMut(R) -> T) -> Self {
        let next_cursor = (rows.len() as i64 > limit)
            .then(|| {
                rows.truncate(limit as usize);
                rows.last().map(&cursor)
            })
            .flatten();
        Self { data: rows.into_iter().map(view).collect(), next_cursor }
    }
}

/// A typed query string; one that does not fit `T` (an unknown or repeated parameter) is
/// answered 400 in the API's error shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = IngressError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, IngressError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(ApiQuery(query)),
            Err(rejection) => Err(IngressError::BadRequest(
                rejection.body_text().replace("Failed to deserialize query string: ", "query string: "),
            )),
        }
    }
}

pub fn parse_uuid(raw: &str, what: &str) -> Result<Uuid, IngressError> {
    Uuid::parse_str(raw).map_err(|_| IngressError::BadRequest(format!("{what} must be a UUID")))
}

pub fn parse_time(raw: Option<&str>, key: &str) -> Result<Option<OffsetDateTime>, IngressError> {
    raw.map(|v| OffsetDateTime::parse(v, &Rfc3339)).transpose().map_err(|_| {
        IngressError::BadRequest(format!("{key} must be an RFC 3339 timestamp (e.g. 2026-11-27T10:00:00Z)"))
    })
}

pub fn parse_limit(raw: Option<&str>) -> Result<i64, IngressError> {
    match raw {
        None => Ok(DEFAULT_PAGE),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| IngressError::BadRequest(format!("limit must be an integer from 1 to {MAX_PAGE}"))),
    }
}

pub fn parse_phone(raw: Option<&str>, key: &str) -> Result<Option<String>, IngressError> {
    raw.map(|v| PhoneNumber::parse(v).map(|p| p.as_str().to_owned()))
        .transpose()
        .map_err(|e| IngressError::BadRequest(format!("{key} {e}")))
}

/// Opaque keyset cursor: the last row's (time, key).
pub fn encode_cursor(time: OffsetDateTime, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{key}", time.unix_timestamp_nanos()))
}

pub fn decode_cursor(raw: &str) -> Result<(OffsetDateTime, String), IngressError> {
    let invalid = || IngressError::BadRequest("cursor is not one this API returned".into());
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?).map_err(|_| invalid())?;
    let (nanos, key) = text.split_once('|').ok_or_else(invalid)?;
    let time =
        OffsetDateTime::from_unix_timestamp_nanos(nanos.parse().map_err(|_| invalid())?).map_err(|_| invalid())?;
    Ok((time, key.to_owned()))
}
