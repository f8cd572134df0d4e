//! Logs, traces and metrics. One `init` per process installs the tracing subscriber (JSON lines
//! carrying the trace and span ids, or pretty on a terminal), the W3C trace-context propagator,
//! and a tracer provider that exports over OTLP/HTTP when an endpoint is configured. Trace ids
//! exist even without export, so logs can always be correlated. The returned guard flushes
//! pending spans when dropped. Metrics are Prometheus text from one global recorder.

use std::fmt;
use std::io::IsTerminal as _;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::global;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TelemetrySettings};

/// Flushes and shuts the tracer provider down when dropped.
#[must_use = "dropping the guard shuts telemetry down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {e}");
        }
    }
}

/// The tracer provider for `settings`: sampled by ratio (a sampled parent's decision is kept),
/// exporting over OTLP/HTTP only when an endpoint is set. Export failures are logged by the
/// batch processor and never reach request handling.
pub fn tracer_provider(service: &'static str, settings: &TelemetrySettings) -> anyhow::Result<SdkTracerProvider> {
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build());
    // The standard OTEL_EXPORTER_OTLP_* variables switch export on too (and configure it).
    let from_environment = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()));
    if !settings.otlp_endpoint.is_empty() || from_environment {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        if !settings.otlp_endpoint.is_empty() {
            exporter = exporter.with_endpoint(settings.otlp_endpoint.clone());
        }
        builder = builder.with_batch_exporter(exporter.build()?);
    }
    Ok(builder.build())
}

/// Installs the global subscriber. A second call in one process (tests) keeps the first one.
pub fn init(service: &'static str, settings: &TelemetrySettings) -> anyhow::Result<TelemetryGuard> {
    let provider = tracer_provider(service, settings)?;
    install(service, settings, provider.clone())?;
    Ok(TelemetryGuard { provider: Some(provider) })
}

/// Installs the subscriber around a given provider (tests pass one with an in-memory exporter).
pub fn install(service: &'static str, settings: &TelemetrySettings, provider: SdkTracerProvider) -> anyhow::Result<()> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives)?,
        _ => EnvFilter::try_new(&settings.log_filter)?,
    };
    let json = match settings.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    // The log filter applies to log output only: spans for traces are kept at INFO whatever
    // the log level, so `log_filter = "warn"` does not switch tracing off.
    let fmt_layer: Box<dyn Layer<Registry> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer().event_format(JsonWithTrace).with_filter(filter).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_filter(filter).boxed()
    };
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    // Ignore "already set": tests start several services in one process.
    let _ = tracing_subscriber::registry().with(fmt_layer).with(otel_layer).try_init();
    Ok(())
}

/// One JSON object per line: time, level, target, message and fields, the current span's name,
/// and its `trace_id` and `span_id` so a log line leads to its trace.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = Map::new();
        let now = time::OffsetDateTime::now_utc();
        line.insert(
            "timestamp".into(),
            now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default().into(),
        );
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        event.record(&mut JsonVisitor(&mut line));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            let context = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            });
            if let Some(context) = context {
                let span_context = context.span().span_context().clone();
                if span_context.is_valid() {
                    line.insert("trace_id".into(), span_context.trace_id().to_string().into());
                    line.insert("span_id".into(), span_context.span_id().to_string().into());
                }
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

/// The process's Prometheus recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let sizes = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0];
        PrometheusBuilder::new()
            .set_buckets(&buckets)
            .and_then(|b| {
                b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_size".into()), &sizes)
            })
            .expect("static histogram buckets are valid")
            .install_recorder()
            .expect("the Prometheus recorder is installed once per process")
    })
}

/// Drains histogram samples into their buckets every few seconds. The recorder otherwise keeps
/// every raw sample until a scrape, which grows memory without bound when nobody scrapes (the
/// 10-minute soak showed ~60 bytes per request). Started once per process; needs a Tokio runtime.
pub fn spawn_metrics_upkeep() {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let handle = metrics().clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Text exposition for a `/metrics` route.
pub fn render_metrics() -> String {
    metrics().render()
}
