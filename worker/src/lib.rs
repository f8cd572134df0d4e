//! The worker: turns the events in RabbitMQ into the truth in PostgreSQL.
//!
//! Status events are consumed in batches, written in one transaction (idempotent, forward-only)
//! and acked with one multiple-ack only after the commit. What cannot be written now goes to
//! the retry ladder; what can never be written goes to the dead-letter queue with its reason.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod broker;
pub mod events;
pub mod inbound;
pub mod monitor;
pub mod replay;
pub mod send;
pub mod status;
pub mod storage;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use shared::amqp::{Publisher, Topology};
use shared::config::WorkerSettings;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Rerouter;
use crate::inbound::InboundPipeline;
use crate::send::SendPipeline;
use crate::send::plivo::PlivoClient;
use crate::send::ratelimit::SenderRateLimiter;
use crate::status::StatusPipeline;

/// Applies the database migrations (the `migrate` subcommand).
pub async fn migrate(settings: &WorkerSettings) -> anyhow::Result<()> {
    let pool = shared::db::pool(&settings.database)?;
    shared::db::migrate(&pool).await?;
    tracing::info!("database migrations applied");
    Ok(())
}

/// Applies migrations, serves the admin endpoints, and processes until `shutdown`.
pub async fn run(settings: WorkerSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = shared::db::pool(&settings.database)?;
    shared::db::migrate(&pool).await?;
    let admin = TcpListener::bind(settings.worker.admin_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (worker.admin_listen): {e}", settings.worker.admin_listen))?;
    let grace = std::time::Duration::from_millis(settings.worker.shutdown_grace_ms);
    let running = run_with(settings, pool, Some(admin), shutdown.clone());
    tokio::pin!(running);
    tokio::select! {
        result = &mut running => result,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            // Whatever was not acked will be redelivered to another worker; writes are idempotent.
            anyhow::bail!("the batch in hand did not finish within worker.shutdown_grace_ms ({} ms)", grace.as_millis())
        }
    }
}

/// How often a worker re-reads how many workers share each sender's rate.
const RATE_SHARE_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// Processes with an existing pool (tests pass a fresh database's pool).
pub async fn run_with(
    settings: WorkerSettings,
    pool: PgPool,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shared::telemetry::metrics();
    shared::telemetry::spawn_metrics_upkeep();
    broker::register_metrics();
    send::register_metrics();
    webhooks::register_metrics();
    let topology = Topology::from_settings(&settings.amqp);
    // Publishing (dead letters, retries) has its own connection, closed after consuming stops.
    let publisher_shutdown = CancellationToken::new();
    let publisher = Publisher::start(
        settings.amqp.clone(),
        topology.clone(),
        "smsflow-worker publisher",
        publisher_shutdown.clone(),
    );
    let monitor = tokio::spawn(monitor::poll_queue_depths(
        settings.amqp.clone(),
        topology.clone(),
        publisher.clone(),
        std::time::Duration::from_secs(10),
        shutdown.clone(),
    ));
    // One flag per status consumer: ready only when every one is attached.
    let status_consuming: Vec<Arc<AtomicBool>> =
        (0..settings.worker.status_consumers.max(1)).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let send_consuming = Arc::new(AtomicBool::new(false));
    let inbound_consuming = Arc::new(AtomicBool::new(false));
    let webhook_consuming = Arc::new(AtomicBool::new(false));
    let admin_task = admin.map(|listener| {
        let mut flags = status_consuming.clone();
        flags.extend([send_consuming.clone(), inbound_consuming.clone(), webhook_consuming.clone()]);
        tokio::spawn(admin::serve(listener, flags, shutdown.clone()))
    });
    let rerouter = Rerouter { publisher: publisher.clone(), topology: topology.clone() };
    let limiter =
        Arc::new(SenderRateLimiter::new(settings.sending.sender_rate_per_second, settings.sending.sender_burst));
    // The send queue's consumers are read once it exists (bounded: a broker that is away
    // leaves the share at the whole rate until the first poll).
    let startup_wait = std::time::Duration::from_millis(settings.amqp.connect_timeout_ms);
    tokio::select! {
        () = shutdown.cancelled() => {}
        _ = tokio::time::timeout(startup_wait, monitor::topology_declared(&publisher)) => {}
    }
    if let Some(workers) = monitor::initial_send_share(&settings.amqp, &topology).await {
        limiter.share_between(workers);
    }
    let rate_share = tokio::spawn(monitor::share_send_rate(
        settings.amqp.clone(),
        topology.clone(),
        limiter.clone(),
        RATE_SHARE_REFRESH,
        shutdown.clone(),
    ));
    let send = Arc::new(SendPipeline {
        plivo: PlivoClient::new(&settings.plivo, &settings.http, &settings.sending)?,
        limiter,
        settings: settings.clone(),
        topology: topology.clone(),
        pool: pool.clone(),
        rerouter: rerouter.clone(),
        consuming: send_consuming,
    });
    let inbound = Arc::new(InboundPipeline {
        settings: settings.clone(),
        topology: topology.clone(),
        pool: pool.clone(),
        rerouter: rerouter.clone(),
        consuming: inbound_consuming,
    });
    let webhooks = Arc::new(webhooks::WebhookPipeline::new(
        &settings,
        topology.clone(),
        pool.clone(),
        rerouter.clone(),
        webhook_consuming,
    )?);
    let relay = tokio::spawn(events::run(
        pool.clone(),
        publisher.clone(),
        topology.clone(),
        events::RelaySettings::from(&settings.worker),
        shutdown.clone(),
    ));
    let status =
        Arc::new(StatusPipeline { settings, topology, pool: pool.clone(), rerouter, consuming: status_consuming });

    // Any pipeline failing for good stops the others: the process exits and is restarted.
    let stop_on_error = |result: anyhow::Result<()>| {
        if result.is_err() {
            shutdown.cancel();
        }
        result
    };
    let (status_result, send_result, inbound_result, webhook_result) = tokio::join!(
        async { stop_on_error(status.run(shutdown.clone()).await) },
        async { stop_on_error(send.run(shutdown.clone()).await) },
        async { stop_on_error(inbound.run(shutdown.clone()).await) },
        async { stop_on_error(webhooks.run(shutdown.clone()).await) },
    );
    let result = status_result.and(send_result).and(inbound_result).and(webhook_result);

    shutdown.cancel();
    // What the relay has not published yet stays in the outbox for the next relay.
    let _ = relay.await;
    publisher_shutdown.cancel();
    publisher.close().await;
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    let _ = monitor.await;
    let _ = rate_share.await;
    pool.close().await;
    result
}
