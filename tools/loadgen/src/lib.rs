//! smsflow's load generator and benchmarks: `callbacks` (signed status callbacks against an
//! ingress), `sends` (send jobs through to Plivo-simulator callbacks), `ceiling` (what RabbitMQ
//! and PostgreSQL allow on this machine), and `compare` (two targets, A/B/A/B).
#![forbid(unsafe_code)]

pub mod callbacks;
pub mod ceiling;
pub mod progress;
pub mod sends;
pub mod wire;

use serde::Serialize;

/// Prints a report as an aligned table, then as one JSON line (for scripts).
pub fn print_report<T: Serialize>(mode: &str, report: &T) {
    let value = serde_json::to_value(report).unwrap_or_default();
    println!("── {mode} ──");
    if let Some(map) = value.as_object() {
        for (key, v) in map {
            let shown = match v {
                serde_json::Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or_default()),
                other => other.to_string(),
            };
            println!("  {key:<34} {shown}");
        }
    }
    println!("{}", serde_json::json!({ "mode": mode, "report": value }));
}
