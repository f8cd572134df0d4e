//! The worker: turns the events in RabbitMQ into the truth in PostgreSQL.
#![forbid(unsafe_code)]

use shared::config::WorkerSettings;
use tokio_util::sync::CancellationToken;

/// Applies the database migrations (the `migrate` subcommand).
pub async fn migrate(settings: &WorkerSettings) -> anyhow::Result<()> {
    let pool = shared::db::pool(&settings.database)?;
    shared::db::migrate(&pool).await?;
    tracing::info!("database migrations applied");
    Ok(())
}

/// Applies migrations, declares the topology, and processes until `shutdown` is cancelled.
pub async fn run(settings: WorkerSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    migrate(&settings).await?;
    let connection = shared::amqp::connect(&settings.amqp, "smsflow-worker").await?;
    let channel = connection.create_channel().await?;
    shared::amqp::Topology::from_settings(&settings.amqp).declare(&channel).await?;
    shutdown.cancelled().await;
    let _ = connection.close(200, "shutting down".into()).await;
    Ok(())
}
