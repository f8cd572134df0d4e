//! The ingress's SQL: the status API's queries, the idempotency check of the send API, and the
//! operator's opt-out changes. Callbacks never touch the database; only these do.

use serde::Serialize;
use shared::domain::InboundSms;
use sqlx::{FromRow, PgPool, Postgres, QueryBuilder};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct MessageRow {
    pub id: Uuid,
    pub message_uuid: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub status: String,
    pub status_reason: Option<String>,
    pub error_code: Option<i32>,
    pub encoding: Option<String>,
    pub segments: Option<i16>,
    pub units: Option<i32>,
    pub amount: Option<String>,
    pub attempts: i32,
    pub metadata: serde_json::Value,
    pub accepted_at: Option<OffsetDateTime>,
    pub submitted_at: Option<OffsetDateTime>,
    pub last_event_at: Option<OffsetDateTime>,
    pub terminal_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const MESSAGE_COLUMNS: &str = "id, message_uuid, sender, recipient, status, status_reason, error_code, encoding, \
     segments, units, amount::text AS amount, attempts, metadata, accepted_at, submitted_at, last_event_at, \
     terminal_at, created_at, updated_at";

#[derive(Debug, Clone, FromRow)]
pub struct EventRow {
    pub status: String,
    pub sequence: Option<i64>,
    pub error_code: Option<i32>,
    pub params: serde_json::Value,
    pub received_at: OffsetDateTime,
    pub recorded_at: OffsetDateTime,
}

/// By our id or by Plivo's MessageUUID (both are UUIDs).
pub async fn message(pool: &PgPool, id: Uuid) -> Result<Option<MessageRow>, sqlx::Error> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1 OR message_uuid = $2 LIMIT 1");
    sqlx::query_as(&sql).bind(id).bind(id.to_string()).fetch_optional(pool).await
}

/// The content fingerprint of a recorded send job (`None`: unknown id, or no fingerprint).
pub async fn job_fingerprint(pool: &PgPool, id: Uuid) -> Result<Option<[u8; 32]>, sqlx::Error> {
    let stored: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT job_fingerprint FROM messages WHERE id = $1").bind(id).fetch_optional(pool).await?;
    Ok(stored.flatten().and_then(|bytes| bytes.try_into().ok()))
}

pub async fn events(pool: &PgPool, id: Uuid) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, sequence, error_code, params, received_at, recorded_at FROM message_events
         WHERE message_id = $1 ORDER BY received_at, id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// One attempt to deliver a message's status event to its callback URL.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
#[schema(as = WebhookAttempt)]
pub struct WebhookAttemptRow {
    /// The event delivered, also the request's `webhook-id`.
    pub event_id: Uuid,
    /// The event's type, e.g. `message.status.delivered`.
    pub event_type: String,
    /// 1 for the first try of this event.
    pub attempt: i32,
    /// Scheme, host and port of the callback URL (never its path or query: they may hold the
    /// receiver's secret).
    pub endpoint: String,
    /// `delivered` (2xx), `rejected` (another status), `unreachable` (no answer in time),
    /// `refused_address` (not a public address, and not allowed).
    pub outcome: String,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub attempted_at: OffsetDateTime,
}

pub async fn webhook_attempts(pool: &PgPool, id: Uuid) -> Result<Vec<WebhookAttemptRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, event_type, attempt, endpoint, outcome, status_code, error, duration_ms, attempted_at
         FROM webhook_attempts WHERE message_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// Filters of `GET /v1/messages`; every combination is served by an index.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    pub status: Option<String>,
    pub recipient: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub metadata: Option<(String, String)>,
    /// Keyset position: rows strictly older than (created_at, id).
    pub after: Option<(OffsetDateTime, Uuid)>,
    pub limit: i64,
}

