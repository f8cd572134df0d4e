//! Keeping secrets and phone numbers out of output: serializers that print `[REDACTED]`, and
//! masking of phone numbers to their last four digits for logs and spans.

use secrecy::SecretString;
use serde::Serializer;

pub const REDACTED: &str = "[REDACTED]";

pub fn secret<S: Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(REDACTED)
}

pub fn opt_secret<S: Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_none(),
    }
}

pub fn secret_list<S: Serializer>(value: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(value.iter().map(|_| REDACTED))
}

/// `+14155550123` → `***0123`: enough to tell numbers apart in a log, not enough to identify one.
pub fn phone(number: &str) -> String {
    let digits: Vec<char> = number.chars().filter(char::is_ascii_alphanumeric).collect();
    let tail: String = digits[digits.len().saturating_sub(4)..].iter().collect();
    format!("***{tail}")
}

/// A JSON decoding error as text that is safe to log, store or answer with. serde's type and
/// value errors quote the refused value (a phone number, say); only the expectation is kept.
/// Syntax errors and missing or unknown fields name no value and stay as they are.
pub fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.split_once(", expected ") {
        Some((problem, expected)) if problem.starts_with("invalid type") || problem.starts_with("invalid value") => {
            format!("a field has the wrong type or value: expected {expected}")
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_keeps_only_the_last_four_characters() {
        assert_eq!(phone("+14155550123"), "***0123");
        assert_eq!(phone("123"), "***123");
        assert_eq!(phone(""), "***");
    }

    #[test]
    fn json_errors_never_quote_the_refused_value() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Job {
            to: String,
            segments: u8,
        }
        for body in [r#"{"to": 14155550123, "segments": 1}"#, r#"{"to": "x", "segments": "14155550123"}"#] {
            let error = serde_json::from_str::<Job>(body).unwrap_err();
            assert!(error.to_string().contains("14155550123"), "serde quotes it: {error}");
            let described = json_error(&error);
            assert!(!described.contains("14155550123"), "{described}");
            assert!(described.contains("expected"), "{described}");
        }
        let missing = serde_json::from_str::<Job>(r#"{"to": "x"}"#).unwrap_err();
        assert_eq!(json_error(&missing), missing.to_string(), "nothing to hide in a missing field");
    }
}
