//! Signed webhooks: each status event of a message that has a callback URL, POSTed to that URL
//! and signed per Standard Webhooks (`shared::webhook`). The event relay hands each one over as
//! a job on the webhook stream, so delivery retries go through the broker's delay ladder (no
//! worker sleeps on a failing receiver) and end in the dead-letter queue after the last rung.
//!
//! A receiver gets the event's JSON, exactly what AMQP subscribers get, with `webhook-id` set
//! to the event id (the same on every attempt: receivers deduplicate on it). Every attempt is
//! recorded in `webhook_attempts` and shown by `GET /v1/messages/{id}`.
//!
//! Outbound requests follow no redirect, use no proxy, time out after `webhooks.timeout_ms`
//! and, unless `webhooks.allow_private_addresses`, refuse every address that is not public —
//! checked on the addresses a name resolves to, so a public name pointing inside is refused
//! too. At most `webhooks.per_endpoint_concurrency` requests go to one endpoint at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use reqwest::dns::{Name, Resolve, Resolving};
use secrecy::ExposeSecret as _;
use shared::amqp::contracts::WebhookJob;
use shared::amqp::headers::get_int;
use shared::amqp::topology::{DEFERRAL_COUNT_HEADER, RETRY_COUNT_HEADER};
use shared::amqp::{Stream, Topology};
use shared::config::WorkerSettings;
use shared::webhook::{ID_HEADER, SIGNATURE_HEADER, SigningKey, TIMESTAMP_HEADER, signature_header};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, DeadReason, Disposition, Rerouter, RetryCause, Session, SessionEnd};

/// A webhook whose endpoint has no free slot goes round the retry ladder instead of holding a
/// prefetch slot (rung 1, then 2, … as it is deferred again), without using an attempt; after
/// this many deferrals it waits for a slot, so it cannot be deferred forever.
const MAX_DEFERRALS: i64 = 10;
/// How long recording an attempt may take: the attempt happened whatever the database says.
const RECORD_TIMEOUT: Duration = Duration::from_secs(1);

/// What one attempt came to; its `label` is stored and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx.
    Delivered { status: u16 },
    /// The receiver answered something else (a redirect is not followed: it is an answer too).
    Rejected { status: u16 },
    /// No answer: refused, reset, TLS, DNS, or the timeout.
    Unreachable { error: String },
    /// The URL reaches an address that is not public, and that is not allowed.
    RefusedAddress { reason: String },
}

impl AttemptOutcome {
    pub const LABELS: [&'static str; 4] = ["delivered", "rejected", "unreachable", "refused_address"];

    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => Self::LABELS[0],
            Self::Rejected { .. } => Self::LABELS[1],
            Self::Unreachable { .. } => Self::LABELS[2],
            Self::RefusedAddress { .. } => Self::LABELS[3],
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Self::Delivered { status } | Self::Rejected { status } => Some(*status),
            _ => None,
        }
    }

    fn error(&self) -> Option<String> {
        match self {
            Self::Delivered { .. } => None,
            Self::Rejected { status } => Some(format!("the receiver answered {status}")),
            Self::Unreachable { error } => Some(error.clone()),
            Self::RefusedAddress { reason } => Some(reason.clone()),
        }
    }

    /// What the job's delivery becomes.
    fn disposition(&self) -> Disposition {
        match self {
            Self::Delivered { .. } => Disposition::Done,
            // 410 Gone: the receiver says it wants no more (as Standard Webhooks senders read it).
            Self::Rejected { status: 410 } => Disposition::Dead(DeadReason::WebhookRefused(
                "the receiver answered 410 Gone: it accepts no more webhooks".into(),
            )),
            Self::Rejected { .. } | Self::Unreachable { .. } => {
                Disposition::retry(RetryCause::Webhook(self.error().unwrap_or_default()))
            }
            // Sending again reaches the same address.
            Self::RefusedAddress { reason } => Disposition::Dead(DeadReason::WebhookRefused(reason.clone())),
        }
    }
}

