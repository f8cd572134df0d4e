//! The system under test with its faults: the broker and the database behind cuttable
//! proxies, services stopped gracefully or killed, the broker stopped or told to close
//! connections; and the exact counts afterwards.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use plivo_sim::{SimConfig, Simulator};
use secrecy::SecretString;
use shared::amqp::Stream;
use shared::testing::{CuttableProxy, TestBroker, amqp_address};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stack::{self, bind_local, wired_settings};
use crate::{Callbacks, Outcome, Traffic, acknowledged};

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The system under test.
pub struct System {
    pub broker: TestBroker,
    pub pool: PgPool,
    /// The ingress's way to the broker.
    pub broker_proxy: CuttableProxy,
    /// The worker's ways to the broker and the database: cut when it is killed, so its
    /// connections die with it as they would with the process.
    pub worker_broker_proxy: CuttableProxy,
    pub database_proxy: CuttableProxy,
    pub sim: Simulator,
    pub ingress_addr: SocketAddr,
    pub client: reqwest::Client,
    ingress: Option<Running>,
    worker: Option<Running>,
    pub worker_settings: shared::config::WorkerSettings,
    ingress_settings: shared::config::IngressSettings,
    started: Instant,
    /// Anything else the scenario measured, for its report row.
    pub note: Option<String>,
}

impl System {
    /// Starts the simulator, the ingress and the worker; broker and database through proxies.
    pub async fn start(pool: PgPool, sim: SimConfig) -> Self {
        let broker = TestBroker::with_retry_delays(vec![1000, 2000, 5000, 10_000, 30_000]).await;
        let broker_proxy = CuttableProxy::start(amqp_address()).await;
        let worker_broker_proxy = CuttableProxy::start(amqp_address()).await;
        let options = pool.connect_options();
        let pg = tokio::net::lookup_host(format!("{}:{}", options.get_host(), options.get_port()))
            .await
            .unwrap()
            .next()
            .unwrap();
        let database_proxy = CuttableProxy::start(pg).await;

        let sim = Simulator::start(sim).await;

        let (ingress_listener, ingress_addr) = bind_local().await;
        let mut amqp = broker.amqp_settings();
        amqp.url = SecretString::from(broker_proxy.amqp_url());
        amqp.reconnect_give_up_ms = 600_000;
        let (ingress_settings, mut worker_settings) =
            wired_settings(&amqp, &format!("http://{ingress_addr}"), &sim.url);
        worker_settings.amqp.url = SecretString::from(worker_broker_proxy.amqp_url());
        // Scenario 5's "accepted, answered too late" must be decided within the scenario.
        worker_settings.plivo.request_timeout_ms = 2000;

        let mut system = Self {
            broker,
            pool,
            broker_proxy,
            worker_broker_proxy,
            database_proxy,
            sim,
            ingress_addr,
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            ingress: None,
            worker: None,
            worker_settings,
            ingress_settings,
            started: Instant::now(),
            note: None,
        };
        system.ingress = Some(system.spawn_ingress(ingress_listener));
        system.start_worker();
        system.wait_ready().await;
        system.progress("ingress, worker and simulator ready");
        system
    }

    /// Where the scenario is, with the time since start: a failing or hanging scenario's
    /// output then says which phase it was in.
    pub fn progress(&self, what: &str) {
        eprintln!("[reliability +{:.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn spawn_ingress(&self, listener: tokio::net::TcpListener) -> Running {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ingress::run(self.ingress_settings.clone(), listener, None, shutdown.clone()));
        Running { shutdown, task }
    }

    /// A pool to the test database through the database proxy (what the worker uses).
    fn proxied_pool(&self) -> PgPool {
        let options = self.pool.connect_options();
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options.as_ref().clone().host("127.0.0.1").port(self.database_proxy.address.port()))
    }

    pub fn start_worker(&mut self) {
        self.worker_broker_proxy.restore();
        self.database_proxy.restore();
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(worker::run_with(self.worker_settings.clone(), self.proxied_pool(), None, shutdown.clone()));
        self.worker = Some(Running { shutdown, task });
    }

