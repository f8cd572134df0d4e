//! Phone numbers in E.164, parsed with libphonenumber's metadata (not a regex).

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhoneNumber(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("must be in E.164 format, starting with '+' and the country code (e.g. +14155550100)")]
    NotE164,
    #[error("is not a phone number: {0}")]
    Unparseable(String),
    #[error("is not a valid number for its country")]
    Invalid,
}

impl PhoneNumber {
    pub fn parse(raw: &str) -> Result<Self, PhoneError> {
        let raw = raw.trim();
        if !raw.starts_with('+') {
            return Err(PhoneError::NotE164);
        }
        if !raw[1..].chars().all(|c| c.is_ascii_digit()) {
            return Err(PhoneError::Unparseable("only digits may follow '+'".into()));
        }
        let number = phonenumber::parse(None, raw).map_err(|e| PhoneError::Unparseable(e.to_string()))?;
        if !phonenumber::is_valid(&number) {
            return Err(PhoneError::Invalid);
        }
        Ok(Self(number.format().mode(phonenumber::Mode::E164).to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Plivo's form: digits only, no '+'.
    pub fn plivo_digits(&self) -> &str {
        &self.0[1..]
    }

    /// Last four digits for logs.
    pub fn masked(&self) -> String {
        crate::redact::phone(&self.0)
    }
}

impl TryFrom<String> for PhoneNumber {
    type Error = PhoneError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<PhoneNumber> for String {
    fn from(value: PhoneNumber) -> Self {
        value.0
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How our side of a message (the sender we send from, the number an inbound SMS was written
/// to) is written wherever it is stored or compared: E.164 for phone numbers, digits for short
/// codes (3–8 digits, as `Sender` parses them), a sender ID as given. Plivo writes numbers
/// without the `+`; every number taken from a callback goes through here or through
/// [`their_identity`], so an opt-out stored from a STOP matches the send it must stop.
pub fn party_identity(raw: &str) -> String {
    let raw = raw.trim();
    // Up to a short code's length, digits stay digits (a sender ID stays as given either way).
    if raw.len() <= crate::domain::send::MAX_SHORT_CODE_DIGITS { raw.to_owned() } else { their_identity(raw) }
}

/// How the other side (a recipient of ours, the writer of an inbound SMS) is written: always a
/// phone number, so E.164 even when it is as short as a short code (Niue's +683 4xxx, say).
pub fn their_identity(raw: &str) -> String {
    let raw = raw.trim();
    if !raw.is_empty() && raw.chars().all(|c| c.is_ascii_digit()) { format!("+{raw}") } else { raw.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parties_are_written_as_the_send_path_writes_senders() {
        assert_eq!(party_identity(" 14155559292 "), "+14155559292");
        assert_eq!(party_identity("+14155559292"), "+14155559292");
        assert_eq!(party_identity("12345"), "12345", "a short code keeps its digits");
        assert_eq!(party_identity("MyBrand"), "MyBrand");
        assert_eq!(their_identity("6834123"), "+6834123", "the other side is always a phone number");
        assert_eq!(their_identity("+14155559292"), "+14155559292");
    }

    #[test]
    fn accepts_valid_e164_numbers_and_refuses_the_rest() {
        assert_eq!(PhoneNumber::parse("+14155552671").unwrap().as_str(), "+14155552671");
        assert_eq!(PhoneNumber::parse("+447911123456").unwrap().plivo_digits(), "447911123456");
        assert_eq!(PhoneNumber::parse("14155552671"), Err(PhoneError::NotE164));
        assert!(matches!(PhoneNumber::parse("+1415abc2671"), Err(PhoneError::Unparseable(_))));
        assert!(PhoneNumber::parse("+1").is_err());
        assert!(PhoneNumber::parse("+1415").is_err());
    }
}
