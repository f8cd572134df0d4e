//! Every SQL statement of the worker. The forward-only rule lives here, in one statement.

use std::collections::HashMap;

use shared::domain::MessageStatus;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::status::event::StatusUpdate;

/// Plivo's "source number blocked by STOP from destination number".
const BLOCKED_BY_STOP: i32 = 200;

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
        SELECT d, m, u, s, q, e, p::jsonb, r
        FROM UNNEST($1::bytea[], $2::uuid[], $3::text[], $4::text[], $5::int8[], $6::int4[], $7::text[],
                    $8::timestamptz[]) AS t(d, m, u, s, q, e, p, r)
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

    // Error 200: the recipient blocked this sender with STOP; stop sending to them from it.
    let blocked: Vec<&StatusUpdate> = updates.iter().filter(|u| u.error_code == Some(BLOCKED_BY_STOP)).collect();
    if !blocked.is_empty() {
        let number = |n: &Option<String>| n.as_deref().map(crate::inbound::normalize_number).unwrap_or_default();
        sqlx::query!(
            r#"INSERT INTO opt_outs (recipient, sender, source, message_uuid)
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])
               WHERE 1 = 1
               ON CONFLICT (recipient, sender) DO NOTHING"#,
            &blocked.iter().map(|u| number(&u.recipient)).collect::<Vec<_>>(),
            &blocked.iter().map(|u| number(&u.sender)).collect::<Vec<_>>(),
            &blocked.iter().map(|_| "error_code".to_owned()).collect::<Vec<_>>(),
            &blocked.iter().map(|u| u.message_uuid.clone()).collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
    }

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

/// The send path's writes. Each moves a message between the states the send path owns
/// (accepted ⇄ sending → submitted/unknown/failed/rejected) and never lowers what a callback set.
pub mod sending {
    use shared::domain::send::ValidSend;
    use sqlx::PgPool;
    use uuid::Uuid;

    /// Records a job as `accepted`; false when its row already exists (a duplicate or redelivery).
    pub async fn record_job(pool: &PgPool, job: &ValidSend) -> Result<bool, sqlx::Error> {
        let inserted = sqlx::query!(
            r#"
            INSERT INTO messages (id, sender, recipient, body, status, status_rank, encoding, segments, metadata, accepted_at)
            VALUES ($1, $2, $3, $4, 'accepted', 10, $5, $6, $7, now())
            ON CONFLICT (id) DO NOTHING
            "#,
            job.id,
            job.sender.as_str(),
            job.to.as_str(),
            job.text,
            job.sms.encoding.as_str(),
            job.sms.segments as i16,
            job.metadata,
        )
        .execute(pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Whether the recipient opted out of this sender (or of all our senders).
    pub async fn is_opted_out(pool: &PgPool, recipient: &str, sender: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM opt_outs WHERE recipient = $1 AND sender IN ($2, '*')) AS "suppressed!""#,
            recipient,
            sender
        )
        .fetch_one(pool)
        .await
    }

    /// Takes the job for sending; `None` when another delivery already did.
    pub async fn claim(pool: &PgPool, id: Uuid) -> Result<Option<i32>, sqlx::Error> {
        sqlx::query_scalar!(
            r#"UPDATE messages SET status = 'sending', status_rank = 20, attempts = attempts + 1, updated_at = now()
               WHERE id = $1 AND status = 'accepted' RETURNING attempts"#,
            id
        )
        .fetch_optional(pool)
        .await
    }

    pub async fn status_of(pool: &PgPool, id: Uuid) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar!("SELECT status FROM messages WHERE id = $1", id).fetch_optional(pool).await
    }

    /// Plivo accepted the message; a callback may already have moved it further.
    pub async fn mark_submitted(pool: &PgPool, id: Uuid, message_uuid: Option<&str>) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"UPDATE messages SET
                   -- A MessageUUID already on another row (Plivo never reuses one) is not copied.
                   message_uuid = COALESCE(message_uuid,
                       CASE WHEN EXISTS (SELECT 1 FROM messages o WHERE o.message_uuid = $2) THEN NULL ELSE $2 END),
                   submitted_at = COALESCE(submitted_at, now()),
                   status = CASE WHEN status_rank < 30 THEN 'submitted' ELSE status END,
                   status_rank = GREATEST(status_rank, 30),
                   status_reason = NULL,
                   updated_at = now()
               WHERE id = $1"#,
            id,
            message_uuid
        )
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Back to `accepted` after a call that provably created no message, before a retry.
    pub async fn release_for_retry(pool: &PgPool, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE messages SET status = 'accepted', status_rank = 10, status_reason = $2, updated_at = now()
             WHERE id = $1 AND status = 'sending'",
            id,
            reason
        )
        .execute(pool)
        .await?;
        Ok(())
    }

    /// A terminal outcome decided by the send path (`failed` or `rejected`), with its reason.
    pub async fn finish(pool: &PgPool, id: Uuid, status: &str, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE messages SET status = $2, status_rank = 100, status_reason = $3, terminal_at = now(), updated_at = now()
             WHERE id = $1 AND status_rank < 100",
            id,
            status,
            reason
        )
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The outcome cannot be known (the request may have reached Plivo): never resent.
    pub async fn mark_unknown(pool: &PgPool, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE messages SET status = 'unknown', status_rank = 25, status_reason = $2, updated_at = now()
             WHERE id = $1 AND status_rank < 25",
            id,
            reason
        )
        .execute(pool)
        .await?;
        Ok(())
    }
}

/// Inbound messages and the consent they carry.
pub mod inbound {
    use sqlx::PgPool;

    use crate::inbound::{Consent, InboundMessage};

    /// Stores the message once; its consent change is applied only that first time. Returns
    /// whether this was the first time.
    pub async fn record(pool: &PgPool, message: &InboundMessage) -> Result<bool, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let inserted = sqlx::query!(
            r#"INSERT INTO inbound_messages (message_uuid, sender, recipient, body, message_type, units, amount, intent, params, received_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7::text::numeric, $8, $9, $10)
               ON CONFLICT (message_uuid) DO NOTHING"#,
            message.message_uuid,
            message.sender,
            message.recipient,
            message.body,
            message.message_type,
            message.units,
            message.amount,
            message.intent,
            message.params,
            message.received_at,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            match &message.consent {
                Consent::OptOut { sender, source } => {
                    sqlx::query!(
                        "INSERT INTO opt_outs (recipient, sender, source, message_uuid) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (recipient, sender) DO NOTHING",
                        message.sender,
                        sender,
                        source,
                        message.message_uuid
                    )
                    .execute(&mut *tx)
                    .await?;
                }
                Consent::OptIn { sender } => {
                    // START lifts the opt-out from this number and a STOPALL.
                    sqlx::query!(
                        "DELETE FROM opt_outs WHERE recipient = $1 AND sender IN ($2, '*')",
                        message.sender,
                        sender
                    )
                    .execute(&mut *tx)
                    .await?;
                }
                Consent::None => {}
            }
        }
        tx.commit().await?;
        Ok(inserted)
    }
}
