//! What a scenario measured, as a row of docs/reliability.md.

use serde::Serialize;

/// One row of docs/reliability.md.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub traffic: String,
    pub fault: String,
    pub jobs: usize,
    pub callbacks_acknowledged: usize,
    pub events_stored: usize,
    pub lost: usize,
    pub status_mismatches: usize,
    pub duplicate_sends: usize,
    pub unknown: usize,
    pub dead_letters: u32,
    pub recovery_seconds: f64,
    /// What else the scenario measured (e.g. valid traffic's latency during a flood).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Outcome {
    /// Prints the row, and appends it to `$SMSFLOW_RELIABILITY_OUT` when that is set.
    pub fn record(&self) {
        use std::io::Write as _;
        if let Ok(path) = std::env::var("SMSFLOW_RELIABILITY_OUT")
            && let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path)
        {
            let _ = writeln!(f, "{}", serde_json::to_string(self).unwrap_or_default());
        }
        eprintln!("{}", serde_json::to_string(self).unwrap_or_default());
    }
}
