//! Every SQL statement of the worker. The forward-only rule lives here, in one statement.

use std::collections::HashMap;

use shared::domain::MessageStatus;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::status::event::StatusUpdate;

/// What one batch changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Messages whose status moved forward.
    pub messages_advanced: u64,
    /// Callbacks stored for the first time (the rest were duplicates).
    pub events_recorded: u64,
}

/// The order in which two updates of one message win: status rank, then Plivo's Sequence, then
/// the event time.
fn precedence(update: &StatusUpdate) -> (i16, i64, OffsetDateTime) {
    (update.status.rank(), update.sequence.unwrap_or(-1), update.event_at)
}

/// Writes a batch of status updates in one transaction: each distinct callback once into
/// `message_events`, and each message's status moved forward only.
pub async fn apply_status_batch(pool: &PgPool, updates: &[StatusUpdate]) -> Result<BatchOutcome, sqlx::Error> {
    if updates.is_empty() {
        return Ok(BatchOutcome::default());
    }
    let mut tx = pool.begin().await?;

    // Correlate: a MessageUUID the database already knows keeps its row; otherwise our own id
    // from `ref`; otherwise a new row (a message sent outside smsflow).
    let mut uuids: Vec<String> = updates.iter().map(|u| u.message_uuid.clone()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    let known = sqlx::query!(
        r#"SELECT id, message_uuid AS "message_uuid!" FROM messages WHERE message_uuid = ANY($1::text[])"#,
        &uuids
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut ids: HashMap<&str, Uuid> = HashMap::with_capacity(uuids.len());
    for row in &known {
        ids.insert(row.message_uuid.as_str(), row.id);
    }
    for update in updates.iter().filter(|u| u.reference.is_some()) {
        ids.entry(&update.message_uuid).or_insert(update.reference.unwrap_or_else(Uuid::now_v7));
    }
    for update in updates {
        ids.entry(&update.message_uuid).or_insert_with(Uuid::now_v7);
    }

    // One statement cannot touch a row twice: keep each message's winning update.
    let mut winners: HashMap<Uuid, &StatusUpdate> = HashMap::new();
    for update in updates {
        let id = ids[update.message_uuid.as_str()];
        winners
            .entry(id)
            .and_modify(|current| {
                if precedence(update) > precedence(current) {
                    *current = update;
                }
            })
            .or_insert(update);
    }
    let mut rows: Vec<(Uuid, &StatusUpdate)> = winners.into_iter().collect();
    // A stable order keeps concurrent workers from deadlocking on each other's rows.
    rows.sort_unstable_by_key(|(id, _)| *id);

    let advanced = sqlx::query!(
        r#"
        INSERT INTO messages AS m (id, message_uuid, sender, recipient, status, status_rank, status_sequence,
                                   error_code, units, amount, last_event_at, terminal_at)
        SELECT u.id, u.message_uuid, u.sender, u.recipient, u.status, u.status_rank, u.status_sequence,
               u.error_code, u.units, u.amount::numeric, u.event_at,
               CASE WHEN u.status_rank = $12 THEN u.event_at END
        FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::int8[],
                    $8::int4[], $9::int4[], $10::text[], $11::timestamptz[])
             AS u(id, message_uuid, sender, recipient, status, status_rank, status_sequence,
                  error_code, units, amount, event_at)
        ON CONFLICT (id) DO UPDATE SET
            status          = EXCLUDED.status,
            status_rank     = EXCLUDED.status_rank,
            status_sequence = EXCLUDED.status_sequence,
            error_code      = COALESCE(EXCLUDED.error_code, m.error_code),
            units           = COALESCE(EXCLUDED.units, m.units),
            amount          = COALESCE(EXCLUDED.amount, m.amount),
            message_uuid    = COALESCE(m.message_uuid, EXCLUDED.message_uuid),
            sender          = COALESCE(m.sender, EXCLUDED.sender),
            recipient       = COALESCE(m.recipient, EXCLUDED.recipient),
            last_event_at   = GREATEST(m.last_event_at, EXCLUDED.last_event_at),
            terminal_at     = COALESCE(m.terminal_at, EXCLUDED.terminal_at),
            updated_at      = now()
        -- Forward only: a higher rank wins; within a non-terminal rank, a later Sequence (then
        -- event time) wins; a terminal status is final.
        WHERE EXCLUDED.status_rank > m.status_rank
           OR (EXCLUDED.status_rank = m.status_rank AND m.status_rank < $12
               AND (COALESCE(EXCLUDED.status_sequence, -1), EXCLUDED.last_event_at)
                 > (COALESCE(m.status_sequence, -1), COALESCE(m.last_event_at, '-infinity'::timestamptz)))
        "#,
        &rows.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        &rows.iter().map(|(_, u)| u.message_uuid.clone()).collect::<Vec<_>>(),
        &rows.iter().map(|(_, u)| u.sender.clone()).collect::<Vec<_>>() as &[Option<String>],
        &rows.iter().map(|(_, u)| u.recipient.clone()).collect::<Vec<_>>() as &[Option<String>],
        &rows.iter().map(|(_, u)| u.status.as_str().to_owned()).collect::<Vec<_>>(),
        &rows.iter().map(|(_, u)| u.status.rank()).collect::<Vec<_>>(),
        &rows.iter().map(|(_, u)| u.sequence).collect::<Vec<_>>() as &[Option<i64>],
        &rows.iter().map(|(_, u)| u.error_code).collect::<Vec<_>>() as &[Option<i32>],
        &rows.iter().map(|(_, u)| u.units).collect::<Vec<_>>() as &[Option<i32>],
        &rows.iter().map(|(_, u)| u.amount.clone()).collect::<Vec<_>>() as &[Option<String>],
        &rows.iter().map(|(_, u)| u.event_at).collect::<Vec<_>>(),
        MessageStatus::Delivered.rank(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let recorded = sqlx::query!(
        r#"
        INSERT INTO message_events (dedupe_key, message_id, message_uuid, status, sequence, error_code, params, received_at)
        SELECT * FROM UNNEST($1::bytea[], $2::uuid[], $3::text[], $4::text[], $5::int8[], $6::int4[], $7::jsonb[],
                             $8::timestamptz[])
        ON CONFLICT (dedupe_key) DO NOTHING
        "#,
        &updates.iter().map(|u| u.dedupe_key.to_vec()).collect::<Vec<_>>(),
        &updates.iter().map(|u| ids[u.message_uuid.as_str()]).collect::<Vec<_>>(),
        &updates.iter().map(|u| u.message_uuid.clone()).collect::<Vec<_>>(),
        &updates.iter().map(|u| u.status.as_str().to_owned()).collect::<Vec<_>>(),
        &updates.iter().map(|u| u.sequence).collect::<Vec<_>>() as &[Option<i64>],
        &updates.iter().map(|u| u.error_code).collect::<Vec<_>>() as &[Option<i32>],
        &updates.iter().map(|u| u.params.clone()).collect::<Vec<_>>(),
        &updates.iter().map(|u| u.received_at).collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();

    tx.commit().await?;
    Ok(BatchOutcome { messages_advanced: advanced, events_recorded: recorded })
}

/// Whether retrying the same statement later can succeed.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // serialization failure, deadlock, unique race between workers creating one row,
            // connection exceptions, insufficient resources, operator intervention, lock timeout.
            matches!(code.as_ref(), "40001" | "40P01" | "23505" | "55P03")
                || ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class))
        }
        _ => false,
    }
}
