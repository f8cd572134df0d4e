//! The stored status is a pure function of the set of distinct callbacks received: property
//! tests over generated message stories (two terminal statuses, missing steps, repeated
//! Sequence numbers), random duplicates, arrival orders and batch splits, through the worker's
//! real batch function against the real PostgreSQL, checked against a model written here.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use worker::status::event::{StatusUpdate, parse};
use worker::storage::{apply_status_batch, is_transient};

/// One callback of a story, as Plivo would send it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Callback {
    status: &'static str,
    sequence: Option<u8>,
    error_code: Option<u16>,
    /// Seconds after a fixed start, as Plivo's DeliveryReportTime.
    at: Option<u8>,
}

/// The model's own order of statuses, written independently of the migration's.
fn model_rank(status: &str) -> i32 {
    match status {
        "queued" => 1,
        "sent" => 2,
        "delivered" | "undelivered" | "failed" | "rejected" => 3,
        other => panic!("not a callback status: {other}"),
    }
}

/// What the row must say, from the set of distinct callbacks of one message: the status and
/// error code of the greatest by (rank, Sequence, Plivo's time). Callbacks that tie on all three
/// are ordered by their dedupe key, which the model does not compute: it accepts any of them,
/// and the tests separately require every ordering of the same set to pick the same one.
fn expected(distinct: &[Callback]) -> Vec<(String, Option<i32>)> {
    let key = |c: &Callback| (model_rank(c.status), c.sequence.map_or(-1, i32::from), c.at.map_or(-1, i32::from));
    let best = distinct.iter().map(key).max().expect("a story has a callback");
    let mut outcomes: Vec<_> = distinct
        .iter()
        .filter(|c| key(c) == best)
        .map(|c| (c.status.to_owned(), c.error_code.map(i32::from)))
        .collect();
    outcomes.sort();
    outcomes.dedup();
    outcomes
}

fn arb_callback() -> impl Strategy<Value = Callback> {
    let status = prop::sample::select(vec!["queued", "sent", "delivered", "undelivered", "failed", "rejected"]);
    let error_code = prop::option::weighted(0.3, prop::sample::select(vec![1u16, 30, 451]));
    (status, prop::option::weighted(0.8, 0u8..5), error_code, prop::option::weighted(0.7, 0u8..4))
        .prop_map(|(status, sequence, error_code, at)| Callback { status, sequence, error_code, at })
}

/// Stories of 1–4 messages, each 1–6 callbacks (any subset of Plivo's steps, in any order).
fn arb_stories() -> impl Strategy<Value = Vec<Vec<Callback>>> {
    prop::collection::vec(prop::collection::vec(arb_callback(), 1..7), 1..5)
}

/// How a run delivers the events: each event's copies, the arrival order, the batch sizes, and
/// which of two workers takes each event.
#[derive(Debug, Clone)]
struct Delivery {
    copies: Vec<u8>,
    order_seed: u64,
    batch_sizes: Vec<usize>,
    worker_of: Vec<bool>,
}

fn arb_delivery() -> impl Strategy<Value = Delivery> {
    (
        prop::collection::vec(1u8..4, 32),
        any::<u64>(),
        prop::collection::vec(1usize..8, 1..12),
        prop::collection::vec(any::<bool>(), 96),
    )
        .prop_map(|(copies, order_seed, batch_sizes, worker_of)| Delivery {
            copies,
            order_seed,
            batch_sizes,
            worker_of,
        })
}

/// A MessageUUID for each story.
fn fresh_uuids(stories: &[Vec<Callback>]) -> Vec<String> {
    stories.iter().map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

/// Removes the messages of `uuids`, so that the same callbacks (the MessageUUID is one of their
/// parameters) can be received again from nothing.
async fn forget(pool: &PgPool, uuids: &[String]) {
    sqlx::query(
        "DELETE FROM event_outbox WHERE subject IN (SELECT id::text FROM messages WHERE message_uuid = ANY($1))",
    )
    .bind(uuids)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM message_events WHERE message_uuid = ANY($1)").bind(uuids).execute(pool).await.unwrap();
    sqlx::query("DELETE FROM messages WHERE message_uuid = ANY($1)").bind(uuids).execute(pool).await.unwrap();
}

/// The queued events of `stories` for `uuids`, each repeated as `delivery` says (a Plivo retry
/// or a redelivery: another request, the same parameters), in its order.
fn events(stories: &[Vec<Callback>], uuids: &[String], delivery: &Delivery) -> Vec<StatusUpdate> {
    let mut updates = Vec::new();
    let callbacks = stories.iter().zip(uuids).flat_map(|(story, uuid)| story.iter().map(move |c| (uuid, c)));
    for (i, (uuid, callback)) in callbacks.enumerate() {
        let sequence = callback.sequence.map(|s| s.to_string());
        let error_code = callback.error_code.map(|e| e.to_string());
        let at = callback.at.map(|s| format!("2026-11-30 10:00:0{s}.000000"));
        let mut params = vec![("MessageUUID", uuid.as_str()), ("Status", callback.status), ("To", "14155550199")];
        params.extend(sequence.as_deref().map(|s| ("Sequence", s)));
        params.extend(error_code.as_deref().map(|e| ("ErrorCode", e)));
        params.extend(at.as_deref().map(|t| ("DeliveryReportTime", t)));
        for _ in 0..delivery.copies[i % delivery.copies.len()] {
            let event = shared::testing::callback_event(&params);
            updates.push(parse(&serde_json::to_vec(&event).unwrap()).expect("a valid callback"));
        }
    }
    crate::helpers::shuffle(&mut updates, delivery.order_seed);
    updates
}

/// Cuts `updates` into batches of the sizes given (cycled).
fn batches<'a>(updates: &'a [StatusUpdate], sizes: &[usize]) -> Vec<&'a [StatusUpdate]> {
    let mut out = Vec::new();
    let mut start = 0;
    for size in sizes.iter().cycle() {
        if start >= updates.len() {
            break;
        }
        let end = (start + size).min(updates.len());
        out.push(&updates[start..end]);
        start = end;
    }
    out
}

