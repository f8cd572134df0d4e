//! Plivo webhooks: status callbacks and inbound SMS.
//!
//! Per request, in this order: method → declared size → signature headers present and shaped
//! like signatures (before any body byte is read) → body read within the limit → content type
//! and form decoding → signature valid → publish with confirm → answer. A 200 means the broker has
//! confirmed the event; anything that cannot be made durable is answered 503 so Plivo retries.
//! Nothing is parsed into domain types here: every received parameter travels to the worker.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use shared::amqp::contracts::CallbackEvent;
use shared::amqp::headers::json_message;
use shared::amqp::{PublishError, Stream};
use shared::plivo::form::{parse_body, parse_pairs};
use shared::plivo::signature::{self, Scheme, SignatureHeaders, VerifyError};
use time::OffsetDateTime;
use tracing::Instrument as _;
use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use uuid::Uuid;

use super::read_body;
use crate::AppState;
use crate::error::{BodyRefusals, BrokerRefusals, IngressError, WebhookAnswers};
use crate::replay::{Begin, ReplayCache};

/// Plivo message status callback
#[utoipa::path(
    post,
    path = "/plivo/callback",
    tag = "Plivo webhooks",
    security(()),
    params(WebhookParams),
    request_body(content = HashMap<String, String>, content_type = "application/x-www-form-urlencoded"),
    responses(WebhookAnswers, BodyRefusals, BrokerRefusals)
)]
pub async fn status_callback(State(state): State<AppState>, request: Request) -> Result<StatusCode, IngressError> {
    counted(Stream::Status, accept(&state, Stream::Status, request).await)
}

/// Plivo inbound SMS
#[utoipa::path(
    post,
    path = "/plivo/inbound",
    tag = "Plivo webhooks",
    security(()),
    params(WebhookParams),
    request_body(content = HashMap<String, String>, content_type = "application/x-www-form-urlencoded"),
    responses(WebhookAnswers, BodyRefusals, BrokerRefusals)
)]
pub async fn inbound_message(State(state): State<AppState>, request: Request) -> Result<StatusCode, IngressError> {
    counted(Stream::Inbound, accept(&state, Stream::Inbound, request).await)
}

/// The values of `smsflow_callbacks_total`'s `result` label.
const CALLBACK_RESULTS: [&str; 6] =
    ["ok", "invalid_signature", "missing_signature", "rate_limited", "unavailable", "rejected"];

/// Every `smsflow_callbacks_total` series at zero from the start: an alert on `increase()` sees
/// the first 503, which a series born at 1 would hide.
pub fn register_metrics() {
    for stream in [Stream::Status, Stream::Inbound] {
        for result in CALLBACK_RESULTS {
            metrics::counter!("smsflow_callbacks_total", "stream" => stream.name(), "result" => result).increment(0);
        }
    }
}

/// `smsflow_callbacks_total{stream, result}`: ok, invalid_signature, missing_signature,
/// rate_limited, unavailable (503) or rejected (any other refusal).
fn counted(stream: Stream, result: Result<StatusCode, IngressError>) -> Result<StatusCode, IngressError> {
    let label = match &result {
        Ok(_) => CALLBACK_RESULTS[0],
        Err(IngressError::InvalidSignature(_)) => CALLBACK_RESULTS[1],
        Err(IngressError::MissingSignature(_)) => CALLBACK_RESULTS[2],
        Err(IngressError::RateLimited(..)) => CALLBACK_RESULTS[3],
        Err(IngressError::Unavailable { .. }) => CALLBACK_RESULTS[4],
        Err(_) => CALLBACK_RESULTS[5],
    };
    metrics::counter!("smsflow_callbacks_total", "stream" => stream.name(), "result" => label).increment(1);
    result
}

