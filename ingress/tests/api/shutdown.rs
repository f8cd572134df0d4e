//! SIGTERM and SIGKILL under load (64 busy connections): every callback that got a 200 is in the
//! queue either way; on SIGTERM the process drains and exits 0.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shared::amqp::Stream;
use shared::testing::{TEST_AUTH_TOKEN, TEST_PUBLIC_BASE_URL, TestBroker};

use crate::helpers::{signed_post, status_params};

#[tokio::test]
async fn sigterm_under_load_loses_no_acknowledged_callback() {
    stop_under_load("TERM").await;
}

#[tokio::test]
async fn sigkill_under_load_acknowledges_nothing_it_did_not_store() {
    stop_under_load("KILL").await;
}

async fn stop_under_load(signal: &str) {
    let broker = TestBroker::new().await;
    broker.topology.declare(&broker.channel).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_smsflow-ingress"))
        .env("SMSFLOW_PLIVO__AUTH_TOKEN", TEST_AUTH_TOKEN)
        .env("SMSFLOW_HTTP__PUBLIC_BASE_URL", TEST_PUBLIC_BASE_URL)
        .env("SMSFLOW_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("SMSFLOW_HTTP__ADMIN_LISTEN", "127.0.0.1:0")
        .envs(broker.amqp_env())
        .env("SMSFLOW_TELEMETRY__LOG_FILTER", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut ready = false;
    for _ in 0..100 {
        if client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ingress binary did not become ready");

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..64 {
        let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("w{worker}-{i}");
                let url = format!("{base}/plivo/callback");
                match signed_post(&client, &url, "/plivo/callback", &status_params(&id, "sent")).send().await {
                    Ok(response) => outcomes.push((id, Some(response.status().as_u16()))),
                    Err(_) => {
                        outcomes.push((id, None));
                        break; // the listener is closed
                    }
                }
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = child.id().expect("child pid").to_string();
    assert!(std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits in time").unwrap();
    stop.store(true, Ordering::Relaxed);

    let mut acknowledged = HashSet::new();
    for worker in workers {
        for (id, status) in worker.await.unwrap() {
            assert!(matches!(status, None | Some(200) | Some(503)), "{id}: unexpected status {status:?}");
            if status == Some(200) {
                acknowledged.insert(id);
            }
        }
    }
    if signal == "TERM" {
        assert_eq!(status.code(), Some(0), "graceful exit");
    }
    assert!(acknowledged.len() > 100, "load was applied ({} acknowledged)", acknowledged.len());

    let queue = broker.topology.queue(Stream::Status);
    let mut queued = HashSet::new();
    while let Some(message) = broker.get(&queue).await {
        for event in shared::testing::callbacks_in(&message.delivery.data) {
            queued.insert(event.param("MessageUUID").unwrap().to_owned());
        }
    }
    let lost: Vec<_> = acknowledged.difference(&queued).collect();
    assert!(lost.is_empty(), "{} acknowledged callbacks are not in the queue: {lost:?}", lost.len());
}
