//! What RabbitMQ and PostgreSQL allow on this machine, with the same payloads: raw publish with
//! confirms into a quorum queue, raw consume with multiple-acks, the worker's own batch upsert
//! driven directly, and the full pipeline (publish → consume → batch upsert → multiple-ack).
//! Benchmarks report their results as ratios to these, measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;
use shared::amqp::contracts::CallbackEvent;

#[derive(Debug, Clone, clap::Args)]
pub struct CeilingArgs {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// A migrated smsflow database (rows written here are deleted afterwards).
    #[arg(long)]
    pub database_url: String,
    /// Messages per measurement.
    #[arg(long, default_value_t = 50_000)]
    pub count: usize,
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Unconfirmed publishes in flight per publisher.
    #[arg(long, default_value_t = 100)]
    pub in_flight: usize,
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub payload_bytes: usize,
    pub publish_confirm_per_second: f64,
    pub consume_ack_per_second: f64,
    pub batch_upsert_rows_per_second: f64,
    pub full_pipeline_per_second: f64,
}

/// A status callback event as the ingress queues it, for message `i`.
pub fn sample_event(run: &str, i: usize, status: &str, sequence: u32) -> CallbackEvent {
    let uuid = format!("ceil-{run}-{i:08}");
    let params = crate::callbacks::plivo_fields(&uuid, status, sequence);
    CallbackEvent {
        schema: CallbackEvent::SCHEMA.into(),
        version: CallbackEvent::VERSION,
        params,
        query: vec![("ref".into(), uuid::Uuid::now_v7().to_string())],
        reference: None,
        method: "POST".into(),
        signature: "v3".into(),
        received_at: time::OffsetDateTime::now_utc(),
        request_id: uuid::Uuid::new_v4().to_string(),
    }
}

fn payloads(run: &str, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            serde_json::to_vec(&sample_event(run, i / 3, ["queued", "sent", "delivered"][i % 3], (i % 3) as u32 + 1))
                .unwrap()
        })
        .collect()
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    args
}

async fn publish_all(
    connection: &Connection,
    queue: &str,
    payloads: Arc<Vec<Vec<u8>>>,
    publishers: usize,
    in_flight: usize,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let (payloads, queue) = (payloads.clone(), queue.to_owned());
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (p..payloads.len()).step_by(publishers).collect();
            futures_util::stream::iter(mine)
                .map(|i| {
                    let (channel, queue, payloads) = (channel.clone(), queue.clone(), payloads.clone());
                    async move {
                        let properties = BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_content_type("application/json".into());
                        let confirm = channel
                            .basic_publish(
                                "".into(),
                                queue.as_str().into(),
                                BasicPublishOptions::default(),
                                &payloads[i],
                                properties,
                            )
                            .await?
                            .await?;
                        anyhow::ensure!(confirm.is_ack(), "broker nacked a publish");
                        Ok::<_, anyhow::Error>(())
                    }
                })
                .buffer_unordered(in_flight)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<()>>()
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Consumes `count` messages, acking every `batch` with one multiple-ack; with `pool`, each batch
/// is first written with the worker's own statement.
async fn consume(
    connection: &Connection,
    queue: &str,
    count: usize,
    batch: usize,
    pool: Option<&sqlx::PgPool>,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel.basic_qos((batch * 2).min(u16::MAX as usize) as u16, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.into(), "ceiling".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut seen = 0;
    while seen < count {
        let mut deliveries = Vec::with_capacity(batch);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        while deliveries.len() < batch && seen + deliveries.len() < count {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(delivery)) => deliveries.push(delivery?),
                Ok(None) => anyhow::bail!("consumer ended"),
                Err(_) => break,
            }
        }
        let Some(last) = deliveries.last() else { continue };
        if let Some(pool) = pool {
            let payloads: Vec<&[u8]> = deliveries.iter().map(|d| d.data.as_slice()).collect();
            worker::status::write_payloads(pool, &payloads).await?;
        }
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        seen += deliveries.len();
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

pub async fn measure(args: &CeilingArgs) -> anyhow::Result<Ceiling> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&args.database_url).await?;
    let queue = format!("smsflow-ceiling-{run}");
    let declare = connection.create_channel().await?;
    declare
        .queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, quorum())
        .await?;
    let data = Arc::new(payloads(&run, args.count));
    let payload_bytes = data.iter().map(Vec::len).sum::<usize>() / data.len().max(1);

    let t = Instant::now();
    publish_all(&connection, &queue, data.clone(), args.publishers, args.in_flight).await?;
    let publish = args.count as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    consume(&connection, &queue, args.count, args.batch, None).await?;
    let consume_ack = args.count as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    for chunk in data.chunks(args.batch) {
        worker::status::write_payloads(&pool, chunk).await?;
    }
    let upsert = args.count as f64 / t.elapsed().as_secs_f64();
    cleanup(&pool, &run).await?;

    let full_run = format!("{run}f");
    let data = Arc::new(payloads(&full_run, args.count));
    let t = Instant::now();
    let consuming = consume(&connection, &queue, args.count, args.batch, Some(&pool));
    let publishing = publish_all(&connection, &queue, data, args.publishers, args.in_flight);
    let (consumed, published) = tokio::join!(consuming, publishing);
    consumed?;
    published?;
    let full = args.count as f64 / t.elapsed().as_secs_f64();
    cleanup(&pool, &full_run).await?;

    declare.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(Ceiling {
        payload_bytes,
        publish_confirm_per_second: publish,
        consume_ack_per_second: consume_ack,
        batch_upsert_rows_per_second: upsert,
        full_pipeline_per_second: full,
    })
}

async fn cleanup(pool: &sqlx::PgPool, run: &str) -> anyhow::Result<()> {
    let pattern = format!("ceil-{run}-%");
    sqlx::query("DELETE FROM message_events WHERE message_uuid LIKE $1").bind(&pattern).execute(pool).await?;
    sqlx::query("DELETE FROM messages WHERE message_uuid LIKE $1").bind(&pattern).execute(pool).await?;
    Ok(())
}
