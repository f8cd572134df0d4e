//! `smsflow-worker`: configuration → telemetry → `worker::run`, or a maintenance subcommand.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use shared::amqp::Stream;
use shared::cli::{ConfigArgs, load_settings_or_exit};
use shared::config::WorkerSettings;
use tokio_util::sync::CancellationToken;

// glibc's malloc and free were a fifth of the worker's time in a drain profile (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Move dead-lettered messages back to their work queue (after fixing the cause).
    ReplayDeadLetters {
        /// Which queue's dead letters: status, inbound or send.
        #[arg(long, value_parser = ["status", "inbound", "send", "webhook"], default_value = "status")]
        stream: String,
        /// Only count the dead letters by reason; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
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
        Command::ReplayDeadLetters { stream, dry_run } => replay(&settings, &stream, dry_run).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => shared::cli::fail(PROGRAM, &format!("{e:#}")),
    }
}

async fn replay(settings: &WorkerSettings, stream: &str, dry_run: bool) -> anyhow::Result<()> {
    let stream = Stream::ALL.into_iter().find(|s| s.name() == stream).expect("clap restricts the values");
    let report = worker::replay::replay_dead_letters(&settings.amqp, stream, dry_run).await?;
    println!("dead letters in {} by reason:", stream.name());
    for (reason, count) in &report.by_reason {
        println!("{count:>8}  {reason}");
    }
    if dry_run {
        println!("dry run: nothing moved");
    } else {
        println!("replayed {} message(s) to the {} queue", report.replayed, stream.name());
    }
    Ok(())
}
