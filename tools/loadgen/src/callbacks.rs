//! Signed Plivo status callbacks against an ingress: throughput, answer codes and ack latency,
//! then the drain into PostgreSQL. Signing happens before the clock starts, so the tool
//! measures the service, not itself.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use shared::plivo::callback::StatusCallback;
use shared::plivo::signature::SignedCallback;

use crate::wire::{Connection, PreparedRequest, Target};

#[derive(Debug, Clone, clap::Args)]
pub struct CallbackLoad {
    /// Where to send: the ingress itself, over plain http:// (`sign` also takes https://).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingress: String,
    /// The public base URL the ingress verifies against (defaults to --ingress).
    #[arg(long)]
    pub public_base_url: Option<String>,
    /// The Plivo auth token the ingress is configured with.
    #[arg(long, env = "SMSFLOW_PLIVO__AUTH_TOKEN")]
    pub auth_token: String,
    /// Callbacks to send (three statuses per message, plus duplicates).
    #[arg(long, default_value_t = 30_000)]
    pub count: usize,
    /// Keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Requests per second in total; 0 sends as fast as the service answers.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Share of callbacks sent twice (as Plivo retries would).
    #[arg(long, default_value_t = 0.05)]
    pub duplicate_share: f64,
    /// Share of messages whose callbacks are sent in reverse order.
    #[arg(long, default_value_t = 0.1)]
    pub out_of_order_share: f64,
    /// PostgreSQL URL: when given, waits until every acknowledged event is stored.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Longest wait for the drain.
    #[arg(long, default_value_t = 300)]
    pub drain_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CallbackReport {
    pub sent: usize,
    pub answers: BTreeMap<String, u64>,
    pub transport_errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub latency_ms: LatencyMs,
    /// Distinct callbacks that got a 200.
    pub acknowledged_events: usize,
    pub stored_events: Option<i64>,
    pub lost_events: Option<i64>,
    /// From the last 200 to the last event committed.
    pub drain_after_last_ack_seconds: Option<f64>,
    /// Acknowledged events per second from the first request to the last commit.
    pub end_to_end_events_per_second: Option<f64>,
}

struct Prepared {
    signed: SignedCallback,
    /// (MessageUUID, Sequence): what one stored event is.
    event: (String, u32),
}

/// A realistic Plivo status callback's fields (about 600 bytes as JSON).
pub fn plivo_fields(message_uuid: &str, status: &str, sequence: u32) -> Vec<(String, String)> {
    StatusCallback {
        message_uuid,
        status,
        from: "14155559999",
        to: "14155552671",
        sequence,
        error_code: (status == "undelivered").then_some(30),
        message_time: "2026-11-27 10:00:00.000001",
        queued_time: "2026-11-27 10:00:00.100001",
        sent_time: if sequence >= 2 { "2026-11-27 10:00:01.000001" } else { "" },
        delivery_report_time: if sequence >= 3 { "2026-11-27 10:00:05.000001" } else { "" },
        requester_ip: "203.0.113.17",
    }
    .fields()
}

/// The run's callbacks, signed. Message UUIDs carry `run_id` so the drain counts only them.
fn prepare(load: &CallbackLoad, run_id: &str) -> anyhow::Result<Vec<Prepared>> {
    let public = load.public_base_url.as_deref().unwrap_or(&load.ingress);
    let url = format!("{}/plivo/callback", public.trim_end_matches('/'));
    let messages = load.count.div_ceil(3).max(1);
    let mut prepared = Vec::with_capacity(load.count);
    'outer: for m in 0..messages {
        let uuid = format!("lg-{run_id}-{m:08}");
        let last = if m % 10 == 0 { "undelivered" } else { "delivered" };
        let mut statuses = vec![("queued", 1), ("sent", 2), (last, 3)];
        if rand::random::<f64>() < load.out_of_order_share {
            statuses.reverse();
        }
        for (status, sequence) in statuses {
            let params = plivo_fields(&uuid, status, sequence);
            let copies = if rand::random::<f64>() < load.duplicate_share { 2 } else { 1 };
            for _ in 0..copies {
                if prepared.len() == load.count {
                    break 'outer;
                }
                let signed = SignedCallback::new(&load.auth_token, false, &url, &params, &SignedCallback::nonce())?;
                prepared.push(Prepared { signed, event: (uuid.clone(), sequence) });
            }
        }
    }
    Ok(prepared)
}

