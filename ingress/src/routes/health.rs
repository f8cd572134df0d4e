//! Liveness and readiness. Readiness follows the broker only: the ingress can take callbacks
//! exactly when it can publish them.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use crate::AppState;

/// The process serves.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Whether the process can take callbacks: its broker connection is up.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    /// `connected` or `disconnected`.
    broker: &'static str,
}

/// Liveness
#[utoipa::path(get, path = "/healthz", tag = "Health", security(()), responses((status = 200, description = "Serving", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the broker connection is up
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "Health",
    security(()),
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    if state.publisher.is_ready() {
        (StatusCode::OK, Json(Readiness { status: "ready", broker: "connected" }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Readiness { status: "not_ready", broker: "disconnected" }))
    }
}

/// This document
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "Health",
    security(()),
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object))
)]
pub async fn openapi() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], crate::openapi::document())
}
