//! The whole flow with no Plivo account: ingress, worker and the simulator against the real
//! RabbitMQ and PostgreSQL. 2,000 messages, half over HTTP and half over AMQP; afterwards the
//! database must equal the simulator's ground truth, and a service subscribed to the events
//! must have received every committed status change of every message, once, in order.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use plivo_sim::{SimConfig, SimMessage};
use reliability::events::Duplicates;
use reliability::{API_TOKEN, Stack};
use shared::amqp::contracts::SendJob;
use shared::amqp::headers::json_message;
use shared::amqp::{Publisher, Stream};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// id, Plivo MessageUUID, status, error code.
type MessageRow = (uuid::Uuid, Option<String>, String, Option<i32>);

/// The suite's simulator with more of every story, more duplicates and disorder, and time
/// compressed further (the whole flow settles within the test).
fn sim_config() -> SimConfig {
    SimConfig {
        weights: plivo_sim::story::StoryWeights { delivered: 70, undelivered: 10, failed: 10, sent_only: 10 },
        latency_ms: 500,
        duplicate_share: 0.1,
        out_of_order_share: 0.1,
        time_scale: 0.01,
        ..reliability::sim_config()
    }
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn two_thousand_messages_over_http_and_amqp_end_as_the_simulator_says(pool: PgPool) {
    let stack = Stack::start(pool.clone(), sim_config(), |_, worker| worker.sending.concurrency = 64).await;
    let (client, ingress_url) = (stack.client.clone(), stack.ingress_url.clone());
    let worker_settings = stack.worker_settings.clone();
    let mut events = stack.broker.subscribe_to_events("message.status.*").await;

    // 1,000 over HTTP …
    let http_ids: Vec<String> = futures_util::stream::iter(0..1000)
        .map(|i| {
            let client = client.clone();
            let url = format!("{ingress_url}/v1/messages");
            async move {
                let body = serde_json::json!({"to": format!("+1415555{:04}", i), "text": format!("http message {i}")});
                let response = client.post(&url).bearer_auth(API_TOKEN).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 202, "HTTP send {i}");
                response.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    // … and 1,000 over AMQP, as an internal service would publish them.
    let publisher_shutdown = CancellationToken::new();
    let publisher = Publisher::start(
        worker_settings.amqp.clone(),
        shared::amqp::Topology::from_settings(&worker_settings.amqp),
        "e2e publisher",
        publisher_shutdown.clone(),
    );
    assert!(publisher.wait_ready(Duration::from_secs(10)).await);
    let amqp_ids: Vec<String> = futures_util::stream::iter(1000..2000)
        .map(|i| {
            let publisher = publisher.clone();
            async move {
                let job = SendJob {
                    id: uuid::Uuid::now_v7(),
                    to: format!("+1415555{:04}", i),
                    text: format!("amqp message {i}"),
                    from: None,
                    powerpack_uuid: None,
                    message_expiry: None,
                    metadata: None,
                    callback: None,
                };
                let properties =
                    json_message(SendJob::SCHEMA, SendJob::VERSION, &job.id.to_string(), Default::default());
                publisher
                    .publish(Stream::Send.routing_key(), &serde_json::to_vec(&job).unwrap(), properties)
                    .await
                    .unwrap();
                job.id.to_string()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(http_ids.len() + amqp_ids.len(), 2000);

    wait_until("every story played", Duration::from_secs(240), async || {
        let stats = stack.sim.stats().await;
        stats.messages_accepted == 2000 && stats.stories_pending == 0
    })
    .await;
    let stats = stack.sim.stats().await;
    let truth: Vec<SimMessage> = stack.sim.messages().await;

    // The simulator received exactly one send request per job, and refused none.
    assert_eq!(stats.send_requests, 2000, "{stats:?}");
    assert_eq!(stats.refused_invalid + stats.refused_rate_limited + stats.refused_unauthorized, 0, "{stats:?}");
    assert_eq!(stats.callbacks_given_up, 0, "every callback was acknowledged: {stats:?}");

    // Event rows equal the distinct acknowledged callbacks.
    let distinct: i64 = truth
        .iter()
        .map(|m| {
            let mut sequences: Vec<u32> = m.callbacks.iter().filter(|c| c.acknowledged).map(|c| c.sequence).collect();
            sequences.sort_unstable();
            sequences.dedup();
            sequences.len() as i64
        })
        .sum();
    wait_until("every callback stored", Duration::from_secs(60), async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM message_events").fetch_one(&pool).await.unwrap();
        n >= distinct
    })
    .await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM message_events").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, distinct, "one event row per distinct callback");

    // Every message's final status and error code equal the simulator's truth.
    let rows: Vec<MessageRow> =
        sqlx::query_as("SELECT id, message_uuid, status, error_code FROM messages").fetch_all(&pool).await.unwrap();
    assert_eq!(rows.len(), 2000, "one row per job, none created by callbacks alone");
    let by_uuid: HashMap<&str, &MessageRow> = rows.iter().filter_map(|r| r.1.as_deref().map(|u| (u, r))).collect();
    let mut mismatches = Vec::new();
    for message in &truth {
        match by_uuid.get(message.message_uuid.as_str()) {
            None => mismatches.push(format!("{}: no row", message.message_uuid)),
            Some((_, _, status, error_code)) => {
                let expected_code = message.error_code.map(|c| c as i32);
                if *status != message.final_status || *error_code != expected_code {
                    mismatches.push(format!(
                        "{}: database {status}/{error_code:?}, simulator {}/{expected_code:?}",
                        message.message_uuid, message.final_status
                    ));
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
    let mut ids: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
    ids.sort();
    let mut sent: Vec<String> = http_ids.into_iter().chain(amqp_ids).collect();
    sent.sort();
    assert_eq!(ids, sent, "the rows are exactly the jobs sent");

    for stream in Stream::ALL {
        let dead = stack.broker.topology.dead_letter_queue(stream);
        assert_eq!(stack.broker.len(&dead).await, 0, "no dead letters in {stream:?}");
    }
    // Every message's chain, from `accepted` (each was sent as a job) to its status.
    let repeated = reliability::events::check_status_events(&pool, &mut events, Duplicates::Never).await;
    assert_eq!(repeated, 0);
    publisher_shutdown.cancel();
    stack.stop().await;
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls until Plivo (the simulator) accepted the message; its callbacks may move it on at once.
async fn wait_until_submitted(pool: &PgPool, id: &str) {
    let id = uuid::Uuid::parse_str(id).unwrap();
    for _ in 0..200 {
        let submitted: Option<bool> = sqlx::query_scalar("SELECT submitted_at IS NOT NULL FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .unwrap();
        if submitted == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("message {id} was not submitted");
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_idempotency_key_reused_with_another_body_is_refused_and_sends_once(pool: PgPool) {
    let stack = Stack::start(pool.clone(), sim_config(), |_, _| {}).await;
    let url = format!("{}/v1/messages", stack.ingress_url);
    let send = |body: serde_json::Value| {
        stack.client.post(&url).bearer_auth(API_TOKEN).header("Idempotency-Key", "order-7").json(&body).send()
    };
    let first = serde_json::json!({"to": "+14155552671", "text": "your code is 1234"});

    let accepted = send(first.clone()).await.unwrap();
    assert_eq!(accepted.status(), 202);
    let id = accepted.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    wait_until_submitted(&pool, &id).await;

    let other = send(serde_json::json!({"to": "+14155552671", "text": "your code is 9999"})).await.unwrap();
    assert_eq!(other.status(), 422);
    let error = other.json::<serde_json::Value>().await.unwrap();
    assert_eq!(error["error"]["code"], "idempotency_key_reused", "{error}");
    assert!(!error.to_string().contains("9999") && !error.to_string().contains("2671"), "no echo: {error}");

    let again = send(first).await.unwrap();
    assert_eq!(again.status(), 202, "the same body again is the same message");
    assert_eq!(again.json::<serde_json::Value>().await.unwrap()["id"], id.as_str());

    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = stack.sim.requests().await;
    assert_eq!(requests.len(), 1, "the simulator saw one request");
    assert_eq!(requests[0].body["text"], "your code is 1234");
    stack.stop().await;
}
