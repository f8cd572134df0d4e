//! The send API: 202 only once the job is durably queued; every bad input refused by name.

use secrecy::SecretString;
use serde_json::{Value, json};
use shared::amqp::Stream;
use shared::amqp::contracts::SendJob;

use crate::helpers::{TestApp, spawn_app_with};

const TOKEN: &str = "test-api-token-0123456789";

async fn send_app(adjust: impl FnOnce(&mut shared::config::IngressSettings)) -> TestApp {
    let app = spawn_app_with(|s| {
        s.api.tokens = vec![SecretString::from(TOKEN)];
        s.plivo.default_sender = "+14155550100".into();
        adjust(s);
    })
    .await;
    app.wait_ready().await;
    app
}

fn post(app: &TestApp, path: &str, body: &Value) -> reqwest::RequestBuilder {
    app.client.post(app.url(path)).bearer_auth(TOKEN).json(body)
}

async fn queued_jobs(app: &TestApp) -> Vec<SendJob> {
    let queue = app.broker.topology.queue(Stream::Send);
    let mut jobs = Vec::new();
    while let Some(message) = app.broker.get(&queue).await {
        assert_eq!(*message.delivery.properties.delivery_mode(), Some(2), "persistent");
        jobs.push(serde_json::from_slice(&message.delivery.data).expect("a send job"));
    }
    jobs
}

#[tokio::test]
async fn a_valid_request_is_queued_and_answered_202_with_its_location() {
    let app = send_app(|_| {}).await;
    let body = json!({"to": "+14155552671", "text": "Your code is 123456", "metadata": {"user": 7}});

    let response = post(&app, "/v1/messages", &body).send().await.unwrap();

    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let answer: Value = response.json().await.unwrap();
    let id = answer["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/messages/{id}"));
    assert_eq!((answer["status"].as_str(), answer["segments"].as_u64()), (Some("accepted"), Some(1)));
    let jobs = queued_jobs(&app).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id.to_string(), id);
    assert_eq!((jobs[0].to.as_str(), jobs[0].text.as_str()), ("+14155552671", "Your code is 123456"));
    assert_eq!(jobs[0].metadata.as_ref().unwrap()["user"], 7);
}

#[tokio::test]
async fn the_same_idempotency_key_gives_the_same_message_id() {
    let app = send_app(|_| {}).await;
    let body = json!({"to": "+14155552671", "text": "once"});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = post(&app, "/v1/messages", &body).header("Idempotency-Key", "order-77").send().await.unwrap();
        assert_eq!(response.status(), 202);
        ids.push(response.json::<Value>().await.unwrap()["id"].clone());
    }
    let other = post(&app, "/v1/messages", &body).header("Idempotency-Key", "order-78").send().await.unwrap();
    let other_id = other.json::<Value>().await.unwrap()["id"].clone();

    assert_eq!(ids[0], ids[1], "same key, same id: the worker sends it once");
    assert_ne!(ids[0], other_id);
}

#[tokio::test]
async fn a_token_with_a_default_callback_gives_it_to_requests_that_name_none() {
    const OTHER: &str = "other-api-token-0123456789";
    let app = send_app(|s| {
        s.api.tokens.push(SecretString::from(OTHER));
        s.api.default_callbacks = vec![shared::config::DefaultCallback {
            token: SecretString::from(TOKEN),
            url: "https://billing.example.com/sms-status".into(),
        }];
    })
    .await;
    let plain = json!({"to": "+14155552671", "text": "a"});
    let own = json!({"to": "+14155552671", "text": "b", "callback": "https://own.example.com/cb"});
    for body in [&plain, &own] {
        assert_eq!(post(&app, "/v1/messages", body).send().await.unwrap().status(), 202);
    }
    let other = app.client.post(app.url("/v1/messages")).bearer_auth(OTHER).json(&plain);
    assert_eq!(other.send().await.unwrap().status(), 202);

    let callbacks: Vec<Option<String>> = queued_jobs(&app).await.into_iter().map(|j| j.callback).collect();
    assert_eq!(
        callbacks,
        [Some("https://billing.example.com/sms-status".into()), Some("https://own.example.com/cb".into()), None],
        "the token's default, the request's own, none for a token without one"
    );
}

#[tokio::test]
async fn the_express_guide_route_is_an_alias() {
    let app = send_app(|_| {}).await;
    let response = post(&app, "/send-sms", &json!({"to": "+14155552671", "text": "hi"})).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(queued_jobs(&app).await.len(), 1);
}

