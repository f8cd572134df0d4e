//! Inbound SMS and consent: STOP suppresses sending, START re-enables it, error 200 records an
//! opt-out, and replays change nothing.

use std::time::Duration;

use shared::amqp::Stream;
use shared::amqp::contracts::CallbackEvent;
use shared::amqp::headers::json_message;
use sqlx::PgPool;

use crate::helpers::{
    callback, publish_job, send_job, start_plivo, start_worker, use_plivo, wait_for_events, wait_for_status,
};

fn inbound(uuid: &str, text: &str) -> CallbackEvent {
    shared::testing::callback_event(&[
        ("From", "14155552671"),
        ("To", "14155550100"),
        ("Text", text),
        ("Type", "sms"),
        ("MessageUUID", uuid),
        ("Units", "1"),
    ])
}

async fn publish_inbound(worker: &crate::helpers::TestWorker, event: &CallbackEvent) {
    let properties = json_message(CallbackEvent::SCHEMA, 1, &event.request_id, Default::default());
    worker
        .publisher
        .publish(Stream::Inbound.routing_key(), &serde_json::to_vec(event).unwrap(), properties)
        .await
        .unwrap();
}

async fn wait_rows(pool: &PgPool, sql: &str, expected: i64) {
    for _ in 0..100 {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
        if n == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql} did not reach {expected}");
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn stop_then_send_sends_nothing_and_start_re_enables_sending(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;

    let stop = inbound("in-stop", "STOP");
    publish_inbound(&worker, &stop).await;
    publish_inbound(&worker, &stop).await; // a Plivo retry
    wait_rows(&pool, "SELECT count(*) FROM opt_outs WHERE recipient = '+14155552671' AND sender = '+14155550100'", 1)
        .await;
    wait_rows(&pool, "SELECT count(*) FROM inbound_messages", 1).await;

    let blocked = send_job("after stop");
    publish_job(&worker.publisher, &blocked).await;
    let (_, reason) = wait_for_status(&pool, blocked.id, "rejected").await;
    assert_eq!(reason.as_deref(), Some("opted_out"));
    assert!(plivo.requests().await.is_empty(), "no Plivo request while opted out");

    publish_inbound(&worker, &inbound("in-start", "start")).await;
    wait_rows(&pool, "SELECT count(*) FROM opt_outs", 0).await;
    // The STOP replayed after START changes nothing: it was stored before.
    publish_inbound(&worker, &stop).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_rows(&pool, "SELECT count(*) FROM opt_outs", 0).await;

    let allowed = send_job("after start");
    publish_job(&worker.publisher, &allowed).await;
    wait_for_status(&pool, allowed.id, "submitted").await;
    assert_eq!(plivo.requests().await.len(), 1, "one Plivo request, after START");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_callback_with_error_200_records_the_opt_out(pool: PgPool) {
    let worker = start_worker(&pool, |_| {}).await;
    let mut event = callback("blocked-uuid", "undelivered", 3);
    for (k, v) in event.params.iter_mut() {
        if k == "ErrorCode" {
            *v = "200".into();
        }
    }
    worker.publish(&[event]).await;
    wait_for_events(&pool, 1, Duration::from_secs(20)).await;
    let row: (String, String, String) =
        sqlx::query_as("SELECT recipient, sender, source FROM opt_outs").fetch_one(&pool).await.unwrap();
    assert_eq!(row, ("+14155550199".into(), "+14155550123".into(), "error_code".into()));
    worker.stop().await.unwrap();
}