async fn accept(state: &AppState, stream: Stream, request: Request) -> Result<StatusCode, IngressError> {
    let (parts, body) = request.into_parts();
    // Plivo calls with GET or POST only. HEAD reaches this handler through the GET route, and a
    // captured GET replayed as HEAD would verify: refused before anything else.
    if parts.method != axum::http::Method::GET && parts.method != axum::http::Method::POST {
        return Err(IngressError::MethodNotAllowed {
            message: "Plivo callbacks come as GET or POST",
            allow: "GET, POST",
        });
    }
    let limit = state.body_limit;
    if super::content_length(&parts.headers).is_some_and(|len| len > limit as u64) {
        return Err(IngressError::PayloadTooLarge { limit });
    }
    let sig_headers = signature_headers(&parts.headers);
    // A forgery whose headers alone refuse it costs no body read, form parse or HMAC.
    state.verifier.precheck(&sig_headers).map_err(|e| refused(state, e))?;

    let is_get = parts.method == axum::http::Method::GET;
    let body_bytes = read_body(&parts.headers, body, limit).await?;
    let body_params = if is_get || body_bytes.is_empty() {
        Vec::new()
    } else {
        if !is_form(&parts.headers) {
            return Err(IngressError::UnsupportedMediaType { expected: "application/x-www-form-urlencoded" });
        }
        parse_body(&body_bytes).map_err(|e| IngressError::BadRequest(e.to_string()))?
    };
    let raw_query = parts.uri.query();
    let query =
        parse_pairs(raw_query.unwrap_or("")).map_err(|e| IngressError::BadRequest(format!("query string: {e}")))?;

    let url = match raw_query {
        Some(q) => format!("{}{}?{q}", state.public_base_url, parts.uri.path()),
        None => format!("{}{}", state.public_base_url, parts.uri.path()),
    };
    let scheme = state
        .verifier
        .verify(&sig_headers, parts.method.as_str(), &url, &body_params)
        .map_err(|e| refused(state, e))?;

    // The replay key covers what the signature proved: V3 signs the method, URL, form and
    // nonce; V2 only the URL without its query, and the nonce.
    let replay_key = match scheme {
        Scheme::V3 => {
            ReplayCache::key("v3", parts.method.as_str(), &url, &body_params, sig_headers.v3_nonce.unwrap_or_default())
        }
        Scheme::V2 => {
            let signed_url = format!("{}{}", state.public_base_url, parts.uri.path());
            ReplayCache::key("v2", "", &signed_url, &[], sig_headers.v2_nonce.unwrap_or_default())
        }
    };
    let reference = query.iter().find(|(k, _)| k == "ref").map(|(_, v)| v.clone());
    let params: Vec<(String, String)> =
        if is_get { query.iter().filter(|(k, _)| k != "ref").cloned().collect() } else { body_params };
    // Verified, yet a shape Plivo never sends: a POST callback carries its fields in a form body,
    // a GET one in its query (an empty-body POST is a GET's query replayed as POST).
    if params.is_empty() {
        return Err(IngressError::BadRequest(if is_get {
            "a GET callback carries its fields in the query string; this one has none".into()
        } else {
            "a POST callback carries its fields in a form body; this one has none".into()
        }));
    }
    let publishing = match state.replays.begin(replay_key) {
        Begin::Fresh(publishing) => publishing,
        Begin::Queued => {
            metrics::counter!("smsflow_callback_replays_total", "stream" => stream.name()).increment(1);
            return Ok(StatusCode::OK);
        }
        Begin::InFlight => {
            return Err(IngressError::RateLimited(
                "an identical signed callback is being queued; retry later".into(),
                1,
            ));
        }
    };
    let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let event = CallbackEvent {
        schema: CallbackEvent::SCHEMA.into(),
        version: CallbackEvent::VERSION,
        params,
        query,
        reference,
        method: parts.method.as_str().to_owned(),
        signature: scheme.as_str().to_owned(),
        received_at: OffsetDateTime::now_utc(),
        request_id,
    };
    publish(state, stream, event).await?;
    publishing.queued();
    Ok(StatusCode::OK)
}

/// A failed verification, answered once the failed-verification budget is spent as 429.
fn refused(state: &AppState, error: VerifyError) -> IngressError {
    match error {
        VerifyError::Missing(m) => state.unverified(IngressError::MissingSignature(m.into())),
        VerifyError::Invalid(m) => state.unverified(IngressError::InvalidSignature(m.into())),
        VerifyError::Url(e) => IngressError::BadRequest(e.to_string()),
    }
}

async fn publish(state: &AppState, stream: Stream, event: CallbackEvent) -> Result<(), IngressError> {
    if stream == Stream::Status {
        return state
            .status_callbacks
            .publish(event)
            .await
            .map_err(|reason| IngressError::Unavailable { reason, retry_after_secs: state.retry_after_secs });
    }
    let payload =
        serde_json::to_vec(&event).map_err(|e| IngressError::BadRequest(format!("cannot encode event: {e}")))?;
    let message_id = Uuid::now_v7().to_string();
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        otel.name = %format!("publish {}", state.exchange),
        messaging.system = "rabbitmq",
        messaging.operation.name = "publish",
        messaging.destination.name = %state.exchange,
        messaging.rabbitmq.destination.routing_key = stream.routing_key(),
        messaging.message.id = %message_id,
    );
    async {
        let properties = json_message(CallbackEvent::SCHEMA, CallbackEvent::VERSION, &message_id, Default::default());
        state.publisher.publish(stream.routing_key(), &payload, properties).await
    }
    .instrument(span)
    .await
    .map_err(|e: PublishError| IngressError::Unavailable {
        reason: e.to_string(),
        retry_after_secs: state.retry_after_secs,
    })
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// A webhook's parameters, for the OpenAPI document: Plivo's signature headers, and the
/// `ref` the worker puts into the callback URLs of the messages it sends.
pub struct WebhookParams;

impl utoipa::IntoParams for WebhookParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        [
            (
                signature::V3_HEADER,
                ParameterIn::Header,
                "Comma-separated base64 HMAC-SHA256 signatures (one per auth token)",
            ),
            (
                signature::MA_V3_HEADER,
                ParameterIn::Header,
                "The same, by the main account's tokens (subaccount callbacks)",
            ),
            (signature::V3_NONCE_HEADER, ParameterIn::Header, "The nonce the signatures cover"),
            (signature::V2_HEADER, ParameterIn::Header, "V2 signature: read only with plivo.accept_v2_signatures"),
            (signature::MA_V2_HEADER, ParameterIn::Header, "V2, by the main account's tokens: likewise"),
            (signature::V2_NONCE_HEADER, ParameterIn::Header, "The nonce the V2 signature covers"),
            ("ref", ParameterIn::Query, "Our message id, in the callback URL of a message we sent"),
        ]
        .into_iter()
        .map(|(name, place, description)| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(place)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build()
        })
        .collect()
    }
}

/// Header values that are not visible ASCII are kept as `""`, which never matches a signature.
fn signature_headers(headers: &HeaderMap) -> SignatureHeaders<'_> {
    let get = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    SignatureHeaders {
        v3: get(signature::V3_HEADER),
        ma_v3: get(signature::MA_V3_HEADER),
        v3_nonce: get(signature::V3_NONCE_HEADER),
        v2: get(signature::V2_HEADER),
        ma_v2: get(signature::MA_V2_HEADER),
        v2_nonce: get(signature::V2_NONCE_HEADER),
    }
}
