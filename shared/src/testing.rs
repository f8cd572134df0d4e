//! Test support (feature `test-support`): real RabbitMQ and PostgreSQL, isolated per test.
//! A missing service fails the test loudly with the command that starts it.

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::SecretString;

use crate::amqp::{Stream, Topology};
use crate::config::{AmqpSettings, IngressSettings, WorkerSettings};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const TEST_AUTH_TOKEN: &str = "MzRmNzU0ZTc1ZDFiNWNlZmE3YjRlYjU2ZTk4ZDBk";
pub const TEST_PUBLIC_BASE_URL: &str = "https://hooks.test.example";
/// The webhook signing secret of test workers (32 bytes).
pub const TEST_WEBHOOK_SECRET: &str = "whsec_c21zZmxvdyB0ZXN0IHdlYmhvb2sgc2VjcmV0IGtleSE=";

pub fn amqp_url() -> String {
    std::env::var("SMSFLOW_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// A test's queues outlive it only this long, whatever re-declared them after its cleanup (a
/// worker still reconnecting, a killed test process). Longer than the longest scenario.
const TEST_QUEUE_EXPIRY_MS: u64 = 60 * 60 * 1000;

const START_HINT: &str = "start it with `docker compose up -d rabbitmq` or `rabbitmq-server -detached`";

/// A RabbitMQ topology under a random prefix, deleted when dropped.
pub struct TestBroker {
    pub prefix: String,
    pub topology: Topology,
    pub connection: Connection,
    pub channel: Channel,
    /// Whether dropping this deletes the topology (false for `attach`ed handles).
    owns_topology: bool,
}

impl TestBroker {
    pub async fn new() -> Self {
        Self::with_retry_delays(vec![200, 400]).await
    }

    pub async fn with_retry_delays(retry_delays_ms: Vec<u64>) -> Self {
        let prefix = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let topology = Topology::new(prefix.clone(), 5, retry_delays_ms).with_idle_expiry(TEST_QUEUE_EXPIRY_MS);
        Self::open(prefix, topology, true).await
    }

    /// A second handle on an existing test topology, on a connection of its own (e.g. after
    /// the first one died with a stopped broker); dropping it leaves the topology in place.
    pub async fn attach(topology: &Topology) -> Self {
        Self::open(topology.prefix().to_owned(), topology.clone(), false).await
    }

    async fn open(prefix: String, topology: Topology, owns_topology: bool) -> Self {
        let url = amqp_url();
        let opening = async {
            let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        let (connection, channel) = match tokio::time::timeout(std::time::Duration::from_secs(10), opening).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => panic!("RabbitMQ is not reachable at {url}: {e}; {START_HINT}"),
            Err(_) => panic!("RabbitMQ at {url} did not answer within 10 s; {START_HINT}"),
        };
        Self { prefix, topology, connection, channel, owns_topology }
    }

    /// Settings pointing at this broker and prefix.
    pub fn amqp_settings(&self) -> AmqpSettings {
        let mut settings = base_ingress_settings().amqp;
        settings.url = SecretString::from(amqp_url());
        settings.prefix = self.prefix.clone();
        settings.delivery_limit = 5;
        settings.retry_delays_ms = self.topology.retry_delays_ms().to_vec();
        settings.idle_queue_expiry_ms = self.topology.idle_expiry_ms();
        settings
    }

    /// The same settings as environment variables, for a service started as a child process.
    pub fn amqp_env(&self) -> Vec<(&'static str, String)> {
        let settings = self.amqp_settings();
        vec![
            ("SMSFLOW_AMQP__URL", amqp_url()),
            ("SMSFLOW_AMQP__PREFIX", settings.prefix),
            ("SMSFLOW_AMQP__DELIVERY_LIMIT", settings.delivery_limit.to_string()),
            ("SMSFLOW_AMQP__RETRY_DELAYS_MS", format!("{:?}", settings.retry_delays_ms)),
            ("SMSFLOW_AMQP__IDLE_QUEUE_EXPIRY_MS", settings.idle_queue_expiry_ms.to_string()),
        ]
    }

    /// Takes one message off a queue, if any.
    pub async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic.get on {queue}: {e}"))
    }

    /// Messages ready in a queue.
    pub async fn len(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        self.channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("queue {queue} does not exist: {e}"))
            .message_count()
    }

    /// A subscribing service's queue bound to the events exchange with `pattern` (`#` for every
    /// event); exclusive and auto-acknowledged, so the broker deletes it with this connection.
    pub async fn subscribe_to_events(&self, pattern: &str) -> lapin::Consumer {
        use lapin::options::{BasicConsumeOptions, QueueBindOptions};
        let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
        let queue = self.channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
        let (name, exchange) = (queue.name().as_str(), self.topology.events_exchange());
        let bind = QueueBindOptions::default();
        self.channel
            .queue_bind(name.into(), exchange.into(), pattern.into(), bind, FieldTable::default())
            .await
            .unwrap();
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        self.channel.basic_consume(name.into(), "".into(), no_ack, FieldTable::default()).await.unwrap()
    }

    fn queue_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for stream in Stream::ALL {
            names.push(self.topology.queue(stream));
            names.push(self.topology.dead_letter_queue(stream));
            names.extend(
                (1..=self.topology.retry_delays_ms().len()).filter_map(|n| self.topology.retry_queue(stream, n)),
            );
        }
        names
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if !self.owns_topology {
            return;
        }
        let queues = self.queue_names();
        let exchanges =
            [self.topology.exchange(), self.topology.dead_letter_exchange(), self.topology.events_exchange()];
        // Drop cannot await; clean up on a thread of its own so a failed test still cleans up.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            // Bounded: a broker that stops answering must not turn a test's end into a hang.
            let cleanup = async move {
                let Ok(connection) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else {
                    return;
                };
                for queue in queues {
                    let Ok(channel) = connection.create_channel().await else {
                        return;
                    };
                    let _ = channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
                }
                for exchange in exchanges {
                    let Ok(channel) = connection.create_channel().await else {
                        return;
                    };
                    let _ = channel.exchange_delete(exchange.into(), Default::default()).await;
                }
                let _ = connection.close(200, "test cleanup".into()).await;
            };
            let _ = runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(15), cleanup).await });
        })
        .join();
    }
}

