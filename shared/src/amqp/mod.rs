//! RabbitMQ: topology, message contracts, a confirming publisher and trace-context headers.

pub mod contracts;
pub mod headers;
pub mod publisher;
pub mod topology;

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;

use crate::config::AmqpSettings;

pub use publisher::{PublishError, Publisher};
pub use topology::{Stream, Topology};

/// Opens one connection, bounded by `amqp.connect_timeout_ms`. lapin's own auto-recovery is
/// left off: it can stall while recovering, so callers rebuild connections themselves.
pub async fn connect(settings: &AmqpSettings, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = Connection::connect(settings.url.expose_secret(), properties);
    match tokio::time::timeout(Duration::from_millis(settings.connect_timeout_ms), connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(anyhow::anyhow!("cannot connect to RabbitMQ: {e}")),
        Err(_) => {
            Err(anyhow::anyhow!("cannot connect to RabbitMQ: no answer within {} ms", settings.connect_timeout_ms))
        }
    }
}

/// The delays between attempts to rebuild a lost broker connection, for every client of the
/// broker: from 100 ms, doubling, jittered so that replicas do not reconnect in step, and at
/// most 5 s (backon's jitter adds up to the delay itself, so the cap before it is 2.5 s).
/// Endless: whoever loops on it decides when to give up.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(2500))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs connection setup (channels, topology, QoS, consumers) bounded by
/// `amqp.connect_timeout_ms`: a broker that accepts the connection but stops answering must
/// not hold a reconnect loop forever. On failure the connection is closed (itself bounded).
pub async fn set_up<T>(
    settings: &AmqpSettings,
    connection: &Connection,
    setup: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> anyhow::Result<T> {
    let error = match tokio::time::timeout(Duration::from_millis(settings.connect_timeout_ms), setup).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => anyhow::anyhow!("cannot set up RabbitMQ channels and topology: {e}"),
        Err(_) => anyhow::anyhow!(
            "cannot set up RabbitMQ channels and topology: no answer within {} ms",
            settings.connect_timeout_ms
        ),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "setup failed".into())).await;
    Err(error)
}
