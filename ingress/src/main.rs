//! `smsflow-ingress`: configuration → telemetry → listener → `ingress::run`.
#![forbid(unsafe_code)]

use clap::Parser;
use shared::cli::{ConfigArgs, load_settings_or_exit};
use shared::config::IngressSettings;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Plivo webhook target: verifies signatures and makes every callback durable in RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "smsflow-ingress", version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings: IngressSettings = load_settings_or_exit("smsflow-ingress", &cli.config);
    let _telemetry = match shared::telemetry::init("smsflow-ingress", &settings.telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            return shared::cli::fail("smsflow-ingress", &format!("cannot start telemetry: {e:#}"));
        }
    };
    let listener = match tokio::net::TcpListener::bind(settings.http.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            return shared::cli::fail("smsflow-ingress", &format!("cannot listen on {}: {e}", settings.http.listen));
        }
    };
    let admin = match tokio::net::TcpListener::bind(settings.http.admin_listen).await {
        Ok(admin) => admin,
        Err(e) => {
            let address = settings.http.admin_listen;
            return shared::cli::fail(
                "smsflow-ingress",
                &format!("cannot listen on {address} (http.admin_listen): {e}"),
            );
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::cli::cancel_on_signal(shutdown.clone()));
    match ingress::run(settings, listener, Some(admin), shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => shared::cli::fail("smsflow-ingress", &format!("{e:#}")),
    }
}