    /// The worker dies at once: nothing is flushed or acked (like SIGKILL).
    pub async fn kill_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.task.abort();
            self.worker_broker_proxy.cut();
            self.database_proxy.cut();
            let _ = worker.task.await;
        }
    }

    /// The broker itself closes every connection of this system (what `rabbitmqctl
    /// close_all_connections` does, limited to this test's connections so that tests running
    /// beside it keep theirs). Returns how many it closed.
    pub async fn force_close_broker_connections(&self) -> usize {
        let ours: HashSet<u16> = [&self.broker_proxy, &self.worker_broker_proxy]
            .iter()
            .flat_map(|proxy| proxy.forwarded_from())
            .map(|local| local.port())
            .collect();
        let listing = rabbitmqctl(&["-q", "list_connections", "--no-table-headers", "pid", "peer_port"]).await;
        let pids: Vec<&str> = listing
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(_, port)| port.trim().parse().is_ok_and(|port: u16| ours.contains(&port)))
            .map(|(pid, _)| pid.trim())
            .collect();
        let closing = pids.iter().map(|pid| async move {
            rabbitmqctl(&["close_connection", pid, "reliability suite: forced close"]).await;
        });
        futures_util::future::join_all(closing).await;
        pids.len()
    }

    /// Every broker connection (ingress and worker) cut, and new ones refused.
    pub fn cut_broker(&self) {
        self.broker_proxy.cut();
        self.worker_broker_proxy.cut();
    }

    pub fn restore_broker(&self) {
        self.broker_proxy.restore();
        self.worker_broker_proxy.restore();
    }

    /// The ingress stops: gracefully (drains in-flight requests) or at once.
    pub async fn stop_ingress(&mut self, graceful: bool) {
        if let Some(ingress) = self.ingress.take() {
            if graceful {
                ingress.shutdown.cancel();
                let _ = ingress.task.await;
            } else {
                ingress.task.abort();
                let _ = ingress.task.await;
            }
        }
    }

    /// Starts the ingress again on the same address (Plivo keeps calling the same URL).
    pub async fn restart_ingress(&mut self) {
        let mut listener = None;
        for _ in 0..50 {
            if let Ok(l) = tokio::net::TcpListener::bind(self.ingress_addr).await {
                listener = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.ingress = Some(self.spawn_ingress(listener.expect("the ingress address is free again")));
        self.wait_ready().await;
    }

    /// Waits (at most 30 s) until the ingress answers `/readyz` with 200.
    pub async fn wait_ready(&self) {
        stack::wait_ready(&self.client, &format!("http://{}", self.ingress_addr)).await;
    }

    /// Signed callbacks straight to the ingress, as Plivo would send them.
    pub fn callbacks(&self) -> Callbacks {
        Callbacks::new(self.client.clone(), self.ingress_addr)
    }

    /// A traffic source that runs on its own task while faults act on the system.
    pub fn traffic(&self) -> Traffic {
        Traffic::new(self.client.clone(), self.ingress_addr)
    }

    /// Waits until every job reached Plivo or ended, every story was played, and every
    /// acknowledged callback is stored; returns the seconds it took.
    pub async fn settle(&self, jobs: &[String], timeout: Duration) -> f64 {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let stats = self.sim.stats().await;
            let unsettled: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM messages WHERE id::text = ANY($1) AND status IN ('accepted', 'sending')",
            )
            .bind(jobs)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(i64::MAX);
            let known: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE id::text = ANY($1)")
                .bind(jobs)
                .fetch_one(&self.pool)
                .await
                .unwrap_or(0);
            if stats.stories_pending == 0 && unsettled == 0 && known as usize == jobs.len() {
                let truth = self.sim.messages().await;
                let acknowledged = acknowledged(&truth);
                if self.stored(&acknowledged).await == acknowledged.len() {
                    return started.elapsed().as_secs_f64();
                }
            }
            if Instant::now() > deadline {
                return started.elapsed().as_secs_f64();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn stored(&self, acknowledged: &HashSet<(String, i64)>) -> usize {
        let rows: Vec<(Option<String>, Option<i64>)> =
            sqlx::query_as("SELECT message_uuid, sequence FROM message_events")
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        let stored: HashSet<(String, i64)> = rows.into_iter().filter_map(|(u, s)| Some((u?, s.unwrap_or(0)))).collect();
        acknowledged.intersection(&stored).count()
    }

    /// Counts everything the guarantees promise.
    pub async fn verify(
        &self,
        scenario: &str,
        traffic: String,
        fault: &str,
        jobs: &[String],
        recovery_seconds: f64,
    ) -> Outcome {
        let truth = self.sim.messages().await;
        let acknowledged = acknowledged(&truth);
        let stored = self.stored(&acknowledged).await;
        let rows: Vec<(uuid::Uuid, Option<String>, String, Option<i32>)> =
            sqlx::query_as("SELECT id, message_uuid, status, error_code FROM messages")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let by_uuid: HashMap<&str, (&str, Option<i32>)> =
            rows.iter().filter_map(|(_, u, s, e)| Some((u.as_deref()?, (s.as_str(), *e)))).collect();
        let unknown = rows.iter().filter(|(_, _, s, _)| s == "unknown").count();
        // A message Plivo accepted while we timed out is ours but stays `unknown` or is found
        // later through its callbacks; compare statuses for messages with a row by MessageUUID.
        let status_mismatches = truth
            .iter()
            .filter(|m| m.callbacks.iter().any(|c| c.acknowledged))
            .filter(|m| match by_uuid.get(m.message_uuid.as_str()) {
                None => true,
                Some((status, code)) => *status != m.final_status || *code != m.error_code.map(|c| c as i32),
            })
            .count();
        let mut per_job: HashMap<String, usize> = HashMap::new();
        for message in &truth {
            if let Some(reference) = message.url.split("ref=").nth(1) {
                *per_job.entry(reference.to_owned()).or_default() += 1;
            }
        }
        let duplicate_sends = per_job.values().map(|n| n.saturating_sub(1)).sum();
        // A connection of its own: the test broker's may have died with a stopped broker.
        let counting = TestBroker::attach(&self.broker.topology).await;
        let mut dead_letters = 0;
        for stream in Stream::ALL {
            dead_letters += counting.len(&self.broker.topology.dead_letter_queue(stream)).await;
        }
        Outcome {
            scenario: scenario.into(),
            traffic,
            fault: fault.into(),
            jobs: jobs.len(),
            callbacks_acknowledged: acknowledged.len(),
            events_stored: stored,
            lost: acknowledged.len() - stored,
            status_mismatches,
            duplicate_sends,
            unknown,
            dead_letters,
            recovery_seconds: (recovery_seconds * 10.0).round() / 10.0,
            note: self.note.clone(),
        }
    }

    pub async fn stop(mut self) {
        self.stop_ingress(true).await;
        if let Some(worker) = self.worker.take() {
            worker.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(15), worker.task).await;
        }
    }
}

/// `rabbitmqctl args…`, or the command in `SMSFLOW_TEST_RABBITMQCTL` (e.g.
/// `docker compose exec -T rabbitmq rabbitmqctl`), and how to name it in a message.
fn rabbitmqctl_command(args: &[&str]) -> (std::process::Command, String) {
    let command = std::env::var("SMSFLOW_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = command.split_whitespace();
    let mut process = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    process.args(words).args(args);
    (process, command)
}

/// Runs `rabbitmqctl` (see `rabbitmqctl_command`) and fails loudly if it cannot.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let (process, command) = rabbitmqctl_command(args);
    let output = tokio::process::Command::from(process).output().await.unwrap_or_else(|e| {
        panic!("cannot run `{command}` ({e}); set SMSFLOW_TEST_RABBITMQCTL to a working rabbitmqctl")
    });
    assert!(
        output.status.success(),
        "`{command} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Stops the RabbitMQ application (every client of the broker loses it). If the scenario
/// panics before `start_again`, dropping this starts it anyway: the machine's broker is
/// always left running.
pub struct BrokerStopped {
    running_again: bool,
}

impl BrokerStopped {
    pub async fn stop() -> Self {
        rabbitmqctl(&["stop_app"]).await;
        Self { running_again: false }
    }

    pub async fn start_again(mut self) {
        rabbitmqctl(&["start_app"]).await;
        self.running_again = true;
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if self.running_again {
            return;
        }
        let _ = rabbitmqctl_command(&["start_app"]).0.status();
    }
}
