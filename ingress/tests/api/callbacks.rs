use shared::amqp::Stream;
use shared::amqp::contracts::CallbackEvent;
use shared::amqp::headers::{SCHEMA_HEADER, get_str};
use shared::plivo::signature::{SignedRequest, sign_v3};
use shared::testing::{TEST_AUTH_TOKEN, TEST_PUBLIC_BASE_URL, form_encode};

use crate::helpers::{pairs, spawn_app, status_params};

#[tokio::test]
async fn a_signed_status_callback_is_queued_persistently_with_every_parameter() {
    let app = spawn_app().await;
    app.wait_ready().await;
    let mut params = status_params("2f378a33-3c19-5eeb-85de-9930a4579025", "delivered");
    // Duplicate keys, empty values, a field Plivo may add later, and non-ASCII text all travel.
    params.extend(pairs(&[("PartInfo", "1 of 1"), ("NewField", "ä€ &=+%"), ("Units", "2"), ("PowerpackUUID", "")]));

    let response = app.post_signed("/plivo/callback?ref=0193a2b4-0000-7000-8000-000000000001", &params).await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let events = app.drain(Stream::Status).await;
    assert_eq!(events.len(), 1, "exactly one event queued");
    let (event, properties) = &events[0];
    assert_eq!(event.params, params, "every parameter, in wire order, duplicates kept");
    assert_eq!(event.reference.as_deref(), Some("0193a2b4-0000-7000-8000-000000000001"));
    assert_eq!(event.schema, CallbackEvent::SCHEMA);
    assert_eq!(event.method, "POST");
    assert_eq!(event.signature, "v3");
    assert!(!event.request_id.is_empty());
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    assert_eq!(get_str(properties.headers().as_ref(), SCHEMA_HEADER), Some(CallbackEvent::SCHEMA));
    assert!(app.drain(Stream::Inbound).await.is_empty());
}

/// Under load, callbacks share messages: 400 concurrent callbacks arrive in fewer messages,
/// version-2 batches among them, and every callback is in exactly one of them. A lone callback
/// on an idle ingress is published alone, as version 1.
#[tokio::test]
async fn concurrent_callbacks_share_messages_and_each_is_in_exactly_one() {
    use shared::amqp::headers::{CALLBACK_COUNT_HEADER, SCHEMA_VERSION_HEADER, get_int};
    let app = spawn_app().await;
    app.wait_ready().await;
    let response = app.post_signed("/plivo/callback", &status_params("lone-1", "sent")).await;
    assert_eq!(response.status(), 200);
    let lone = app.drain_messages(Stream::Status).await;
    assert_eq!(lone.len(), 1);
    assert_eq!(get_int(lone[0].1.headers().as_ref(), SCHEMA_VERSION_HEADER), Some(1), "idle: published alone");

    let uuids: Vec<String> = (0..400).map(|i| format!("batched-{i}")).collect();
    let answers = futures_util::future::join_all(
        uuids.iter().map(|uuid| app.signed_post("/plivo/callback", &status_params(uuid, "delivered")).send()),
    )
    .await;
    assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|a| a.status() == 200)), "every callback answered 200");
    let messages = app.drain_messages(Stream::Status).await;
    let mut seen: Vec<String> = messages
        .iter()
        .flat_map(|(events, _)| events.iter().map(|e| e.param("MessageUUID").unwrap().to_owned()))
        .collect();
    seen.sort();
    let mut expected = uuids.clone();
    expected.sort();
    assert_eq!(seen, expected, "every callback in exactly one message");
    let batches = messages.iter().filter(|(events, _)| events.len() > 1).count();
    assert!(messages.len() < uuids.len() && batches > 0, "{} messages for 400 callbacks", messages.len());
    for (events, properties) in &messages {
        let version = if events.len() > 1 { CallbackEvent::BATCH_VERSION } else { CallbackEvent::VERSION };
        assert_eq!(get_int(properties.headers().as_ref(), SCHEMA_VERSION_HEADER), Some(version.into()));
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        assert!(events.len() <= 32, "at most amqp.callback_batch_max per message");
        let count = get_int(properties.headers().as_ref(), CALLBACK_COUNT_HEADER);
        assert_eq!(count, (events.len() > 1).then_some(events.len() as i64), "the count header of a batch");
    }
}

