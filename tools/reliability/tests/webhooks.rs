//! Signed webhooks end to end: a message sent with a callback URL, the simulator moving it on,
//! and a local receiver that answers 500 twice and then 200 to each event. The receiver gets
//! every status event three times with one `webhook-id`; the signatures verify with the
//! Standard Webhooks reference library (PyPI `standardwebhooks`, run by the test); the message
//! view shows the attempts. A receiver on a loopback address is refused unless allowed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse as _;
use futures_util::StreamExt as _;
use plivo_sim::SimConfig;
use reliability::{API_TOKEN, Stack};
use shared::amqp::Stream;
use shared::testing::TEST_WEBHOOK_SECRET;
use sqlx::PgPool;

/// One request as the receiver saw it.
#[derive(Debug, Clone, serde::Serialize)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

/// A local webhook receiver: per `webhook-id`, the first `failures` requests get 500 (or,
/// with `redirect`, a 302 to another path of the receiver, which counts what reaches it).
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(failures: usize) -> Self {
        Self::start_answering(failures, false).await
    }

    async fn start_answering(failures: usize, redirect: bool) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        let answer = move |headers: HeaderMap, body: Bytes| {
            let log = log.clone();
            async move {
                let header =
                    |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let request = Received {
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    body: String::from_utf8(body.to_vec()).expect("a JSON body"),
                };
                let mut log = log.lock().unwrap();
                let seen = log.iter().filter(|r| r.id == request.id).count();
                log.push(request);
                match seen < failures {
                    true if redirect => (StatusCode::FOUND, [("location", "/followed")]).into_response(),
                    true => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    false => StatusCode::OK.into_response(),
                }
            }
        };
        let followed = received.clone();
        let follow = move |headers: HeaderMap| {
            let followed = followed.clone();
            async move {
                let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let marker =
                    Received { id, timestamp: String::new(), signature: "followed".into(), body: String::new() };
                followed.lock().unwrap().push(marker);
                StatusCode::OK
            }
        };
        let app = axum::Router::new()
            .route("/hooks/sms", axum::routing::post(answer))
            .route("/followed", axum::routing::any(follow));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url: format!("http://{address}/hooks/sms?token=receiver-secret"), received }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// Every message delivered, quickly.
fn sim_config() -> SimConfig {
    SimConfig {
        weights: plivo_sim::story::StoryWeights { delivered: 100, undelivered: 0, failed: 0, sent_only: 0 },
        latency_ms: 50,
        duplicate_share: 0.0,
        out_of_order_share: 0.0,
        time_scale: 0.01,
        ..reliability::sim_config()
    }
}

