//! The ingress: Plivo's webhook target. It verifies signatures, makes every callback durable in
//! RabbitMQ (publisher confirms) and only then answers 200. It holds no state and never waits on
//! PostgreSQL to accept a callback.
#![forbid(unsafe_code)]

pub mod batcher;
pub mod error;
pub mod openapi;
pub mod replay;
pub mod routes;
pub mod storage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::routing::{get, post};
use shared::amqp::{Publisher, Topology};
use shared::config::IngressSettings;
use shared::plivo::signature::Verifier;
use shared::ratelimit::TokenBucket;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::error::IngressError;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub verifier: Arc<Verifier>,
    pub publisher: Publisher,
    pub public_base_url: Arc<str>,
    pub exchange: Arc<str>,
    pub body_limit: usize,
    pub retry_after_secs: u32,
    /// Global budget for requests that fail verification.
    pub unverified_budget: Arc<TokenBucket>,
    pub api_tokens: Arc<Vec<Arc<routes::auth::ApiToken>>>,
    /// For the status API, the send API's idempotency check and opt-out changes; connects
    /// lazily so start-up never waits on it.
    pub db: sqlx::PgPool,
    pub default_sender: Arc<str>,
    pub replays: Arc<replay::ReplayCache>,
    /// Status callbacks go through it: one message per batch under load.
    pub status_callbacks: batcher::CallbackBatcher,
    /// Connections open on the public listener (counted by [`run`]'s server): the batcher
    /// stops waiting for company once each has a callback in the batch or in flight.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// Open connections on the admin listener at most (Prometheus and a person with curl).
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// How long, and how many, queued callbacks an instance remembers to answer their replays
/// without publishing again (~100 bytes each: ~10 MB at most).
const REPLAY_TTL: Duration = Duration::from_secs(15 * 60);
const REPLAY_CAPACITY: usize = 100_000;

impl AppState {
    pub fn new(settings: &IngressSettings, publisher: Publisher) -> anyhow::Result<Self> {
        let api = &settings.api;
        let tokens = api.tokens.iter().map(|t| (t, false)).chain(api.full_read_tokens.iter().map(|t| (t, true)));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let status_callbacks = batcher::CallbackBatcher::start(
            publisher.clone(),
            settings.amqp.prefix.as_str().into(),
            shared::amqp::Stream::Status.routing_key(),
            batcher::BatchSettings::from(&settings.amqp),
            connections.clone(),
        );
        Ok(Self {
            status_callbacks,
            connections,
            verifier: Arc::new(Verifier::from_settings(&settings.plivo)),
            replays: Arc::new(replay::ReplayCache::new(REPLAY_TTL, REPLAY_CAPACITY)),
            publisher,
            public_base_url: settings.http.public_base_url.as_str().into(),
            exchange: settings.amqp.prefix.as_str().into(),
            body_limit: settings.http.body_limit_bytes,
            retry_after_secs: settings.http.retry_after_secs,
            unverified_budget: Arc::new(TokenBucket::new(
                settings.http.unverified_per_second.into(),
                settings.http.unverified_burst.into(),
            )),
            api_tokens: Arc::new(
                tokens
                    .map(|(t, full)| {
                        use secrecy::ExposeSecret as _;
                        let default_callback = api
                            .default_callbacks
                            .iter()
                            .find(|d| d.token.expose_secret() == t.expose_secret())
                            .map(|d| d.url.clone());
                        let token = routes::auth::ApiToken::new(
                            t.clone(),
                            full,
                            default_callback,
                            api.rate_per_second,
                            api.burst,
                        );
                        Arc::new(token)
                    })
                    .collect(),
            ),
            db: shared::db::pool(&settings.database)?,
            default_sender: settings.plivo.default_sender.as_str().into(),
        })
    }

    /// Spends the failed-verification budget; once it is gone, failures are answered 429.
    pub(crate) fn unverified(&self, error: IngressError) -> IngressError {
        match self.unverified_budget.try_take() {
            Ok(()) => error,
            Err(wait) => IngressError::RateLimited(
                "too many requests that fail verification; retry later".into(),
                wait.as_secs().max(1),
            ),
        }
    }
}

