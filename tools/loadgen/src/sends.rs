//! Send jobs through the ingress's HTTP API against the Plivo simulator: jobs per second until
//! `submitted`, and until the simulator's callbacks bring every message to its final status.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde::Serialize;

#[derive(Debug, Clone, clap::Args)]
pub struct SendLoad {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingress: String,
    /// A token from api.tokens.
    #[arg(long, env = "SMSFLOW_LOADGEN_API_TOKEN")]
    pub api_token: String,
    #[arg(long, default_value_t = 2_000)]
    pub count: usize,
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// The database the worker writes, to follow the messages.
    #[arg(long)]
    pub database_url: String,
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub jobs: usize,
    pub accepted: usize,
    pub refused: usize,
    /// Answers other than 202, by status (0: no answer).
    pub refusals: std::collections::BTreeMap<String, u64>,
    pub enqueue_seconds: f64,
    pub jobs_per_second_to_submitted: f64,
    pub seconds_to_all_final: Option<f64>,
    pub unknown: i64,
}

pub async fn run(load: &SendLoad) -> anyhow::Result<SendReport> {
    let client = reqwest::Client::new();
    let url = format!("{}/v1/messages", load.ingress);
    let started = Instant::now();
    let answers: Vec<(u16, Option<String>)> = futures_util::stream::iter(0..load.count)
        .map(|i| {
            let (client, url, token) = (client.clone(), url.clone(), load.api_token.clone());
            async move {
                let body =
                    serde_json::json!({"to": format!("+1415555{:04}", i % 9000), "text": format!("load test {i}")});
                let Ok(response) = client.post(&url).bearer_auth(token).json(&body).send().await else {
                    return (0, None);
                };
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                (status, body["id"].as_str().filter(|_| status == 202).map(str::to_owned))
            }
        })
        .buffer_unordered(load.connections)
        .collect()
        .await;
    let enqueue_seconds = started.elapsed().as_secs_f64();
    let mut refusals: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for (status, id) in &answers {
        if id.is_none() {
            *refusals.entry(status.to_string()).or_default() += 1;
        }
    }
    let ids: Vec<uuid::Uuid> = answers.into_iter().filter_map(|(_, id)| id?.parse().ok()).collect();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&load.database_url).await?;
    let deadline = Instant::now() + Duration::from_secs(load.timeout_secs);
    let count = |sql: &'static str| {
        let (pool, ids) = (pool.clone(), ids.clone());
        async move { sqlx::query_scalar::<_, i64>(sql).bind(ids).fetch_one(&pool).await }
    };
    let mut submitted_at = None;
    let mut final_at = None;
    while Instant::now() < deadline && final_at.is_none() {
        let submitted = count(
            "SELECT count(*) FROM messages WHERE id = ANY($1) AND status_rank >= smsflow_status_rank('submitted')",
        )
        .await?;
        if submitted_at.is_none() && submitted as usize >= ids.len() {
            submitted_at = Some(started.elapsed().as_secs_f64());
        }
        // Final: terminal, or `sent` with no delivery report expected (sent-only stories).
        let settled = count(
            "SELECT count(*) FROM messages WHERE id = ANY($1) AND (smsflow_status_is_terminal(status) OR status IN ('sent', 'unknown'))",
        )
        .await?;
        if submitted_at.is_some() && settled as usize >= ids.len() {
            final_at = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unknown = count("SELECT count(*) FROM messages WHERE id = ANY($1) AND status = 'unknown'").await?;
    Ok(SendReport {
        jobs: load.count,
        accepted: ids.len(),
        refused: load.count - ids.len(),
        refusals,
        enqueue_seconds,
        jobs_per_second_to_submitted: submitted_at.map_or(0.0, |t| ids.len() as f64 / t),
        seconds_to_all_final: final_at,
        unknown,
    })
}
