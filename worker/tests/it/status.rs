use std::time::Duration;

use sqlx::PgPool;

use crate::helpers::{assert_stories, callback, count_events, shuffle, start_worker, state_of, story, wait_for_events};

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_late_sent_never_overwrites_delivered(pool: PgPool) {
    let worker = start_worker(&pool, |s| s.worker.batch_size = 1).await;
    worker.publish(&[callback("m-late", "delivered", 3)]).await;
    wait_for_events(&pool, 1, Duration::from_secs(20)).await;
    worker.publish(&[callback("m-late", "sent", 2)]).await;
    wait_for_events(&pool, 2, Duration::from_secs(20)).await;

    assert_eq!(state_of(&pool, "m-late").await.0, "delivered");
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn every_permutation_with_duplicates_ends_delivered_with_three_events(pool: PgPool) {
    let worker = start_worker(&pool, |s| s.worker.batch_size = 2).await;
    let statuses = [("queued", 1), ("sent", 2), ("delivered", 3)];
    let permutations = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
    let mut events = Vec::new();
    for (p, order) in permutations.iter().enumerate() {
        let uuid = format!("perm-{p}");
        for &i in order {
            events.push(callback(&uuid, statuses[i].0, statuses[i].1));
        }
        events.push(callback(&uuid, statuses[order[0]].0, statuses[order[0]].1)); // a duplicate
    }
    // Publish one at a time so the permutation is the arrival order.
    for event in &events {
        worker.publish(std::slice::from_ref(event)).await;
    }
    wait_for_events(&pool, 18, Duration::from_secs(30)).await;

    for p in 0..permutations.len() {
        let uuid = format!("perm-{p}");
        assert_eq!(state_of(&pool, &uuid).await.0, "delivered", "{uuid}");
        let n = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM message_events WHERE message_uuid = $1"#, uuid)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 3, "{uuid}: exactly three distinct events");
    }
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_same_callback_five_times_is_one_event(pool: PgPool) {
    let worker = start_worker(&pool, |_| {}).await;
    let event = callback("m-five", "sent", 2);
    let mut retried = vec![event.clone(); 5];
    for (i, copy) in retried.iter_mut().enumerate() {
        copy.request_id = format!("retry-{i}"); // each Plivo retry is a new request
    }
    worker.publish(&retried).await;
    worker.publish(&[callback("m-five", "delivered", 3)]).await;
    wait_for_events(&pool, 2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(count_events(&pool).await, 2, "one row for the five copies, one for delivered");
    let (status, error) = state_of(&pool, "m-five").await;
    assert_eq!((status.as_str(), error), ("delivered", None));
    worker.stop().await.unwrap();
}

async fn ten_thousand_events_land_exactly(pool: PgPool, batch_size: usize) {
    let worker = start_worker(&pool, |s| {
        s.worker.batch_size = batch_size;
        s.amqp.prefetch = (batch_size * 2).clamp(10, 2000) as u16;
    })
    .await;
    let mut events: Vec<_> = (0..2000).flat_map(|i| story(i).1).collect();
    assert_eq!(events.len(), 10_000);
    shuffle(&mut events, batch_size as u64);

    worker.publish(&events).await;
    wait_for_events(&pool, 6000, Duration::from_secs(120)).await;

    assert_stories(&pool, 2000).await;
    worker.stop().await.unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn ten_thousand_events_over_two_thousand_messages_land_exactly_in_batches_of_500(pool: PgPool) {
    ten_thousand_events_land_exactly(pool, 500).await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn ten_thousand_events_over_two_thousand_messages_land_exactly_in_batches_of_37(pool: PgPool) {
    ten_thousand_events_land_exactly(pool, 37).await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_callback_with_our_ref_lands_on_our_row(pool: PgPool) {
    let id = uuid::Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO messages (id, status, recipient, accepted_at) VALUES ($1, 'submitted', '+14155550199', now())",
        id
    )
    .execute(&pool)
    .await
    .unwrap();
    let worker = start_worker(&pool, |_| {}).await;
    let mut event = callback("plivo-uuid-ref", "delivered", 3);
    event.reference = Some(id.to_string());
    worker.publish(&[event, callback("plivo-uuid-ref", "sent", 2)]).await;
    wait_for_events(&pool, 2, Duration::from_secs(20)).await;

    let row = sqlx::query!("SELECT id, status, message_uuid FROM messages").fetch_all(&pool).await.unwrap();
    assert_eq!(row.len(), 1, "no second row for the same message");
    assert_eq!((row[0].id, row[0].status.as_str()), (id, "delivered"));
    assert_eq!(row[0].message_uuid.as_deref(), Some("plivo-uuid-ref"));
    worker.stop().await.unwrap();
}
