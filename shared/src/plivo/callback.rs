//! Plivo's callbacks (status and inbound): their field names, and how their values are read.
//! One home for what the worker parses, the simulator and the load generator send, and the
//! tests build (docs/plivo.md §2 and §3).

use std::collections::BTreeMap;

use time::OffsetDateTime;
use time::macros::format_description;

/// The field names Plivo's callbacks carry.
pub mod field {
    pub const MESSAGE_UUID: &str = "MessageUUID";
    pub const PARENT_MESSAGE_UUID: &str = "ParentMessageUUID";
    pub const STATUS: &str = "Status";
    /// Generation order of one message's callbacks.
    pub const SEQUENCE: &str = "Sequence";
    pub const ERROR_CODE: &str = "ErrorCode";
    pub const FROM: &str = "From";
    pub const TO: &str = "To";
    pub const TEXT: &str = "Text";
    /// Older inbound callbacks name the text `Body`.
    pub const BODY: &str = "Body";
    pub const TYPE: &str = "Type";
    pub const UNITS: &str = "Units";
    pub const TOTAL_AMOUNT: &str = "TotalAmount";
    pub const TOTAL_RATE: &str = "TotalRate";
    pub const POWERPACK_UUID: &str = "PowerpackUUID";
    pub const PART_INFO: &str = "PartInfo";
    pub const MCC: &str = "MCC";
    pub const MNC: &str = "MNC";
    pub const MESSAGE_INTENT: &str = "MessageIntent";
    pub const MESSAGE_TIME: &str = "MessageTime";
    pub const QUEUED_TIME: &str = "QueuedTime";
    pub const SENT_TIME: &str = "SentTime";
    pub const DELIVERY_REPORT_TIME: &str = "DeliveryReportTime";
    /// When the status happened according to Plivo, most specific first.
    pub const STATUS_TIMES: [&str; 4] = [DELIVERY_REPORT_TIME, SENT_TIME, QUEUED_TIME, MESSAGE_TIME];
}

/// A status callback as Plivo sends it (docs/plivo.md §2): what the simulator and the load
/// generator put on the wire. Times are Plivo's text (`2024-05-14 09:12:44.319284`); an empty
/// one is a step the message has not reached.
#[derive(Debug, Clone)]
pub struct StatusCallback<'a> {
    pub message_uuid: &'a str,
    pub status: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub sequence: u32,
    pub error_code: Option<u32>,
    pub message_time: &'a str,
    pub queued_time: &'a str,
    pub sent_time: &'a str,
    pub delivery_report_time: &'a str,
    /// The address Plivo says it called from.
    pub requester_ip: &'a str,
}

impl StatusCallback<'_> {
    /// The fields in the order Plivo sends them: one part of one SMS at the US rate.
    pub fn fields(&self) -> Vec<(String, String)> {
        let rate = "0.00650";
        let error_code = self.error_code.map(|c| c.to_string()).unwrap_or_default();
        let sequence = self.sequence.to_string();
        owned([
            (field::STATUS, self.status),
            (field::TO, self.to),
            (field::MESSAGE_UUID, self.message_uuid),
            (field::FROM, self.from),
            (field::TOTAL_RATE, rate),
            (field::UNITS, "1"),
            (field::TOTAL_AMOUNT, rate),
            (field::TYPE, "sms"),
            (field::MCC, "310"),
            (field::MNC, "260"),
            (field::ERROR_CODE, &error_code),
            (field::PARENT_MESSAGE_UUID, self.message_uuid),
            (field::PART_INFO, "1 of 1"),
            (field::SEQUENCE, &sequence),
            (field::POWERPACK_UUID, ""),
            (field::MESSAGE_TIME, self.message_time),
            (field::QUEUED_TIME, self.queued_time),
            (field::SENT_TIME, self.sent_time),
            (field::DELIVERY_REPORT_TIME, self.delivery_report_time),
            ("requester_ip", self.requester_ip),
        ])
    }
}

