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

mod api;
mod callbacks;
mod control;
pub mod story;

pub use control::{Fault, ReceivedRequest, ScriptedAnswer};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::ratelimit::TokenBucket;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::story::StoryWeights;

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
        .route("/v1/Account/{auth_id}/Message/", post(api::send_message))
        .route("/v1/Account/{auth_id}/Message", post(api::send_message))
        .route("/_sim/messages", get(control::list_messages))
        .route("/_sim/messages/{uuid}", get(control::one_message))
        .route("/_sim/stats", get(control::stats))
        .route("/_sim/external", post(control::external_story))
        .route("/_sim/inbound", post(control::inbound))
        .route("/_sim/faults", post(control::set_fault))
        .route("/_sim/script", post(control::add_to_script))
        .route("/_sim/requests", get(control::list_requests))
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
