//! Plivo SMS error codes (docs/plivo.md §5) and whether sending again could help.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Retryability {
    /// Sending the same message again will fail the same way.
    Permanent,
    /// A later attempt may succeed.
    Retryable,
    /// Plivo does not say; treat as not retryable, and look.
    Unknown,
}

/// Plivo's error code and what it means: the one shape of it in the HTTP API and in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = PlivoError))]
pub struct ErrorCodeInfo {
    pub code: u32,
    pub reason: &'static str,
    pub retryability: Retryability,
}

use Retryability::{Permanent, Retryable, Unknown};

const TABLE: &[(u32, &str, Retryability)] = &[
    (0, "success", Permanent),
    (10, "invalid message", Permanent),
    (20, "network error", Retryable),
    (30, "spam detected", Permanent),
    (40, "invalid source number", Permanent),
    (50, "invalid destination number", Permanent),
    (60, "loop detected", Permanent),
    (70, "destination permanently unavailable", Permanent),
    (80, "destination temporarily unavailable", Retryable),
    (90, "no route available", Unknown),
    (100, "prohibited by carrier", Permanent),
    (110, "message too long", Permanent),
    (200, "source number blocked by STOP from destination number", Permanent),
    (201, "US toll-free to Canadian destination blocked", Permanent),
    (300, "failed to dispatch message", Unknown),
    (420, "message expired", Retryable),
    (450, "destination country barred", Permanent),
    (451, "messages-per-hour threshold exceeded", Retryable),
    (900, "insufficient credit", Retryable),
    (910, "account disabled", Permanent),
    (1000, "unknown error", Unknown),
];

/// Looks a code up; codes Plivo added after our table are `Unknown`, never guessed.
pub fn classify(code: u32) -> ErrorCodeInfo {
    TABLE
        .iter()
        .find(|(c, ..)| *c == code)
        .map(|&(code, reason, retryability)| ErrorCodeInfo { code, reason, retryability })
        .unwrap_or(ErrorCodeInfo { code, reason: "not in Plivo's published table", retryability: Unknown })
}

/// Parses the `ErrorCode` field: absent, empty and `000` all mean "no error".
pub fn parse_error_code(raw: Option<&str>) -> Option<u32> {
    raw.map(str::trim).filter(|s| !s.is_empty()).and_then(|s| s.parse().ok()).filter(|c| *c != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_and_unknown_codes() {
        assert_eq!(classify(80).retryability, Retryable);
        assert_eq!(classify(450).retryability, Permanent);
        assert_eq!(classify(4242).retryability, Unknown);
        assert_eq!(classify(4242).code, 4242);
    }

    #[test]
    fn empty_and_zero_error_codes_mean_none() {
        assert_eq!(parse_error_code(None), None);
        assert_eq!(parse_error_code(Some("")), None);
        assert_eq!(parse_error_code(Some("000")), None);
        assert_eq!(parse_error_code(Some("30")), Some(30));
    }
}