/// Whether an address is one a webhook may reach without `allow_private_addresses`: not
/// loopback, private, link-local, shared (CGNAT), unspecified, broadcast, multicast, reserved
/// or documentation space, nor such an IPv4 address carried inside IPv6 (mapped, compatible,
/// NAT64, 6to4), nor an IPv6 range that tunnels or is site-local.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::/96, 64:ff9b:1::/48): a DNS64
            // resolver turns a private A record into one of these.
            if s[..6] == [0; 6] || (s[0] == 0x64 && s[1] == 0xff9b) {
                return is_public(IpAddr::V4(embedded(s[6], s[7])));
            }
            // 6to4 carries its IPv4 address in the second and third groups.
            if s[0] == 0x2002 {
                return is_public(IpAddr::V4(embedded(s[1], s[2])));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed inside)
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

/// The resolver's refusal, found again in the request's error chain.
#[derive(Debug)]
struct NotPublic(String);

impl std::fmt::Display for NotPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotPublic {}

/// Resolves names as the system does and keeps only public addresses.
struct PublicAddressesOnly;

impl Resolve for PublicAddressesOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = resolved.iter().copied().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() && !resolved.is_empty() {
                let reason = format!("{host} resolves to no public address");
                return Err(Box::new(NotPublic(reason)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Where a webhook goes, as it may be shown and stored: scheme, host and port only. A path
/// or query may hold the receiver's secret (Slack-style URLs keep it in the path).
pub fn endpoint_of(url: &reqwest::Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{}://{}{port}", url.scheme(), url.host_str().unwrap_or_default())
}

pub struct WebhookPipeline {
    topology: Topology,
    pool: PgPool,
    rerouter: Rerouter,
    consuming: Arc<AtomicBool>,
    concurrency: u16,
    per_endpoint: usize,
    allow_private: bool,
    amqp: shared::config::AmqpSettings,
    keys: Vec<SigningKey>,
    http: reqwest::Client,
    /// One semaphore per endpoint (scheme, host, port) that has had a webhook.
    endpoints: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl WebhookPipeline {
    pub fn new(
        settings: &WorkerSettings,
        topology: Topology,
        pool: PgPool,
        rerouter: Rerouter,
        consuming: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let webhooks = &settings.webhooks;
        let keys = webhooks
            .secrets
            .iter()
            .map(|s| SigningKey::parse(s.expose_secret()).map_err(|e| anyhow::anyhow!("webhooks.secrets: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if keys.is_empty() {
            tracing::warn!("webhooks.secrets is empty: send jobs' callback URLs will not be called");
        }
        let timeout = Duration::from_millis(webhooks.timeout_ms);
        let mut http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names itself, past the address check.
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .user_agent(concat!("smsflow-webhooks/", env!("CARGO_PKG_VERSION")));
        if !webhooks.allow_private_addresses {
            http = http.dns_resolver(Arc::new(PublicAddressesOnly));
        }
        Ok(Self {
            topology,
            pool,
            rerouter,
            consuming,
            concurrency: webhooks.concurrency,
            per_endpoint: webhooks.per_endpoint_concurrency.into(),
            allow_private: webhooks.allow_private_addresses,
            amqp: settings.amqp.clone(),
            keys,
            http: http.build()?,
            endpoints: Mutex::new(HashMap::new()),
        })
    }

    /// Consumes webhook jobs until shutdown; `webhooks.concurrency` are in flight at once.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        broker::consume_with_reconnect(
            &self.amqp,
            &self.topology,
            Stream::Webhook,
            self.concurrency,
            &self.consuming,
            &shutdown,
            |session| Box::pin(self.clone().consume(session, shutdown.clone())),
        )
        .await
    }

    async fn consume(self: Arc<Self>, session: &mut Session, shutdown: CancellationToken) -> SessionEnd {
        let queue = self.topology.queue(Stream::Webhook);
        broker::consume_concurrently(session, &shutdown, &queue, |delivery| {
            let pipeline = self.clone();
            async move { pipeline.handle(delivery).await }
        })
        .await
    }

    /// Delivers one job and disposes of it; an error (the broker) leaves it unacked.
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
        let (job, url) = match self.deliverable(&delivery.data) {
            Ok(deliverable) => deliverable,
            Err(reason) => return self.rerouter.dispose(Stream::Webhook, &delivery, Disposition::Dead(reason)).await,
        };
        let endpoint = self.endpoint_semaphore(&url);
        let _slot = match endpoint.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let deferrals = get_int(delivery.properties.headers().as_ref(), DEFERRAL_COUNT_HEADER).unwrap_or(0);
                if deferrals < MAX_DEFERRALS && self.rerouter.defer(Stream::Webhook, &delivery, deferrals + 1).await? {
                    metrics::counter!("smsflow_webhook_deferrals_total").increment(1);
                    return Ok(());
                }
                // Deferred enough (or no ladder to defer through): wait for the endpoint.
                endpoint.acquire_owned().await?
            }
        };
        self.attempt(&delivery, &job, &url).await
    }

    /// The job and the URL to call, or why it can never be delivered.
    fn deliverable(&self, payload: &[u8]) -> Result<(WebhookJob, reqwest::Url), DeadReason> {
        let job = parse(payload)?;
        tracing::Span::current().record("smsflow.message_id", tracing::field::display(job.message_id));
        if self.keys.is_empty() {
            let reason = "no webhook signing secret is configured (webhooks.secrets)";
            return Err(DeadReason::WebhookRefused(reason.into()));
        }
        match reqwest::Url::parse(&job.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => Ok((job, url)),
            _ => Err(DeadReason::WebhookRefused("the callback is not an http(s) URL with a host".into())),
        }
    }

    async fn attempt(&self, delivery: &Delivery, job: &WebhookJob, url: &reqwest::Url) -> anyhow::Result<()> {
        let attempt = get_int(delivery.properties.headers().as_ref(), RETRY_COUNT_HEADER).unwrap_or(0) + 1;
        let started = Instant::now();
        let outcome = self.post(job, url).await;
        let elapsed = started.elapsed();
        metrics::counter!("smsflow_webhook_attempts_total", "outcome" => outcome.label()).increment(1);
        metrics::histogram!("smsflow_webhook_duration_seconds", "outcome" => outcome.label())
            .record(elapsed.as_secs_f64());
        tracing::info!(
            message_id = %job.message_id,
            event_id = %job.event.id,
            attempt,
            outcome = outcome.label(),
            status = outcome.status(),
            "webhook attempt"
        );
        // The attempt happened whatever the database says: an outage loses its record, never
        // the delivery's progress (recording it again would mean calling the receiver again).
        let recording = record_attempt(&self.pool, job, attempt, url, &outcome, elapsed);
        let error = match tokio::time::timeout(RECORD_TIMEOUT, recording).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {} ms", RECORD_TIMEOUT.as_millis())),
        };
        if let Some(error) = error {
            metrics::counter!("smsflow_webhook_attempts_unrecorded_total").increment(1);
            tracing::warn!(error, message_id = %job.message_id, "webhook attempt not recorded");
        }
        self.rerouter.dispose(Stream::Webhook, delivery, outcome.disposition()).await
    }

