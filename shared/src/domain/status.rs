//! Message statuses. Statuses only move forward:
//! `accepted < sending < unknown < submitted < queued < sent < {delivered, undelivered, failed,
//! rejected}`. Which of two statuses wins is decided in one place, the database's
//! `smsflow_status_precedence` (migrations/20261201000001_one_status_rule.sql); nothing in Rust
//! ranks statuses.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Accepted,
    Sending,
    Unknown,
    Submitted,
    Queued,
    Sent,
    Delivered,
    Undelivered,
    Failed,
    Rejected,
}

impl MessageStatus {
    pub const ALL: [MessageStatus; 10] = [
        Self::Accepted,
        Self::Sending,
        Self::Unknown,
        Self::Submitted,
        Self::Queued,
        Self::Sent,
        Self::Delivered,
        Self::Undelivered,
        Self::Failed,
        Self::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Sending => "sending",
            Self::Unknown => "unknown",
            Self::Submitted => "submitted",
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Undelivered => "undelivered",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Delivered | Self::Undelivered | Self::Failed | Self::Rejected)
    }

    /// Statuses a Plivo callback can carry (`read` is WhatsApp's and maps to `delivered`).
    pub fn from_callback(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "queued" => Some(Self::Queued),
            "sent" => Some(Self::Sent),
            "delivered" | "read" => Some(Self::Delivered),
            "undelivered" => Some(Self::Undelivered),
            "failed" => Some(Self::Failed),
            "rejected" => Some(Self::Rejected),
            _ => None,
        }
    }
}

impl std::str::FromStr for MessageStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| format!("unknown status {s:?}"))
    }
}

impl std::fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_outcomes_are_terminal() {
        use MessageStatus::*;
        assert!([Delivered, Undelivered, Failed, Rejected].iter().all(|s| s.is_terminal()));
        assert!(!Sent.is_terminal());
    }

    #[test]
    fn round_trips_through_its_text() {
        for status in MessageStatus::ALL {
            assert_eq!(status.as_str().parse::<MessageStatus>().unwrap(), status);
        }
        assert_eq!(MessageStatus::from_callback("Delivered"), Some(MessageStatus::Delivered));
        assert_eq!(MessageStatus::from_callback("bogus"), None);
    }
}
