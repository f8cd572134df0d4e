//! Everything both smsflow services need and neither owns: configuration, telemetry, the AMQP
//! topology and message contracts, Plivo's signature scheme and the domain types.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod plivo;
pub mod ratelimit;
pub mod redact;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod webhook;

pub use db::MIGRATOR;
