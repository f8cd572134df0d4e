//! A few seconds of load to keep the tool working: it must complete with zero errors and zero
//! lost events. No timing assertions: figures are measured by the tool, not judged by tests.

use loadgen::callbacks::{CallbackLoad, run};
use loadgen::ceiling::{CeilingArgs, measure};
use reliability::{Stack, sim_config};
use shared::testing::{TEST_AUTH_TOKEN, amqp_url, database_url};
use sqlx::PgPool;

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_short_callback_run_loses_nothing(pool: PgPool) {
    let stack = Stack::start(pool.clone(), sim_config(), |_, _| {}).await;

    let report = run(&CallbackLoad {
        ingress: stack.ingress_url.clone(),
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
    stack.stop().await;
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