/// An inbound SMS callback as Plivo sends it (docs/plivo.md §3): what the simulator puts on
/// the wire.
#[derive(Debug, Clone)]
pub struct InboundCallback<'a> {
    pub message_uuid: &'a str,
    /// The sender (without `+`, as Plivo writes it).
    pub from: &'a str,
    /// Our number.
    pub to: &'a str,
    pub text: &'a str,
    /// Plivo's reading of the text (`optout`, `optin`, `help` or empty).
    pub intent: &'a str,
}

impl InboundCallback<'_> {
    /// The fields in the order Plivo sends them: one part, free of charge.
    pub fn fields(&self) -> Vec<(String, String)> {
        owned([
            (field::FROM, self.from),
            (field::TO, self.to),
            (field::TEXT, self.text),
            (field::TYPE, "sms"),
            (field::MESSAGE_UUID, self.message_uuid),
            (field::UNITS, "1"),
            (field::TOTAL_RATE, "0.00000"),
            (field::TOTAL_AMOUNT, "0.00000"),
            (field::MESSAGE_INTENT, self.intent),
            (field::POWERPACK_UUID, ""),
        ])
    }
}

fn owned<const N: usize>(fields: [(&str, &str); N]) -> Vec<(String, String)> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// A value with its surrounding blanks trimmed; `None` when nothing is left.
pub fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// `2024-05-14 09:12:44.319284`, taken as UTC (Plivo does not say; docs/plivo.md §2).
pub fn parse_time(raw: &str) -> Option<OffsetDateTime> {
    let with_fraction = format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond]");
    let without = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(raw, with_fraction)
        .or_else(|_| time::PrimitiveDateTime::parse(raw, without))
        .ok()
        .map(|t| t.assume_utc())
}

/// Plivo's charge as written, if it fits `numeric(14, 5)`; anything else ("inf", "NaN", 1e400)
/// is dropped rather than let the database refuse, and dead-letter, the whole callback.
pub fn plausible_amount(raw: Option<&str>) -> Option<String> {
    let raw = non_empty(raw)?;
    let plain = raw.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-');
    let value: f64 = raw.parse().ok()?;
    (plain && value.is_finite() && value.abs() < 1e9).then(|| raw.to_owned())
}

/// A callback's fields as the text of one JSON object, the way they are stored: a field that
/// came once is a string, a repeated one an array of its values in the order received.
pub fn fields_json(params: &[(String, String)]) -> String {
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Values<'a> {
        One(&'a str),
        Many(Vec<&'a str>),
    }
    let mut grouped: BTreeMap<&str, Values> = BTreeMap::new();
    for (k, v) in params {
        match grouped.get_mut(k.as_str()) {
            None => {
                grouped.insert(k, Values::One(v));
            }
            Some(Values::One(first)) => {
                let first = *first;
                grouped.insert(k, Values::Many(vec![first, v]));
            }
            Some(Values::Many(all)) => all.push(v),
        }
    }
    serde_json::to_string(&grouped).expect("a map of strings serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_become_one_json_object_with_repeated_keys_as_arrays() {
        let params: Vec<(String, String)> = [("To", "1"), ("Status", "sent"), ("To", "2"), ("A", "\"q\"")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let json: serde_json::Value = serde_json::from_str(&fields_json(&params)).unwrap();
        assert_eq!(json, serde_json::json!({"A": "\"q\"", "Status": "sent", "To": ["1", "2"]}));
    }

    #[test]
    fn only_an_amount_the_database_can_hold_is_kept() {
        assert_eq!(plausible_amount(Some("0.01300")).as_deref(), Some("0.01300"));
        for hostile in ["inf", "NaN", "1e400", "1e12", "12345678901", "", "0x10"] {
            assert_eq!(plausible_amount(Some(hostile)), None, "{hostile}");
        }
    }

    #[test]
    fn plivo_times_are_read_as_utc_with_or_without_a_fraction() {
        assert_eq!(parse_time("2024-05-14 09:12:44.319284").map(|t| t.unix_timestamp()), Some(1_715_677_964));
        assert_eq!(parse_time("2024-05-14 09:12:44").map(|t| t.unix_timestamp()), Some(1_715_677_964));
        assert_eq!(parse_time("14/05/2024"), None);
    }
}
