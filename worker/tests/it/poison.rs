use std::collections::BTreeMap;
use std::time::Duration;

use shared::amqp::Stream;
use shared::amqp::contracts::CallbackEvent;
use shared::amqp::headers::get_str;
use shared::amqp::topology::DEAD_LETTER_REASON_HEADER;
use sqlx::PgPool;

use crate::helpers::{callback, publish_raw, start_worker, state_of, wait_for_events};

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn poison_is_dead_lettered_with_its_reason_and_the_events_after_it_are_processed(pool: PgPool) {
    let worker = start_worker(&pool, |_| {}).await;
    let no_uuid = {
        let mut e = callback("x", "sent", 1);
        e.params.retain(|(k, _)| k != "MessageUUID");
        e
    };
    let unknown_status = callback("m-poison-status", "teleported", 1);
    let wrong_version = callback("m-poison-version", "sent", 1);
    publish_raw(&worker.publisher, b"this is not json", CallbackEvent::SCHEMA, 1).await;
    publish_raw(&worker.publisher, &serde_json::to_vec(&no_uuid).unwrap(), CallbackEvent::SCHEMA, 1).await;
    publish_raw(&worker.publisher, &serde_json::to_vec(&unknown_status).unwrap(), CallbackEvent::SCHEMA, 1).await;
    let mut body = serde_json::to_value(&wrong_version).unwrap();
    body["version"] = 99.into();
    publish_raw(&worker.publisher, &serde_json::to_vec(&body).unwrap(), CallbackEvent::SCHEMA, 99).await;
    worker.publish(&[callback("m-good", "delivered", 3)]).await;

    wait_for_events(&pool, 1, Duration::from_secs(20)).await;
    assert_eq!(state_of(&pool, "m-good").await.0, "delivered");

    let dead = worker.broker.topology.dead_letter_queue(Stream::Status);
    let mut reasons = Vec::new();
    for _ in 0..50 {
        if worker.broker.len(&dead).await >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = worker::replay::replay_dead_letters(&worker.settings.amqp, Stream::Status, true).await.unwrap();
    assert_eq!(report.by_reason.values().sum::<u64>(), 4, "dry run counts: {:?}", report.by_reason);
    assert_eq!(report.replayed, 0);
    assert_eq!(worker.broker.len(&dead).await, 4, "a dry run moves nothing");
    while let Some(message) = worker.broker.get(&dead).await {
        reasons.push(
            get_str(message.delivery.properties.headers().as_ref(), DEAD_LETTER_REASON_HEADER).unwrap().to_owned(),
        );
    }
    reasons.sort();
    let expected = ["callback has no MessageUUID", "not a JSON callback event", "unknown status", "unsupported schema"];
    for (reason, prefix) in reasons.iter().zip(expected) {
        assert!(reason.starts_with(prefix), "{reason:?} starts with {prefix:?}");
    }
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn replayed_dead_letters_are_processed_once_the_cause_is_fixed(pool: PgPool) {
    // A valid event sits in the dead-letter queue, as if the cause had been fixed since.
    let worker = start_worker(&pool, |_| {}).await;
    let event = callback("m-replayed", "delivered", 3);
    let dead_exchange = worker.broker.topology.dead_letter_exchange();
    let properties = shared::amqp::headers::json_message(CallbackEvent::SCHEMA, 1, "id-1", Default::default());
    worker
        .publisher
        .publish_to(&dead_exchange, Stream::Status.name(), &serde_json::to_vec(&event).unwrap(), properties)
        .await
        .unwrap();

    let report = worker::replay::replay_dead_letters(&worker.settings.amqp, Stream::Status, false).await.unwrap();

    assert_eq!(report.replayed, 1);
    assert_eq!(report.by_reason, BTreeMap::from([("unknown".to_owned(), 1)]));
    wait_for_events(&pool, 1, Duration::from_secs(20)).await;
    assert_eq!(state_of(&pool, "m-replayed").await.0, "delivered");
    assert_eq!(worker.broker.len(&worker.broker.topology.dead_letter_queue(Stream::Status)).await, 0);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn twenty_five_dry_runs_then_a_replay_bring_back_every_dead_letter(pool: PgPool) {
    // RabbitMQ 4 drops a quorum-queue message after 20 failed deliveries; a dry run that
    // returned messages with nack(requeue) lost them all by the 21st.
    let worker = start_worker(&pool, |_| {}).await;
    let dead_exchange = worker.broker.topology.dead_letter_exchange();
    let dead = worker.broker.topology.dead_letter_queue(Stream::Status);
    for i in 0..5 {
        let event = callback(&format!("m-dead-{i}"), "delivered", 3);
        let properties = shared::amqp::headers::json_message(CallbackEvent::SCHEMA, 1, "id", Default::default());
        worker
            .publisher
            .publish_to(&dead_exchange, Stream::Status.name(), &serde_json::to_vec(&event).unwrap(), properties)
            .await
            .unwrap();
    }

    for run in 1..=25 {
        let report = worker::replay::replay_dead_letters(&worker.settings.amqp, Stream::Status, true).await.unwrap();
        assert_eq!(report.by_reason.values().sum::<u64>(), 5, "dry run {run} counts all: {:?}", report.by_reason);
        assert_eq!(worker.broker.len(&dead).await, 5, "dry run {run} leaves the queue as it was");
    }
    let report = worker::replay::replay_dead_letters(&worker.settings.amqp, Stream::Status, false).await.unwrap();

    assert_eq!(report.replayed, 5);
    wait_for_events(&pool, 5, Duration::from_secs(20)).await;
    for i in 0..5 {
        assert_eq!(state_of(&pool, &format!("m-dead-{i}")).await.0, "delivered");
    }
    assert_eq!(worker.broker.len(&dead).await, 0);
    worker.stop().await.unwrap();
}

/// A batch message (version 2) with a poison callback between two good ones: the poison alone
/// is dead-lettered, as the version-1 message it was, and its neighbours are stored.
#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_poison_callback_inside_a_batch_is_dead_lettered_alone_and_its_neighbours_are_stored(pool: PgPool) {
    use shared::amqp::contracts::CallbackBatch;
    use shared::amqp::headers::{CALLBACK_COUNT_HEADER, SCHEMA_VERSION_HEADER, get_int};
    let worker = start_worker(&pool, |_| {}).await;
    let poison = callback("m-batch-poison", "teleported", 1);
    let batch = CallbackBatch::new(vec![
        callback("m-batch-1", "delivered", 3),
        poison.clone(),
        callback("m-batch-2", "undelivered", 3),
    ]);
    let body = serde_json::to_vec(&batch).unwrap();
    // As the ingress publishes a batch: with its callback count.
    let mut count = lapin::types::FieldTable::default();
    count.insert(CALLBACK_COUNT_HEADER.into(), lapin::types::AMQPValue::LongLongInt(3));
    let properties = shared::amqp::headers::json_message(
        CallbackEvent::SCHEMA,
        CallbackEvent::BATCH_VERSION,
        &uuid::Uuid::now_v7().to_string(),
        count,
    );
    worker.publisher.publish(Stream::Status.routing_key(), &body, properties).await.unwrap();

    wait_for_events(&pool, 2, Duration::from_secs(20)).await;
    assert_eq!(state_of(&pool, "m-batch-1").await.0, "delivered");
    assert_eq!(state_of(&pool, "m-batch-2").await.0, "undelivered");
    let dead = worker.broker.topology.dead_letter_queue(Stream::Status);
    for _ in 0..50 {
        if worker.broker.len(&dead).await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(worker.broker.len(&dead).await, 1, "the poison alone, once");
    let message = worker.broker.get(&dead).await.unwrap();
    let headers = message.delivery.properties.headers().as_ref();
    assert!(get_str(headers, DEAD_LETTER_REASON_HEADER).unwrap().starts_with("unknown status"));
    assert_eq!(get_int(headers, SCHEMA_VERSION_HEADER), Some(1), "dead-lettered as a single callback");
    assert_eq!(get_int(headers, CALLBACK_COUNT_HEADER), None, "a part holds one callback: no batch count");
    let alone: CallbackEvent = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(alone, poison);
    let part_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &message.delivery.data).to_string();
    assert_eq!(
        message.delivery.properties.message_id().as_ref().map(|id| id.as_str()),
        Some(part_id.as_str()),
        "a part's id follows its content, so a second copy after a crash is recognisable"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM message_events").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 2, "the neighbours, and nothing of the poison");
    worker.stop().await.unwrap();
}