#[tokio::test]
async fn an_inbound_sms_goes_to_the_inbound_queue() {
    let app = spawn_app().await;
    app.wait_ready().await;
    let params = pairs(&[("From", "14155550111"), ("To", "14155550100"), ("Text", "STOP"), ("MessageUUID", "u-1")]);

    let response = app.post_signed("/plivo/inbound", &params).await;

    assert_eq!(response.status(), 200);
    let events = app.drain(Stream::Inbound).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0.params, params);
    assert!(app.drain(Stream::Status).await.is_empty());
}

#[tokio::test]
async fn a_get_callback_is_verified_over_its_query_and_queued() {
    let app = spawn_app().await;
    app.wait_ready().await;
    let params = status_params("bbd551fd-a503-5403-8ace-fc51ab2baa4c", "sent");
    let path = format!("/plivo/callback?ref=abc&{}", form_encode(&params));
    let nonce = "12345678901234567890";
    let url = format!("{TEST_PUBLIC_BASE_URL}{path}");
    let signature = sign_v3(TEST_AUTH_TOKEN, &SignedRequest { method: "GET", url: &url, body: &[], nonce }).unwrap();

    let response = app
        .client
        .get(app.url(&path))
        .header("X-Plivo-Signature-V3", signature)
        .header("X-Plivo-Signature-V3-Nonce", nonce)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let events = app.drain(Stream::Status).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0.params, params, "query parameters without ref");
    assert_eq!(events[0].0.reference.as_deref(), Some("abc"));
    assert_eq!(events[0].0.method, "GET");
}

#[tokio::test]
async fn a_forged_callback_gets_403_and_nothing_is_queued() {
    let app = spawn_app().await;
    app.wait_ready().await;
    let params = status_params("forged-0001", "delivered");
    let nonce = "11111111111111111111";
    let url = format!("{TEST_PUBLIC_BASE_URL}/plivo/callback");
    let forged =
        sign_v3("not-the-real-token", &SignedRequest { method: "POST", url: &url, body: &params, nonce }).unwrap();

    let response = app
        .client
        .post(app.url("/plivo/callback"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-plivo-signature-v3", forged)
        .header("x-plivo-signature-v3-nonce", nonce)
        .body(form_encode(&params))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 403);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_signature");
    assert_eq!(app.broker.len(&app.broker.topology.queue(Stream::Status)).await, 0);
}

#[tokio::test]
async fn a_callback_missing_message_uuid_or_status_is_still_queued() {
    let app = spawn_app().await;
    app.wait_ready().await;
    let params = pairs(&[("Units", "1")]);

    let response = app.post_signed("/plivo/callback", &params).await;

    assert_eq!(response.status(), 200, "verified data is never dropped at the edge");
    assert_eq!(app.drain(Stream::Status).await.len(), 1);
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    app.wait_ready().await;
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn metrics_count_callbacks_by_result() {
    let app = spawn_app().await;
    app.wait_ready().await;
    assert_eq!(app.post_signed("/plivo/callback", &status_params("metric-1", "sent")).await.status(), 200);
    let text = app.metrics().await;
    assert!(text.contains(r#"smsflow_callbacks_total{stream="status",result="ok"}"#), "{text}");
    assert!(text.contains("smsflow_publish_confirm_seconds_bucket"), "{text}");
    assert!(text.contains("smsflow_http_request_duration_seconds_bucket"), "{text}");
}

#[tokio::test]
async fn invented_methods_add_no_metric_series() {
    let app = spawn_app().await;
    app.wait_ready().await;
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        app.client.request(method, app.url("/healthz")).send().await.unwrap();
    }
    let text = app.metrics().await;
    assert!(!text.contains("INVENTED"), "no series per invented method:\n{text}");
    assert!(text.contains(r#"method="other""#), "they share one label value:\n{text}");
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_listener_only() {
    let app = spawn_app().await;
    app.wait_ready().await;
    assert!(app.metrics().await.contains("smsflow_callbacks_total"));
    assert_eq!(app.client.get(app.url("/metrics")).send().await.unwrap().status(), 404, "not on the public port");
}
