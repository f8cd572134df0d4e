//! A Plivo simulator, so nobody needs a Plivo account, a public URL or a tunnel to see smsflow
//! work, test it, or load it.
//!
//! It serves the part of Plivo's API the worker uses (`POST /v1/Account/{auth_id}/Message/`)
//! with Plivo's checks and answers, and for every accepted message plays a delivery story on the
//! message's `url`: form-encoded callbacks with Plivo's fields, each signed with V3 and a fresh
//! nonce, with Plivo's retry schedule when the target does not answer 2xx in time. It records
//! the ground truth and serves it (`GET /_sim/messages`, `GET /_sim/stats`) so tests and the
//! load tool can compare. Tests script Plivo's answers one request at a time
//! (`POST /_sim/script`) and read back what was asked of it (`GET /_sim/requests`).
#![forbid(unsafe_code)]

pub mod story;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::plivo::api::{ErrorResponse, SendMessageRequest, SendMessageResponse};
use shared::plivo::signature::SignedCallback;
use shared::ratelimit::TokenBucket;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::story::{Story, StoryWeights};

/// How the simulator behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    /// The Auth ID requests must use (path and basic-auth user).
    #[arg(long, env = "PLIVO_SIM_AUTH_ID", default_value = "MASIMULATOR000000001")]
    pub auth_id: String,
    /// The Auth Token: checks basic auth and signs callbacks (V3).
    #[arg(long, env = "PLIVO_SIM_AUTH_TOKEN")]
    pub auth_token: String,
    /// Send Message requests allowed per second before answering 429.
    #[arg(long, env = "PLIVO_SIM_RATE_LIMIT", default_value_t = 60.0)]
    pub rate_limit: f64,
    #[command(flatten)]
    pub weights: StoryWeights,
    /// Delay before each callback of a story (ms, before time scaling).
    #[arg(long, env = "PLIVO_SIM_LATENCY_MS", default_value_t = 500)]
    pub latency_ms: u64,
    /// Share of callbacks delivered twice (as Plivo retries would).
    #[arg(long, env = "PLIVO_SIM_DUPLICATE_SHARE", default_value_t = 0.05)]
    pub duplicate_share: f64,
    /// Share of stories whose callbacks arrive out of order.
    #[arg(long, env = "PLIVO_SIM_OUT_OF_ORDER_SHARE", default_value_t = 0.05)]
    pub out_of_order_share: f64,
    /// Multiplies every delay (latency, Plivo's 60/120/240 s retry schedule, the 8 s answer
    /// timeout): 0.01 plays a 7-minute retry schedule in 4 s.
    #[arg(long, env = "PLIVO_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
}

impl SimConfig {
    fn scaled(&self, ms: u64) -> Duration {
        Duration::from_secs_f64(ms as f64 * self.time_scale / 1000.0)
    }

    /// Plivo gives up on an answer after 8 s; scaled, but never below one second so a busy
    /// target is not mistaken for a dead one.
    fn answer_timeout(&self) -> Duration {
        self.scaled(8000).max(Duration::from_secs(1))
    }
}

/// Plivo's retry schedule for callbacks: after 60, 120 and 240 s (docs/plivo.md §2).
const RETRY_SCHEDULE_MS: [u64; 3] = [60_000, 120_000, 240_000];

/// One attempt to deliver a callback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    /// The HTTP status the target answered, or `None` when it did not answer in time.
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// A callback the simulator sent (or tried to).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallbackRecord {
    pub sequence: u32,
    pub status: String,
    pub error_code: Option<u32>,
    /// A second delivery of an earlier callback (same fields, new nonce).
    pub duplicate: bool,
    pub attempts: Vec<Attempt>,
    pub acknowledged: bool,
}