/// Answers to valid callbacks sent while something else went on (a fault, an attack).
#[derive(Debug, Default, Clone)]
pub struct Probe {
    pub sent: usize,
    pub accepted: usize,
    pub latencies_ms: Vec<f64>,
}

impl Probe {
    /// The latency at quantile `q` (0..=1) of the accepted callbacks, in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(index).copied().unwrap_or(f64::NAN)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} of {} valid callbacks answered 200, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.accepted,
            self.sent,
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(1.0)
        )
    }
}

/// A callback event as the ingress would queue it, carrying `params`.
pub fn callback_event(params: &[(&str, &str)]) -> crate::amqp::contracts::CallbackEvent {
    use crate::amqp::contracts::CallbackEvent;
    CallbackEvent {
        schema: CallbackEvent::SCHEMA.into(),
        version: CallbackEvent::VERSION,
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        query: vec![],
        reference: None,
        method: "POST".into(),
        signature: "v3".into(),
        received_at: time::OffsetDateTime::now_utc(),
        request_id: uuid::Uuid::new_v4().to_string(),
    }
}

/// The callbacks a status message holds: one (version 1) or several (a version-2 batch).
pub fn callbacks_in(payload: &[u8]) -> Vec<crate::amqp::contracts::CallbackEvent> {
    use crate::amqp::contracts::{CallbackBatch, CallbackEvent};
    match serde_json::from_slice::<CallbackEvent>(payload) {
        Ok(event) => vec![event],
        Err(_) => serde_json::from_slice::<CallbackBatch>(payload).expect("a callback or a batch of them").callbacks,
    }
}

/// Ingress settings for tests: defaults plus the test token and public URL.
pub fn base_ingress_settings() -> IngressSettings {
    crate::config::load_with_env(None, test_env()).expect("test settings load")
}

/// Worker settings for tests: defaults plus the test token.
pub fn base_worker_settings() -> WorkerSettings {
    crate::config::load_with_env(None, test_env()).expect("test settings load")
}

fn test_env() -> Vec<(String, String)> {
    vec![
        ("SMSFLOW_PLIVO__AUTH_TOKEN".into(), format!("\"{TEST_AUTH_TOKEN}\"")),
        ("SMSFLOW_PLIVO__AUTH_ID".into(), "MATESTACCOUNT000000001".into()),
        ("SMSFLOW_HTTP__PUBLIC_BASE_URL".into(), TEST_PUBLIC_BASE_URL.into()),
        // Tests run many services side by side: every admin listener on a free port.
        ("SMSFLOW_HTTP__ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
        ("SMSFLOW_TELEMETRY__LOG_FILTER".into(), "warn".into()),
        ("SMSFLOW_WEBHOOKS__SECRETS".into(), format!("[\"{TEST_WEBHOOK_SECRET}\"]")),
        // Test receivers listen on loopback.
        ("SMSFLOW_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES".into(), "true".into()),
    ]
}

/// A TCP forwarder in front of a real service that a test can cut (every connection closed,
/// new ones refused) and restore, to simulate an outage without disturbing other tests.
pub struct CuttableProxy {
    pub address: std::net::SocketAddr,
    up: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    forwarding: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>>,
}

impl CuttableProxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let (up, _) = tokio::sync::watch::channel(true);
        let up = std::sync::Arc::new(up);
        let forwarding = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (state, live) = (up.clone(), forwarding.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*state.borrow() {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                let mut down = state.subscribe();
                let live = live.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let Ok(local) = outbound.local_addr() else { return };
                    live.lock().unwrap_or_else(|e| e.into_inner()).insert(local);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                    live.lock().unwrap_or_else(|e| e.into_inner()).remove(&local);
                });
            }
        });
        Self { address, up, forwarding }
    }

    /// The local addresses of the connections this proxy holds to the target now: the
    /// target sees its clients as these (e.g. RabbitMQ names a connection `local -> target`).
    pub fn forwarded_from(&self) -> Vec<std::net::SocketAddr> {
        self.forwarding.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }

    /// Closes every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    /// An AMQP URL that goes through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.address)
    }
}

/// The address of the RabbitMQ server in `amqp_url()`.
pub fn amqp_address() -> std::net::SocketAddr {
    let url = amqp_url();
    let authority = url.split('@').nth(1).unwrap_or("127.0.0.1:5672");
    let host_port = authority.split('/').next().unwrap_or("127.0.0.1:5672");
    std::net::ToSocketAddrs::to_socket_addrs(host_port)
        .ok()
        .and_then(|mut a| a.next())
        .expect("RabbitMQ address resolves")
}

pub use crate::plivo::form::encode_pairs as form_encode;

/// The URL of a `#[sqlx::test]` pool's database, for services and binaries under test.
pub fn database_url(pool: &sqlx::PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or_default()
    )
}
