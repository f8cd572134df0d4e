use std::net::SocketAddr;
use std::time::Duration;

use shared::amqp::Stream;
use shared::amqp::contracts::CallbackEvent;
use shared::config::IngressSettings;
use shared::plivo::signature::SignedCallback;
use shared::testing::{TEST_AUTH_TOKEN, TEST_PUBLIC_BASE_URL, TestBroker, base_ingress_settings};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub address: SocketAddr,
    /// The admin listener (/metrics).
    pub admin: SocketAddr,
    pub broker: TestBroker,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: JoinHandle<anyhow::Result<()>>,
}

pub fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A realistic status callback for `message_uuid`.
pub fn status_params(message_uuid: &str, status: &str) -> Vec<(String, String)> {
    pairs(&[
        ("MessageUUID", message_uuid),
        ("Status", status),
        ("To", "14155550199"),
        ("From", "14155550123"),
        ("Units", "1"),
        ("TotalRate", "0.00650"),
        ("TotalAmount", "0.00650"),
        ("ErrorCode", ""),
        ("Sequence", "2"),
        ("MessageTime", "2026-11-27 10:00:00.000001"),
    ])
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the ingress on 127.0.0.1:0 with a fresh topology; `adjust` may change settings.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut IngressSettings)) -> TestApp {
    let broker = TestBroker::new().await;
    let mut settings = base_ingress_settings();
    settings.amqp = broker.amqp_settings();
    adjust(&mut settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(ingress::run(settings, listener, Some(admin_listener), shutdown.clone()));
    let app = TestApp { address, admin, broker, client: reqwest::Client::new(), shutdown, server };
    app.broker.topology.declare(&app.broker.channel).await.expect("declare topology");
    app
}

impl TestApp {
    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        self.client.get(url).send().await.unwrap().text().await.unwrap()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.address)
    }

    /// Waits until /readyz says the broker is connected.
    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ingress did not become ready within 10 s");
    }

    /// A POST signed with the test token the way Plivo signs it.
    pub fn signed_post(&self, path_and_query: &str, params: &[(String, String)]) -> reqwest::RequestBuilder {
        signed_post(&self.client, &self.url(path_and_query), path_and_query, params)
    }

    pub async fn post_signed(&self, path_and_query: &str, params: &[(String, String)]) -> reqwest::Response {
        self.signed_post(path_and_query, params).send().await.expect("request sent")
    }

    /// Every event waiting in a stream's work queue, in order (a batch message's callbacks one
    /// after the other, each with its message's properties).
    pub async fn drain(&self, stream: Stream) -> Vec<(CallbackEvent, lapin::BasicProperties)> {
        let messages = self.drain_messages(stream).await;
        messages
            .into_iter()
            .flat_map(|(events, properties)| events.into_iter().map(move |e| (e, properties.clone())))
            .collect()
    }

    /// Every message waiting in a stream's work queue, in order, with the callbacks it holds:
    /// one (version 1) or several (a version-2 batch).
    pub async fn drain_messages(&self, stream: Stream) -> Vec<(Vec<CallbackEvent>, lapin::BasicProperties)> {
        let queue = self.broker.topology.queue(stream);
        let mut messages = Vec::new();
        while let Some(message) = self.broker.get(&queue).await {
            let events = shared::testing::callbacks_in(&message.delivery.data);
            messages.push((events, message.delivery.properties.clone()));
        }
        messages
    }
}

pub fn signed_post(
    client: &reqwest::Client,
    full_url: &str,
    path_and_query: &str,
    params: &[(String, String)],
) -> reqwest::RequestBuilder {
    let public_url = format!("{TEST_PUBLIC_BASE_URL}{path_and_query}");
    let signed = SignedCallback::new(TEST_AUTH_TOKEN, false, &public_url, params, &SignedCallback::nonce()).unwrap();
    let mut request = client.post(full_url);
    for (name, value) in signed.wire_headers() {
        request = request.header(name, value);
    }
    request.body(signed.form.unwrap_or_default())
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.server.abort();
    }
}