/// The HTTP surface, with its middleware.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let security_headers = [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("content-security-policy", "default-src 'none'; frame-ancestors 'none'"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ];
    let mut router = Router::new()
        .route("/plivo/callback", get(routes::plivo::status_callback).post(routes::plivo::status_callback))
        .route("/plivo/inbound", get(routes::plivo::inbound_message).post(routes::plivo::inbound_message))
        .route("/v1/messages", post(routes::send::create_message).get(routes::messages::list_messages))
        .route("/send-sms", post(routes::send::create_message))
        .route("/v1/messages/{id}", get(routes::messages::get_message))
        .route("/v1/stats", get(routes::stats::stats))
        .route("/v1/inbound", get(routes::inbound::list_inbound))
        .route(
            "/v1/opt-outs/{number}",
            get(routes::opt_outs::get_opt_outs)
                .put(routes::opt_outs::put_opt_out)
                .delete(routes::opt_outs::delete_opt_outs),
        )
        .route("/openapi.json", get(routes::health::openapi))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_method_not_allowed))
        // Every route reads its body itself, after authenticating, within a limit of its own
        // (answered 413 with a clear body); an extractor added later is bounded all the same.
        .layer(DefaultBodyLimit::max(state.body_limit))
        .with_state(state);
    for (name, value) in security_headers {
        router = router.layer(SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        ));
    }
    router.layer(axum::middleware::from_fn(record_http_metrics)).layer(
        ServiceBuilder::new()
            .layer(axum::middleware::map_request(drop_unsafe_request_id))
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            // The span names the path only: a GET callback's query carries phone numbers.
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|request: &Request<_>| {
                        let request_id =
                            request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                        let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str());
                        tracing::info_span!(
                            "http request",
                            otel.kind = "server",
                            otel.name = %format!("{} {route}", method_label(request.method())),
                            http.request.method = method_label(request.method()),
                            http.route = %route,
                            http.response.status_code = tracing::field::Empty,
                            request_id = %request_id,
                        )
                    })
                    .on_response(|response: &axum::http::Response<_>, latency: Duration, span: &tracing::Span| {
                        span.record("http.response.status_code", response.status().as_u16());
                        tracing::debug!(status = response.status().as_u16(), ?latency, "answered");
                    }),
            )
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, request_timeout)),
    )
}

/// A client's `X-Request-Id` is kept only when short and plain (it goes into logs and queued
/// events); any other is dropped, and a fresh one is made in its place.
async fn drop_unsafe_request_id(mut request: Request<axum::body::Body>) -> Request<axum::body::Body> {
    let safe = request.headers().get("x-request-id").is_none_or(|value| {
        let bytes = value.as_bytes();
        (1..=MAX_REQUEST_ID).contains(&bytes.len())
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    });
    if !safe {
        request.headers_mut().remove("x-request-id");
    }
    request
}

const MAX_REQUEST_ID: usize = 64;

/// `smsflow_http_requests_total` and `smsflow_http_request_duration_seconds` by route and
/// status: for a webhook, the duration is the time Plivo waits for its answer.
async fn record_http_metrics(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("smsflow_http_request_duration_seconds", "route" => route.clone(), "method" => method)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("smsflow_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

/// The method as a metric label or span name: any method a client invents would otherwise
/// become a series (or span name) of its own, forever.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

async fn not_found() -> IngressError {
    IngressError::NotFound
}

/// axum answers a known path asked with another method 405 with an empty body: every error of
/// this API is JSON, so it gets the JSON one, keeping axum's `Allow` header.
async fn json_method_not_allowed(response: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{ALLOW, CONTENT_TYPE};
    use axum::response::IntoResponse as _;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED || response.headers().contains_key(CONTENT_TYPE) {
        return response;
    }
    let message = "this path does not take this method (the Allow header lists those it takes)";
    let mut json = IngressError::MethodNotAllowed { message, allow: "" }.into_response();
    match response.headers().get(ALLOW) {
        Some(allow) => json.headers_mut().insert(ALLOW, allow.clone()),
        None => json.headers_mut().remove(ALLOW),
    };
    json
}

const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Open connections that have not yet sent a whole request head, oldest first (ids grow with
/// time). When the cap is reached the oldest of them is closed to make room: slowloris clients
/// then cannot keep new clients out, and a connection that has sent a request is never evicted.
#[derive(Clone, Default)]
struct Waiting {
    next_id: Arc<std::sync::atomic::AtomicU64>,
    connections: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, CancellationToken>>>,
}

impl Waiting {
    fn add(&self) -> (u64, CancellationToken) {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let evict = CancellationToken::new();
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).insert(id, evict.clone());
        (id, evict)
    }

    fn remove(&self, id: u64) {
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Closes the oldest waiting connection; false when none is waiting.
    fn evict_oldest(&self) -> bool {
        let oldest = self.connections.lock().unwrap_or_else(|e| e.into_inner()).pop_first();
        oldest.map(|(_, evict)| evict.cancel()).is_some()
    }
}

/// A connection whose writes make no progress for `timeout` fails with `TimedOut`, and hyper
/// then closes it: hyper has no write timeout, so a client that never reads its answer would
/// otherwise hold its connection slot (and delay shutdown) for ever.
struct WriteDeadline {
    inner: tokio::net::TcpStream,
    timeout: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn new(inner: tokio::net::TcpStream, timeout: Duration) -> Self {
        Self { inner, timeout, stalled: None }
    }

    /// Arms the deadline while `progress` is pending, clears it once it is not.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        progress: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if progress.is_ready() {
            self.stalled = None;
            return progress;
        }
        let timeout = self.timeout;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let progress = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, progress)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let progress = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, progress)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let progress = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, progress)
    }
}