/// The list query; `prefix` lets a test run it under `EXPLAIN`.
pub fn list_query<'a>(prefix: &str, filter: &'a MessageFilter) -> QueryBuilder<'a, Postgres> {
    let mut q = QueryBuilder::new(format!("{prefix}SELECT {MESSAGE_COLUMNS} FROM messages WHERE TRUE"));
    if let Some(status) = &filter.status {
        q.push(" AND status = ").push_bind(status);
    }
    if let Some(recipient) = &filter.recipient {
        q.push(" AND recipient = ").push_bind(recipient);
    }
    if let Some(since) = filter.since {
        q.push(" AND created_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        q.push(" AND created_at < ").push_bind(until);
    }
    if let Some((key, value)) = &filter.metadata {
        // jsonb_path_ops GIN index: containment of {"key": "value"}.
        q.push(" AND metadata @> ").push_bind(serde_json::json!({ key: value }));
    }
    if let Some((created_at, id)) = filter.after {
        q.push(" AND (created_at, id) < (").push_bind(created_at).push(", ").push_bind(id).push(")");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(filter.limit);
    q
}

pub async fn list(pool: &PgPool, filter: &MessageFilter) -> Result<Vec<MessageRow>, sqlx::Error> {
    list_query("", filter).build_query_as().fetch_all(pool).await
}

/// One group's count; `key` is the status, the error code or the hour (RFC 3339), by
/// `group_by`.
#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub struct StatsGroup {
    pub key: Option<String>,
    pub count: i64,
}

/// How `GET /v1/stats` groups its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Status,
    ErrorCode,
    Hour,
}

pub async fn stats(
    pool: &PgPool,
    since: OffsetDateTime,
    until: OffsetDateTime,
    group_by: GroupBy,
) -> Result<Vec<StatsGroup>, sqlx::Error> {
    let key = match group_by {
        GroupBy::Status => "status",
        GroupBy::ErrorCode => "error_code::text",
        GroupBy::Hour => "to_char(date_trunc('hour', created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
    };
    let sql = format!(
        "SELECT {key} AS key, count(*) AS count FROM messages WHERE created_at >= $1 AND created_at < $2
         GROUP BY 1 ORDER BY 1"
    );
    sqlx::query_as(&sql).bind(since).bind(until).fetch_all(pool).await
}

/// Delivered and terminal counts in a window, for the delivery rate.
pub async fn delivery_counts(
    pool: &PgPool,
    since: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FILTER (WHERE smsflow_status_is_terminal(status))
         FROM messages WHERE created_at >= $1 AND created_at < $2",
    )
    .bind(since)
    .bind(until)
    .fetch_one(pool)
    .await
}

#[derive(Debug, Clone, Default)]
pub struct InboundFilter {
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub after: Option<(OffsetDateTime, String)>,
    pub limit: i64,
}

pub async fn inbound(pool: &PgPool, filter: &InboundFilter) -> Result<Vec<InboundSms>, sqlx::Error> {
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT message_uuid, sender, recipient, body, message_type, units, intent, received_at FROM inbound_messages WHERE TRUE",
    );
    if let Some(sender) = &filter.sender {
        q.push(" AND sender = ").push_bind(sender);
    }
    if let Some(recipient) = &filter.recipient {
        q.push(" AND recipient = ").push_bind(recipient);
    }
    if let Some(since) = filter.since {
        q.push(" AND received_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        q.push(" AND received_at < ").push_bind(until);
    }
    if let Some((received_at, uuid)) = &filter.after {
        q.push(" AND (received_at, message_uuid) < (").push_bind(*received_at).push(", ").push_bind(uuid).push(")");
    }
    q.push(" ORDER BY received_at DESC, message_uuid DESC LIMIT ").push_bind(filter.limit);
    q.build_query_as().fetch_all(pool).await
}

/// One opt-out: `recipient` receives nothing from `sender` (`*`: from any of our numbers).
#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
#[schema(as = OptOut)]
pub struct OptOutRow {
    pub recipient: String,
    pub sender: String,
    /// What added it: `keyword` (STOP), `intent` (Plivo's opt-out intent), `error_code` (a
    /// carrier's opt-out error) or `operator` (this API).
    pub source: String,
    pub message_uuid: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

pub async fn opt_outs(pool: &PgPool, recipient: &str) -> Result<Vec<OptOutRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT recipient, sender, source, message_uuid, created_at FROM opt_outs WHERE recipient = $1 ORDER BY sender",
    )
    .bind(recipient)
    .fetch_all(pool)
    .await
}

/// An operator's opt-out (the API's only write: operators manage the suppression list).
pub async fn put_opt_out(pool: &PgPool, recipient: &str, sender: &str) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO opt_outs (recipient, sender, source) VALUES ($1, $2, 'operator') ON CONFLICT (recipient, sender) DO NOTHING",
    )
    .bind(recipient)
    .bind(sender)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

pub async fn delete_opt_outs(pool: &PgPool, recipient: &str, sender: Option<&str>) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM opt_outs WHERE recipient = $1 AND ($2::text IS NULL OR sender = $2)")
        .bind(recipient)
        .bind(sender)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