async fn send_with_callback(stack: &Stack, callback: &str) -> String {
    let body = serde_json::json!({"to": "+14155552671", "text": "your code is 1234", "callback": callback});
    let response =
        stack.client.post(format!("{}/v1/messages", stack.ingress_url)).bearer_auth(API_TOKEN).json(&body).send().await;
    let response = response.unwrap();
    assert_eq!(response.status(), 202);
    response.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

/// The message's view; `null` until the worker has recorded the job (404 until then).
async fn message_view(stack: &Stack, id: &str) -> serde_json::Value {
    let url = format!("{}/v1/messages/{id}", stack.ingress_url);
    let response = stack.client.get(url).bearer_auth(API_TOKEN).send().await.unwrap();
    match response.status().as_u16() {
        404 => serde_json::Value::Null,
        200 => response.json().await.unwrap(),
        other => panic!("GET /v1/messages/{id} answered {other}"),
    }
}

/// Waits until the view's attempts satisfy `done`, and returns the view.
async fn wait_for_attempts(
    stack: &Stack,
    id: &str,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> serde_json::Value {
    for _ in 0..300 {
        let view = message_view(stack, id).await;
        if done(view["webhook_attempts"].as_array().map(Vec::as_slice).unwrap_or_default()) {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {:#}", message_view(stack, id).await);
}

/// Runs the Standard Webhooks reference verifier over the requests: the count it verified, and
/// the count it refused once each body was altered by one character.
fn verify_with_the_reference_library(secret: &str, requests: &[Received]) -> (usize, usize) {
    let python = std::env::var("SMSFLOW_TEST_WEBHOOK_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SMSFLOW_TEST_WEBHOOK_PYTHON is not set: run the tests with tools/test, which prepares a Python with \
             the standardwebhooks package, or point it at one (pip install standardwebhooks==1.1.0)"
        )
    });
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
secret, requests = sys.argv[1], json.load(sys.stdin)
verified = refused = 0
for r in requests:
    headers = {"webhook-id": r["id"], "webhook-timestamp": r["timestamp"], "webhook-signature": r["signature"]}
    Webhook(secret).verify(r["body"], headers)
    verified += 1
    try:
        Webhook(secret).verify(r["body"].replace("message", "massage", 1), headers)
    except WebhookVerificationError:
        refused += 1
print(verified, refused)
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(&serde_json::to_vec(requests).unwrap()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the verifier failed: {}{stdout}", String::from_utf8_lossy(&output.stderr));
    let counts: Vec<usize> = stdout.split_whitespace().map(|n| n.parse().unwrap()).collect();
    (counts[0], counts[1])
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_receiver_failing_twice_gets_each_event_three_times_signed_and_the_view_shows_the_attempts(pool: PgPool) {
    let receiver = Receiver::start(2).await;
    let stack = Stack::start(pool.clone(), sim_config(), |_, _| {}).await;
    let mut events = stack.broker.subscribe_to_events("message.status.*").await;
    let id = send_with_callback(&stack, &receiver.url).await;

    // delivered is the last status: once its webhook got through, every event has been tried.
    let view = wait_for_attempts(&stack, &id, "the delivered event's webhook", |attempts| {
        attempts.iter().any(|a| a["event_type"] == "message.status.delivered" && a["outcome"] == "delivered")
    })
    .await;
    assert_eq!(view["status"], "delivered");

    let mut subscribed = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        let event: shared::amqp::contracts::Event = serde_json::from_slice(&delivery.unwrap().data).unwrap();
        subscribed.push(event.id.to_string());
    }
    // Every event also went out over AMQP, and every one of them as a webhook, three times.
    let view = wait_for_attempts(&stack, &id, "three attempts of every event", |attempts| {
        attempts.len() == 3 * subscribed.len()
    })
    .await;
    let mut by_event: BTreeMap<String, Vec<(i64, String, Option<i64>)>> = BTreeMap::new();
    for attempt in view["webhook_attempts"].as_array().unwrap() {
        by_event.entry(attempt["event_id"].as_str().unwrap().to_owned()).or_default().push((
            attempt["attempt"].as_i64().unwrap(),
            attempt["outcome"].as_str().unwrap().to_owned(),
            attempt["status_code"].as_i64(),
        ));
        let origin = receiver.url.split("/hooks").next().unwrap();
        assert_eq!(attempt["endpoint"], origin, "neither the path nor the query is shown");
    }
    let mut event_ids: Vec<&String> = by_event.keys().collect();
    event_ids.sort();
    subscribed.sort();
    assert_eq!(event_ids, subscribed.iter().collect::<Vec<_>>(), "one webhook per status event");
    assert!(subscribed.len() >= 3, "accepted, at least one step, delivered: {subscribed:?}");
    for (event, attempts) in &by_event {
        assert_eq!(
            attempts,
            &vec![
                (1, "rejected".to_owned(), Some(500)),
                (2, "rejected".to_owned(), Some(500)),
                (3, "delivered".to_owned(), Some(200)),
            ],
            "event {event}"
        );
    }

    let received = receiver.received();
    assert_eq!(received.len(), 3 * subscribed.len());
    let mut per_id: HashMap<&str, Vec<&str>> = HashMap::new();
    for request in &received {
        per_id.entry(request.id.as_str()).or_default().push(request.body.as_str());
    }
    for (webhook_id, bodies) in &per_id {
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every attempt of {webhook_id} carries the same event");
        let event: serde_json::Value = serde_json::from_str(bodies[0]).unwrap();
        assert_eq!(event["id"], *webhook_id, "webhook-id is the event id");
        assert_eq!(event["data"]["message_id"], id.as_str());
    }
    let (verified, refused) = verify_with_the_reference_library(TEST_WEBHOOK_SECRET, &received);
    assert_eq!((verified, refused), (received.len(), received.len()), "every signature verifies, no altered body does");
    assert_eq!(stack.broker.len(&stack.broker.topology.dead_letter_queue(Stream::Webhook)).await, 0);
    stack.stop().await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_receiver_on_a_loopback_address_is_refused_unless_allowed(pool: PgPool) {
    let receiver = Receiver::start(0).await;
    let stack =
        Stack::start(pool.clone(), sim_config(), |_, worker| worker.webhooks.allow_private_addresses = false).await;
    // By address, and by a name that resolves to it.
    let by_address = send_with_callback(&stack, &receiver.url).await;
    let by_name = send_with_callback(&stack, &receiver.url.replace("127.0.0.1", "localhost")).await;
    let mut refused = 0u32;
    for id in [&by_address, &by_name] {
        let view = wait_for_attempts(&stack, id, "the delivered event's refusal", |attempts| {
            attempts.iter().any(|a| a["event_type"] == "message.status.delivered")
        })
        .await;
        for attempt in view["webhook_attempts"].as_array().unwrap() {
            assert_eq!(attempt["outcome"], "refused_address", "{attempt}");
            assert_eq!(attempt["attempt"], 1, "a refused address is never retried: {attempt}");
            assert!(attempt["error"].as_str().unwrap().contains("public address"), "{attempt}");
            refused += 1;
        }
    }
    let dead = stack.broker.topology.dead_letter_queue(Stream::Webhook);
    for _ in 0..50 {
        if stack.broker.len(&dead).await >= refused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stack.broker.len(&dead).await, refused, "each refused webhook is dead-lettered, once");
    assert!(receiver.received().is_empty(), "nothing reached the receiver");
    stack.stop().await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_redirect_is_never_followed_and_the_last_attempt_dead_letters_signed_with_both_secrets_in_rotation(
    pool: PgPool,
) {
    const NEW_SECRET: &str = "whsec_bmV3IHNtc2Zsb3cgd2ViaG9vayBzZWNyZXQsIDMyIGI=";
    let receiver = Receiver::start_answering(usize::MAX, true).await;
    let stack = Stack::start(pool.clone(), sim_config(), |_, worker| {
        worker.webhooks.secrets =
            vec![secrecy::SecretString::from(NEW_SECRET), secrecy::SecretString::from(TEST_WEBHOOK_SECRET)];
    })
    .await;
    let id = send_with_callback(&stack, &receiver.url).await;
    // The ladder has two rungs: three attempts, each answered 302, then the dead-letter queue.
    let view = wait_for_attempts(&stack, &id, "the delivered event's third attempt", |attempts| {
        attempts.iter().any(|a| a["event_type"] == "message.status.delivered" && a["attempt"] == 3)
    })
    .await;
    let attempts = view["webhook_attempts"].as_array().unwrap();
    assert!(attempts.iter().all(|a| a["outcome"] == "rejected" && a["status_code"] == 302), "{attempts:?}");
    let events: std::collections::BTreeSet<&str> = attempts.iter().map(|a| a["event_id"].as_str().unwrap()).collect();
    let dead = stack.broker.topology.dead_letter_queue(Stream::Webhook);
    for _ in 0..100 {
        let tried = message_view(&stack, &id).await["webhook_attempts"].as_array().map_or(0, Vec::len);
        if tried == 3 * events.len() && stack.broker.len(&dead).await as usize == events.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stack.broker.len(&dead).await as usize,
        events.len(),
        "each event's webhook dead-lettered after 3 tries"
    );
    let received = receiver.received();
    assert!(received.iter().all(|r| r.signature != "followed"), "a redirect is never followed");
    assert_eq!(received.len(), 3 * events.len());
    for secret in [NEW_SECRET, TEST_WEBHOOK_SECRET] {
        let (verified, _) = verify_with_the_reference_library(secret, &received);
        assert_eq!(verified, received.len(), "a receiver that knows either secret verifies every webhook");
    }
    stack.stop().await;
}
