pub mod auth;
pub mod health;
pub mod messages;
pub mod plivo;
pub mod send;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

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
