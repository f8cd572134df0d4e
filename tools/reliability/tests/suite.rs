//! The reliability suite (docs/reliability.md): steady traffic, one fault, exact counts.
//! Short profile by default (CI); `SMSFLOW_RELIABILITY=long` for the long one.

use std::time::Duration;

use futures_util::StreamExt as _;

use plivo_sim::Fault;
use reliability::events::Duplicates;
use reliability::{Outcome, System, long_profile, run_scenario, sim_config};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn traffic_profile() -> (usize, f64) {
    if long_profile() { (3000, 50.0) } else { (150, 15.0) }
}

fn outage(short_secs: u64, long_secs: u64) -> Duration {
    Duration::from_secs(if long_profile() { long_secs } else { short_secs })
}

/// Starts traffic, lets it run 3 s, then hands the system to the fault.
async fn with_traffic(pool: PgPool) -> (System, tokio::task::JoinHandle<Vec<String>>, String) {
    with_traffic_on(System::start(pool, sim_config()).await).await
}

async fn with_traffic_on(system: System) -> (System, tokio::task::JoinHandle<Vec<String>>, String) {
    let (count, rate) = traffic_profile();
    // Longer than any outage: a job refused during the fault is accepted once it is over.
    let traffic = tokio::spawn(system.traffic().send(count, rate, Duration::from_secs(90)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    system.progress("traffic flowing; injecting the fault");
    (system, traffic, format!("{count} send jobs at {rate}/s over HTTP, ~3 signed callbacks each"))
}

async fn finish(
    system: System,
    traffic: tokio::task::JoinHandle<Vec<String>>,
    scenario: &str,
    description: String,
    fault: &str,
) -> Outcome {
    system.progress("fault over; waiting for the traffic to finish");
    let jobs = traffic.await.unwrap();
    system.progress(&format!("{} jobs accepted; waiting for the system to settle", jobs.len()));
    let recovery = system.settle(&jobs, Duration::from_secs(240)).await;
    system.progress(&format!("settled (or gave up) after {recovery:.1} s; counting"));
    let outcome = system.verify(scenario, description, fault, &jobs, recovery).await;
    system.stop().await;
    outcome.record();
    assert_eq!(jobs.len(), traffic_profile().0, "every job was accepted once the fault was over: {outcome:?}");
    outcome
}

fn assert_kept(outcome: &Outcome, expected_dead_letters: u32) {
    assert!(outcome.jobs > 0 && outcome.callbacks_acknowledged > 0, "traffic flowed: {outcome:?}");
    assert_eq!(outcome.lost, 0, "every acknowledged callback is stored: {outcome:?}");
    assert_eq!(outcome.duplicate_sends, 0, "one job, at most one SMS: {outcome:?}");
    assert_eq!(outcome.status_mismatches, 0, "final statuses equal Plivo's truth: {outcome:?}");
    assert_eq!(outcome.dead_letters, expected_dead_letters, "{outcome:?}");
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn worker_killed_mid_batch_and_restarted_after_5_s(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        let (mut system, traffic, description) = with_traffic(pool).await;
        system.kill_worker().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        system.start_worker();
        let outcome = finish(
            system,
            traffic,
            "1. worker killed",
            description,
            "worker killed (abort) mid-batch, restarted after 5 s",
        )
        .await;
        assert_kept(&outcome, 0);
        // A job whose Plivo call was cut by the kill ends `unknown`, never sent twice.
        assert!(outcome.unknown <= 1, "{outcome:?}");
    })
    .await;
}

/// The ingress stopped under load, gracefully or at once, and back on the same address 2 s later.
async fn ingress_stopped_under_load(
    database: PgConnectOptions,
    graceful: bool,
    scenario: &'static str,
    fault: &'static str,
) {
    run_scenario(database, move |pool| async move {
        let (mut system, traffic, description) = with_traffic(pool).await;
        system.stop_ingress(graceful).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        system.restart_ingress().await;
        let outcome = finish(system, traffic, scenario, description, fault).await;
        assert_kept(&outcome, 0);
    })
    .await;
}

/// The worker dies with committed status changes whose events it has not published: the
/// events exchange is removed first, so every change from then on stays in the outbox. After
/// the restart the subscriber has every committed change of every message, in order.
#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn worker_killed_between_commit_and_publish(_: PgPoolOptions, database: PgConnectOptions) {
    use sqlx::Connection as _;
    run_scenario(database, |pool| async move {
        // Subscribed before the first job: every message's whole chain is expected.
        let mut system = System::start(pool.clone(), sim_config()).await;
        let mut events = system.broker.subscribe_to_events("message.status.*").await;
        // The test holds the relay's leadership lock: from now on every change is committed and
        // stays unpublished in the outbox (the worker's relay stands by).
        system.kill_worker().await;
        let mut holder = pool.acquire().await.unwrap().detach();
        let lock = worker::events::RELAY_LOCK;
        sqlx::query("SELECT pg_advisory_lock($1)").bind(lock).execute(&mut holder).await.unwrap();
        system.start_worker();
        let (mut system, traffic, description) = with_traffic_on(system).await;
        let unpublished =
            async || -> i64 { sqlx::query_scalar("SELECT count(*) FROM event_outbox").fetch_one(&pool).await.unwrap() };
        for _ in 0..100 {
            if unpublished().await >= 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        system.kill_worker().await;
        let stranded = unpublished().await;
        system.progress(&format!("worker killed with {stranded} committed events unpublished"));
        assert!(stranded > 0, "the kill must find committed, unpublished events");
        holder.close().await.unwrap();
        system.start_worker();
        let settled_pool = system.pool.clone();
        let outcome = finish(
            system,
            traffic,
            "1b. worker killed between commit and publish",
            description,
            "relay held off (its lock taken), worker killed with events in the outbox, restarted",
        )
        .await;
        assert_kept(&outcome, 0);
        reliability::events::check_status_events(&settled_pool, &mut events, Duplicates::SameIdOnly).await;
    })
    .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn ingress_stopped_gracefully_under_load(_: PgPoolOptions, database: PgConnectOptions) {
    ingress_stopped_under_load(database, true, "2a. ingress SIGTERM", "ingress graceful shutdown, back after 2 s")
        .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn ingress_killed_under_load(_: PgPoolOptions, database: PgConnectOptions) {
    ingress_stopped_under_load(database, false, "2b. ingress killed", "ingress killed (abort), back after 2 s").await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn broker_connections_force_closed(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        let (system, traffic, description) = with_traffic(pool).await;
        let closed = system.force_close_broker_connections().await;
        assert!(closed >= 2, "the ingress's and the worker's connections were closed ({closed})");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let fault = format!("the broker closed all {closed} connections of the system (rabbitmqctl close_connection)");
        let outcome = finish(system, traffic, "3a. broker connections closed", description, &fault).await;
        assert_kept(&outcome, 0);
    })
    .await;
}

/// Short profile: the broker unreachable behind its proxy (other tests keep using the
/// machine's broker). Long profile, which runs alone: the broker itself stopped
/// (`rabbitmqctl stop_app`) and started again.
#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn broker_unreachable_then_back(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        let (system, traffic, description) = with_traffic(pool).await;
        let down = Duration::from_secs(20);
        let stopped = if long_profile() {
            Some(reliability::BrokerStopped::stop().await)
        } else {
            system.cut_broker();
            None
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let during =
            system.callbacks().post_signed_callback(&[("MessageUUID", "during-outage"), ("Status", "sent")]).await;
        assert_eq!(during, 503, "a callback that cannot be made durable is refused so that Plivo retries it");
        tokio::time::sleep(down - Duration::from_secs(2)).await;
        match stopped {
            Some(stopped) => stopped.start_again().await,
            None => system.restore_broker(),
        }
        let fault = match long_profile() {
            true => format!("RabbitMQ stopped (rabbitmqctl stop_app) for {} s, then started", down.as_secs()),
            false => format!("every broker connection cut, broker unreachable for {} s", down.as_secs()),
        };
        let outcome = finish(system, traffic, "3b. broker down", description, &fault).await;
        assert_kept(&outcome, 0);
    })
    .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn postgres_unreachable_then_back(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        let (system, traffic, description) = with_traffic(pool).await;
        let down = outage(10, 30);
        system.database_proxy.cut();
        tokio::time::sleep(down).await;
        system.database_proxy.restore();
        let fault = format!("PostgreSQL unreachable for {} s", down.as_secs());
        let outcome = finish(system, traffic, "4a. PostgreSQL down", description, &fault).await;
        assert_kept(&outcome, 0);
    })
    .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn postgres_slowed_by_a_lock(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        let locker = pool.clone();
        let (system, traffic, description) = with_traffic(pool).await;
        let held = outage(5, 10);
        let mut tx = locker.begin().await.unwrap();
        sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();
        tokio::time::sleep(held).await;
        tx.rollback().await.unwrap();
        let fault = format!("exclusive lock held on messages for {} s", held.as_secs());
        let outcome = finish(system, traffic, "4b. PostgreSQL slowed", description, &fault).await;
        assert_kept(&outcome, 0);
    })
    .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn plivo_failing_then_hanging_after_accepting(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        let (system, traffic, description) = with_traffic(pool).await;
        system.sim.set_fault(Fault::ServerError, 3000, 0).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        system.sim.set_fault(Fault::RateLimited, 3000, 0).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Plivo accepts but answers after the worker's 2 s timeout: the ambiguous case.
        system.sim.set_fault(Fault::AcceptThenHang, 1000, 5000).await;
        let fault = "Plivo answers 500 for 3 s, then 429 for 3 s, then accepts but answers too late for 1 s";
        let outcome = finish(system, traffic, "5. Plivo failures", description, fault).await;
        assert_eq!(outcome.lost, 0, "{outcome:?}");
        assert_eq!(outcome.duplicate_sends, 0, "no duplicate SMS by default: {outcome:?}");
        assert_eq!(outcome.dead_letters, 0, "{outcome:?}");
        // Jobs whose answer came too late are `unknown`; the rest match Plivo's truth.
        assert!(outcome.status_mismatches <= outcome.unknown, "{outcome:?}");
    })
    .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn poison_in_every_queue_is_dead_lettered_and_traffic_continues(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        use shared::amqp::{Publisher, Stream, Topology};
        let (system, traffic, description) = with_traffic(pool).await;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut amqp = system.worker_settings.amqp.clone();
        amqp.url = secrecy::SecretString::from(shared::testing::amqp_url());
        let publisher = Publisher::start(amqp.clone(), Topology::from_settings(&amqp), "poison", shutdown.clone());
        assert!(publisher.wait_ready(Duration::from_secs(10)).await);
        for stream in Stream::ALL {
            let properties = lapin::BasicProperties::default().with_delivery_mode(2);
            publisher.publish(stream.routing_key(), b"\xff not json at all", properties).await.unwrap();
        }
        shutdown.cancel();
        // Each is dead-lettered with a reason that names the problem...
        let mut reasons = std::collections::BTreeMap::new();
        for _ in 0..100 {
            reasons.clear();
            for stream in Stream::ALL {
                let report = worker::replay::replay_dead_letters(&amqp, stream, true).await.unwrap();
                reasons.extend(report.by_reason.into_iter().map(|(reason, n)| ((stream.name(), reason), n)));
            }
            if reasons.values().sum::<u64>() == Stream::ALL.len() as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(reasons.len(), Stream::ALL.len(), "one dead letter per queue: {reasons:?}");
        assert!(reasons.keys().all(|(_, reason)| reason != "unknown" && !reason.is_empty()), "{reasons:?}");
        // ...and a replay before the cause is fixed puts them back once, without a loop or a loss
        // (replay after a fix: worker/tests/it/poison.rs).
        for stream in Stream::ALL {
            let report = worker::replay::replay_dead_letters(&amqp, stream, false).await.unwrap();
            assert_eq!(report.replayed, 1, "{stream:?}");
        }
        system.progress(&format!("dead-letter reasons: {reasons:?}; replayed once, dead-lettered again"));
        let outcome =
            finish(system, traffic, "6. poison", description, "one undecodable message in each of the four queues")
                .await;
        assert_kept(&outcome, Stream::ALL.len() as u32);
    })
    .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn forged_flood_and_slow_clients_do_not_cost_valid_traffic(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        use tokio::io::AsyncWriteExt as _;
        let (mut system, traffic, description) = with_traffic(pool).await;
        let address = system.ingress_addr;
        let (forged, slow) = if long_profile() { (100_000, 1000) } else { (5_000, 100) };
        let before = system.callbacks().probe_valid_callbacks("before", tokio::time::sleep(Duration::from_secs(2))).await;
        let stop = tokio_util::sync::CancellationToken::new();
        // Slow clients: each opens a connection and trickles a body one byte a second.
        let mut trickles = Vec::new();
        for _ in 0..slow {
            trickles.push(tokio::spawn(async move {
                let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else { return };
                let head = "POST /plivo/callback HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\n\
                            x-plivo-signature-v3: x\r\nx-plivo-signature-v3-nonce: 1\r\ncontent-length: 1000\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..15 {
                    if stream.write_all(b"a").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
        // Forged callbacks as fast as 32 connections allow, with valid ones among them.
        let during = tokio::spawn({
            let (callbacks, stop) = (system.callbacks(), stop.clone());
            async move { callbacks.probe_valid_callbacks("during", stop.cancelled_owned()).await }
        });
        let client = system.client.clone();
        let url = format!("http://{address}/plivo/callback");
        let refused = futures_util::stream::iter(0..forged)
            .map(|i| {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .header("x-plivo-signature-v3", "Zm9yZ2VkIHNpZ25hdHVyZSBmb3JnZWQgc2lnbmF0dXJlIQ==")
                        .header("x-plivo-signature-v3-nonce", "12345678901234567890")
                        .body(format!("MessageUUID=forged-{i}&Status=delivered"))
                        .send()
                        .await;
                    response.map(|r| r.status().as_u16()).unwrap_or(0)
                }
            })
            .buffer_unordered(32)
            .filter(|status| std::future::ready(*status == 403 || *status == 429))
            .count()
            .await;
        system.progress(&format!("flood sent: {refused} of {forged} forgeries refused"));
        for t in trickles {
            let _ = t.await;
        }
        stop.cancel();
        let during = during.await.unwrap();
        let fault = format!("{forged} forged callbacks (32 connections) and {slow} clients sending one byte a second");
        system.note = Some(format!("before the flood: {}; during it: {}", before.summary(), during.summary()));
        let outcome = finish(system, traffic, "7. flood and slow clients", description, &fault).await;
        assert_eq!(refused, forged, "every forgery refused (403, or 429 once over budget)");
        assert!(during.sent > 0 && during.accepted == during.sent, "no valid callback refused: {}", during.summary());
        assert_kept(&outcome, 0);
    })
    .await;
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_captured_callback_replayed_1000_times_is_one_event(_: PgPoolOptions, database: PgConnectOptions) {
    run_scenario(database, |pool| async move {
        let system = System::start(pool.clone(), sim_config()).await;
        let params = [("MessageUUID", "replayed-1"), ("Status", "delivered"), ("Sequence", "3")];
        let nonce = "55555555555555555555";
        let answers: Vec<u16> = futures_util::stream::iter(0..1000)
            .map(|_| {
                let request = system.callbacks().signed_callback(&params, nonce);
                async move { request.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        // 200 once queued; 429 (retry in a second) for a copy that arrives while the first is
        // still being published, so that concurrent copies are not all published.
        let accepted = answers.iter().filter(|s| **s == 200).count();
        assert!(answers.iter().all(|s| matches!(s, 200 | 429)), "every copy answered 200 or 429: {answers:?}");
        assert!(accepted > 900, "once queued, copies are answered 200 ({accepted} of 1,000)");
        let mut stored = 0;
        for _ in 0..100 {
            stored =
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM message_events WHERE message_uuid = 'replayed-1'")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if stored == 1 {
                // Give the rest of the copies time to arrive and be deduplicated.
                tokio::time::sleep(Duration::from_secs(2)).await;
                stored = sqlx::query_scalar("SELECT count(*) FROM message_events WHERE message_uuid = 'replayed-1'")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(stored, 1, "one event for 1,000 replays");
        system.stop().await;
    })
    .await;
}
