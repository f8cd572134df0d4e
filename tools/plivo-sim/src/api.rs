//! Plivo's Send Message API as the simulator plays it: Plivo's checks and answers, the script,
//! the faults, and the rate limit.

use base64::Engine as _;
use shared::plivo::api::{ErrorResponse, SendMessageRequest, SendMessageResponse};

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::callbacks::start_story;
use crate::story::Story;
use crate::{Fault, KEPT_REQUESTS, LoggedRequest, Shared, Sim};

pub(crate) fn plivo_error(status: StatusCode, error: &str) -> Response {
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

pub(crate) async fn send_message(
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
