//! Worker integration tests against the real RabbitMQ and PostgreSQL: each test gets a fresh
//! database (`#[sqlx::test]`) and a random topology prefix.

mod crash;
mod events;
mod helpers;
mod inbound;
mod infra;
mod outage;
mod poison;
mod send;
mod status;
mod status_rule;
