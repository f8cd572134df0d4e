//! What both binaries share on the command line: `--config`, `--check-config`, and turning a
//! configuration error into one line and exit code 2.

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{self, Validate};

/// Exit code for invalid configuration or usage (clap uses 2 for usage errors too).
pub const EXIT_CONFIG: i32 = 2;

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file layered over the built-in defaults (also SMSFLOW_CONFIG).
    #[arg(long, short = 'c', value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it with secrets redacted, and exit.
    #[arg(long, global = true)]
    pub check_config: bool,
}

/// Loads settings, or prints one line naming the problem and exits with code 2. With
/// `--check-config`, prints the effective configuration and exits 0.
pub fn load_settings_or_exit<T: DeserializeOwned + Validate + Serialize>(program: &str, args: &ConfigArgs) -> T {
    match config::load::<T>(args.config.as_deref()) {
        Ok(settings) => {
            if args.check_config {
                println!("# {program}: configuration is valid; effective values (secrets redacted):");
                print!("{}", config::render(&settings));
                std::process::exit(0);
            }
            settings
        }
        Err(e) => {
            eprintln!("{program}: configuration error: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// Logs and prints a fatal error as one line; exit code 1.
pub fn fail(program: &str, message: &str) -> std::process::ExitCode {
    tracing::error!(error = message, "fatal");
    eprintln!("{program}: {message}");
    std::process::ExitCode::FAILURE
}

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
    token.cancel();
}
