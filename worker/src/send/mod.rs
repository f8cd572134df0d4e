//! Send jobs → Plivo's Send Message API, at most once per job by default.
//!
//! Per job: record it (`accepted`) → opt-out check → wait for the sender's rate → claim it
//! (`accepted` → `sending`, which only one delivery can do) → call Plivo → record the outcome →
//! ack. A redelivered job found in `sending` means a worker stopped during the call: the outcome
//! is unknown, so it is marked `unknown` and not sent again (unless the operator chose
//! at-least-once).

pub mod plivo;
pub mod ratelimit;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use backon::Retryable as _;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use shared::amqp::contracts::SendJob;
use shared::amqp::headers::{SCHEMA_VERSION_HEADER, get_int, get_str};
use shared::amqp::topology::{PLIVO_ACCEPTED_HEADER, REPLAY_COUNT_HEADER, RETRY_COUNT_HEADER};
use shared::amqp::{Stream, Topology};
use shared::config::{DeliveryGuarantee, WorkerSettings};
use shared::domain::MessageStatus;
use shared::domain::send::ValidSend;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use self::plivo::{PlivoClient, SendOutcome};
use self::ratelimit::SenderRateLimiter;
use crate::broker::{self, DeadReason, Disposition, Rerouter, RetryCause, Session, SessionEnd};
use crate::storage::sending::{self as store, Recorded};

/// The values of `smsflow_send_outcomes_total`'s `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Submitted,
    /// Plivo refused the message (a 4xx other than 429): it ends `failed` at once.
    Refused,
    /// Sent, or maybe sent, but the outcome could not be learned (at-most-once: not resent).
    Unknown,
    /// Never sent: every retry of the ladder used up.
    Failed,
    OptedOut,
    Duplicate,
    RetryScheduled,
    IdempotencyConflict,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Self::Submitted,
        Self::Refused,
        Self::Unknown,
        Self::Failed,
        Self::OptedOut,
        Self::Duplicate,
        Self::RetryScheduled,
        Self::IdempotencyConflict,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Refused => "refused",
            Self::Unknown => "unknown",
            Self::Failed => "failed",
            Self::OptedOut => "opted_out",
            Self::Duplicate => "duplicate",
            Self::RetryScheduled => "retry_scheduled",
            Self::IdempotencyConflict => "idempotency_conflict",
        }
    }

    fn count(self) {
        metrics::counter!("smsflow_send_outcomes_total", "outcome" => self.label()).increment(1);
    }
}

/// Every `smsflow_send_outcomes_total` series at zero from the start, so that an alert on the
/// first `unknown` fires.
pub fn register_metrics() {
    for outcome in Outcome::ALL {
        metrics::counter!("smsflow_send_outcomes_total", "outcome" => outcome.label()).increment(0);
    }
}

/// Why a job could not be handled to the end.
enum Handling {
    /// A database write failed: the job is retried later, or dead-lettered if it never can be.
    Database(sqlx::Error),
    /// The broker did not confirm a reroute: the job is not acked, the broker redelivers it.
    Broker(shared::amqp::PublishError),
    /// Its dead letter is confirmed but the row could not say so: not acked either.
    Unrecorded(sqlx::Error),
}

impl From<sqlx::Error> for Handling {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}

/// In-process retries of recording a submission (~10 s in all): the message is already sent.
const MARK_SUBMITTED_RETRIES: usize = 8;

pub struct SendPipeline {
    pub settings: WorkerSettings,
    pub topology: Topology,
    pub pool: PgPool,
    pub rerouter: Rerouter,
    pub plivo: PlivoClient,
    pub limiter: Arc<SenderRateLimiter>,
    pub consuming: Arc<AtomicBool>,
}