/// Serves `app` until `shutdown`, then waits for the open connections to finish their requests.
/// hyper runs with a timer, so a connection that does not send a request's headers within
/// `http.header_read_timeout_ms` (a slowloris client, or one idle between keep-alive requests)
/// is closed, and at most `http.max_connections` are open at once: past it, the connection that
/// has waited longest for its first request head is closed to make room, and when every open
/// connection has sent a request, the new one is closed as soon as it is accepted.
/// `open` is kept equal to the number of connections being served.
async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
    open: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::{Service as _, ServiceExt as _};

    // HTTP/1 only (Plivo and API clients speak it): the auto builder's HTTP/2 sniffing reads
    // the first bytes with no timer, and an HTTP/2 connection has no idle timeout, so either
    // would let a silent client hold a slot forever.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    // The read buffer bounds a request's head (hyper's default is ~400 KiB per connection);
    // a GET callback with a long SMS in its query fits in 64 KiB many times over.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout).max_buf_size(MAX_HEAD_BYTES);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let waiting = Waiting::default();
    let mut make_service = app.into_make_service_with_connect_info::<SocketAddr>();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // A client gone before its connection was accepted: nothing to wait for.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // Full: the connection that has waited longest without sending a request makes room.
            Err(_) if waiting.evict_oldest() => {
                metrics::counter!("smsflow_http_connections_evicted_total").increment(1);
                match tokio::time::timeout(Duration::from_millis(100), slots.clone().acquire_owned()).await {
                    Ok(Ok(slot)) => slot,
                    _ => {
                        metrics::counter!("smsflow_http_connections_refused_total").increment(1);
                        continue;
                    }
                }
            }
            Err(_) => {
                metrics::counter!("smsflow_http_connections_refused_total").increment(1);
                continue; // dropping the stream closes it
            }
        };
        let _ = stream.set_nodelay(true);
        let stream = WriteDeadline::new(stream, write_timeout);
        let (id, evicted) = waiting.add();
        let Ok(service) = make_service.call(peer).await;
        let served = waiting.clone();
        let first_request = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let service = service.map_request(move |request: Request<hyper::body::Incoming>| {
            // A whole request head arrived: this connection is a client's, not a slowloris. Only
            // the first one takes the lock; keep-alive requests after it cost nothing here.
            if first_request.swap(false, std::sync::atomic::Ordering::Relaxed) {
                served.remove(id);
            }
            request.map(axum::body::Body::new)
        });
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)).into_owned();
        let connection = graceful.watch(connection);
        let waiting = waiting.clone();
        let open = open.clone();
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            // Client resets and timeouts end connections all the time; nothing to report.
            tokio::select! {
                _ = connection => {}
                () = evicted.cancelled() => {}
            }
            waiting.remove(id);
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests finish
/// (each one either got its confirm and answered 200, or answered 503) for at most the grace
/// period, and closes the broker connection.
/// `admin`: where `/metrics` is served (`http.admin_listen` in the binary), off the public port.
pub async fn run(
    settings: IngressSettings,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shared::telemetry::metrics();
    routes::plivo::register_metrics();
    shared::telemetry::spawn_metrics_upkeep();
    let broker_shutdown = CancellationToken::new();
    let publisher = Publisher::start(
        settings.amqp.clone(),
        Topology::from_settings(&settings.amqp),
        "smsflow-ingress",
        broker_shutdown.clone(),
    );
    let state = AppState::new(&settings, publisher.clone())?;
    let connections = state.connections.clone();
    let app = router(state, Duration::from_millis(settings.http.request_timeout_ms));
    let address = listener.local_addr()?;
    tracing::info!(%address, "ingress listening");
    let header_read_timeout = Duration::from_millis(settings.http.header_read_timeout_ms);
    // An answer that cannot be written within the request timeout is abandoned with its connection.
    let write_timeout = Duration::from_millis(settings.http.request_timeout_ms);
    let admin = admin.map(|admin| {
        let app = Router::new()
            .route("/metrics", get(|| async { shared::telemetry::render_metrics() }))
            .route("/healthz", get(routes::health::healthz));
        // The same protections as the public port, with room for a few scrapers only.
        let open = Default::default();
        tokio::spawn(serve(
            admin,
            app,
            header_read_timeout,
            write_timeout,
            ADMIN_MAX_CONNECTIONS,
            open,
            shutdown.clone(),
        ))
    });

    let server = serve(
        listener,
        app,
        header_read_timeout,
        write_timeout,
        settings.http.max_connections,
        connections,
        shutdown.clone(),
    );
    tokio::pin!(server);
    let outcome = tokio::select! {
        result = &mut server => result.map_err(anyhow::Error::from),
        () = shutdown.cancelled() => {
            tracing::info!("shutting down: draining in-flight requests");
            let grace = Duration::from_millis(settings.http.shutdown_grace_ms);
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result.map_err(anyhow::Error::from),
                Err(_) => Err(anyhow::anyhow!("in-flight requests did not finish within the {} ms grace period", grace.as_millis())),
            }
        }
    };
    broker_shutdown.cancel();
    publisher.close().await;
    if let Some(admin) = admin {
        // Bounded like the public side: a scrape in progress does not hold the exit.
        let grace = Duration::from_millis(settings.http.shutdown_grace_ms);
        let _ = tokio::time::timeout(grace, admin).await;
    }
    outcome
}
