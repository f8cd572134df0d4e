//! Liveness and readiness. Readiness follows the broker only: the ingress can take callbacks
//! exactly when it can publish them.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.publisher.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ready", "broker": "connected" })))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "broker": "disconnected" })))
    }
}

/// The OpenAPI 3.1 document of every route (`docs/openapi.json`, checked against the router by
/// tests and against live responses by schemathesis in CI).
pub async fn openapi() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");