impl SendPipeline {
    /// Consumes send jobs until shutdown; `sending.concurrency` jobs are in progress at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let prefetch = self.settings.sending.concurrency;
        broker::consume_with_reconnect(
            &self.settings.amqp,
            &self.topology,
            Stream::Send,
            prefetch,
            &self.consuming,
            &shutdown,
            |session| Box::pin(self.clone().consume_jobs(session, shutdown.clone())),
        )
        .await
    }

    async fn consume_jobs(self: Arc<Self>, session: &mut Session, shutdown: CancellationToken) -> SessionEnd {
        // Jobs already handed to Plivo finish and record their outcome before this returns.
        let queue = self.topology.queue(Stream::Send);
        broker::consume_concurrently(session, &shutdown, &queue, |delivery| {
            let pipeline = self.clone();
            async move { pipeline.handle(delivery).await }
        })
        .await
    }

    /// Processes one job and disposes of it. Database trouble stays with this job: an outage
    /// sends it through the retry ladder, a refusal dead-letters it. Only broker errors (the job
    /// could not be rerouted or acked) end the session, and the broker then redelivers.
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
        let disposition = match self.process(&delivery).await {
            Ok(disposition) => disposition,
            Err(Handling::Database(e)) => crate::storage::disposition_of(e),
            // Not acked: the broker redelivers the job, and its row says what was done.
            Err(Handling::Broker(e)) => return Err(e.into()),
            Err(Handling::Unrecorded(e)) => return Err(anyhow::anyhow!("cannot record a dead-lettered job: {e}")),
        };
        self.rerouter.dispose(Stream::Send, &delivery, disposition).await
    }

    /// What to do with one job, having done what it asks (an error: a database write failed).
    async fn process(&self, delivery: &Delivery) -> Result<Disposition, Handling> {
        let job = match parse(delivery) {
            Ok(job) => job,
            Err(reason) => return Ok(Disposition::Dead(reason)),
        };
        let valid = match job.validate(&self.settings.plivo.default_sender) {
            Ok(valid) => valid,
            Err(e) => return Ok(Disposition::Dead(DeadReason::InvalidJob(format!("invalid send job: {e}")))),
        };
        let id = valid.id;
        tracing::Span::current().record("smsflow.message_id", tracing::field::display(id));
        if store::record_job(&self.pool, &valid).await? == Recorded::Conflict {
            Outcome::IdempotencyConflict.count();
            tracing::warn!(message_id = %id, "send job reuses an id with other content; dead-lettered");
            return Ok(Disposition::Dead(DeadReason::IdempotencyConflict(format!(
                "idempotency conflict: job id {id} was already used for a message with other content \
                 (recipient, sender, text or options); not sent"
            ))));
        }

        if store::is_opted_out(&self.pool, valid.to.as_str(), &valid.sender).await? {
            // Only a job nobody claimed is rejected: a redelivery of one that may have been
            // sent keeps its outcome, or becomes `unknown`, like any other redelivery.
            if !store::reject_unclaimed(&self.pool, id, "opted_out").await? {
                return self.not_claimed(delivery, &valid).await;
            }
            Outcome::OptedOut.count();
            tracing::info!(message_id = %id, to = %valid.to.masked(), "recipient opted out; not sent");
            return Ok(Disposition::Done);
        }

        let waited = self.limiter.acquire(valid.sender.as_str()).await;
        metrics::histogram!("smsflow_send_rate_limiter_wait_seconds").record(waited.as_secs_f64());
        if store::claim(&self.pool, id).await?.is_none() {
            return self.not_claimed(delivery, &valid).await;
        }
        let outcome = self.call_plivo(&valid).await;
        self.record(delivery, &valid, outcome).await
    }

    /// The job's row was not `accepted`: a duplicate, or this very delivery again after an
    /// interrupted attempt (redelivered by the broker, or back from the retry ladder).
    async fn not_claimed(&self, delivery: &Delivery, valid: &ValidSend) -> Result<Disposition, Handling> {
        let status = store::status_of(&self.pool, valid.id).await?;
        let headers = delivery.properties.headers().as_ref();
        if status == Some(MessageStatus::Sending)
            && let Some(message_uuid) = get_str(headers, PLIVO_ACCEPTED_HEADER)
        {
            // Plivo accepted it on an earlier attempt whose write did not get through.
            self.record_submitted(valid.id, Some(message_uuid).filter(|u| !u.is_empty())).await?;
            return Ok(Disposition::Done);
        }
        let seen_before = delivery.redelivered
            || [RETRY_COUNT_HEADER, REPLAY_COUNT_HEADER].iter().any(|h| get_int(headers, h).unwrap_or(0) > 0);
        if status == Some(MessageStatus::Sending) && seen_before {
            match self.settings.sending.delivery {
                DeliveryGuarantee::AtMostOnce => {
                    let reason = "a worker stopped during the Plivo call; not resent (at-most-once)";
                    store::mark_unknown(&self.pool, valid.id, reason).await?;
                    Outcome::Unknown.count();
                    tracing::warn!(message_id = %valid.id, "send outcome unknown: {reason}");
                }
                DeliveryGuarantee::AtLeastOnce if !self.rerouter.retries_exhausted(Stream::Send, delivery) => {
                    store::release_for_retry(&self.pool, valid.id, "resending after an interrupted call").await?;
                    return Ok(Disposition::retry(RetryCause::InterruptedCall));
                }
                DeliveryGuarantee::AtLeastOnce => {
                    // No retry left to resend it with: its outcome stays unknown (and it is
                    // dead-lettered for an operator to replay), never `accepted` for good.
                    let reason = "a worker stopped during the Plivo call, and no retry is left";
                    store::mark_unknown(&self.pool, valid.id, reason).await?;
                    Outcome::Unknown.count();
                    return Ok(Disposition::retry(RetryCause::InterruptedCall));
                }
            }
        } else {
            Outcome::Duplicate.count();
            let status = status.map_or("none", MessageStatus::as_str);
            tracing::info!(message_id = %valid.id, status, "duplicate send job; not sent again");
        }
        Ok(Disposition::Done)
    }

    /// Plivo has the message: a database blip must not turn it into `unknown` (or, at-least-once,
    /// into a second SMS), so the write is retried here first.
    async fn record_submitted(&self, id: uuid::Uuid, message_uuid: Option<&str>) -> Result<(), sqlx::Error> {
        let write = || store::mark_submitted(&self.pool, id, message_uuid);
        write
            .retry(crate::backoff::quick(Duration::from_millis(100), MARK_SUBMITTED_RETRIES))
            .when(crate::storage::is_transient)
            .notify(|e, wait| tracing::warn!(message_id = %id, error = %e, ?wait, "recording the submission failed; retrying"))
            .await?;
        Outcome::Submitted.count();
        if let Some(uuid) = message_uuid {
            tracing::Span::current().record("plivo.message_uuid", uuid);
        }
        tracing::info!(message_id = %id, message_uuid = message_uuid.unwrap_or(""), "submitted to Plivo");
        Ok(())
    }

    /// Calls Plivo, retrying in-process only what provably created no message.
    async fn call_plivo(&self, valid: &ValidSend) -> SendOutcome {
        let first_call = std::sync::atomic::AtomicBool::new(true);
        let attempt = || async {
            // The first call's rate token was taken before the claim; retries take their own.
            if !first_call.swap(false, std::sync::atomic::Ordering::Relaxed) {
                self.limiter.acquire(valid.sender.as_str()).await;
            }
            match self.plivo.send(valid).await {
                SendOutcome::NotSent { reason } => Err(reason),
                other => Ok(other),
            }
        };
        let retried = attempt
            .retry(crate::backoff::quick(Duration::from_millis(200), self.settings.sending.in_process_retries))
            .notify(
                |reason, wait| tracing::info!(message_id = %valid.id, reason, ?wait, "Plivo call not made; retrying"),
            )
            .await;
        retried.unwrap_or_else(|reason| SendOutcome::NotSent { reason })
    }

    /// Writes the outcome; the job is acked (or rerouted) only after it is committed.
    async fn record(
        &self,
        delivery: &Delivery,
        valid: &ValidSend,
        outcome: SendOutcome,
    ) -> Result<Disposition, Handling> {
        let id = valid.id;
        match outcome {
            SendOutcome::Accepted { message_uuid } => {
                match self.record_submitted(id, message_uuid.as_deref()).await {
                    Err(e) if crate::storage::is_transient(&e) => {
                        // The database is still away: the job goes round the retry ladder carrying
                        // Plivo's answer, and its redelivery records it instead of deciding the
                        // call was interrupted (which would be `unknown`, or a second SMS).
                        let accepted = AMQPValue::LongString(message_uuid.unwrap_or_default().into());
                        return Ok(Disposition::Retry {
                            cause: RetryCause::DatabaseUnavailable(e.to_string()),
                            headers: vec![(PLIVO_ACCEPTED_HEADER, accepted)],
                        });
                    }
                    other => other?,
                }
            }
            SendOutcome::Refused { status, error } => {
                store::mark_failed(&self.pool, id, &format!("Plivo refused the message ({status}): {error}")).await?;
                Outcome::Refused.count();
                tracing::warn!(message_id = %id, status, "Plivo refused the message");
            }
            SendOutcome::Unknown { reason } if self.settings.sending.delivery == DeliveryGuarantee::AtMostOnce => {
                store::mark_unknown(&self.pool, id, &reason).await?;
                Outcome::Unknown.count();
                tracing::warn!(message_id = %id, reason, "send outcome unknown; not resent (at-most-once)");
            }
            SendOutcome::NotSent { reason } | SendOutcome::Unknown { reason } => {
                if !self.rerouter.retries_exhausted(Stream::Send, delivery) {
                    store::release_for_retry(&self.pool, id, &reason).await?;
                    Outcome::RetryScheduled.count();
                    return Ok(Disposition::retry(RetryCause::Plivo(reason)));
                }
                // Out of retries: the job is dead-lettered (confirmed) before it is marked
                // `failed`, so a `failed` job always has its dead letter to replay. Until then
                // it stays `sending`: if this worker stops in between, the redelivery finds it
                // so and it ends `unknown`, never sent twice.
                let retry = Disposition::retry(RetryCause::Plivo(reason.clone()));
                self.rerouter.reroute(Stream::Send, delivery, retry).await.map_err(Handling::Broker)?;
                let gave_up = format!("gave up: {reason}");
                let write = || store::mark_failed(&self.pool, id, &gave_up);
                write
                    .retry(crate::backoff::quick(Duration::from_millis(100), MARK_SUBMITTED_RETRIES))
                    .when(crate::storage::is_transient)
                    .await
                    .map_err(Handling::Unrecorded)?;
                Outcome::Failed.count();
            }
        }
        Ok(Disposition::Done)
    }
}

fn parse(delivery: &Delivery) -> Result<SendJob, DeadReason> {
    let version = get_int(delivery.properties.headers().as_ref(), SCHEMA_VERSION_HEADER);
    if version.is_some_and(|v| v != i64::from(SendJob::VERSION)) {
        return Err(DeadReason::Schema(format!(
            "unsupported send job version {version:?} (expected {})",
            SendJob::VERSION
        )));
    }
    serde_json::from_slice::<SendJob>(&delivery.data)
        .map_err(|e| DeadReason::InvalidJob(format!("not a valid send job: {}", shared::redact::json_error(&e))))
}
