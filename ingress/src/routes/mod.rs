pub mod auth;
pub mod health;
pub mod inbound;
pub mod messages;
pub mod opt_outs;
pub mod plivo;
pub mod query;
pub mod send;
pub mod stats;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use shared::redact;

use crate::error::IngressError;

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads a body of at most `limit` bytes; a larger one (declared or streamed) is a 413.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<bytes::Bytes, IngressError> {
    if content_length(headers).is_some_and(|len| len > limit as u64) {
        return Err(IngressError::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(IngressError::PayloadTooLarge { limit }),
        Err(e) => Err(IngressError::BadRequest(format!("cannot read request body: {e}"))),
    }
}

/// A database error as the API answers it: 503 while the database is away, 500 otherwise.
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

/// A phone number, in full for a token allowed to read it, else masked to its last digits.
fn shown_phone(raw: Option<&str>, full: bool) -> Option<String> {
    raw.map(|n| if full { n.to_owned() } else { redact::phone(n) })
}