/// As the worker does: a transient failure (a deadlock or a unique race with another worker)
/// is retried with the whole batch.
async fn apply(pool: &PgPool, batch: &[StatusUpdate]) {
    for attempt in 1.. {
        match apply_status_batch(pool, batch).await {
            Ok(_) => return,
            Err(e) if is_transient(&e) && attempt < 20 => {
                tokio::time::sleep(std::time::Duration::from_millis(5 * attempt)).await;
            }
            Err(e) => panic!("batch refused: {e}"),
        }
    }
}

type Row = (String, Option<i32>, i64);

async fn stored(pool: &PgPool, uuid: &str) -> Row {
    sqlx::query_as(
        "SELECT m.status, m.error_code, (SELECT count(*) FROM message_events e WHERE e.message_id = m.id)
         FROM messages m WHERE m.message_uuid = $1",
    )
    .bind(uuid)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("message {uuid}: {e}"))
}

/// Checks every message of `stories` against the model; returns the rows for comparison.
async fn check(pool: &PgPool, stories: &[Vec<Callback>], uuids: &[String]) -> Result<Vec<Row>, TestCaseError> {
    let mut rows = Vec::new();
    for (story, uuid) in stories.iter().zip(uuids) {
        let distinct: Vec<Callback> =
            story.iter().cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let row = stored(pool, uuid).await;
        let allowed = expected(&distinct);
        prop_assert!(
            allowed.contains(&(row.0.clone(), row.1)),
            "story {story:?}: stored {row:?}, expected one of {allowed:?}"
        );
        prop_assert_eq!(row.2, distinct.len() as i64, "one event per distinct callback: {:?}", story);
        check_events(pool, uuid, &row.0).await?;
        rows.push(row);
    }
    Ok(rows)
}

/// The message's events, in the order they committed, tell its status changes exactly: each
/// names the status before it (the first none), statuses only move forward, and the last is
/// the stored status.
async fn check_events(pool: &PgPool, uuid: &str, stored_status: &str) -> Result<(), TestCaseError> {
    let events: Vec<(String, Option<String>, i16)> = sqlx::query_as(
        "SELECT o.data->>'status', o.data->>'previous_status', smsflow_status_rank(o.data->>'status')
         FROM event_outbox o JOIN messages m ON o.subject = m.id::text
         WHERE m.message_uuid = $1 ORDER BY o.id",
    )
    .bind(uuid)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut previous: Option<(String, i16)> = None;
    for (status, before, rank) in &events {
        prop_assert_eq!(before, &previous.as_ref().map(|(s, _)| s.clone()), "events {:?}", events);
        if let Some((last, last_rank)) = &previous {
            prop_assert!(status != last && rank >= last_rank, "not a forward change: {:?}", events);
        }
        previous = Some((status.clone(), *rank));
    }
    let last = previous.map(|(s, _)| s);
    prop_assert_eq!(last.as_deref(), Some(stored_status), "events {:?}", events);
    Ok(())
}

