//! AMQP message headers: W3C trace context (`traceparent`, `tracestate`) and the schema name
//! and version every smsflow message carries.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub const SCHEMA_HEADER: &str = "x-smsflow-schema";
pub const SCHEMA_VERSION_HEADER: &str = "x-smsflow-schema-version";
/// How many callbacks a status-callback message holds (version 2; absent: one). Consumers size
/// their batches by it without reading the body first; the body stays the authority.
pub const CALLBACK_COUNT_HEADER: &str = "x-smsflow-callbacks";

pub struct HeaderInjector<'a>(pub &'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.into(), AMQPValue::LongString(value.into()));
    }
}

pub struct HeaderExtractor<'a>(pub &'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        get_str(Some(self.0), key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// A trace context to continue or link from another task.
pub use opentelemetry::Context as TraceContext;

/// The current span's trace context.
pub fn current_context() -> TraceContext {
    tracing::Span::current().context()
}

/// Makes `span` continue the first trace and link the others: a span for work that several
/// traces share (a batch of deliveries, a message holding several requests' callbacks).
pub fn continue_and_link(span: &tracing::Span, contexts: impl IntoIterator<Item = TraceContext>) {
    use opentelemetry::trace::TraceContextExt as _;
    let mut contexts = contexts.into_iter();
    if let Some(first) = contexts.next() {
        let _ = span.set_parent(first);
    }
    for context in contexts {
        let linked = context.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
}

/// Writes the current span's trace context into `headers`.
pub fn inject_current_context(headers: &mut FieldTable) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// The current span's W3C `traceparent`, when it has a trace context to carry.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// Reads a trace context from message headers (empty when absent).
pub fn extract_context(headers: Option<&FieldTable>) -> opentelemetry::Context {
    match headers {
        Some(headers) => global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers))),
        None => opentelemetry::Context::new(),
    }
}

/// Reads a string header, whichever string type the publisher used (pika and amqplib may
/// send short strings).
pub fn get_str<'a>(headers: Option<&'a FieldTable>, key: &str) -> Option<&'a str> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Reads an integer header, whichever integer type the publisher used.
pub fn get_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// Properties of a persistent JSON message with schema headers and a trace context: the one
/// `headers` already carry (an outbox event keeps the trace of the change that caused it), else
/// the current span's.
pub fn json_message(schema: &str, version: u32, message_id: &str, mut headers: FieldTable) -> BasicProperties {
    headers.insert(SCHEMA_HEADER.into(), AMQPValue::LongString(LongString::from(schema)));
    headers.insert(SCHEMA_VERSION_HEADER.into(), AMQPValue::LongLongInt(version.into()));
    if get_str(Some(&headers), "traceparent").is_none() {
        inject_current_context(&mut headers);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_timestamp(now)
        .with_headers(headers)
}
