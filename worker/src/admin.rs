//! The worker's small admin server: liveness and readiness for the orchestrator, and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `consuming`: one flag per pipeline; ready when every one has a consumer attached.
pub async fn serve(
    listener: TcpListener,
    consuming: Vec<Arc<AtomicBool>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { shared::telemetry::render_metrics() }))
        .with_state(consuming);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

async fn readyz(State(consuming): State<Vec<Arc<AtomicBool>>>) -> (StatusCode, &'static str) {
    if consuming.iter().all(|flag| flag.load(Ordering::Relaxed)) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not consuming")
    }
}
