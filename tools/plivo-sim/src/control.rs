//! The simulator's control routes (`/_sim/…`): the ground truth, the script and the faults,
//! stories for messages it never received, and inbound SMS.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::plivo_error;
use crate::callbacks::{send_signed, start_story};
use crate::story::Story;
use crate::{Shared, SimMessage, Stats};

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
pub(crate) struct FaultRequest {
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

/// The JSON body of a control route (`/_sim/…`). A body that is missing or does not fit is
/// answered 400 with the shape the route expects, not only the parser's complaint.
pub(crate) struct Control<T>(T);

pub(crate) trait ControlBody: serde::de::DeserializeOwned {
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

pub(crate) async fn add_to_script(
    State(sim): State<Shared>,
    Control(answers): Control<Vec<ScriptedAnswer>>,
) -> Response {
    if let Some(bad) = answers.iter().find(|a| !(200..=599).contains(&a.status)) {
        return plivo_error(StatusCode::BAD_REQUEST, &format!("status {} is not an HTTP answer (200-599)", bad.status));
    }
    sim.script.lock().unwrap_or_else(|e| e.into_inner()).extend(answers);
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn list_requests(State(sim): State<Shared>) -> Json<Vec<ReceivedRequest>> {
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

pub(crate) async fn set_fault(State(sim): State<Shared>, Control(request): Control<FaultRequest>) -> StatusCode {
    let until = std::time::Instant::now() + Duration::from_millis(request.for_ms);
    *sim.faults.lock().unwrap_or_else(|e| e.into_inner()) = request.fault.map(|f| (f, until, request.hold_ms));
    StatusCode::NO_CONTENT
}

pub(crate) async fn list_messages(State(sim): State<Shared>) -> Json<Vec<SimMessage>> {
    let messages = sim.messages.lock().unwrap_or_else(|e| e.into_inner());
    let mut list: Vec<SimMessage> = messages.values().cloned().collect();
    list.sort_by(|a, b| a.message_uuid.cmp(&b.message_uuid));
    Json(list)
}

pub(crate) async fn one_message(State(sim): State<Shared>, Path(uuid): Path<String>) -> Response {
    match sim.messages.lock().unwrap_or_else(|e| e.into_inner()).get(&uuid) {
        Some(message) => Json(message.clone()).into_response(),
        None => plivo_error(StatusCode::NOT_FOUND, "message not found"),
    }
}

pub(crate) async fn stats(State(sim): State<Shared>) -> Json<Stats> {
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
pub(crate) struct ExternalRequest {
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

pub(crate) async fn external_story(State(sim): State<Shared>, Control(request): Control<ExternalRequest>) -> Response {
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
pub(crate) struct InboundRequest {
    url: String,
    from: String,
    to: String,
    text: String,
    #[serde(default)]
    intent: String,
}

pub(crate) async fn inbound(State(sim): State<Shared>, Control(request): Control<InboundRequest>) -> Response {
    let message_uuid = uuid::Uuid::new_v4().to_string();
    let params = shared::plivo::callback::InboundCallback {
        message_uuid: &message_uuid,
        from: &request.from,
        to: &request.to,
        text: &request.text,
        intent: &request.intent,
    }
    .fields();
    let attempt = send_signed(&sim, "POST", &request.url, &params).await;
    Json(json!({ "message_uuid": message_uuid, "answer": attempt.status, "error": attempt.error })).into_response()
}
