//! The send path against a fake Plivo (wiremock): one job is at most one SMS.

use std::time::Duration;

use shared::amqp::Stream;
use shared::amqp::headers::get_str;
use shared::amqp::topology::DEAD_LETTER_REASON_HEADER;
use sqlx::PgPool;
use wiremock::matchers::{body_partial_json, header_exists, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{fake_plivo, message_path, publish_job, send_job, start_worker, wait_for_status};

fn accepted(uuid: &str) -> ResponseTemplate {
    ResponseTemplate::new(202).set_body_json(serde_json::json!({
        "api_id": "a1", "message": "message(s) queued", "message_uuid": [uuid]
    }))
}

async fn requests(server: &MockServer) -> usize {
    server.received_requests().await.unwrap_or_default().len()
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_accepted_send_is_submitted_with_plivo_uuid_and_our_callback_url(pool: PgPool) {
    let plivo = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(message_path()))
        .and(header_exists("authorization"))
        .respond_with(accepted("plivo-uuid-1"))
        .expect(1)
        .mount(&plivo)
        .await;
    let worker = start_worker(&pool, |s| fake_plivo(s, &plivo.uri())).await;
    let job = send_job("hello");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;

    let row = sqlx::query!(
        "SELECT message_uuid, recipient, sender, encoding, segments, metadata FROM messages WHERE id = $1",
        job.id
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.message_uuid.as_deref(), Some("plivo-uuid-1"));
    assert_eq!((row.recipient.as_deref(), row.sender.as_deref()), (Some("+14155552671"), Some("+14155550100")));
    assert_eq!((row.encoding.as_deref(), row.segments), (Some("gsm7"), Some(1)));
    assert_eq!(row.metadata["order"], 42);
    let request = &plivo.received_requests().await.unwrap()[0];
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["dst"], "14155552671");
    assert_eq!(body["src"], "14155550100");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["url"], format!("{}/plivo/callback?ref={}", shared::testing::TEST_PUBLIC_BASE_URL, job.id));
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn each_permanent_plivo_error_fails_the_message_without_retry(pool: PgPool) {
    let plivo = MockServer::start().await;
    let codes = [400u16, 401, 403, 404, 422];
    for code in codes {
        Mock::given(method("POST"))
            .and(body_partial_json(serde_json::json!({ "text": format!("code {code}") })))
            .respond_with(
                ResponseTemplate::new(code)
                    .set_body_json(serde_json::json!({"api_id": "x", "error": format!("plivo says {code}")})),
            )
            .expect(1)
            .mount(&plivo)
            .await;
    }
    let worker = start_worker(&pool, |s| fake_plivo(s, &plivo.uri())).await;
    let jobs: Vec<_> = codes.iter().map(|code| send_job(&format!("code {code}"))).collect();
    for job in &jobs {
        publish_job(&worker.publisher, job).await;
    }
    for (job, code) in jobs.iter().zip(codes) {
        let (_, reason) = wait_for_status(&pool, job.id, "failed").await;
        let reason = reason.unwrap_or_default();
        assert!(reason.contains(&format!("({code})")) && reason.contains(&format!("plivo says {code}")), "{reason}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(requests(&plivo).await, codes.len(), "no retries");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_429_then_202_is_one_sms(pool: PgPool) {
    let plivo = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&plivo)
        .await;
    Mock::given(method("POST")).respond_with(accepted("plivo-uuid-429")).expect(1).with_priority(2).mount(&plivo).await;
    let worker = start_worker(&pool, |s| fake_plivo(s, &plivo.uri())).await;
    let job = send_job("rate limited first");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;

    assert_eq!(requests(&plivo).await, 2, "one refused with 429, one accepted");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn three_503s_then_202_is_one_sms_through_the_delay_queue(pool: PgPool) {
    let plivo = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&plivo)
        .await;
    Mock::given(method("POST")).respond_with(accepted("plivo-uuid-503")).expect(1).with_priority(2).mount(&plivo).await;
    // Two in-process retries: the third 503 sends the job through the delay queue.
    let worker = start_worker(&pool, |s| {
        fake_plivo(s, &plivo.uri());
        s.sending.in_process_retries = 2;
    })
    .await;
    let job = send_job("server errors first");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;

    assert_eq!(requests(&plivo).await, 4);
    let attempts =
        sqlx::query_scalar!("SELECT attempts FROM messages WHERE id = $1", job.id).fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 2, "claimed once per delivery: the first and the retried one");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_read_timeout_after_the_request_arrived_is_unknown_and_not_resent(pool: PgPool) {
    let plivo = MockServer::start().await;
    Mock::given(method("POST")).respond_with(accepted("late").set_delay(Duration::from_secs(3))).mount(&plivo).await;
    let worker = start_worker(&pool, |s| {
        fake_plivo(s, &plivo.uri());
        s.plivo.request_timeout_ms = 500;
    })
    .await;
    let job = send_job("slow answer");

    publish_job(&worker.publisher, &job).await;
    let (_, reason) = wait_for_status(&pool, job.id, "unknown").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert!(reason.unwrap_or_default().contains("no answer"), "reason explains");
    assert_eq!(requests(&plivo).await, 1, "the fake saw exactly one request");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_same_job_published_twice_is_one_request(pool: PgPool) {
    let plivo = MockServer::start().await;
    Mock::given(method("POST")).respond_with(accepted("plivo-uuid-dup")).expect(1).mount(&plivo).await;
    let worker = start_worker(&pool, |s| fake_plivo(s, &plivo.uri())).await;
    let job = send_job("only once");

    publish_job(&worker.publisher, &job).await;
    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    assert_eq!(requests(&plivo).await, 1);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_opted_out_recipient_is_rejected_without_calling_plivo(pool: PgPool) {
    let plivo = MockServer::start().await;
    Mock::given(method("POST")).respond_with(accepted("never")).expect(0).mount(&plivo).await;
    sqlx::query!("INSERT INTO opt_outs (recipient, sender, source) VALUES ('+14155552671', '+14155550100', 'keyword')")
        .execute(&pool)
        .await
        .unwrap();
    let worker = start_worker(&pool, |s| fake_plivo(s, &plivo.uri())).await;
    let job = send_job("should not go");

    publish_job(&worker.publisher, &job).await;
    let (_, reason) = wait_for_status(&pool, job.id, "rejected").await;

    assert_eq!(reason.as_deref(), Some("opted_out"));
    assert_eq!(requests(&plivo).await, 0);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_invalid_job_is_dead_lettered_with_its_reason(pool: PgPool) {
    let plivo = MockServer::start().await;
    let worker = start_worker(&pool, |s| fake_plivo(s, &plivo.uri())).await;
    let mut job = send_job("bad number");
    job.to = "4155552671".into();

    publish_job(&worker.publisher, &job).await;

    let dead = worker.broker.topology.dead_letter_queue(Stream::Send);
    let mut message = None;
    for _ in 0..100 {
        message = worker.broker.get(&dead).await;
        if message.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = message.expect("dead-lettered");
    let reason = get_str(message.delivery.properties.headers().as_ref(), DEAD_LETTER_REASON_HEADER).unwrap();
    assert!(reason.starts_with("invalid send job: to:"), "{reason}");
    assert_eq!(requests(&plivo).await, 0);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_sender_rate_holds_ten_per_second_over_thirty_seconds_of_backlog(pool: PgPool) {
    let plivo = MockServer::start().await;
    Mock::given(method("POST")).respond_with(UniqueUuid).mount(&plivo).await;
    let worker = start_worker(&pool, |s| {
        fake_plivo(s, &plivo.uri());
        s.sending.sender_rate_per_second = 10.0;
        s.sending.sender_burst = 1;
    })
    .await;
    for i in 0..400 {
        publish_job(&worker.publisher, &send_job(&format!("backlog {i}"))).await;
    }
    while requests(&plivo).await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = requests(&plivo).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let sent = requests(&plivo).await - started;

    eprintln!("sender rate: {sent} Plivo requests in 30 s at a configured 10/s");
    assert!((270..=330).contains(&sent), "{sent} requests in 30 s at 10/s");
    worker.stop().await.unwrap();
}

/// Answers 202 with a fresh MessageUUID each time, as Plivo does.
struct UniqueUuid;

impl wiremock::Respond for UniqueUuid {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        accepted(&uuid::Uuid::new_v4().to_string())
    }
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_plivo_uuid_already_on_another_row_does_not_wedge_the_job(pool: PgPool) {
    sqlx::query!(
        "INSERT INTO messages (id, message_uuid, status, status_rank) VALUES (gen_random_uuid(), 'taken', 'sent', 50)"
    )
    .execute(&pool)
    .await
    .unwrap();
    let plivo = MockServer::start().await;
    Mock::given(method("POST")).respond_with(accepted("taken")).expect(1).mount(&plivo).await;
    let worker = start_worker(&pool, |s| fake_plivo(s, &plivo.uri())).await;
    let job = send_job("uuid clash");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;
    worker.stop().await.unwrap();
}