/// The ground truth of one message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimMessage {
    pub message_uuid: String,
    pub src: String,
    pub dst: String,
    pub url: String,
    pub method: String,
    pub story: String,
    pub final_status: String,
    pub error_code: Option<u32>,
    pub callbacks: Vec<CallbackRecord>,
    pub finished: bool,
    /// Sent by "another system": no Send Message request preceded it.
    pub external: bool,
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Stats {
    pub send_requests: u64,
    pub messages_accepted: u64,
    pub refused_unauthorized: u64,
    pub refused_invalid: u64,
    pub refused_rate_limited: u64,
    /// Requests answered with an injected fault (`/_sim/faults`).
    pub faulted: u64,
    pub callback_attempts: u64,
    pub callbacks_acknowledged: u64,
    pub callbacks_given_up: u64,
    pub stories_pending: u64,
    pub stories_finished: u64,
}

#[derive(Default)]
struct Counters {
    send_requests: AtomicU64,
    accepted: AtomicU64,
    unauthorized: AtomicU64,
    invalid: AtomicU64,
    rate_limited: AtomicU64,
    faulted: AtomicU64,
    callback_attempts: AtomicU64,
    acknowledged: AtomicU64,
    given_up: AtomicU64,
}

/// A fault the simulator plays on the Send Message API for a while (`POST /_sim/faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answer 500 without creating a message.
    ServerError,
    /// Answer 429 without creating a message.
    RateLimited,
    /// Create the message (its story plays) but answer only after `hold_ms`: the client times out.
    AcceptThenHang,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    fault: Option<Fault>,
    #[serde(default = "default_fault_ms")]
    for_ms: u64,
    #[serde(default = "default_hold_ms")]
    hold_ms: u64,
}

fn default_fault_ms() -> u64 {
    10_000
}

fn default_hold_ms() -> u64 {
    30_000
}

/// The answer to one future Send Message request (`POST /_sim/script` queues them, first in
/// first out, ahead of the configured behaviour once the request is authenticated), so a test
/// plays exactly the Plivo it needs: a 429 then a 202, a permanent error, a late answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScriptedAnswer {
    /// 2xx accepts the message (its story plays); anything else refuses it in Plivo's shape.
    pub status: u16,
    /// Plivo's `error` text for a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The `message_uuid` an accepted message gets instead of a fresh one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_uuid: Option<String>,
    /// Hold the answer this long (ms, not time-scaled): past the client's timeout, an accepted
    /// message exists but its sender never learns it.
    #[serde(default)]
    pub delay_ms: u64,
}

impl ScriptedAnswer {
    pub fn accept() -> Self {
        Self { status: 202, error: None, message_uuid: None, delay_ms: 0 }
    }

    pub fn refuse(status: u16, error: &str) -> Self {
        Self { status, error: Some(error.to_owned()), message_uuid: None, delay_ms: 0 }
    }
}

/// A Send Message request as the simulator received it (`GET /_sim/requests`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceivedRequest {
    /// The JSON body (`null` if it was not JSON).
    pub body: Value,
    /// The status the simulator answered with; `None` while it holds the answer, or if the
    /// client left before it came.
    pub answered: Option<u16>,
}

/// A request as logged on the hot path: its body as received (decoded only when listed), and
/// its arrival number, so that a late answer finds its request.
struct LoggedRequest {
    arrival: u64,
    body: axum::body::Bytes,
    answered: Option<u16>,
}

/// The most requests `GET /_sim/requests` keeps (the oldest are dropped): enough for any test,
/// bounded for a long load run.
const KEPT_REQUESTS: usize = 10_000;

struct Sim {
    faults: Mutex<Option<(Fault, std::time::Instant, u64)>>,
    script: Mutex<std::collections::VecDeque<ScriptedAnswer>>,
    requests: Mutex<std::collections::VecDeque<LoggedRequest>>,
    config: SimConfig,
    http: reqwest::Client,
    limiter: TokenBucket,
    messages: Mutex<HashMap<String, SimMessage>>,
    counters: Counters,
    shutdown: CancellationToken,
}

