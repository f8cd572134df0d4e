//! The whole system in one process, for tests and benchmarks that need it running but inject no
//! faults: the Plivo simulator, the ingress and the worker, on a test topology of the real
//! RabbitMQ and the test's PostgreSQL database. `System` adds the fault injection around the
//! same wiring.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use plivo_sim::{SimConfig, Simulator};
use secrecy::SecretString;
use shared::config::{AmqpSettings, IngressSettings, WorkerSettings};
use shared::testing::{TestBroker, base_ingress_settings, base_worker_settings};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Callbacks;

/// The send API's bearer token in every in-process system.
pub const API_TOKEN: &str = "reliability-api-token-0123";
/// The simulator's Plivo Auth ID.
pub const SIM_AUTH_ID: &str = "MASIMULATOR000000001";
/// The default sender number.
pub const SENDER: &str = "+14155559999";

/// Ingress and worker settings wired to one broker, to each other (the worker's callback URL
/// is the ingress) and to the simulator, with limits loose enough not to be what a test meets.
pub fn wired_settings(amqp: &AmqpSettings, ingress_url: &str, sim_url: &str) -> (IngressSettings, WorkerSettings) {
    let mut ingress = base_ingress_settings();
    ingress.amqp = amqp.clone();
    ingress.http.public_base_url = ingress_url.to_owned();
    ingress.api.tokens = vec![SecretString::from(API_TOKEN)];
    ingress.api.rate_per_second = 10_000;
    ingress.api.burst = 10_000;
    ingress.plivo.default_sender = SENDER.into();
    let mut worker = base_worker_settings();
    worker.amqp = amqp.clone();
    worker.http.public_base_url = ingress_url.to_owned();
    worker.plivo.api_base_url = sim_url.to_owned();
    worker.plivo.auth_id = SIM_AUTH_ID.into();
    worker.plivo.default_sender = SENDER.into();
    worker.sending.sender_rate_per_second = 2000.0;
    worker.sending.sender_burst = 2000;
    (ingress, worker)
}

/// Waits (at most 30 s) until the ingress at `base` answers `/readyz` with 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let probe = client.get(format!("{base}/readyz")).timeout(Duration::from_secs(2));
        if probe.send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the ingress at {base} did not become ready within 30 s");
}

pub async fn bind_local() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a local port");
    let address = listener.local_addr().expect("local address");
    (listener, address)
}

/// Simulator, ingress and worker running; `stop` shuts them down and fails if the worker failed.
pub struct Stack {
    pub broker: TestBroker,
    pub ingress_url: String,
    pub sim: Simulator,
    pub worker_settings: WorkerSettings,
    pub client: reqwest::Client,
    ingress_addr: SocketAddr,
    shutdown: CancellationToken,
    worker: JoinHandle<anyhow::Result<()>>,
}

impl Stack {
    /// Starts everything, `tune` adjusting the wired settings first, and returns once the
    /// ingress is ready.
    pub async fn start(
        pool: PgPool,
        sim: SimConfig,
        tune: impl FnOnce(&mut IngressSettings, &mut WorkerSettings),
    ) -> Self {
        let broker = TestBroker::new().await;
        let shutdown = CancellationToken::new();
        let sim = Simulator::start(sim).await;
        let (ingress_listener, ingress_addr) = bind_local().await;
        let ingress_url = format!("http://{ingress_addr}");
        let (mut ingress_settings, mut worker_settings) =
            wired_settings(&broker.amqp_settings(), &ingress_url, &sim.url);
        // The status API and the ingress's idempotency check read the test's database.
        ingress_settings.database.url = SecretString::from(shared::testing::database_url(&pool));
        tune(&mut ingress_settings, &mut worker_settings);
        tokio::spawn(ingress::run(ingress_settings, ingress_listener, None, shutdown.clone()));
        let worker = tokio::spawn(worker::run_with(worker_settings.clone(), pool, None, shutdown.clone()));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("HTTP client");
        wait_ready(&client, &ingress_url).await;
        Self { broker, ingress_url, sim, worker_settings, client, ingress_addr, shutdown, worker }
    }

    /// Signed callbacks straight to the ingress, as Plivo would send them.
    pub fn callbacks(&self) -> Callbacks {
        Callbacks::new(self.client.clone(), self.ingress_addr)
    }

    /// Shuts everything down; panics if the worker ended with an error or did not stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.worker).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("the worker failed: {e:#}"),
            Ok(Err(e)) => panic!("the worker task failed: {e}"),
            Err(_) => panic!("the worker did not stop within 30 s"),
        }
    }
}