    /// The slots of the URL's endpoint (scheme, host, port). Only endpoints with a webhook in
    /// flight are kept: the map never outgrows the webhooks in progress.
    fn endpoint_semaphore(&self, url: &reqwest::Url) -> Arc<Semaphore> {
        let host = url.host_str().unwrap_or_default();
        let key = format!("{}://{host}:{}", url.scheme(), url.port_or_known_default().unwrap_or(0));
        let mut endpoints = self.endpoints.lock().expect("endpoint map");
        endpoints.retain(|_, slots| Arc::strong_count(slots) > 1);
        endpoints.entry(key).or_insert_with(|| Arc::new(Semaphore::new(self.per_endpoint))).clone()
    }

    /// One signed POST of the event.
    async fn post(&self, job: &WebhookJob, url: &reqwest::Url) -> AttemptOutcome {
        if !self.allow_private
            && let Some(ip) = literal_ip(url)
            && !is_public(ip)
        {
            return AttemptOutcome::RefusedAddress { reason: format!("{ip} is not a public address") };
        }
        let body = serde_json::to_vec(&job.event).expect("an event serializes");
        let id = job.event.id.to_string();
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let request = self
            .http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, &id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature_header(&self.keys, &id, timestamp, &body))
            .body(body);
        match request.send().await {
            Ok(answer) if answer.status().is_success() => {
                AttemptOutcome::Delivered { status: answer.status().as_u16() }
            }
            Ok(answer) => AttemptOutcome::Rejected { status: answer.status().as_u16() },
            Err(error) => match refusal_in(&error) {
                Some(reason) => AttemptOutcome::RefusedAddress { reason },
                None => AttemptOutcome::Unreachable { error: crate::send::plivo::describe(&error) },
            },
        }
    }
}