#[tokio::test]
async fn bad_send_requests_are_refused_by_name_and_queue_nothing() {
    let app = send_app(|_| {}).await;
    let valid = json!({"to": "+14155552671", "text": "hi"});
    let url = app.url("/v1/messages");
    type Case = (&'static str, reqwest::RequestBuilder, u16, &'static str, Option<&'static str>);
    let cases: Vec<Case> = vec![
        ("missing token", app.client.post(&url).json(&valid), 401, "unauthorized", None),
        ("wrong token", app.client.post(&url).bearer_auth("not-the-token-at-all").json(&valid), 403, "forbidden", None),
        (
            "malformed JSON",
            app.client.post(&url).bearer_auth(TOKEN).header("content-type", "application/json").body("{\"to\": "),
            400,
            "malformed_json",
            None,
        ),
        (
            "not JSON",
            app.client.post(&url).bearer_auth(TOKEN).header("content-type", "text/plain").body("to=1"),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "unknown field",
            post(&app, "/v1/messages", &json!({"to": "+14155552671", "text": "hi", "priority": 1})),
            422,
            "invalid_field",
            None,
        ),
        ("missing text", post(&app, "/v1/messages", &json!({"to": "+14155552671"})), 422, "invalid_field", None),
        (
            "an id",
            post(
                &app,
                "/v1/messages",
                &json!({"id": "0193a1b2-0000-7000-8000-000000000001", "to": "+14155552671", "text": "hi"}),
            ),
            422,
            "invalid_field",
            None,
        ),
        (
            "a null id",
            post(&app, "/v1/messages", &json!({"id": null, "to": "+14155552671", "text": "hi"})),
            422,
            "invalid_field",
            None,
        ),
        (
            "number instead of text",
            post(&app, "/v1/messages", &json!({"to": 14155552671u64, "text": "hi"})),
            422,
            "invalid_field",
            None,
        ),
        (
            "number too short",
            post(&app, "/v1/messages", &json!({"to": "+1415", "text": "hi"})),
            422,
            "invalid_field",
            Some("to"),
        ),
        (
            "letters in number",
            post(&app, "/v1/messages", &json!({"to": "+1415abc2671", "text": "hi"})),
            422,
            "invalid_field",
            Some("to"),
        ),
        (
            "missing +",
            post(&app, "/v1/messages", &json!({"to": "14155552671", "text": "hi"})),
            422,
            "invalid_field",
            Some("to"),
        ),
        (
            "empty text",
            post(&app, "/v1/messages", &json!({"to": "+14155552671", "text": ""})),
            422,
            "invalid_field",
            Some("text"),
        ),
        (
            "text over 1,600 GSM characters",
            post(&app, "/v1/messages", &json!({"to": "+14155552671", "text": "a".repeat(1601)})),
            422,
            "invalid_field",
            Some("text"),
        ),
        (
            "text over 737 UCS-2 characters",
            post(&app, "/v1/messages", &json!({"to": "+14155552671", "text": "ł".repeat(738)})),
            422,
            "invalid_field",
            Some("text"),
        ),
        (
            "sender and powerpack together",
            post(
                &app,
                "/v1/messages",
                &json!({"to": "+14155552671", "text": "hi", "from": "+14155550100", "powerpack_uuid": "p"}),
            ),
            422,
            "invalid_field",
            Some("from"),
        ),
        (
            "expiry out of range",
            post(&app, "/v1/messages", &json!({"to": "+14155552671", "text": "hi", "message_expiry": 1})),
            422,
            "invalid_field",
            Some("message_expiry"),
        ),
        (
            "metadata not an object",
            post(&app, "/v1/messages", &json!({"to": "+14155552671", "text": "hi", "metadata": [1]})),
            422,
            "invalid_field",
            None,
        ),
    ];
    for (description, request, status, code, field) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{description}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{description}: {body}");
        if let Some(field) = field {
            assert_eq!(body["error"]["field"], field, "{description}: {body}");
        }
        assert!(!body.to_string().contains("4155552671"), "{description}: no phone number echoed: {body}");
    }
    assert!(queued_jobs(&app).await.is_empty());
}

#[tokio::test]
async fn a_token_over_its_rate_gets_429() {
    let app = send_app(|s| {
        s.api.rate_per_second = 1;
        s.api.burst = 2;
    })
    .await;
    let body = json!({"to": "+14155552671", "text": "hi"});
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(post(&app, "/v1/messages", &body).send().await.unwrap().status().as_u16());
    }
    // A burst of 2, then one more per elapsed second at most.
    let allowed = 2 + started.elapsed().as_secs() as usize + 1;
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    assert_eq!(&statuses[..2], [202, 202], "{statuses:?}");
    assert!(statuses.contains(&429) && accepted <= allowed, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 202 || *s == 429), "{statuses:?}");
}

#[tokio::test]
async fn with_the_broker_unreachable_a_send_gets_503_and_nothing_is_promised() {
    let app = spawn_app_with(|s| {
        s.api.tokens = vec![SecretString::from(TOKEN)];
        s.plivo.default_sender = "+14155550100".into();
        s.amqp.url = SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f");
        s.amqp.connect_timeout_ms = 300;
    })
    .await;
    let response = post(&app, "/v1/messages", &json!({"to": "+14155552671", "text": "hi"})).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
}
