//! Every SQL statement of the worker. The forward-only rule itself is the database's
//! (`smsflow_status_precedence` and its siblings, in the migrations): the statements here
//! compare with it, so the worker and a hand-written query can never disagree.

use std::collections::HashMap;

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

/// Writes a batch of status updates in one transaction: each distinct callback once into
/// `message_events`, and each message's status moved to the greatest of its statuses by the one
/// rule, `smsflow_status_precedence` (see the migration that defines it). Neither the order of
/// `updates`, nor their duplicates, nor how they were split into batches changes the result.
pub async fn apply_status_batch(pool: &PgPool, updates: &[StatusUpdate]) -> Result<BatchOutcome, sqlx::Error> {
    if updates.is_empty() {
        return Ok(BatchOutcome::default());
    }
    let mut tx = pool.begin().await?;
    trace_events(&mut tx).await?;

    // Correlate: a MessageUUID the database already knows keeps its row; otherwise our own id
    // from `ref`; otherwise the row of a message sent outside smsflow, whose id follows from
    // the MessageUUID (`id_of_foreign_message`).
    let mut uuids: Vec<String> = updates.iter().map(|u| u.message_uuid.clone()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    // Planned for each batch (an unnamed statement), never from a cached generic plan: one
    // cached while `messages` held a page or two scans the whole table for every MessageUUID of
    // every batch (a linear search of the array per row) until autovacuum next analyzes the
    // table, which on a new database took most of the status writer's time. The query macros
    // cannot make an unnamed statement, so this one is not checked at compile time; and the
    // same SQL must not run as a cached statement on these connections, or that plan returns.
    let known: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, message_uuid FROM messages WHERE message_uuid = ANY($1::text[])")
            .bind(&uuids)
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?;
    let mut ids: HashMap<&str, Uuid> = HashMap::with_capacity(uuids.len());
    for (id, message_uuid) in &known {
        ids.insert(message_uuid.as_str(), *id);
    }
    for update in updates {
        if let Some(reference) = update.reference {
            ids.entry(&update.message_uuid).or_insert(reference);
        }
    }
    for update in updates {
        ids.entry(&update.message_uuid).or_insert_with(|| id_of_foreign_message(&update.message_uuid));
    }
    // The columns both statements bind, built once.
    let message_ids: Vec<Uuid> = updates.iter().map(|u| ids[u.message_uuid.as_str()]).collect();
    let message_uuids: Vec<String> = updates.iter().map(|u| u.message_uuid.clone()).collect();
    let statuses: Vec<String> = updates.iter().map(|u| u.status.as_str().to_owned()).collect();
    let sequences: Vec<Option<i64>> = updates.iter().map(|u| u.sequence).collect();
    let error_codes: Vec<Option<i32>> = updates.iter().map(|u| u.error_code).collect();
    let event_keys: Vec<Vec<u8>> = updates.iter().map(|u| u.dedupe_key.to_vec()).collect();

    let advanced = sqlx::query_scalar!(
        r#"
        WITH batch AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                                 $7::int4[], $8::int4[], $9::text[], $10::timestamptz[], $11::timestamptz[],
                                 $12::bytea[])
                AS u(id, message_uuid, sender, recipient, status, sequence, error_code, units, amount,
                     plivo_time, event_at, event_key)
        ),
        -- One statement cannot touch a row twice: each message's winner within the batch.
        winners AS (
            SELECT DISTINCT ON (id) id, message_uuid, sender, recipient, status, sequence, error_code,
                   plivo_time, event_key, event_at,
                   max(units) OVER per_message AS units,
                   max(amount::numeric) OVER per_message AS amount,
                   max(event_at) OVER per_message AS last_event_at
            FROM batch
            WINDOW per_message AS (PARTITION BY id)
            ORDER BY id, smsflow_status_precedence(status, sequence, plivo_time, event_key) DESC
        ),
        upserted AS (
            INSERT INTO messages AS m (id, message_uuid, sender, recipient, status, status_sequence,
                                       status_event_at, status_event_key, error_code, units, amount,
                                       last_event_at, terminal_at)
            SELECT id, message_uuid, sender, recipient, status, sequence, plivo_time, event_key, error_code,
                   units, amount, last_event_at,
                   -- When the winning status happened, not when the first terminal one arrived.
                   CASE WHEN smsflow_status_is_terminal(status) THEN event_at END
            FROM winners
            -- A stable order keeps concurrent workers from deadlocking on each other's rows.
            ORDER BY id
            ON CONFLICT (id) DO UPDATE SET
                status           = CASE WHEN EXCLUDED.status_precedence > m.status_precedence
                                        THEN EXCLUDED.status ELSE m.status END,
                status_sequence  = CASE WHEN EXCLUDED.status_precedence > m.status_precedence
                                        THEN EXCLUDED.status_sequence ELSE m.status_sequence END,
                status_event_at  = CASE WHEN EXCLUDED.status_precedence > m.status_precedence
                                        THEN EXCLUDED.status_event_at ELSE m.status_event_at END,
                status_event_key = CASE WHEN EXCLUDED.status_precedence > m.status_precedence
                                        THEN EXCLUDED.status_event_key ELSE m.status_event_key END,
                -- The error code is the winning callback's: a later `delivered` clears an
                -- earlier `undelivered`'s code.
                error_code       = CASE WHEN EXCLUDED.status_precedence > m.status_precedence
                                        THEN EXCLUDED.error_code ELSE m.error_code END,
                -- Why the send path ended where it did no longer explains a callback's status.
                status_reason    = CASE WHEN EXCLUDED.status_precedence > m.status_precedence
                                        THEN NULL ELSE m.status_reason END,
                terminal_at      = CASE WHEN EXCLUDED.status_precedence > m.status_precedence
                                        THEN EXCLUDED.terminal_at ELSE m.terminal_at END,
                units            = GREATEST(m.units, EXCLUDED.units),
                amount           = GREATEST(m.amount, EXCLUDED.amount),
                last_event_at    = GREATEST(m.last_event_at, EXCLUDED.last_event_at),
                message_uuid     = COALESCE(m.message_uuid, EXCLUDED.message_uuid),
                sender           = COALESCE(m.sender, EXCLUDED.sender),
                recipient        = COALESCE(m.recipient, EXCLUDED.recipient),
                updated_at       = now()
            -- Only a row that changes is written.
            WHERE EXCLUDED.status_precedence > m.status_precedence
               OR (GREATEST(m.units, EXCLUDED.units), GREATEST(m.amount, EXCLUDED.amount),
                   GREATEST(m.last_event_at, EXCLUDED.last_event_at), COALESCE(m.message_uuid, EXCLUDED.message_uuid),
                   COALESCE(m.sender, EXCLUDED.sender), COALESCE(m.recipient, EXCLUDED.recipient))
                  IS DISTINCT FROM (m.units, m.amount, m.last_event_at, m.message_uuid, m.sender, m.recipient)
            RETURNING m.id, m.status_event_key
        )
        SELECT count(*) AS "advanced!" FROM upserted JOIN winners USING (id)
        WHERE upserted.status_event_key = winners.event_key
        "#,
        &message_ids,
        &message_uuids,
        &updates.iter().map(|u| u.sender.clone()).collect::<Vec<_>>() as &[Option<String>],
        &updates.iter().map(|u| u.recipient.clone()).collect::<Vec<_>>() as &[Option<String>],
        &statuses,
        &sequences as &[Option<i64>],
        &error_codes as &[Option<i32>],
        &updates.iter().map(|u| u.units).collect::<Vec<_>>() as &[Option<i32>],
        &updates.iter().map(|u| u.amount.clone()).collect::<Vec<_>>() as &[Option<String>],
        &updates.iter().map(|u| u.plivo_time).collect::<Vec<_>>() as &[Option<OffsetDateTime>],
        &updates.iter().map(|u| u.event_at).collect::<Vec<_>>(),
        &event_keys,
    )
    .fetch_one(&mut *tx)
    .await? as u64;

    let recorded = sqlx::query!(
        r#"
        INSERT INTO message_events (dedupe_key, message_id, message_uuid, status, sequence, error_code, params, received_at)
        SELECT d, m, u, s, q, e, p::jsonb, r
        FROM UNNEST($1::bytea[], $2::uuid[], $3::text[], $4::text[], $5::int8[], $6::int4[], $7::text[],
                    $8::timestamptz[]) AS t(d, m, u, s, q, e, p, r)
        -- In key order, as the messages in id order: two workers holding the same callbacks
        -- (a Plivo retry in each) wait for each other instead of deadlocking.
        ORDER BY d
        ON CONFLICT (dedupe_key) DO NOTHING
        "#,
        &event_keys,
        &message_ids,
        &message_uuids,
        &statuses,
        &sequences as &[Option<i64>],
        &error_codes as &[Option<i32>],
        &updates.iter().map(|u| u.params.clone()).collect::<Vec<_>>(),
        &updates.iter().map(|u| u.received_at).collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();

    // Error 200: the recipient blocked this sender with STOP; stop sending to them from it.
    let blocked: Vec<(&str, &str, &StatusUpdate)> = updates
        .iter()
        .filter(|u| u.error_code == Some(BLOCKED_BY_STOP))
        .filter_map(|u| Some((u.recipient.as_deref()?, u.sender.as_deref()?, u)))
        .collect();
    if !blocked.is_empty() {
        sqlx::query!(
            r#"INSERT INTO opt_outs (recipient, sender, source, message_uuid, opted_out_at)
               SELECT DISTINCT ON (r, s) r, s, 'error_code', u, t
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS b(r, s, u, t)
               ORDER BY r, s, t DESC
               ON CONFLICT (recipient, sender) DO UPDATE SET opted_out_at = GREATEST(opt_outs.opted_out_at, EXCLUDED.opted_out_at)"#,
            &blocked.iter().map(|(recipient, _, _)| recipient.to_string()).collect::<Vec<_>>(),
            &blocked.iter().map(|(_, sender, _)| sender.to_string()).collect::<Vec<_>>(),
            &blocked.iter().map(|(_, _, u)| u.message_uuid.clone()).collect::<Vec<_>>(),
            &blocked.iter().map(|(_, _, u)| u.event_at).collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
    }

    tx.commit().await?;
    Ok(BatchOutcome { messages_advanced: advanced, events_recorded: recorded })
}

/// The id of a message smsflow did not send, from Plivo's MessageUUID. Two workers writing the
/// first callbacks of such a message at once then insert the same row: the second waits for the
/// first's insert and updates it (the MessageUUID's uniqueness is checked at statement end, see
/// its migration), where two fresh ids raced for the MessageUUID and one whole batch failed on
/// its unique key (and was retried). A callback with our `ref` racing one without it for the
/// same message can still collide that way; it is retried like any transient failure.
pub fn id_of_foreign_message(message_uuid: &str) -> Uuid {
    Uuid::new_v5(&FOREIGN_MESSAGES, message_uuid.as_bytes())
}

/// The UUIDv5 namespace of `id_of_foreign_message`. Never to change: two worker versions
/// deriving different ids during a rolling upgrade would race again.
const FOREIGN_MESSAGES: Uuid = Uuid::from_u128(0x0b6f2d57_8c1e_4f55_9a0e_5d3c7e21a9b4);

/// The events this transaction's changes write to the outbox (by trigger) carry the current
/// trace, so a subscriber's trace links back to the callbacks that caused them.
async fn trace_events(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    if let Some(traceparent) = shared::amqp::headers::current_traceparent() {
        sqlx::query("SELECT set_config('smsflow.traceparent', $1, true)").bind(traceparent).execute(tx).await?;
    }
    Ok(())
}

/// What a failed write means for its delivery: an outage is retried later, a refusal is for good.
pub fn disposition_of(error: sqlx::Error) -> crate::broker::Disposition {
    use crate::broker::{Disposition, RetryCause};
    if is_transient(&error) {
        Disposition::retry(RetryCause::DatabaseUnavailable(error.to_string()))
    } else {
        Disposition::Dead(refusal(error))
    }
}

/// Why the database refused a write for good, as a dead letter's reason.
pub fn refusal(error: sqlx::Error) -> crate::broker::DeadReason {
    crate::broker::DeadReason::DatabaseRefused(error.to_string())
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
    use shared::domain::MessageStatus;
    use shared::domain::send::{Sender, ValidSend};
    use sqlx::PgPool;
    use uuid::Uuid;

    /// What recording a job found.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Recorded {
        /// The first delivery of this id: its row is `accepted`.
        New,
        /// The id was recorded before with the same content (a redelivery or a duplicate).
        Again,
        /// The id was recorded before with other content: one idempotency key, two messages.
        Conflict,
    }

    /// Records a job as `accepted` with its content's fingerprint, unless its id is known.
    pub async fn record_job(pool: &PgPool, job: &ValidSend) -> Result<Recorded, sqlx::Error> {
        let fingerprint = job.fingerprint();
        // DO UPDATE (a no-op write), not DO NOTHING: it waits for a concurrent delivery that is
        // inserting the same id and returns that row, so two contents racing cannot both pass.
        let row = sqlx::query!(
            r#"
            INSERT INTO messages AS m (id, sender, recipient, body, status, encoding, segments, metadata,
                                       job_fingerprint, callback_url, accepted_at)
            VALUES ($1, $2, $3, $4, 'accepted', $5, $6, $7, $8, $9, now())
            ON CONFLICT (id) DO UPDATE SET job_fingerprint = m.job_fingerprint,
                -- A row a status callback created before its job: the job's URL is the one.
                callback_url = CASE WHEN m.job_fingerprint IS NULL THEN EXCLUDED.callback_url
                                    ELSE m.callback_url END
            RETURNING (xmax = 0) AS "inserted!", job_fingerprint AS stored
            "#,
            job.id,
            job.sender.as_str(),
            job.to.as_str(),
            job.text,
            job.sms.encoding.as_str(),
            job.sms.segments as i16,
            job.metadata,
            &fingerprint[..],
            job.callback,
        )
        .fetch_one(pool)
        .await?;
        Ok(match row.stored {
            _ if row.inserted => Recorded::New,
            // A row without a fingerprint was created by a callback or before fingerprints.
            Some(stored) if stored != fingerprint => Recorded::Conflict,
            _ => Recorded::Again,
        })
    }

    /// Whether the recipient opted out of this sender, or of all our senders. A Powerpack may
    /// send from any number of its pool, so any opt-out of the recipient's suppresses it.
    pub async fn is_opted_out(pool: &PgPool, recipient: &str, sender: &Sender) -> Result<bool, sqlx::Error> {
        let sender = match sender {
            Sender::Powerpack(_) => None,
            other => Some(other.as_str()),
        };
        sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM opt_outs WHERE recipient = $1 AND ($2::text IS NULL OR sender IN ($2, '*')))
               AS "suppressed!""#,
            recipient,
            sender
        )
        .fetch_one(pool)
        .await
    }

    /// Rejects a job nobody has claimed yet; false when a delivery already took it (its outcome
    /// then stands: an opt-out never rewrites a message that may have been sent).
    pub async fn reject_unclaimed(pool: &PgPool, id: Uuid, reason: &str) -> Result<bool, sqlx::Error> {
        let rejected = sqlx::query!(
            "UPDATE messages SET status = 'rejected', status_reason = $2, terminal_at = now(), updated_at = now()
             WHERE id = $1 AND status = 'accepted'",
            id,
            reason
        )
        .execute(pool)
        .await?
        .rows_affected();
        Ok(rejected == 1)
    }

    /// Takes the job for sending; `None` when another delivery already did.
    pub async fn claim(pool: &PgPool, id: Uuid) -> Result<Option<i32>, sqlx::Error> {
        sqlx::query_scalar!(
            r#"UPDATE messages SET status = 'sending', attempts = attempts + 1, updated_at = now()
               WHERE id = $1 AND status = 'accepted' RETURNING attempts"#,
            id
        )
        .fetch_optional(pool)
        .await
    }

    pub async fn status_of(pool: &PgPool, id: Uuid) -> Result<Option<MessageStatus>, sqlx::Error> {
        let status = sqlx::query_scalar!("SELECT status FROM messages WHERE id = $1", id).fetch_optional(pool).await?;
        // The table's CHECK admits only the statuses MessageStatus names.
        Ok(status.and_then(|s| s.parse().ok()))
    }

    /// Plivo accepted the message; a callback may already have moved it further.
    pub async fn mark_submitted(pool: &PgPool, id: Uuid, message_uuid: Option<&str>) -> Result<(), sqlx::Error> {
        sqlx::query!(
            r#"UPDATE messages SET
                   -- A MessageUUID already on another row (Plivo never reuses one) is not copied.
                   message_uuid = COALESCE(message_uuid,
                       CASE WHEN EXISTS (SELECT 1 FROM messages o WHERE o.message_uuid = $2) THEN NULL ELSE $2 END),
                   submitted_at = COALESCE(submitted_at, now()),
                   status = CASE WHEN status_rank < smsflow_status_rank('submitted') THEN 'submitted' ELSE status END,
                   status_reason = CASE WHEN status_rank < smsflow_status_rank('submitted') THEN NULL ELSE status_reason END,
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
            "UPDATE messages SET status = 'accepted', status_reason = $2, updated_at = now()
             WHERE id = $1 AND status = 'sending'",
            id,
            reason
        )
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The send path decided the message failed (Plivo refused it, or every retry is used up).
    pub async fn mark_failed(pool: &PgPool, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
        move_forward(pool, id, MessageStatus::Failed.as_str(), reason).await
    }

    /// The outcome cannot be known (the request may have reached Plivo): never resent.
    pub async fn mark_unknown(pool: &PgPool, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
        move_forward(pool, id, MessageStatus::Unknown.as_str(), reason).await
    }

    /// A send-path status, set only if it ranks above the stored one; it carries no callback,
    /// so the callback's part of the precedence is cleared with it.
    async fn move_forward(pool: &PgPool, id: Uuid, status: &str, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "UPDATE messages SET status = $2, status_reason = $3, status_sequence = NULL, status_event_at = NULL,
                    status_event_key = NULL,
                    terminal_at = CASE WHEN smsflow_status_is_terminal($2) THEN now() ELSE terminal_at END,
                    updated_at = now()
             WHERE id = $1 AND status_rank < smsflow_status_rank($2)",
            id,
            status,
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
        super::trace_events(&mut tx).await?;
        let inserted = sqlx::query!(
            r#"INSERT INTO inbound_messages (message_uuid, sender, recipient, body, message_type, units, amount, intent, params, received_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7::text::numeric, $8, $9, $10)
               ON CONFLICT (message_uuid) DO NOTHING"#,
            message.sms.message_uuid,
            message.sms.sender,
            message.sms.recipient,
            message.sms.body,
            message.sms.message_type,
            message.sms.units,
            message.amount,
            message.sms.intent,
            message.params,
            message.sms.received_at,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            match &message.consent {
                Consent::OptOut { sender, source } => {
                    sqlx::query!(
                        "INSERT INTO opt_outs (recipient, sender, source, message_uuid, opted_out_at)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (recipient, sender) DO UPDATE
                             SET opted_out_at = GREATEST(opt_outs.opted_out_at, EXCLUDED.opted_out_at)",
                        message.sms.sender,
                        sender,
                        source,
                        message.sms.message_uuid,
                        message.sent_at
                    )
                    .execute(&mut *tx)
                    .await?;
                }
                Consent::OptIn { sender } => {
                    // Only an opt-out the recipient made before this START; a STOPALL stays.
                    sqlx::query!(
                        "DELETE FROM opt_outs WHERE recipient = $1 AND sender = $2 AND opted_out_at < $3",
                        message.sms.sender,
                        sender,
                        message.sent_at
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
