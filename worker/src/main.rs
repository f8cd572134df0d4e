//! `smsflow-worker`: configuration → telemetry → `worker::run`, or a maintenance subcommand.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use shared::cli::{ConfigArgs, load_settings_or_exit};
use shared::config::WorkerSettings;
use tokio_util::sync::CancellationToken;

/// Consumes status events, inbound messages and send jobs; writes PostgreSQL; calls Plivo.
#[derive(Debug, Parser)]
#[command(name = "smsflow-worker", version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume and process (the default).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
}

const PROGRAM: &str = "smsflow-worker";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings: WorkerSettings = load_settings_or_exit(PROGRAM, &cli.config);
    let _telemetry = match shared::telemetry::init(PROGRAM, &settings.telemetry) {
        Ok(guard) => guard,
        Err(e) => return shared::cli::fail(PROGRAM, &format!("cannot start telemetry: {e:#}")),
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let shutdown = CancellationToken::new();
            tokio::spawn(shared::cli::cancel_on_signal(shutdown.clone()));
            worker::run(settings, shutdown).await
        }
        Command::Migrate => worker::migrate(&settings).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => shared::cli::fail(PROGRAM, &format!("{e:#}")),
    }
}
