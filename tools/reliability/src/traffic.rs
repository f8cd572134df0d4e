//! Traffic while a scenario runs: signed callbacks straight to the ingress, send jobs over
//! HTTP, and what the valid ones were answered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::future::FusedFuture as _;
use futures_util::{FutureExt as _, StreamExt as _};
use shared::plivo::callback::field;
use shared::testing::{Probe, TEST_AUTH_TOKEN};

use crate::API_TOKEN;

/// Posts signed callbacks to the ingress; cheap to clone into a task of its own.
#[derive(Clone)]
pub struct Callbacks {
    client: reqwest::Client,
    ingress_addr: SocketAddr,
}

impl Callbacks {
    pub fn new(client: reqwest::Client, ingress_addr: SocketAddr) -> Self {
        Self { client, ingress_addr }
    }

    /// A status callback signed as Plivo signs it (V3, the simulator's auth token).
    pub fn signed_callback(&self, params: &[(&str, &str)], nonce: &str) -> reqwest::RequestBuilder {
        let url = format!("http://{}/plivo/callback", self.ingress_addr);
        let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let signed = shared::plivo::signature::SignedCallback::new(TEST_AUTH_TOKEN, false, &url, &params, nonce)
            .expect("sign a callback");
        let mut request = self.client.post(url);
        for (name, value) in signed.wire_headers() {
            request = request.header(name, value);
        }
        request.body(signed.form.unwrap_or_default())
    }

    /// Posts one signed callback; the answer's status code (0 if there was none).
    pub async fn post_signed_callback(&self, params: &[(&str, &str)]) -> u16 {
        let nonce = format!("{:020}", rand::random::<u64>());
        self.signed_callback(params, &nonce).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
    }

    /// Valid signed callbacks every 50 ms until `until` completes: how the ingress treats
    /// real traffic while something else is going on.
    pub async fn probe_valid_callbacks(&self, label: &str, until: impl std::future::Future<Output = ()>) -> Probe {
        let mut probe = Probe::default();
        let mut until = std::pin::pin!(until.fuse());
        while !until.is_terminated() {
            let uuid = format!("probe-{label}-{}", probe.sent);
            let started = Instant::now();
            let status = self.post_signed_callback(&[(field::MESSAGE_UUID, &uuid), (field::STATUS, "queued")]).await;
            probe.sent += 1;
            if status == 200 {
                probe.accepted += 1;
                probe.latencies_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            tokio::select! {
                () = &mut until => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        probe
    }
}

/// Send jobs over HTTP, as a client would: a refused request is retried with the same
/// idempotency key (so a retry is never a second SMS).
#[derive(Clone)]
pub struct Traffic {
    client: reqwest::Client,
    url: String,
}

impl Traffic {
    pub fn new(client: reqwest::Client, ingress_addr: SocketAddr) -> Self {
        Self { client, url: format!("http://{ingress_addr}/v1/messages") }
    }

    /// `count` jobs at `per_second`; returns the ids that got a 202. A job still refused
    /// `give_up` after its turn is abandoned (the scenario then sees fewer jobs than it sent).
    pub async fn send(self, count: usize, per_second: f64, give_up: Duration) -> Vec<String> {
        let started = Instant::now();
        let results: Vec<Option<String>> = futures_util::stream::iter(0..count)
            .map(|i| {
                let (client, url) = (self.client.clone(), self.url.clone());
                async move {
                    let turn = started + Duration::from_secs_f64(i as f64 / per_second);
                    tokio::time::sleep_until(turn.into()).await;
                    while turn.elapsed() < give_up {
                        let body = serde_json::json!({"to": format!("+1415555{:04}", i % 9000), "text": format!("reliability {i}")});
                        let response = client
                            .post(&url)
                            .bearer_auth(API_TOKEN)
                            .header("Idempotency-Key", format!("job-{i}"))
                            .timeout(Duration::from_secs(5))
                            .json(&body)
                            .send()
                            .await;
                        if let Ok(response) = response
                            && response.status() == 202
                        {
                            return response.json::<serde_json::Value>().await.ok()?["id"].as_str().map(str::to_owned);
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    None
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut ids: Vec<String> = results.into_iter().flatten().collect();
        ids.sort();
        ids.dedup();
        ids
    }
}
