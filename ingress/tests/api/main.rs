//! Ingress integration tests against the real RabbitMQ (one test binary, per-test topology).

mod bad_input;
mod callbacks;
mod cli;
mod helpers;
mod openapi;
mod outage;
mod send;
mod shutdown;
mod status_api;
