//! `smsflow-plivo-sim`: the Plivo simulator as a process.
#![forbid(unsafe_code)]

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Simulates Plivo's Send Message API and signed delivery-report callbacks, with ground truth
/// at /_sim/messages and /_sim/stats.
#[derive(Debug, Parser)]
#[command(name = "smsflow-plivo-sim", version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "PLIVO_SIM_LISTEN", default_value = "0.0.0.0:9000")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    config: plivo_sim::SimConfig,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _telemetry = tracing_subscriber_init();
    let listener = match tokio::net::TcpListener::bind(cli.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("smsflow-plivo-sim: cannot listen on {}: {e}", cli.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::cli::cancel_on_signal(shutdown.clone()));
    match plivo_sim::run(cli.config, listener, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smsflow-plivo-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn tracing_subscriber_init() -> anyhow::Result<shared::telemetry::TelemetryGuard> {
    let settings = shared::config::TelemetrySettings {
        log_format: shared::config::LogFormat::Auto,
        log_filter: "info".into(),
        otlp_endpoint: String::new(),
        sample_ratio: 1.0,
    };
    shared::telemetry::init("smsflow-plivo-sim", &settings)
}
