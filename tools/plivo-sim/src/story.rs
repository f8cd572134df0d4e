//! Delivery stories: which callbacks a message produces, in which order, with which fields
//! (docs/plivo.md §2).

use time::OffsetDateTime;
use time::macros::format_description;

use crate::SimMessage;
use shared::plivo::callback::StatusCallback;

/// Relative weights of the stories a new message plays.
#[derive(Debug, Clone, clap::Args)]
pub struct StoryWeights {
    /// queued → sent → delivered
    #[arg(long = "weight-delivered", env = "PLIVO_SIM_WEIGHT_DELIVERED", default_value_t = 80)]
    pub delivered: u32,
    /// queued → sent → undelivered with a carrier error code
    #[arg(long = "weight-undelivered", env = "PLIVO_SIM_WEIGHT_UNDELIVERED", default_value_t = 8)]
    pub undelivered: u32,
    /// queued → failed with a Plivo error code (420, 450, 900)
    #[arg(long = "weight-failed", env = "PLIVO_SIM_WEIGHT_FAILED", default_value_t = 6)]
    pub failed: u32,
    /// queued → sent, and no delivery report (US/CA style)
    #[arg(long = "weight-sent-only", env = "PLIVO_SIM_WEIGHT_SENT_ONLY", default_value_t = 6)]
    pub sent_only: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Story {
    Delivered,
    Undelivered(u32),
    Failed(u32),
    SentOnly,
}

const CARRIER_ERRORS: [u32; 4] = [20, 30, 70, 80];
const PLIVO_ERRORS: [u32; 3] = [420, 450, 900];

impl Story {
    pub fn choose(weights: &StoryWeights) -> Self {
        let total = weights.delivered + weights.undelivered + weights.failed + weights.sent_only;
        let mut pick = rand::random_range(0..total.max(1));
        for (weight, story) in [
            (weights.delivered, Story::Delivered),
            (weights.undelivered, Story::Undelivered(CARRIER_ERRORS[rand::random_range(0..CARRIER_ERRORS.len())])),
            (weights.failed, Story::Failed(PLIVO_ERRORS[rand::random_range(0..PLIVO_ERRORS.len())])),
            (weights.sent_only, Story::SentOnly),
        ] {
            if pick < weight {
                return story;
            }
            pick -= weight;
        }
        Story::Delivered
    }

    pub fn named(name: &str) -> Option<Self> {
        match name {
            "delivered" => Some(Story::Delivered),
            "undelivered" => Some(Story::Undelivered(30)),
            "failed" => Some(Story::Failed(420)),
            "sent-only" => Some(Story::SentOnly),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Story::Delivered => "delivered",
            Story::Undelivered(_) => "undelivered",
            Story::Failed(_) => "failed",
            Story::SentOnly => "sent-only",
        }
    }

    pub fn final_status(self) -> &'static str {
        match self {
            Story::Delivered => "delivered",
            Story::Undelivered(_) => "undelivered",
            Story::Failed(_) => "failed",
            Story::SentOnly => "sent",
        }
    }

    pub fn error_code(self) -> Option<u32> {
        match self {
            Story::Undelivered(code) | Story::Failed(code) => Some(code),
            _ => None,
        }
    }

    /// The callbacks in generation order (`Sequence` 1, 2, …), or reversed when `disorder`.
    pub fn callbacks(self, disorder: bool) -> Vec<Callback> {
        let statuses: Vec<(&'static str, Option<u32>)> = match self {
            Story::Delivered => vec![("queued", None), ("sent", None), ("delivered", None)],
            Story::Undelivered(code) => vec![("queued", None), ("sent", None), ("undelivered", Some(code))],
            Story::Failed(code) => vec![("queued", None), ("failed", Some(code))],
            Story::SentOnly => vec![("queued", None), ("sent", None)],
        };
        let mut callbacks: Vec<Callback> = statuses
            .iter()
            .enumerate()
            .map(|(i, (status, error_code))| Callback { sequence: i as u32 + 1, status, error_code: *error_code })
            .collect();
        if disorder {
            callbacks.reverse();
        }
        callbacks
    }
}

#[derive(Debug, Clone)]
pub struct Callback {
    pub sequence: u32,
    pub status: &'static str,
    pub error_code: Option<u32>,
}

impl Callback {
    /// Plivo's status-callback fields (docs/plivo.md §2), in the order Plivo sends them.
    pub fn params(&self, message: &SimMessage) -> Vec<(String, String)> {
        let now = OffsetDateTime::now_utc();
        let stamp = now
            .format(format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]"))
            .unwrap_or_default();
        let reached = |status: &str| match status {
            "queued" => 1,
            "sent" | "failed" => 2,
            _ => 3,
        };
        let step = reached(self.status);
        let at = |min_step: i32| if step >= min_step { stamp.clone() } else { String::new() };
        let (queued, sent, reported) = (at(1), if self.status == "failed" { String::new() } else { at(2) }, at(3));
        StatusCallback {
            message_uuid: &message.message_uuid,
            status: self.status,
            from: &message.src,
            to: &message.dst,
            sequence: self.sequence,
            error_code: self.error_code,
            message_time: &stamp,
            queued_time: &queued,
            sent_time: &sent,
            delivery_report_time: &reported,
            requester_ip: "127.0.0.1",
        }
        .fields()
    }
}
