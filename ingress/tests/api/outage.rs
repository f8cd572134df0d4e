//! The broker going away: callbacks get 503 with Retry-After (so Plivo retries), readiness
//! drops, liveness stays, and the ingress recovers by itself.

use std::time::Duration;

use secrecy::SecretString;
use shared::amqp::Stream;
use shared::testing::{CuttableProxy, amqp_address};

use crate::helpers::{spawn_app_with, status_params};

#[tokio::test]
async fn with_no_broker_listening_callbacks_get_503_and_liveness_stays_up() {
    let app = spawn_app_with(|s| {
        // A port nothing listens on.
        s.amqp.url = SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f");
        s.amqp.connect_timeout_ms = 500;
    })
    .await;

    let response = app.post_signed("/plivo/callback", &status_params("outage-1", "sent")).await;

    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 503);
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn after_a_broker_outage_the_ingress_recovers_by_itself() {
    let proxy = CuttableProxy::start(amqp_address()).await;
    let url = proxy.amqp_url();
    let app = spawn_app_with(|s| s.amqp.url = SecretString::from(url)).await;
    app.wait_ready().await;
    assert_eq!(app.post_signed("/plivo/callback", &status_params("before", "sent")).await.status(), 200);

    proxy.cut();
    let mut refused = 0;
    for i in 0..50 {
        let status = app.post_signed("/plivo/callback", &status_params(&format!("during-{i}"), "sent")).await.status();
        assert!(status == 503 || status == 200, "only 200 or 503 while the broker goes away, got {status}");
        if status == 503 {
            refused += 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused, 1, "the outage was noticed");
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 503);

    proxy.restore();
    app.wait_ready().await;
    assert_eq!(app.post_signed("/plivo/callback", &status_params("after", "sent")).await.status(), 200);

    let ids: Vec<String> =
        app.drain(Stream::Status).await.iter().filter_map(|(e, _)| e.param("MessageUUID").map(str::to_owned)).collect();
    assert!(ids.contains(&"before".to_owned()) && ids.contains(&"after".to_owned()), "{ids:?}");
}
