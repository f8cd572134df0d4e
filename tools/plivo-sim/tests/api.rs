//! The simulator itself: Plivo's checks and answers, signed callbacks, Plivo's retry schedule.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use plivo_sim::{SimConfig, SimMessage, Simulator};
use secrecy::SecretString;
use shared::plivo::form::parse_body;
use shared::plivo::signature::{SignatureHeaders, Verifier};

const TOKEN: &str = "sim-test-token";
const AUTH_ID: &str = "MASIMTEST00000000001";

fn config() -> SimConfig {
    SimConfig {
        auth_id: AUTH_ID.into(),
        auth_token: TOKEN.into(),
        rate_limit: 1000.0,
        weights: plivo_sim::story::StoryWeights { delivered: 1, undelivered: 0, failed: 0, sent_only: 0 },
        latency_ms: 0,
        duplicate_share: 0.0,
        out_of_order_share: 0.0,
        time_scale: 0.001,
    }
}

fn send(client: &reqwest::Client, sim: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
    client.post(format!("{sim}/v1/Account/{AUTH_ID}/Message/")).basic_auth(AUTH_ID, Some(TOKEN)).json(&body)
}

#[tokio::test]
async fn the_send_api_checks_like_plivo_and_answers_in_plivo_shapes() {
    let running = Simulator::start(config()).await;
    let sim = &running.url;
    let client = reqwest::Client::new();

    let wrong = client
        .post(format!("{sim}/v1/Account/{AUTH_ID}/Message/"))
        .basic_auth(AUTH_ID, Some("wrong"))
        .json(&serde_json::json!({"src": "1", "dst": "2", "text": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.json::<serde_json::Value>().await.unwrap()["error"].is_string());

    for (body, missing) in [
        (serde_json::json!({"dst": "14155552671", "text": "t"}), "src"),
        (serde_json::json!({"src": "14155550100", "text": "t"}), "dst"),
        (serde_json::json!({"src": "14155550100", "dst": "14155552671"}), "text"),
    ] {
        let response = send(&client, sim, body).send().await.unwrap();
        assert_eq!(response.status(), 400, "missing {missing}");
        let error = response.json::<serde_json::Value>().await.unwrap()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(missing), "{error}");
    }

    let ok =
        send(&client, sim, serde_json::json!({"src": "14155550100", "dst": "14155552671<14155552672", "text": "t"}))
            .send()
            .await
            .unwrap();
    assert_eq!(ok.status(), 202);
    let body: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(body["message_uuid"].as_array().unwrap().len(), 2, "one uuid per destination");
    assert_eq!(body["message"], "message(s) queued");
}

#[tokio::test]
async fn over_its_rate_the_api_answers_429() {
    let running = Simulator::start(SimConfig { rate_limit: 2.0, ..config() }).await;
    let sim = &running.url;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let body = serde_json::json!({"src": "14155550100", "dst": "14155552671", "text": "t"});
        statuses.push(send(&client, sim, body).send().await.unwrap().status().as_u16());
    }
    assert!(statuses.contains(&429) && statuses[0] == 202, "{statuses:?}");
}

/// A callback target that answers 500 to the first `failures` requests, and checks signatures.
async fn target(failures: usize) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let valid = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cb?ref=abc", listener.local_addr().unwrap());
    let (seen2, valid2, url2) = (seen.clone(), valid.clone(), url.clone());
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (seen, valid, url) = (seen2.clone(), valid2.clone(), url2.clone());
            async move {
                let params = parse_body(&body).unwrap();
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                let sig = SignatureHeaders {
                    v3: header("x-plivo-signature-v3"),
                    v3_nonce: header("x-plivo-signature-v3-nonce"),
                    ..Default::default()
                };
                let verifier = Verifier::new(vec![SecretString::from(TOKEN)], None, false);
                if verifier.verify(&sig, "POST", &url, &params).is_ok() {
                    valid.fetch_add(1, Ordering::Relaxed);
                }
                if seen.fetch_add(1, Ordering::Relaxed) < failures {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen, valid)
}

