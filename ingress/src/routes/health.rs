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
