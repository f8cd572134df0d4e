//! A few seconds of load to keep the tool working: it must complete with zero errors and zero
//! lost events. No timing assertions: figures are measured by the tool, not judged by tests.

use loadgen::callbacks::{CallbackLoad, run};
use loadgen::ceiling::{CeilingArgs, measure};
use shared::testing::database_url;
use shared::testing::{TEST_AUTH_TOKEN, TestBroker, amqp_url, base_ingress_settings, base_worker_settings};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_short_callback_run_loses_nothing(pool: PgPool) {
    let broker = TestBroker::new().await;
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut ingress_settings = base_ingress_settings();
    ingress_settings.amqp = broker.amqp_settings();
    ingress_settings.http.public_base_url = base.clone();
    tokio::spawn(ingress::run(ingress_settings, listener, shutdown.clone()));
    let mut worker_settings = base_worker_settings();
    worker_settings.amqp = broker.amqp_settings();
    let worker = tokio::spawn(worker::run_with(worker_settings, pool.clone(), None, shutdown.clone()));
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let report = run(&CallbackLoad {
        ingress: base,
        public_base_url: None,
        auth_token: TEST_AUTH_TOKEN.into(),
        count: 600,
        connections: 8,
        rate: 0.0,
        duplicate_share: 0.05,
        out_of_order_share: 0.1,
        database_url: Some(database_url(&pool)),
        drain_timeout_secs: 60,
    })
    .await
    .unwrap();

    assert_eq!(report.sent, 600);
    assert_eq!(report.transport_errors, 0, "{report:?}");
    assert_eq!(report.answers.keys().collect::<Vec<_>>(), ["200"], "{report:?}");
    assert_eq!(report.lost_events, Some(0), "{report:?}");
    assert_eq!(report.stored_events, Some(report.acknowledged_events as i64), "{report:?}");
    shutdown.cancel();
    worker.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_ceiling_measurement_completes(pool: PgPool) {
    let ceiling = measure(&CeilingArgs {
        amqp_url: amqp_url(),
        database_url: database_url(&pool),
        count: 1500,
        publishers: 2,
        in_flight: 50,
        batch: 100,
    })
    .await
    .unwrap();
    assert!(ceiling.payload_bytes > 400, "{ceiling:?}");
    for figure in [
        ceiling.publish_confirm_per_second,
        ceiling.consume_ack_per_second,
        ceiling.batch_upsert_rows_per_second,
        ceiling.full_pipeline_per_second,
    ] {
        assert!(figure.is_finite() && figure > 0.0, "{ceiling:?}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM message_events").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "the ceiling cleans up after itself");
}
