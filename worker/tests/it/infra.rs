//! The foundations: migrations on a fresh database, the topology on the real broker.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use shared::amqp::Stream;
use shared::testing::TestBroker;
use shared::testing::database_url;
use sqlx::PgPool;

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn migrations_create_the_schema_with_its_constraints(pool: PgPool) {
    let tables: Vec<String> = sqlx::query_scalar!(
        r#"SELECT table_name AS "table_name!" FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"#
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for table in ["inbound_messages", "message_events", "messages", "opt_outs"] {
        assert!(tables.iter().any(|t| t == table), "{table} exists: {tables:?}");
    }
    let bad_status = sqlx::query("INSERT INTO messages (id, status) VALUES (gen_random_uuid(), 'lost')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(bad_status.as_database_error().and_then(|e| e.constraint()), Some("messages_status_known"));
    let duplicate_uuid = sqlx::query(
        "INSERT INTO messages (id, message_uuid, status) VALUES (gen_random_uuid(), 'u', 'sent'), (gen_random_uuid(), 'u', 'sent')",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(duplicate_uuid.as_database_error().and_then(|e| e.code()).as_deref(), Some("23505"));
}

#[sqlx::test(migrations = false)]
async fn the_migrate_subcommand_applies_migrations_and_is_idempotent(pool: PgPool) {
    let url = database_url(&pool);
    for run in 0..2 {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow-worker"))
            .arg("migrate")
            .env("SMSFLOW_PLIVO__AUTH_TOKEN", "test-token")
            .env("SMSFLOW_PLIVO__AUTH_ID", "MATESTACCOUNT000000001")
            .env("SMSFLOW_DATABASE__URL", &url)
            .env("SMSFLOW_TELEMETRY__LOG_FILTER", "warn")
            .output()
            .unwrap();
        assert!(output.status.success(), "run {run}: {}", String::from_utf8_lossy(&output.stderr));
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&pool).await.unwrap();
    assert_eq!(applied as usize, shared::MIGRATOR.iter().count());
}

#[tokio::test]
async fn the_topology_can_be_declared_twice() {
    let broker = TestBroker::new().await;
    broker.topology.declare(&broker.channel).await.expect("first declaration");
    broker.topology.declare(&broker.channel).await.expect("second declaration changes nothing");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    for stream in Stream::ALL {
        for queue in [broker.topology.queue(stream), broker.topology.dead_letter_queue(stream)]
            .into_iter()
            .chain(broker.topology.retry_queue(stream, 1))
        {
            broker
                .channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap_or_else(|e| panic!("{queue} exists: {e}"));
        }
    }
}

#[tokio::test]
async fn a_message_in_a_delay_queue_returns_to_its_work_queue() {
    let broker = TestBroker::with_retry_delays(vec![300]).await;
    broker.topology.declare(&broker.channel).await.unwrap();
    let retry = broker.topology.retry_queue(Stream::Status, 1).unwrap();
    let confirm = broker
        .channel
        .basic_publish(
            "".into(),
            retry.as_str().into(),
            Default::default(),
            b"{}",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    drop(confirm);
    let work = broker.topology.queue(Stream::Status);
    for _ in 0..50 {
        if broker.len(&work).await == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the delayed message did not come back to {work}");
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_admin_server_answers_health_readiness_and_metrics(pool: PgPool) {
    let broker = TestBroker::new().await;
    let settings = crate::helpers::settings_for(&broker);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(worker::run_with(settings, pool, Some(listener), shutdown.clone()));
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..100 {
        if client.get(format!("{admin}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "ready once every consumer is attached");
    assert_eq!(client.get(format!("{admin}/healthz")).send().await.unwrap().status(), 200);
    // Queue depths are polled every 10 s.
    let expected = format!("smsflow_queue_messages{{queue=\"{}.status\"}}", broker.prefix);
    let mut metrics = String::new();
    for _ in 0..30 {
        metrics = client.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.contains(&expected) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(metrics.contains(&expected), "{metrics}");
    // Counters that alerts watch with increase() exist at zero before their first event.
    for series in [
        "smsflow_send_outcomes_total{outcome=\"unknown\"} 0",
        "smsflow_dead_letters_total{stream=\"send\",reason=\"idempotency_conflict\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} is registered at zero:\n{metrics}");
    }
    shutdown.cancel();
    worker.await.unwrap().unwrap();
}
