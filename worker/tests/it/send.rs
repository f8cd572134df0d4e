//! The send path against the Plivo simulator, its answers scripted per test: one job is at most
//! one SMS.

use std::time::Duration;

use plivo_sim::{ScriptedAnswer, Simulator};
use shared::amqp::Stream;
use shared::amqp::headers::get_str;
use shared::amqp::topology::DEAD_LETTER_REASON_HEADER;
use shared::config::DeliveryGuarantee;
use sqlx::PgPool;

use crate::helpers::{CALLBACK_BASE_URL, publish_job, send_job, start_plivo, start_worker, use_plivo, wait_for_status};

/// The next dead-lettered send job and its reason (waits up to 10 s).
async fn next_send_dead_letter(worker: &crate::helpers::TestWorker) -> (lapin::message::BasicGetMessage, String) {
    let dead = worker.broker.topology.dead_letter_queue(Stream::Send);
    for _ in 0..100 {
        if let Some(message) = worker.broker.get(&dead).await {
            let headers = message.delivery.properties.headers().clone();
            let reason = get_str(headers.as_ref(), DEAD_LETTER_REASON_HEADER).expect("a dead-letter reason").to_owned();
            return (message, reason);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing was dead-lettered from {dead}");
}

async fn requests(plivo: &Simulator) -> usize {
    plivo.requests().await.len()
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_accepted_send_is_submitted_with_plivo_uuid_and_our_callback_url(pool: PgPool) {
    let plivo = start_plivo().await;
    plivo.script(&[ScriptedAnswer { message_uuid: Some("plivo-uuid-1".into()), ..ScriptedAnswer::accept() }]).await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
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
    let requests = plivo.requests().await;
    assert_eq!(requests.len(), 1);
    let body = &requests[0].body;
    assert_eq!(body["dst"], "14155552671");
    assert_eq!(body["src"], "14155550100");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["url"], format!("{CALLBACK_BASE_URL}/plivo/callback?ref={}", job.id));
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn each_permanent_plivo_error_fails_the_message_without_retry(pool: PgPool) {
    let plivo = start_plivo().await;
    let codes = [400u16, 401, 403, 404, 422];
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    // One job at a time, so that each meets its own scripted answer.
    for code in codes {
        plivo.script(&[ScriptedAnswer::refuse(code, &format!("plivo says {code}"))]).await;
        let job = send_job(&format!("code {code}"));
        publish_job(&worker.publisher, &job).await;
        let (_, reason) = wait_for_status(&pool, job.id, "failed").await;
        let reason = reason.unwrap_or_default();
        assert!(reason.contains(&format!("({code})")) && reason.contains(&format!("plivo says {code}")), "{reason}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(requests(&plivo).await, codes.len(), "no retries");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_job_out_of_retries_is_dead_lettered_and_then_failed(pool: PgPool) {
    let plivo = start_plivo().await;
    // More 429s than the in-process retries and the two rungs of the test ladder take.
    let refusals: Vec<ScriptedAnswer> = (0..20).map(|_| ScriptedAnswer::refuse(429, "too many requests")).collect();
    plivo.script(&refusals).await;
    let worker = start_worker(&pool, |s| {
        use_plivo(s, &plivo);
        s.sending.in_process_retries = 0;
    })
    .await;
    let job = send_job("never accepted");
    publish_job(&worker.publisher, &job).await;
    let (_, reason) = next_send_dead_letter(&worker).await;
    assert!(reason.starts_with("gave up after 2 retries: Plivo answered 429"), "{reason}");
    let (_, status_reason) = wait_for_status(&pool, job.id, "failed").await;
    assert!(status_reason.unwrap_or_default().starts_with("gave up: Plivo answered 429"));
    assert_eq!(requests(&plivo).await, 3, "the first call and one per rung");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_429_then_202_is_one_sms(pool: PgPool) {
    let plivo = start_plivo().await;
    plivo.script(&[ScriptedAnswer::refuse(429, "too many requests")]).await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let job = send_job("rate limited first");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;

    let answers: Vec<_> = plivo.requests().await.iter().map(|r| r.answered).collect();
    assert_eq!(answers, [Some(429), Some(202)], "one refused with 429, one accepted");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn with_503_configured_retryable_three_503s_then_202_is_one_sms_through_the_delay_queue(pool: PgPool) {
    let plivo = start_plivo().await;
    plivo.script(&vec![ScriptedAnswer::refuse(503, "service unavailable"); 3]).await;
    // Two in-process retries: the third 503 sends the job through the delay queue.
    let worker = start_worker(&pool, |s| {
        use_plivo(s, &plivo);
        s.sending.in_process_retries = 2;
        s.sending.retry_statuses = vec![429, 503];
    })
    .await;
    let job = send_job("server errors first");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;

    let answers: Vec<_> = plivo.requests().await.iter().map(|r| r.answered).collect();
    assert_eq!(answers, [Some(503), Some(503), Some(503), Some(202)]);
    let attempts =
        sqlx::query_scalar!("SELECT attempts FROM messages WHERE id = $1", job.id).fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 2, "claimed once per delivery: the first and the retried one");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_read_timeout_after_the_request_arrived_is_unknown_and_not_resent(pool: PgPool) {
    let plivo = start_plivo().await;
    plivo.script(&[ScriptedAnswer { delay_ms: 3000, ..ScriptedAnswer::accept() }]).await;
    let worker = start_worker(&pool, |s| {
        use_plivo(s, &plivo);
        s.plivo.request_timeout_ms = 500;
    })
    .await;
    let job = send_job("slow answer");

    publish_job(&worker.publisher, &job).await;
    let (_, reason) = wait_for_status(&pool, job.id, "unknown").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert!(reason.unwrap_or_default().contains("no answer"), "reason explains");
    assert_eq!(requests(&plivo).await, 1, "Plivo saw exactly one request");
    assert_eq!(plivo.stats().await.messages_accepted, 1, "and created the message the worker never heard of");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_same_job_published_twice_is_one_request(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
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
    let plivo = start_plivo().await;
    sqlx::query!("INSERT INTO opt_outs (recipient, sender, source) VALUES ('+14155552671', '+14155550100', 'keyword')")
        .execute(&pool)
        .await
        .unwrap();
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let job = send_job("should not go");

    publish_job(&worker.publisher, &job).await;
    let (_, reason) = wait_for_status(&pool, job.id, "rejected").await;

    assert_eq!(reason.as_deref(), Some("opted_out"));
    assert_eq!(requests(&plivo).await, 0);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_invalid_job_is_dead_lettered_with_its_reason(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let mut job = send_job("bad number");
    job.to = "4155552671".into();

    publish_job(&worker.publisher, &job).await;

    let (_, reason) = next_send_dead_letter(&worker).await;
    assert!(reason.starts_with("invalid send job: to:"), "{reason}");
    assert_eq!(requests(&plivo).await, 0);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_sender_rate_holds_ten_per_second_over_thirty_seconds_of_backlog(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| {
        use_plivo(s, &plivo);
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

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_plivo_uuid_already_on_another_row_does_not_wedge_the_job(pool: PgPool) {
    sqlx::query!("INSERT INTO messages (id, message_uuid, status) VALUES (gen_random_uuid(), 'taken', 'sent')")
        .execute(&pool)
        .await
        .unwrap();
    let plivo = start_plivo().await;
    plivo.script(&[ScriptedAnswer { message_uuid: Some("taken".into()), ..ScriptedAnswer::accept() }]).await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let job = send_job("uuid clash");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;
    assert_eq!(requests(&plivo).await, 1);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn by_default_a_server_error_is_unknown_with_one_request_and_no_resend(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let codes = [500u16, 502, 503, 504];
    for (i, code) in codes.into_iter().enumerate() {
        plivo.script(&[ScriptedAnswer::refuse(code, "upstream trouble")]).await;
        let job = send_job(&format!("server error {code}"));
        publish_job(&worker.publisher, &job).await;
        let (_, reason) = wait_for_status(&pool, job.id, "unknown").await;
        assert!(reason.unwrap_or_default().contains(&format!("{code}")), "the reason names {code}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(requests(&plivo).await, i + 1, "{code}: one request, never resent");
    }
    worker.stop().await.unwrap();
}

/// Makes the first `failures` writes that record a submission fail as a failover would (a
/// sequence is not rolled back with the failed statement, so it counts them).
async fn fail_submission_writes(pool: &PgPool, failures: i64) {
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE blips;
         CREATE FUNCTION blip() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('blips') <= {failures} THEN
                 RAISE EXCEPTION 'simulated blip' USING ERRCODE = '40001';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER blip BEFORE UPDATE ON messages FOR EACH ROW
             WHEN (OLD.submitted_at IS NULL AND NEW.submitted_at IS NOT NULL) EXECUTE FUNCTION blip();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

async fn submission_writes(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT last_value FROM blips").fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_database_blip_while_recording_the_submission_does_not_make_it_unknown(pool: PgPool) {
    fail_submission_writes(&pool, 2).await;
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let job = send_job("sent during a blip");

    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;

    assert_eq!(submission_writes(&pool).await, 3, "two failed writes, then the one that held");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(requests(&plivo).await, 1, "one SMS");
    worker.stop().await.unwrap();
}

/// A send whose submission cannot be written for longer than the in-process retries: one
/// delivery tries 9 times (~10 s); the 10th write is the redelivery's, through the delay queue,
/// which carries Plivo's answer instead of deciding the call was interrupted.
async fn a_database_away_longer_than_the_in_process_retries(pool: PgPool, delivery: DeliveryGuarantee) {
    fail_submission_writes(&pool, 9).await;
    let plivo = start_plivo().await;
    plivo.script(&[ScriptedAnswer { message_uuid: Some("plivo-uuid-late".into()), ..ScriptedAnswer::accept() }]).await;
    let worker = start_worker(&pool, |s| {
        use_plivo(s, &plivo);
        s.sending.delivery = delivery;
    })
    .await;
    let job = send_job("sent during an outage");

    publish_job(&worker.publisher, &job).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let uuid = loop {
        let row: (String, Option<String>) = sqlx::query_as("SELECT status, message_uuid FROM messages WHERE id = $1")
            .bind(job.id)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .unwrap_or(("not recorded yet".into(), None));
        assert_ne!(row.0, "unknown", "a sent message is never unknown");
        if row.0 == "submitted" {
            break row.1;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {} after 40 s", row.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert_eq!(submission_writes(&pool).await, 10, "nine failed writes, then the redelivery's");
    assert_eq!(uuid.as_deref(), Some("plivo-uuid-late"), "Plivo's MessageUUID is kept");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(requests(&plivo).await, 1, "one SMS");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn at_most_once_a_database_away_for_long_does_not_make_a_sent_message_unknown(pool: PgPool) {
    a_database_away_longer_than_the_in_process_retries(pool, DeliveryGuarantee::AtMostOnce).await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn at_least_once_a_database_away_for_long_does_not_send_twice(pool: PgPool) {
    a_database_away_longer_than_the_in_process_retries(pool, DeliveryGuarantee::AtLeastOnce).await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_job_id_reused_with_other_content_is_dead_lettered_and_not_sent(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let first = send_job("the first text");
    publish_job(&worker.publisher, &first).await;
    wait_for_status(&pool, first.id, "submitted").await;

    let other = shared::amqp::contracts::SendJob { text: "another text".into(), ..first.clone() };
    publish_job(&worker.publisher, &other).await;
    publish_job(&worker.publisher, &first).await; // the same content again: a harmless duplicate

    let (message, reason) = next_send_dead_letter(&worker).await;
    assert!(reason.starts_with("idempotency conflict"), "{reason}");
    let dead_job: shared::amqp::contracts::SendJob = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(dead_job.text, "another text");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(requests(&plivo).await, 1, "one SMS, with the first text");
    assert_eq!(plivo.requests().await[0].body["text"], "the first text");
    assert_eq!(
        worker.broker.len(&worker.broker.topology.dead_letter_queue(Stream::Send)).await,
        0,
        "only the other content was dead-lettered"
    );
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_opt_out_after_the_send_does_not_rewrite_a_redelivered_job(pool: PgPool) {
    let plivo = start_plivo().await;
    let worker = start_worker(&pool, |s| use_plivo(s, &plivo)).await;
    let job = send_job("sent before the STOP");
    publish_job(&worker.publisher, &job).await;
    wait_for_status(&pool, job.id, "submitted").await;
    sqlx::query("INSERT INTO opt_outs (recipient, sender, source) VALUES ('+14155552671', '*', 'operator')")
        .execute(&pool)
        .await
        .unwrap();

    publish_job(&worker.publisher, &job).await; // a duplicate publish
    tokio::time::sleep(Duration::from_millis(800)).await;

    let (status, reason) = wait_for_status(&pool, job.id, "submitted").await;
    assert_eq!((status.as_str(), reason), ("submitted", None), "the sent message keeps its status");
    assert_eq!(requests(&plivo).await, 1);
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn three_workers_together_hold_the_senders_configured_rate(pool: PgPool) {
    let plivo = start_plivo().await;
    let limit = |s: &mut shared::config::WorkerSettings| {
        use_plivo(s, &plivo);
        s.sending.sender_rate_per_second = 10.0;
        s.sending.sender_burst = 1;
    };
    let first = start_worker(&pool, limit).await;
    let mut others = Vec::new();
    for _ in 0..2 {
        let broker = shared::testing::TestBroker::attach(&first.broker.topology).await;
        others.push(crate::helpers::start_worker_on(broker, pool.clone(), limit).await);
    }
    for i in 0..600 {
        publish_job(&first.publisher, &send_job(&format!("shared backlog {i}"))).await;
    }
    // Each worker learned at start how many share the rate, and re-reads it every 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = requests(&plivo).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let sent = requests(&plivo).await - started;

    eprintln!("sender rate with three workers: {sent} Plivo requests in 30 s at a configured 10/s");
    assert!((270..=330).contains(&sent), "{sent} requests in 30 s at 10/s across three workers");
    for worker in others {
        worker.stop().await.unwrap();
    }
    first.stop().await.unwrap();
}