type Shared = Arc<Sim>;

/// The simulator's routes.
fn router(sim: Shared) -> Router {
    Router::new()
        .route("/v1/Account/{auth_id}/Message/", post(send_message))
        .route("/v1/Account/{auth_id}/Message", post(send_message))
        .route("/_sim/messages", get(list_messages))
        .route("/_sim/messages/{uuid}", get(one_message))
        .route("/_sim/stats", get(stats))
        .route("/_sim/external", post(external_story))
        .route("/_sim/inbound", post(inbound))
        .route("/_sim/faults", post(set_fault))
        .route("/_sim/script", post(add_to_script))
        .route("/_sim/requests", get(list_requests))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sim)
}

/// Serves until `shutdown`; stories in progress stop with it.
pub async fn run(config: SimConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(config.answer_timeout()).build()?;
    let limiter = TokenBucket::new(config.rate_limit, config.rate_limit.max(1.0));
    let sim = Arc::new(Sim {
        faults: Mutex::new(None),
        script: Mutex::default(),
        requests: Mutex::default(),
        config,
        http,
        limiter,
        messages: Mutex::new(HashMap::new()),
        counters: Counters::default(),
        shutdown: shutdown.clone(),
    });
    tracing::info!(address = %listener.local_addr()?, "Plivo simulator listening");
    axum::serve(listener, router(sim).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// A simulator running in this process, for tests: its URL and its control API (which panics
/// if the simulator does not answer). It stops when dropped.
pub struct Simulator {
    pub url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Simulator {
    pub async fn start(config: SimConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the simulator");
        let url = format!("http://{}", listener.local_addr().expect("simulator address"));
        let shutdown = CancellationToken::new();
        tokio::spawn(run(config, listener, shutdown.clone()));
        Self { url, http: reqwest::Client::new(), shutdown }
    }

    /// Queues answers for the next Send Message requests, in order.
    pub async fn script(&self, answers: &[ScriptedAnswer]) {
        let response = self.http.post(format!("{}/_sim/script", self.url)).json(answers).send().await;
        assert!(response.is_ok_and(|r| r.status() == StatusCode::NO_CONTENT), "the simulator took the script");
    }

    /// Every Send Message request so far (up to the last 10,000).
    pub async fn requests(&self) -> Vec<ReceivedRequest> {
        self.get("/_sim/requests").await
    }

    /// Plays `fault` for `for_ms` (`hold_ms`: how long an accepted answer is held).
    pub async fn set_fault(&self, fault: Fault, for_ms: u64, hold_ms: u64) {
        let body = json!({"fault": fault, "for_ms": for_ms, "hold_ms": hold_ms});
        let response = self.http.post(format!("{}/_sim/faults", self.url)).json(&body).send().await;
        assert!(response.is_ok_and(|r| r.status() == StatusCode::NO_CONTENT), "the simulator took the fault");
    }

    pub async fn stats(&self) -> Stats {
        self.get("/_sim/stats").await
    }

    pub async fn messages(&self) -> Vec<SimMessage> {
        self.get("/_sim/messages").await
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let response = self.http.get(format!("{}{path}", self.url)).send().await;
        let response = response.unwrap_or_else(|e| panic!("GET {path} from the simulator: {e}"));
        response.json().await.unwrap_or_else(|e| panic!("GET {path} from the simulator: {e}"))
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The JSON body of a control route (`/_sim/…`). A body that is missing or does not fit is
/// answered 400 with the shape the route expects, not only the parser's complaint.
struct Control<T>(T);

trait ControlBody: serde::de::DeserializeOwned {
    /// The body the route expects, as the README documents it.
    const SHAPE: &'static str;
}

impl ControlBody for Vec<ScriptedAnswer> {
    const SHAPE: &'static str = r#"[{"status": 202, "message_uuid"?: "…", "error"?: "…", "delay_ms"?: 0}, …]"#;
}

impl ControlBody for FaultRequest {
    const SHAPE: &'static str = r#"{"fault": "server_error" | "rate_limited" | "accept_then_hang" | null, "for_ms"?: 10000, "hold_ms"?: 30000}"#;
}

impl ControlBody for ExternalRequest {
    const SHAPE: &'static str = r#"{"url": "…", "src": "…", "dst": "…", "method"?: "POST", "story"?: "delivered"}"#;
}

impl ControlBody for InboundRequest {
    const SHAPE: &'static str = r#"{"url": "…", "from": "…", "to": "…", "text": "…", "intent"?: "optout"}"#;
}

impl<S: Send + Sync, T: ControlBody> axum::extract::FromRequest<S> for Control<T> {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(body)) => Ok(Control(body)),
            Err(rejection) => Err(plivo_error(
                StatusCode::BAD_REQUEST,
                &format!("expected a JSON body {} ({})", T::SHAPE, rejection.body_text()),
            )),
        }
    }
}

fn plivo_error(status: StatusCode, error: &str) -> Response {
    (status, Json(ErrorResponse { api_id: uuid::Uuid::new_v4().to_string(), error: error.into() })).into_response()
}

fn authorized(sim: &Sim, path_auth_id: &str, headers: &HeaderMap) -> bool {
    let Some(encoded) =
        headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
    let expected = format!("{}:{}", sim.config.auth_id, sim.config.auth_token);
    path_auth_id == sim.config.auth_id && decoded == expected.as_bytes()
}

async fn send_message(
    State(sim): State<Shared>,
    Path(auth_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let arrival = sim.counters.send_requests.fetch_add(1, Ordering::Relaxed);
    {
        // Recorded on arrival: a client that times out drops this handler before it answers.
        let mut requests = sim.requests.lock().unwrap_or_else(|e| e.into_inner());
        if requests.len() == KEPT_REQUESTS {
            requests.pop_front();
        }
        requests.push_back(LoggedRequest { arrival, body: body.clone(), answered: None });
    }
    let response = answer_send(&sim, &auth_id, &headers, &body).await;
    let mut requests = sim.requests.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(request) = requests.iter_mut().rev().find(|r| r.arrival == arrival) {
        request.answered = Some(response.status().as_u16());
    }
    response
}

async fn answer_send(sim: &Shared, auth_id: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    if !authorized(sim, auth_id, headers) {
        sim.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
        return plivo_error(StatusCode::UNAUTHORIZED, "Authentication credentials invalid");
    }
    let scripted = sim.script.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
    if let Some(answer) = &scripted
        && !(200..300).contains(&answer.status)
    {
        sim.counters.faulted.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(answer.delay_ms)).await;
        let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return plivo_error(status, answer.error.as_deref().unwrap_or("scripted error"));
    }
    if scripted.is_none() && sim.limiter.try_take().is_err() {
        sim.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
        return plivo_error(StatusCode::TOO_MANY_REQUESTS, "too many requests");
    }
    let fault = {
        let mut faults = sim.faults.lock().unwrap_or_else(|e| e.into_inner());
        match *faults {
            Some((fault, until, hold_ms)) if std::time::Instant::now() < until => Some((fault, hold_ms)),
            _ => {
                *faults = None;
                None
            }
        }
    };
    match fault {
        Some((Fault::ServerError, _)) => {
            sim.counters.faulted.fetch_add(1, Ordering::Relaxed);
            return plivo_error(StatusCode::INTERNAL_SERVER_ERROR, "internal server error");
        }
        Some((Fault::RateLimited, _)) => {
            sim.counters.faulted.fetch_add(1, Ordering::Relaxed);
            return plivo_error(StatusCode::TOO_MANY_REQUESTS, "too many requests");
        }
        _ => {}
    }
    let Ok(request) = serde_json::from_slice::<SendMessageRequest>(body) else {
        sim.counters.invalid.fetch_add(1, Ordering::Relaxed);
        return plivo_error(StatusCode::BAD_REQUEST, "invalid JSON body");
    };
    fn given(value: &Option<String>) -> Option<&str> {
        value.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }
    let (src, powerpack) = (given(&request.src), given(&request.powerpack_uuid));
    let missing = if src.is_none() && powerpack.is_none() {
        Some("src parameter is required (or powerpack_uuid)")
    } else if src.is_some() && powerpack.is_some() {
        Some("both src and powerpack_uuid cannot be specified")
    } else if request.dst.trim().is_empty() {
        Some("dst parameter is required")
    } else if request.text.trim().is_empty() {
        Some("text parameter is required")
    } else {
        None
    };
    if let Some(error) = missing {
        sim.counters.invalid.fetch_add(1, Ordering::Relaxed);
        return plivo_error(StatusCode::BAD_REQUEST, error);
    }
    let src = src.or(powerpack).unwrap_or_default().to_owned();
    let url = given(&request.url).map(str::to_owned);
    let method = given(&request.method).unwrap_or("POST").to_ascii_uppercase();
    let mut uuids = Vec::new();
    for dst in request.dst.split('<').map(str::trim).filter(|d| !d.is_empty()) {
        let scripted_uuid = scripted.as_ref().and_then(|a| a.message_uuid.clone()).filter(|_| uuids.is_empty());
        let message_uuid = scripted_uuid.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let story = Story::choose(&sim.config.weights);
        uuids.push(message_uuid.clone());
        sim.counters.accepted.fetch_add(1, Ordering::Relaxed);
        if let Some(url) = &url {
            start_story(sim, message_uuid, src.clone(), dst.to_owned(), url.clone(), method.clone(), story, false);
        }
    }
    let hold_ms = match (fault, &scripted) {
        (Some((Fault::AcceptThenHang, hold_ms)), _) => hold_ms,
        (_, Some(answer)) => answer.delay_ms,
        _ => 0,
    };
    if hold_ms > 0 {
        // The message exists and its story plays, but the answer comes late.
        sim.counters.faulted.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    }
    let api_id = uuid::Uuid::new_v4().to_string();
    let accepted = SendMessageResponse { api_id, message: "message(s) queued".into(), message_uuid: uuids };
    (StatusCode::ACCEPTED, Json(accepted)).into_response()
}

async fn add_to_script(State(sim): State<Shared>, Control(answers): Control<Vec<ScriptedAnswer>>) -> Response {
    if let Some(bad) = answers.iter().find(|a| !(200..=599).contains(&a.status)) {
        return plivo_error(StatusCode::BAD_REQUEST, &format!("status {} is not an HTTP answer (200-599)", bad.status));
    }
    sim.script.lock().unwrap_or_else(|e| e.into_inner()).extend(answers);
    StatusCode::NO_CONTENT.into_response()
}

async fn list_requests(State(sim): State<Shared>) -> Json<Vec<ReceivedRequest>> {
    let requests = sim.requests.lock().unwrap_or_else(|e| e.into_inner());
    Json(
        requests
            .iter()
            .map(|r| ReceivedRequest {
                body: serde_json::from_slice(&r.body).unwrap_or(Value::Null),
                answered: r.answered,
            })
            .collect(),
    )
}

async fn set_fault(State(sim): State<Shared>, Control(request): Control<FaultRequest>) -> StatusCode {
    let until = std::time::Instant::now() + Duration::from_millis(request.for_ms);
    *sim.faults.lock().unwrap_or_else(|e| e.into_inner()) = request.fault.map(|f| (f, until, request.hold_ms));
    StatusCode::NO_CONTENT
}

#[allow(clippy::too_many_arguments)]
fn start_story(
    sim: &Shared,
    message_uuid: String,
    src: String,
    dst: String,
    url: String,
    method: String,
    story: Story,
    external: bool,
) {
    let record = SimMessage {
        message_uuid: message_uuid.clone(),
        src,
        dst,
        url,
        method,
        story: story.name().to_owned(),
        final_status: story.final_status().to_owned(),
        error_code: story.error_code(),
        callbacks: Vec::new(),
        finished: false,
        external,
    };
    sim.messages.lock().unwrap_or_else(|e| e.into_inner()).insert(message_uuid.clone(), record);
    let sim = sim.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = play(&sim, &message_uuid, story) => {}
            () = sim.shutdown.cancelled() => {}
        }
    });
}

