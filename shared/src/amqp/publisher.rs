//! A publisher that only reports success once RabbitMQ has confirmed a persistent message and
//! did not return it as unroutable.
//!
//! Confirms are pipelined: many publishes are in flight on each of a small pool of channels,
//! and each caller waits only for its own confirm. A supervisor task owns the connection: it
//! connects with backoff, declares the topology, and rebuilds everything when the connection
//! or a channel dies, while `publish` fails fast with [`PublishError::Unavailable`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use crate::config::AmqpSettings;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker unavailable")]
    Unavailable,
    #[error("broker did not confirm within {0} ms")]
    Timeout(u64),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound for routing key {0:?}")]
    Unroutable(String),
    #[error("publish failed: {0}")]
    Broker(#[from] lapin::Error),
}

struct Live {
    connection: Connection,
    channels: Vec<Channel>,
}

impl Live {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.channels.iter().all(|c| c.status().connected())
    }
}

struct Inner {
    settings: AmqpSettings,
    topology: Topology,
    name: String,
    live: RwLock<Option<Arc<Live>>>,
    next_channel: AtomicUsize,
    suspect: Notify,
    connected: Notify,
}

/// Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl Publisher {
    /// Starts the supervisor; the publisher becomes ready once connected. It runs until
    /// `shutdown` is cancelled.
    pub fn start(
        settings: AmqpSettings,
        topology: Topology,
        name: impl Into<String>,
        shutdown: CancellationToken,
    ) -> Self {
        let inner = Arc::new(Inner {
            settings,
            topology,
            name: name.into(),
            live: RwLock::new(None),
            next_channel: AtomicUsize::new(0),
            suspect: Notify::new(),
            connected: Notify::new(),
        });
        tokio::spawn(supervise(inner.clone(), shutdown));
        Self { inner }
    }

    /// True while a connection with healthy channels is in place.
    pub fn is_ready(&self) -> bool {
        self.current().is_some_and(|live| live.healthy())
    }

    /// Waits until ready or `timeout` passes; returns whether it is ready.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_ready() {
            let notified = self.inner.connected.notified();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_ready();
            }
        }
        true
    }

    fn current(&self) -> Option<Arc<Live>> {
        self.inner.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes to the main exchange (`mandatory`) and waits for the broker's confirm.
    pub async fn publish(
        &self,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_to(&self.inner.topology.exchange(), routing_key, payload, properties).await
    }

    /// Publishes to any exchange (`""` for a queue by name) and waits for the broker's confirm.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_with(exchange, routing_key, payload, properties, true).await
    }

    /// `publish_to` choosing the mandatory flag: without it, the broker drops an unroutable
    /// message instead of returning it (status events nobody subscribed to), which saves it
    /// and us a frame per such message. Confirmed either way.
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let started = std::time::Instant::now();
        let Some(live) = self.current() else {
            metrics::counter!("smsflow_publish_total", "result" => "unavailable").increment(1);
            return Err(PublishError::Unavailable);
        };
        let index = self.inner.next_channel.fetch_add(1, Ordering::Relaxed) % live.channels.len();
        let channel = &live.channels[index];
        let timeout_ms = self.inner.settings.confirm_timeout_ms;
        let confirm = async {
            let options = BasicPublishOptions { mandatory, ..Default::default() };
            channel.basic_publish(exchange.into(), routing_key.into(), options, payload, properties).await?.await
        };
        let result = match tokio::time::timeout(Duration::from_millis(timeout_ms), confirm).await {
            Err(_) => Err(PublishError::Timeout(timeout_ms)),
            Ok(Err(e)) => Err(PublishError::Broker(e)),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable(routing_key.to_owned())),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            // The channel is always in confirm mode; treat anything else as not stored.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        };
        if matches!(result, Err(PublishError::Broker(_) | PublishError::Timeout(_))) {
            self.inner.suspect.notify_one();
        }
        let outcome = match &result {
            Ok(()) => "confirmed",
            Err(PublishError::Timeout(_)) => "timeout",
            Err(PublishError::Nacked) => "nacked",
            Err(PublishError::Unroutable(_)) => "unroutable",
            Err(_) => "error",
        };
        metrics::counter!("smsflow_publish_total", "result" => outcome).increment(1);
        metrics::histogram!("smsflow_publish_confirm_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    /// Closes the connection (after in-flight publishes finished).
    pub async fn close(&self) {
        let live = self.inner.live.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(live) = live {
            close_quietly(&live).await;
        }
    }
}

async fn close_quietly(live: &Live) {
    let closing = live.connection.close(200, "shutting down".into());
    let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
}

async fn establish(inner: &Inner) -> anyhow::Result<Live> {
    let connection = super::connect(&inner.settings, &inner.name).await?;
    let setup = async {
        let declare_channel = connection.create_channel().await?;
        inner.topology.declare(&declare_channel).await?;
        let _ = declare_channel.close(200, "topology declared".into()).await;
        let mut channels = Vec::with_capacity(inner.settings.publish_channels);
        for _ in 0..inner.settings.publish_channels {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            channels.push(channel);
        }
        Ok::<_, lapin::Error>(channels)
    };
    let channels = super::set_up(&inner.settings, &connection, setup).await?;
    Ok(Live { connection, channels })
}

async fn supervise(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut backoff = super::reconnect_backoff();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match establish(&inner).await {
            Ok(live) => {
                let live = Arc::new(live);
                *inner.live.write().unwrap_or_else(|e| e.into_inner()) = Some(live.clone());
                inner.connected.notify_waiters();
                tracing::info!(connection = %inner.name, "connected to RabbitMQ");
                backoff = super::reconnect_backoff();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = inner.suspect.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    if !live.healthy() {
                        break;
                    }
                }
                tracing::warn!(connection = %inner.name, "RabbitMQ connection lost; reconnecting");
                let mut slot = inner.live.write().unwrap_or_else(|e| e.into_inner());
                if slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, &live)) {
                    *slot = None;
                }
                drop(slot);
                tokio::spawn(async move { close_quietly(&live).await });
            }
            Err(e) => {
                tracing::warn!(connection = %inner.name, error = %e, "RabbitMQ not available; retrying")
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