pub async fn run(load: &CallbackLoad) -> anyhow::Result<CallbackReport> {
    let target = Target::parse(&load.ingress)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let prepared = prepare(load, &run_id)?;
    let requests =
        prepared.iter().map(|item| PreparedRequest::new(&target, &item.signed)).collect::<Result<Vec<_>, _>>()?;
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let progress = crate::progress::Progress::new(prepared.len());
    let shown = progress.show();
    let mut tasks = Vec::new();
    for _ in 0..load.connections.max(1) {
        let (requests, next, progress) = (requests.clone(), next.clone(), progress.clone());
        let mut connection = Connection::new(&target)?;
        let rate = load.rate;
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut answers: BTreeMap<String, u64> = BTreeMap::new();
            let mut errors = 0u64;
            let mut acked: Vec<usize> = Vec::new();
            let mut last_ack = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else { break };
                if rate > 0.0 {
                    tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
                }
                let sent_at = Instant::now();
                let answer = connection.send(request).await;
                let micros = sent_at.elapsed().as_micros() as u64;
                match answer {
                    Ok(status) => {
                        let status = status.as_u16();
                        progress.record(status == 200);
                        latency.record(micros.max(1))?;
                        *answers.entry(status.to_string()).or_default() += 1;
                        if status == 200 {
                            acked.push(i);
                            last_ack = Some(Instant::now());
                        }
                    }
                    Err(error) => {
                        if errors == 0 {
                            eprintln!("no answer on a connection (only its first failure is shown): {error:#}");
                        }
                        progress.record(false);
                        errors += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>((latency, answers, errors, acked, last_ack))
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut transport_errors = 0;
    let mut acknowledged: HashSet<(String, u32)> = HashSet::new();
    let mut last_ack: Option<Instant> = None;
    for task in tasks {
        let (h, a, e, acked, last) = task.await??;
        latency.add(h)?;
        for (k, v) in a {
            *answers.entry(k).or_default() += v;
        }
        transport_errors += e;
        acknowledged.extend(acked.into_iter().map(|i| prepared[i].event.clone()));
        last_ack = last_ack.max(last);
    }
    drop(shown);
    let seconds = started.elapsed().as_secs_f64();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let mut report = CallbackReport {
        sent: prepared.len(),
        answers,
        transport_errors,
        seconds,
        requests_per_second: prepared.len() as f64 / seconds,
        latency_ms: LatencyMs {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: latency.max() as f64 / 1000.0,
        },
        acknowledged_events: acknowledged.len(),
        stored_events: None,
        lost_events: None,
        drain_after_last_ack_seconds: None,
        end_to_end_events_per_second: None,
    };
    if let Some(database_url) = &load.database_url {
        let drain = wait_for_drain(database_url, &run_id, acknowledged.len(), load.drain_timeout_secs).await?;
        let stored_set: HashSet<(String, u32)> = drain.events.into_iter().collect();
        report.stored_events = Some(drain.stored);
        report.lost_events = Some(acknowledged.difference(&stored_set).count() as i64);
        report.drain_after_last_ack_seconds =
            last_ack.map(|t| drain.drained_at.saturating_duration_since(t).as_secs_f64());
        report.end_to_end_events_per_second =
            Some(drain.stored as f64 / drain.drained_at.duration_since(started).as_secs_f64());
    }
    Ok(report)
}

/// What PostgreSQL holds of a run once the drain ended.
pub struct Drain {
    /// Events stored under the run's message UUIDs.
    pub stored: i64,
    /// When the count reached the expected number (or the wait gave up).
    pub drained_at: Instant,
    /// (MessageUUID, Sequence) of every stored event.
    pub events: Vec<(String, u32)>,
}

/// Waits until `expected` events of the run `run_id` are stored (or `timeout_secs` passed).
pub async fn wait_for_drain(
    database_url: &str,
    run_id: &str,
    expected: usize,
    timeout_secs: u64,
) -> anyhow::Result<Drain> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(database_url).await?;
    let pattern = format!("lg-{run_id}-%");
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let mut stored: i64;
    loop {
        stored = sqlx::query_scalar("SELECT count(*) FROM message_events WHERE message_uuid LIKE $1")
            .bind(&pattern)
            .fetch_one(&pool)
            .await?;
        if stored >= expected as i64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_at = Instant::now();
    let rows: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT message_uuid, sequence FROM message_events WHERE message_uuid LIKE $1")
            .bind(&pattern)
            .fetch_all(&pool)
            .await?;
    let events = rows.into_iter().map(|(u, s)| (u, s.unwrap_or(0) as u32)).collect();
    Ok(Drain { stored, drained_at, events })
}

/// Pre-signed callbacks for an independent load generator (wrk with `tools/loadgen/wrk/callbacks.lua`).
#[derive(Debug, Clone, Serialize)]
pub struct SignedFiles {
    /// Message UUIDs start `lg-{run_id}-`: `drain --run-id` counts them.
    pub run_id: String,
    pub requests: usize,
    /// `{prefix}.0` … `{prefix}.{threads - 1}`: one file per wrk thread.
    pub prefix: String,
    pub threads: usize,
    pub bytes: u64,
}

/// Writes the run's callbacks, signed, as whole HTTP/1.1 requests (each followed by a NUL
/// byte, which no request holds), dealt round-robin into one file per wrk thread: a thread
/// then only reads its own share before the run, and sends the bytes as they are. Every
/// callback is distinct (no duplicates), so each 2xx is one event the drain must find.
pub fn write_signed(load: &CallbackLoad, prefix: &str, threads: usize) -> anyhow::Result<SignedFiles> {
    use std::io::Write as _;
    anyhow::ensure!(threads > 0, "--threads must be at least 1");
    let target = Target::parse(&load.ingress)?;
    let (host, path) = (&target.host, target.callback_path());
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let load = CallbackLoad { duplicate_share: 0.0, ..load.clone() };
    let prepared = prepare(&load, &run_id)?;
    let mut files = (0..threads)
        .map(|i| Ok(std::io::BufWriter::new(std::fs::File::create(format!("{prefix}.{i}"))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut bytes = 0;
    for (i, item) in prepared.iter().enumerate() {
        let mut request = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
        for (name, value) in item.signed.wire_headers() {
            request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        let body = item.signed.form.as_deref().unwrap_or_default();
        request.extend_from_slice(format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes());
        anyhow::ensure!(!request.contains(&0), "a request holds a NUL byte");
        request.push(0);
        bytes += request.len() as u64;
        files[i % threads].write_all(&request)?;
    }
    for file in &mut files {
        file.flush()?;
    }
    Ok(SignedFiles { run_id, requests: prepared.len(), prefix: prefix.to_owned(), threads, bytes })
}
