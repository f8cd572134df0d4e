//! Queue depth and consumer counts as metrics (`smsflow_queue_messages`,
//! `smsflow_queue_consumers`), polled from the broker: the consumer lag a dashboard shows and
//! an autoscaler (KEDA) reads.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use shared::amqp::{Stream, Topology};
use shared::config::AmqpSettings;
use tokio_util::sync::CancellationToken;

pub async fn poll_queue_depths(
    settings: AmqpSettings,
    topology: Topology,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut connection = None;
    loop {
        if connection.as_ref().is_none_or(|c: &lapin::Connection| !c.status().connected()) {
            connection = shared::amqp::connect(&settings, "smsflow-worker monitor").await.ok();
        }
        if let Some(connection) = &connection {
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            for stream in Stream::ALL {
                for queue in [topology.queue(stream), topology.dead_letter_queue(stream)] {
                    // A passive declare of a missing queue closes its channel: one channel each.
                    let Ok(channel) = connection.create_channel().await else { continue };
                    if let Ok(q) = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                        metrics::gauge!("smsflow_queue_messages", "queue" => queue.clone())
                            .set(q.message_count() as f64);
                        metrics::gauge!("smsflow_queue_consumers", "queue" => queue).set(q.consumer_count() as f64);
                        let _ = channel.close(200, "polled".into()).await;
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    if let Some(connection) = connection {
        let _ = connection.close(200, "shutting down".into()).await;
    }
}
