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

/// Free text from elsewhere (Plivo's error messages) made safe to log, store or answer with:
/// every run of 7 or more digits standing alone, with an optional leading `+`, is masked as
/// `phone` masks a number. Digits inside a word (a UUID's `1231380bc196`) are left alone.
pub fn numbers_in(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut start = 0;
    while start < chars.len() {
        let digits_from = if chars[start] == '+' { start + 1 } else { start };
        let mut end = digits_from;
        while end < chars.len() && chars[end].is_ascii_digit() {
            end += 1;
        }
        let alone = (start == 0 || !chars[start - 1].is_alphanumeric())
            && (end == chars.len() || !chars[end].is_alphanumeric());
        if end - digits_from >= 7 && alone {
            out.push_str(&phone(&chars[digits_from..end].iter().collect::<String>()));
        } else {
            // Copy a short or embedded digit run whole, so that its tail is not taken for a
            // run of its own.
            end = end.max(start + 1);
            out.extend(&chars[start..end]);
        }
        start = end;
    }
    out
}

/// A JSON decoding error as text that is safe to log, store or answer with. serde's type and
/// value errors quote the refused value (a phone number, say), and its unknown field and
/// variant errors the caller's own key or word: only the expectation is kept. Syntax errors
/// and missing fields name nothing of the input and stay as they are.
pub fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.split_once(", expected ") {
        Some((problem, expected)) if problem.starts_with("invalid type") || problem.starts_with("invalid value") => {
            format!("a field has the wrong type or value: expected {expected}")
        }
        Some((problem, expected)) if problem.starts_with("unknown field") => {
            format!("a field is not one of this body's: expected {expected}")
        }
        Some((problem, expected)) if problem.starts_with("unknown variant") => {
            format!("a value is not one of those allowed: expected {expected}")
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
    fn numbers_in_free_text_are_masked_and_nothing_else_changes() {
        assert_eq!(
            numbers_in("'dst' +14155550123 is not valid; nor is 4155550199."),
            "'dst' ***0123 is not valid; nor is ***0199."
        );
        for untouched in [
            "Insufficient Credit",
            "amount 0.00650, code 420, 123456 units",
            "api_id db342550-7f1d-11e1-8ea7-1231380bc196",
            "at 2026-11-27 10:00:00",
            "+ 12",
            "",
        ] {
            assert_eq!(numbers_in(untouched), untouched);
        }
        assert_eq!(numbers_in("1234567"), "***4567");
        assert_eq!(numbers_in("x1234567"), "x1234567", "inside a word");
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
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Strict {
            to: String,
        }
        let unknown = serde_json::from_str::<Strict>(r#"{"to": "x", "+14155550123": 1}"#).unwrap_err();
        let described = json_error(&unknown);
        assert!(!described.contains("14155550123") && described.contains("`to`"), "{described}");
        let missing = serde_json::from_str::<Job>(r#"{"to": "x"}"#).unwrap_err();
        assert_eq!(json_error(&missing), missing.to_string(), "nothing to hide in a missing field");
    }
}
