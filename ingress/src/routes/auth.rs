//! Who calls the HTTP API: bearer tokens, compared by digest, each with its request rate. The
//! `Caller` extractor runs before anything else of a request is read, so a stranger costs no
//! body read, query parse or database query.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::IngressError;

/// One configured API token.
pub struct ApiToken {
    /// May read full phone numbers and message text.
    pub full_read: bool,
    /// Scopes idempotency keys to their token.
    pub fingerprint: String,
    /// The callback URL of this token's send requests that name none.
    pub default_callback: Option<String>,
    /// SHA-256 of the token: presented tokens are compared by digest, so neither the
    /// comparison's time nor an early length check says anything about the token.
    digest: [u8; 32],
    pub budget: shared::ratelimit::TokenBucket,
}

impl ApiToken {
    pub fn new(
        secret: secrecy::SecretString,
        full_read: bool,
        default_callback: Option<String>,
        rate_per_second: u32,
        burst: u32,
    ) -> Self {
        use secrecy::ExposeSecret as _;
        let digest: [u8; 32] = Sha256::digest(secret.expose_secret().as_bytes()).into();
        let fingerprint = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            digest,
            full_read,
            fingerprint,
            default_callback,
            budget: shared::ratelimit::TokenBucket::new(rate_per_second.into(), burst.into()),
        }
    }
}

/// The API's caller: a configured token, presented as `Authorization: Bearer …` and within its
/// request rate.
pub struct Caller(Arc<ApiToken>);

impl std::ops::Deref for Caller {
    type Target = ApiToken;

    fn deref(&self) -> &ApiToken {
        &self.0
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = IngressError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, IngressError> {
        authenticate(state, &parts.headers).map(Caller)
    }
}

/// The token presented as `Authorization: Bearer …`, within its request rate.
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Arc<ApiToken>, IngressError> {
    let token = identify(state, headers)?;
    if let Err(wait) = token.budget.try_take() {
        return Err(IngressError::RateLimited("this token's request rate is exceeded".into(), wait.as_secs().max(1)));
    }
    Ok(token)
}

fn identify(state: &AppState, headers: &HeaderMap) -> Result<Arc<ApiToken>, IngressError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| IngressError::Unauthorized("missing bearer token (Authorization: Bearer <token>)".into()))?;
    // Compare digests with every token, in constant time: timing reveals neither which token
    // nor how long one is.
    let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut matched = None;
    for token in state.api_tokens.iter() {
        if bool::from(token.digest.ct_eq(&presented)) {
            matched = Some(token);
        }
    }
    matched.cloned().ok_or_else(|| IngressError::Forbidden("bearer token not accepted".into()))
}
