//! Delivery stories played out: each callback signed as Plivo signs it, sent to the message's
//! `url`, and retried on Plivo's schedule until it is answered 2xx.

use shared::plivo::signature::SignedCallback;

use std::sync::atomic::Ordering;

use crate::story::Story;
use crate::{Attempt, CallbackRecord, Shared, Sim, SimMessage};

/// Plivo's retry schedule for callbacks: after 60, 120 and 240 s (docs/plivo.md §2).
const RETRY_SCHEDULE_MS: [u64; 3] = [60_000, 120_000, 240_000];

#[allow(clippy::too_many_arguments)]
pub(crate) fn start_story(
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
    callback: &crate::story::Callback,
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
pub(crate) async fn send_signed(sim: &Sim, method: &str, url: &str, params: &[(String, String)]) -> Attempt {
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