/// Runs `property` over generated cases on a runtime of its own (proptest's runner is
/// synchronous), with its own pool to the test's database.
fn run_property<S: Strategy + Send + 'static>(
    pool: &PgPool,
    cases: u32,
    strategy: S,
    property: impl Fn(&PgPool, S::Value) -> futures_util::future::BoxFuture<'_, Result<(), TestCaseError>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let options = (*pool.connect_options()).clone();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let pool = runtime.block_on(PgPoolOptions::new().max_connections(4).connect_with(options)).unwrap();
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        let result = runner.run(&strategy, |value| runtime.block_on(property(&pool, value)));
        if let Err(failure) = result {
            panic!("{failure}");
        }
    })
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_stored_status_depends_only_on_the_set_of_distinct_callbacks(pool: PgPool) {
    let strategy = (arb_stories(), arb_delivery(), arb_delivery());
    run_property(&pool, 64, strategy, |pool, (stories, first, second)| {
        Box::pin(async move {
            // The same callbacks, twice, with other duplicates, another order, other batches.
            let uuids = fresh_uuids(&stories);
            let mut results = Vec::new();
            for delivery in [&first, &second] {
                forget(pool, &uuids).await;
                for batch in batches(&events(&stories, &uuids, delivery), &delivery.batch_sizes) {
                    apply(pool, batch).await;
                }
                results.push(check(pool, &stories, &uuids).await?);
            }
            prop_assert_eq!(&results[0], &results[1], "the same set of callbacks ended differently: {:?}", stories);
            Ok(())
        })
    })
    .await
    .unwrap();
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn two_concurrent_workers_store_what_one_worker_stores(pool: PgPool) {
    let strategy = (arb_stories(), arb_delivery());
    run_property(&pool, 48, strategy, |pool, (stories, delivery)| {
        Box::pin(async move {
            // One worker alone.
            let uuids = fresh_uuids(&stories);
            for batch in batches(&events(&stories, &uuids, &delivery), &delivery.batch_sizes) {
                apply(pool, batch).await;
            }
            let alone = check(pool, &stories, &uuids).await?;

            // Two workers at once, each taking the events the broker hands it.
            forget(pool, &uuids).await;
            let updates = events(&stories, &uuids, &delivery);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (i, update) in updates.into_iter().enumerate() {
                if delivery.worker_of[i % delivery.worker_of.len()] { a.push(update) } else { b.push(update) }
            }
            let sizes = &delivery.batch_sizes;
            let run = |mine: Vec<StatusUpdate>| async move {
                for batch in batches(&mine, sizes) {
                    apply(pool, batch).await;
                }
            };
            tokio::join!(run(a), run(b));
            let together = check(pool, &stories, &uuids).await?;
            prop_assert_eq!(alone, together, "two workers ended differently from one: {:?}", stories);
            Ok(())
        })
    })
    .await
    .unwrap();
}

/// Two workers holding the same callbacks of messages the database does not know yet (each
/// delivered to both, as Plivo's retries can be, in other orders and batches) write them at
/// the same time: not one batch fails. Both derive a new message's row id from its MessageUUID,
/// so the second insert waits for the first and updates it; with a fresh id each, the two raced
/// for the MessageUUID's unique key and a whole batch was rolled back and retried.
#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn two_workers_writing_new_messages_at_once_never_collide(pool: PgPool) {
    let strategy = (arb_stories(), arb_delivery(), arb_delivery());
    run_property(&pool, 48, strategy, |pool, (stories, first, second)| {
        Box::pin(async move {
            let uuids = fresh_uuids(&stories);
            let run = |delivery: Delivery| {
                let uuids = &uuids;
                let stories = &stories;
                async move {
                    for batch in batches(&events(stories, uuids, &delivery), &delivery.batch_sizes) {
                        apply_status_batch(pool, batch).await.map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>(())
                }
            };
            let (a, b) = tokio::join!(run(first), run(second));
            prop_assert!(a.is_ok() && b.is_ok(), "a batch failed: {:?} / {:?} for {:?}", a, b, stories);
            check(pool, &stories, &uuids).await?;
            Ok(())
        })
    })
    .await
    .unwrap();
}

/// The example behind the rule (README: "Which status wins").
#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn of_two_terminal_statuses_plivos_later_word_wins_in_either_order(pool: PgPool) {
    let story = vec![
        Callback { status: "undelivered", sequence: Some(3), error_code: Some(30), at: Some(1) },
        Callback { status: "delivered", sequence: Some(4), error_code: None, at: Some(2) },
    ];
    for reversed in [false, true] {
        for batch_size in [1, 2] {
            let delivery =
                Delivery { copies: vec![1], order_seed: 0, batch_sizes: vec![batch_size], worker_of: vec![true] };
            let uuids = fresh_uuids(std::slice::from_ref(&story));
            let mut updates = events(std::slice::from_ref(&story), &uuids, &delivery);
            updates.sort_by_key(|u| u.sequence);
            if reversed {
                updates.reverse();
            }
            for batch in batches(&updates, &delivery.batch_sizes) {
                apply(&pool, batch).await;
            }
            let row = stored(&pool, &uuids[0]).await;
            assert_eq!(
                (row.0.as_str(), row.1, row.2),
                ("delivered", None, 2),
                "reversed {reversed}, batch {batch_size}"
            );
        }
    }
}