/// The address a URL names directly (no resolver is asked for it).
fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    url.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// The resolver's refusal, if that is why the request failed.
fn refusal_in(error: &reqwest::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(inner) = cause {
        if let Some(refused) = inner.downcast_ref::<NotPublic>() {
            return Some(refused.0.clone());
        }
        cause = inner.source();
    }
    None
}

pub fn parse(payload: &[u8]) -> Result<WebhookJob, DeadReason> {
    let job: WebhookJob = serde_json::from_slice(payload)
        .map_err(|e| DeadReason::NotJson(format!("not a webhook job: {}", shared::redact::json_error(&e))))?;
    if job.schema != WebhookJob::SCHEMA || job.version != WebhookJob::VERSION {
        return Err(DeadReason::Schema(format!("unsupported schema {:?} version {}", job.schema, job.version)));
    }
    Ok(job)
}

async fn record_attempt(
    pool: &PgPool,
    job: &WebhookJob,
    attempt: i64,
    url: &reqwest::Url,
    outcome: &AttemptOutcome,
    elapsed: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_attempts
             (message_id, event_id, event_type, attempt, endpoint, outcome, status_code, error, duration_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(job.message_id)
    .bind(job.event.id)
    .bind(&job.event.kind)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .bind(endpoint_of(url))
    .bind(outcome.label())
    .bind(outcome.status().map(i32::from))
    .bind(outcome.error())
    .bind(i32::try_from(elapsed.as_millis()).unwrap_or(i32::MAX))
    .execute(pool)
    .await
    .map(|_| ())
}

/// Every attempt series at zero from the start (an alert on `increase()` sees the first).
pub fn register_metrics() {
    for outcome in AttemptOutcome::LABELS {
        metrics::counter!("smsflow_webhook_attempts_total", "outcome" => outcome).increment(0);
    }
    metrics::counter!("smsflow_webhook_deferrals_total").increment(0);
    metrics::counter!("smsflow_webhook_attempts_unrecorded_total").increment(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::7f00:1",
            "64:ff9b::a00:5",
            "64:ff9b:1::a00:5",
            "2002:a00:1::1",
            "2002:7f00:1::",
            "fec0::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
            "192.0.0.8",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private} is not public");
        }
        for public in
            ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
        {
            assert!(is_public(public.parse().unwrap()), "{public} is public");
        }
    }

    #[test]
    fn the_stored_endpoint_never_holds_the_path_query_or_credentials() {
        let url = reqwest::Url::parse("https://user:pw@hooks.example.com:8443/sms/status?token=s3cret").unwrap();
        assert_eq!(endpoint_of(&url), "https://hooks.example.com:8443");
    }

    #[test]
    fn rejected_and_unreachable_are_retried_and_a_refused_address_is_not() {
        assert_eq!(AttemptOutcome::Delivered { status: 204 }.disposition(), Disposition::Done);
        assert!(matches!(AttemptOutcome::Rejected { status: 500 }.disposition(), Disposition::Retry { .. }));
        assert!(matches!(AttemptOutcome::Rejected { status: 302 }.disposition(), Disposition::Retry { .. }));
        let gone = AttemptOutcome::Rejected { status: 410 }.disposition();
        assert!(matches!(gone, Disposition::Dead(DeadReason::WebhookRefused(_))), "410 Gone stops at once");
        let unreachable = AttemptOutcome::Unreachable { error: "timed out".into() };
        assert!(matches!(unreachable.disposition(), Disposition::Retry { .. }));
        let refused = AttemptOutcome::RefusedAddress { reason: "10.0.0.1 is not a public address".into() };
        assert!(matches!(refused.disposition(), Disposition::Dead(DeadReason::WebhookRefused(_))));
    }
}
