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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_keeps_only_the_last_four_characters() {
        assert_eq!(phone("+14155550123"), "***0123");
        assert_eq!(phone("123"), "***123");
        assert_eq!(phone(""), "***");
    }
}