/// Sends every callback of the story, with duplicates and disorder as configured.
async fn play(sim: &Shared, message_uuid: &str, story: Story) {
    let message = sim.messages.lock().unwrap_or_else(|e| e.into_inner())[message_uuid].clone();
    let callbacks = story.callbacks(rand::random::<f64>() < sim.config.out_of_order_share);
    for callback in callbacks {
        tokio::time::sleep(sim.config.scaled(sim.config.latency_ms)).await;
        let params = callback.params(&message);
        deliver(sim, message_uuid, &message, &callback, &params, false).await;
        if rand::random::<f64>() < sim.config.duplicate_share {
            deliver(sim, message_uuid, &message, &callback, &params, true).await;
        }
    }
    if let Some(m) = sim.messages.lock().unwrap_or_else(|e| e.into_inner()).get_mut(message_uuid) {
        m.finished = true;
    }
}

/// One callback with Plivo's retry schedule: retried after 60, 120 and 240 s (scaled) when the
/// target does not answer 2xx within 8 s (scaled).
async fn deliver(
    sim: &Shared,
    message_uuid: &str,
    message: &SimMessage,
    callback: &story::Callback,
    params: &[(String, String)],
    duplicate: bool,
) {
    let mut record = CallbackRecord {
        sequence: callback.sequence,
        status: callback.status.to_owned(),
        error_code: callback.error_code,
        duplicate,
        attempts: Vec::new(),
        acknowledged: false,
    };
    for delay in std::iter::once(0).chain(RETRY_SCHEDULE_MS) {
        tokio::time::sleep(sim.config.scaled(delay)).await;
        sim.counters.callback_attempts.fetch_add(1, Ordering::Relaxed);
        let attempt = send_signed(sim, &message.method, &message.url, params).await;
        let ok = attempt.status.is_some_and(|s| (200..300).contains(&s));
        record.attempts.push(attempt);
        if ok {
            record.acknowledged = true;
            sim.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    if !record.acknowledged {
        sim.counters.given_up.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(m) = sim.messages.lock().unwrap_or_else(|e| e.into_inner()).get_mut(message_uuid) {
        m.callbacks.push(record);
    }
}

/// A form POST (or GET with query) signed exactly as Plivo signs: V3 over the URL, the sorted
/// parameters and a fresh 20-digit nonce.
async fn send_signed(sim: &Sim, method: &str, url: &str, params: &[(String, String)]) -> Attempt {
    let get = method.eq_ignore_ascii_case("GET");
    let nonce = SignedCallback::nonce();
    let signed = match SignedCallback::new(&sim.config.auth_token, get, url, params, &nonce) {
        Ok(signed) => signed,
        Err(e) => return Attempt { status: None, error: Some(format!("cannot sign {url}: {e}")) },
    };
    let mut request =
        if get { sim.http.get(&signed.url) } else { sim.http.post(&signed.url) }.header("User-Agent", "PlivoHTTP/sim");
    for (name, value) in signed.wire_headers() {
        request = request.header(name, value);
    }
    if let Some(form) = signed.form {
        request = request.body(form);
    }
    match request.send().await {
        Ok(response) => Attempt { status: Some(response.status().as_u16()), error: None },
        Err(e) => Attempt { status: None, error: Some(e.to_string()) },
    }
}

async fn list_messages(State(sim): State<Shared>) -> Json<Vec<SimMessage>> {
    let messages = sim.messages.lock().unwrap_or_else(|e| e.into_inner());
    let mut list: Vec<SimMessage> = messages.values().cloned().collect();
    list.sort_by(|a, b| a.message_uuid.cmp(&b.message_uuid));
    Json(list)
}

async fn one_message(State(sim): State<Shared>, Path(uuid): Path<String>) -> Response {
    match sim.messages.lock().unwrap_or_else(|e| e.into_inner()).get(&uuid) {
        Some(message) => Json(message.clone()).into_response(),
        None => plivo_error(StatusCode::NOT_FOUND, "message not found"),
    }
}

async fn stats(State(sim): State<Shared>) -> Json<Stats> {
    let (pending, finished) = {
        let messages = sim.messages.lock().unwrap_or_else(|e| e.into_inner());
        let finished = messages.values().filter(|m| m.finished).count() as u64;
        (messages.len() as u64 - finished, finished)
    };
    let c = &sim.counters;
    Json(Stats {
        send_requests: c.send_requests.load(Ordering::Relaxed),
        messages_accepted: c.accepted.load(Ordering::Relaxed),
        refused_unauthorized: c.unauthorized.load(Ordering::Relaxed),
        refused_invalid: c.invalid.load(Ordering::Relaxed),
        refused_rate_limited: c.rate_limited.load(Ordering::Relaxed),
        faulted: c.faulted.load(Ordering::Relaxed),
        callback_attempts: c.callback_attempts.load(Ordering::Relaxed),
        callbacks_acknowledged: c.acknowledged.load(Ordering::Relaxed),
        callbacks_given_up: c.given_up.load(Ordering::Relaxed),
        stories_pending: pending,
        stories_finished: finished,
    })
}

/// Plays a story for a message the simulator never received, as if another system sent it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExternalRequest {
    url: String,
    #[serde(default = "default_method")]
    method: String,
    src: String,
    dst: String,
    #[serde(default)]
    story: Option<String>,
}

fn default_method() -> String {
    "POST".into()
}

async fn external_story(State(sim): State<Shared>, Control(request): Control<ExternalRequest>) -> Response {
    let story = match request.story.as_deref() {
        None => Story::choose(&sim.config.weights),
        Some(name) => match Story::named(name) {
            Some(story) => story,
            None => {
                let known = "delivered, undelivered, failed or sent-only";
                return plivo_error(StatusCode::BAD_REQUEST, &format!("unknown story {name:?}: {known}"));
            }
        },
    };
    let message_uuid = uuid::Uuid::new_v4().to_string();
    start_story(&sim, message_uuid.clone(), request.src, request.dst, request.url, request.method, story, true);
    (StatusCode::ACCEPTED, Json(json!({ "message_uuid": message_uuid }))).into_response()
}

/// Sends an inbound SMS webhook (signed) to a `message_url`, answering with the target's status.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundRequest {
    url: String,
    from: String,
    to: String,
    text: String,
    #[serde(default)]
    intent: String,
}

async fn inbound(State(sim): State<Shared>, Control(request): Control<InboundRequest>) -> Response {
    let message_uuid = uuid::Uuid::new_v4().to_string();
    let params: Vec<(String, String)> = [
        ("From", request.from.as_str()),
        ("To", request.to.as_str()),
        ("Text", request.text.as_str()),
        ("Type", "sms"),
        ("MessageUUID", message_uuid.as_str()),
        ("Units", "1"),
        ("TotalRate", "0.00000"),
        ("TotalAmount", "0.00000"),
        ("MessageIntent", request.intent.as_str()),
        ("PowerpackUUID", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let attempt = send_signed(&sim, "POST", &request.url, &params).await;
    Json(json!({ "message_uuid": message_uuid, "answer": attempt.status, "error": attempt.error })).into_response()
}