#[tokio::test]
async fn callbacks_are_signed_and_retried_on_plivos_schedule() {
    let running = Simulator::start(config()).await;
    let sim = &running.url;
    let (callback_url, seen, valid) = target(2).await;
    let client = reqwest::Client::new();
    let body = serde_json::json!({"src": "14155550100", "dst": "14155552671", "text": "t", "url": callback_url});
    let answer: serde_json::Value = send(&client, sim, body).send().await.unwrap().json().await.unwrap();
    let uuid = answer["message_uuid"][0].as_str().unwrap().to_owned();

    let mut message: Option<SimMessage> = None;
    for _ in 0..100 {
        let m: SimMessage =
            client.get(format!("{sim}/_sim/messages/{uuid}")).send().await.unwrap().json().await.unwrap();
        if m.finished {
            message = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let message = message.expect("story finished");

    assert_eq!(message.final_status, "delivered");
    let statuses: Vec<&str> = message.callbacks.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(statuses, ["queued", "sent", "delivered"]);
    let first = &message.callbacks[0];
    let answers: Vec<Option<u16>> = first.attempts.iter().map(|a| a.status).collect();
    assert_eq!(answers, [Some(500), Some(500), Some(200)], "retried after non-2xx answers");
    assert!(message.callbacks.iter().all(|c| c.acknowledged));
    assert_eq!(seen.load(Ordering::Relaxed), 5);
    assert_eq!(valid.load(Ordering::Relaxed), 5, "every callback carries a valid V3 signature");
}

#[tokio::test]
async fn scripted_answers_are_played_in_order_and_every_request_is_recorded() {
    use plivo_sim::ScriptedAnswer;
    let sim = Simulator::start(config()).await;
    let client = reqwest::Client::new();
    sim.script(&[
        ScriptedAnswer::refuse(503, "try later"),
        ScriptedAnswer { message_uuid: Some("chosen-uuid".into()), ..ScriptedAnswer::accept() },
    ])
    .await;
    let body = |text: &str| serde_json::json!({"src": "14155550100", "dst": "14155552671", "text": text});

    let refused = send(&client, &sim.url, body("one")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.json::<serde_json::Value>().await.unwrap()["error"], "try later");
    let chosen = send(&client, &sim.url, body("two")).send().await.unwrap();
    assert_eq!(chosen.status(), 202);
    assert_eq!(chosen.json::<serde_json::Value>().await.unwrap()["message_uuid"][0], "chosen-uuid");
    let unscripted = send(&client, &sim.url, body("three")).send().await.unwrap();
    assert_eq!(unscripted.status(), 202, "past the script, the configured behaviour");

    let requests = sim.requests().await;
    let seen: Vec<_> = requests.iter().map(|r| (r.body["text"].as_str().unwrap(), r.answered)).collect();
    assert_eq!(seen, [("one", Some(503)), ("two", Some(202)), ("three", Some(202))]);
    assert_eq!(sim.stats().await.messages_accepted, 2);

    let refused = client
        .post(format!("{}/_sim/script", sim.url))
        .json(&serde_json::json!([{"status": 99}]))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400, "a status that is not an HTTP answer is refused");
}

#[tokio::test]
async fn a_control_route_without_a_body_answers_with_the_shape_it_expects() {
    let sim = Simulator::start(config()).await;
    let client = reqwest::Client::new();
    let routes = [
        ("/_sim/inbound", "\"from\""),
        ("/_sim/external", "\"story\""),
        ("/_sim/script", "\"status\""),
        ("/_sim/faults", "\"fault\""),
    ];
    for (route, names) in routes {
        for body in ["", "{\"nonsense\": true}"] {
            let request = client.post(format!("{}{route}", sim.url)).header("content-type", "application/json");
            let response = request.body(body).send().await.unwrap();
            assert_eq!(response.status(), 400, "{route} with {body:?}");
            let answer: serde_json::Value = response.json().await.unwrap();
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(error.starts_with("expected a JSON body") && error.contains(names), "{route}: {error}");
        }
    }
}
