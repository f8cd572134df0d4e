//! One trace from Plivo's request to the database row: the ingress's server span, its publish
//! (producer) span, the worker's consumer span whose parent is the publish (through the
//! `traceparent` AMQP header), and the database transaction below it. A test binary of its own:
//! it installs the process-wide tracer with an in-memory exporter.

use std::time::Duration;

use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use shared::plivo::form::encode_pairs;
use shared::plivo::signature::{SignedRequest, sign_v3};
use shared::testing::{TEST_AUTH_TOKEN, TestBroker, base_ingress_settings, base_worker_settings};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

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

    let broker = TestBroker::new().await;
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut ingress_settings = base_ingress_settings();
    ingress_settings.amqp = broker.amqp_settings();
    ingress_settings.http.public_base_url = base.clone();
    tokio::spawn(ingress::run(ingress_settings, listener, shutdown.clone()));
    let mut worker_settings = base_worker_settings();
    worker_settings.amqp = broker.amqp_settings();
    let worker = tokio::spawn(worker::run_with(worker_settings, pool.clone(), None, shutdown.clone()));

    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let params: Vec<(String, String)> = [("MessageUUID", "traced-1"), ("Status", "delivered"), ("Sequence", "3")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let url = format!("{base}/plivo/callback");
    let nonce = "12345678901234567890";
    let signature =
        sign_v3(TEST_AUTH_TOKEN, &SignedRequest { method: "POST", url: &url, body: &params, nonce }).unwrap();
    let response = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-plivo-signature-v3", signature)
        .header("x-plivo-signature-v3-nonce", nonce)
        .body(encode_pairs(&params))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for _ in 0..100 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM message_events").fetch_one(&pool).await.unwrap();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    worker.await.unwrap().unwrap();
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
