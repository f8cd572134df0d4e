//! PostgreSQL unreachable for 30 s while events keep arriving: afterwards every event is in
//! the database, none dead-lettered, none duplicated.

use std::time::Duration;

use shared::amqp::Stream;
use shared::testing::{CuttableProxy, TestBroker};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::helpers::{assert_stories, start_worker_on, story, wait_for_events};

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn postgres_unreachable_for_30_seconds_loses_and_duplicates_nothing(pool: PgPool) {
    let options = pool.connect_options();
    let target = format!("{}:{}", options.get_host(), options.get_port());
    let target = tokio::net::lookup_host(target).await.unwrap().next().unwrap();
    let proxy = CuttableProxy::start(target).await;
    let proxied = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(options.as_ref().clone().host("127.0.0.1").port(proxy.address.port()));
    // The ladder outlasts the outage: 1+2+5+10+20 s plus the in-process retries.
    let broker = TestBroker::with_retry_delays(vec![1000, 2000, 5000, 10_000, 20_000]).await;
    let worker = start_worker_on(broker, proxied, |s| s.worker.batch_size = 50).await;

    let messages = 300;
    let events: Vec<_> = (0..messages).flat_map(|i| story(i).1).collect();
    let (before, rest) = events.split_at(300);
    let (during, after) = rest.split_at(900);
    worker.publish(before).await;
    wait_for_events(&pool, 180, Duration::from_secs(30)).await; // 300 events, 180 distinct

    proxy.cut();
    for chunk in during.chunks(90) {
        worker.publish(chunk).await;
        tokio::time::sleep(Duration::from_secs(3)).await; // 10 chunks: the 30 s outage
    }
    proxy.restore();
    worker.publish(after).await;

    wait_for_events(&pool, (messages * 3) as i64, Duration::from_secs(120)).await;
    assert_stories(&pool, messages).await;
    let dead = worker.broker.topology.dead_letter_queue(Stream::Status);
    assert_eq!(worker.broker.len(&dead).await, 0, "nothing dead-lettered");
    worker.stop().await.unwrap();
}
