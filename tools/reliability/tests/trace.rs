//! One trace from Plivo's request to the database row: the ingress's server span, its publish
//! (producer) span, the worker's consumer span whose parent is the publish (through the
//! `traceparent` AMQP header), and the database transaction below it. A test binary of its own:
//! it installs the process-wide tracer with an in-memory exporter.

use std::time::Duration;

use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use reliability::{Stack, sim_config};
use shared::testing::base_ingress_settings;
use sqlx::PgPool;

fn find<'a>(spans: &'a [SpanData], kind: SpanKind, name_prefix: &str) -> &'a SpanData {
    spans.iter().find(|s| s.span_kind == kind && s.name.starts_with(name_prefix)).unwrap_or_else(|| {
        let seen: Vec<_> = spans.iter().map(|s| (s.name.to_string(), s.span_kind.clone())).collect();
        panic!("no {kind:?} span named {name_prefix}…; spans: {seen:?}")
    })
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn one_trace_covers_the_callback_from_request_to_database_row(pool: PgPool) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let mut telemetry = base_ingress_settings().telemetry;
    telemetry.log_filter = "off".into();
    shared::telemetry::install("smsflow-test", &telemetry, provider.clone()).unwrap();

    let stack = Stack::start(pool.clone(), sim_config(), |_, _| {}).await;
    let mut events = stack.broker.subscribe_to_events("#").await;
    let answer = stack
        .callbacks()
        .post_signed_callback(&[("MessageUUID", "traced-1"), ("Status", "delivered"), ("Sequence", "3")])
        .await;
    assert_eq!(answer, 200);
    for _ in 0..100 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM message_events").fetch_one(&pool).await.unwrap();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = tokio::time::timeout(Duration::from_secs(30), futures_util::StreamExt::next(&mut events))
        .await
        .expect("the status change's event is published")
        .unwrap()
        .unwrap();
    let event_traceparent = shared::amqp::headers::get_str(event.properties.headers().as_ref(), "traceparent")
        .expect("the event carries a traceparent")
        .to_owned();
    stack.stop().await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    let server = find(&spans, SpanKind::Server, "POST /plivo/callback");
    let publish = find(&spans, SpanKind::Producer, "publish");
    let consume = find(&spans, SpanKind::Consumer, "process ");
    let database = find(&spans, SpanKind::Client, "apply_status_batch");
    let trace_id = server.span_context.trace_id();
    for span in [publish, consume, database] {
        assert_eq!(span.span_context.trace_id(), trace_id, "{} is in the request's trace", span.name);
    }
    assert_eq!(publish.parent_span_id, server.span_context.span_id(), "publish is a child of the request");
    assert_eq!(consume.parent_span_id, publish.span_context.span_id(), "processing continues the publish's trace");
    assert_eq!(database.parent_span_id, consume.span_context.span_id(), "the transaction is part of processing");
    assert_eq!(
        event_traceparent.split('-').nth(1),
        Some(trace_id.to_string().as_str()),
        "the event links to the trace of the callback that caused it, not to the relay's"
    );
    let attribute = |span: &SpanData, key: &str| {
        span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
    };
    assert_eq!(attribute(publish, "messaging.system").as_deref(), Some("rabbitmq"));
    assert_eq!(attribute(server, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attribute(database, "db.system.name").as_deref(), Some("postgresql"));
    for span in &spans {
        for kv in &span.attributes {
            assert!(!kv.value.to_string().contains("14155"), "no phone number in span {}: {kv:?}", span.name);
        }
    }
}
