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

/// An inbound message from the test recipient to `to`, sent at Plivo's `MessageTime` `at`.
fn inbound_to(uuid: &str, to: &str, text: &str, at: &str) -> CallbackEvent {
    shared::testing::callback_event(&[
        ("From", "14155552671"),
        ("To", to),
        ("Text", text),
        ("MessageUUID", uuid),
        ("MessageTime", at),
    ])
}

/// Publishes `job` and asserts it ends rejected for the opt-out, with no request to Plivo.
async fn assert_suppressed(
    pool: &PgPool,
    worker: &crate::helpers::TestWorker,
    plivo: &plivo_sim::Simulator,
    job: shared::amqp::contracts::SendJob,
) {
    publish_job(&worker.publisher, &job).await;
    let (_, reason) = wait_for_status(pool, job.id, "rejected").await;
    assert_eq!(reason.as_deref(), Some("opted_out"), "{job:?}");
    assert!(plivo.requests().await.is_empty(), "no Plivo request while opted out: {job:?}");
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn stop_to_a_short_code_a_long_number_or_a_powerpack_number_suppresses_the_next_send(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    publish_inbound(&worker, &inbound_to("in-sc", "12345", "STOP", "2026-11-30 10:00:00")).await;
    publish_inbound(&worker, &inbound_to("in-ln", "14155550100", "STOP", "2026-11-30 10:00:00")).await;
    wait_rows(&pool, "SELECT count(*) FROM opt_outs WHERE recipient = '+14155552671'", 2).await;

    let from_short_code = shared::amqp::contracts::SendJob { from: Some("12345".into()), ..send_job("short code") };
    assert_suppressed(&pool, &worker, &plivo, from_short_code).await;
    assert_suppressed(&pool, &worker, &plivo, send_job("long number")).await;
    // A Powerpack may pick any number of its pool, the one STOPped included.
    let via_powerpack = shared::amqp::contracts::SendJob {
        from: None,
        powerpack_uuid: Some("7f8a3d4e-0000-4000-8000-000000000001".into()),
        ..send_job("powerpack")
    };
    assert_suppressed(&pool, &worker, &plivo, via_powerpack).await;
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_start_older_than_the_stop_it_meets_keeps_the_number_opted_out(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    // The recipient wrote START at 10:00 and STOP at 10:05; Plivo's retry of the START reaches
    // us after the STOP.
    publish_inbound(&worker, &inbound_to("in-stop-late", "14155550100", "STOP", "2026-11-30 10:05:00")).await;
    wait_rows(&pool, "SELECT count(*) FROM opt_outs", 1).await;
    publish_inbound(&worker, &inbound_to("in-start-early", "14155550100", "START", "2026-11-30 10:00:00")).await;
    wait_rows(&pool, "SELECT count(*) FROM inbound_messages", 2).await;

    assert_suppressed(&pool, &worker, &plivo, send_job("after the reordering")).await;
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_start_to_one_number_does_not_lift_a_stopall(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    publish_inbound(&worker, &inbound_to("in-stopall", "14155550100", "STOPALL", "2026-11-30 10:00:00")).await;
    wait_rows(&pool, "SELECT count(*) FROM opt_outs WHERE sender = '*'", 1).await;
    publish_inbound(&worker, &inbound_to("in-start-one", "14155550100", "START", "2026-11-30 10:05:00")).await;
    wait_rows(&pool, "SELECT count(*) FROM inbound_messages", 2).await;

    let from_another_number =
        shared::amqp::contracts::SendJob { from: Some("+14155550111".into()), ..send_job("another number") };
    assert_suppressed(&pool, &worker, &plivo, from_another_number).await;
    worker.stop().await.unwrap();
}
