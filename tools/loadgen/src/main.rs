//! `smsflow-loadgen`: see the library's documentation and docs/benchmarks.md.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use loadgen::{callbacks, ceiling, print_report, sends};

#[derive(Debug, Parser)]
#[command(name = "smsflow-loadgen", version, about = "Load generator and benchmarks for smsflow")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pre-signed Plivo status callbacks against an ingress; with --ceiling-* also measures the
    /// infrastructure ceiling first and prints the ratios.
    Callbacks {
        #[command(flatten)]
        load: callbacks::CallbackLoad,
        /// Measure the ceiling in the same run and print ratios to it.
        #[arg(long, requires = "ceiling_database_url")]
        with_ceiling: bool,
        /// A migrated smsflow database for the ceiling's upsert measurement.
        #[arg(long)]
        ceiling_database_url: Option<String>,
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        ceiling_amqp_url: String,
        #[arg(long, default_value_t = 50_000)]
        ceiling_count: usize,
    },
    /// Writes pre-signed callbacks as whole HTTP requests for wrk
    /// (`tools/loadgen/wrk/callbacks.lua`), one file per wrk thread: PREFIX.0, PREFIX.1, ...
    Sign {
        #[command(flatten)]
        load: callbacks::CallbackLoad,
        /// Where to write them (a suffix .N is added per thread).
        #[arg(long)]
        out: String,
        /// wrk's -t.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Waits until PostgreSQL holds `--expected` events of a signed run, and reports when.
    Drain {
        #[arg(long)]
        database_url: String,
        /// The `run_id` that `sign` printed.
        #[arg(long)]
        run_id: String,
        #[arg(long)]
        expected: usize,
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// Send jobs over HTTP through to the simulator's final statuses.
    Sends {
        #[command(flatten)]
        load: sends::SendLoad,
    },
    /// What RabbitMQ and PostgreSQL allow here, with the same payloads.
    Ceiling {
        #[command(flatten)]
        args: ceiling::CeilingArgs,
    },
    /// Runs `callbacks` against --ingress and --other alternately, and prints each pair's ratio.
    Compare {
        #[command(flatten)]
        load: callbacks::CallbackLoad,
        /// The second target (B); --ingress is A.
        #[arg(long)]
        other: String,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Callbacks { load, with_ceiling, ceiling_database_url, ceiling_amqp_url, ceiling_count } => {
            let ceiling = if with_ceiling {
                let database_url = ceiling_database_url.unwrap_or_default();
                let args = ceiling::CeilingArgs {
                    amqp_url: ceiling_amqp_url,
                    database_url,
                    count: ceiling_count,
                    publishers: 4,
                    in_flight: 100,
                    batch: 500,
                };
                let ceiling = ceiling::measure(&args).await?;
                print_report("ceiling", &ceiling);
                Some(ceiling)
            } else {
                None
            };
            let report = callbacks::run(&load).await?;
            print_report("callbacks", &report);
            if let Some(ceiling) = ceiling {
                let ratios = serde_json::json!({
                    "ingress_vs_publish_confirm_ceiling": report.requests_per_second / ceiling.publish_confirm_per_second,
                    "end_to_end_vs_full_pipeline_ceiling": report.end_to_end_events_per_second.map(|e| e / ceiling.full_pipeline_per_second),
                });
                print_report("ratios", &ratios);
            }
            if report.lost_events.unwrap_or(0) > 0 || report.transport_errors > 0 {
                anyhow::bail!(
                    "{} lost events, {} transport errors",
                    report.lost_events.unwrap_or(0),
                    report.transport_errors
                );
            }
        }
        Command::Sign { load, out, threads } => print_report("signed", &callbacks::write_signed(&load, &out, threads)?),
        Command::Drain { database_url, run_id, expected, timeout_secs } => {
            let started = std::time::Instant::now();
            let drain = callbacks::wait_for_drain(&database_url, &run_id, expected, timeout_secs).await?;
            let report = serde_json::json!({
                "expected": expected,
                "stored": drain.stored,
                "seconds": drain.drained_at.duration_since(started).as_secs_f64(),
            });
            print_report("drain", &report);
            anyhow::ensure!(drain.stored >= expected as i64, "{} of {expected} events stored", drain.stored);
        }
        Command::Sends { load } => print_report("sends", &sends::run(&load).await?),
        Command::Ceiling { args } => print_report("ceiling", &ceiling::measure(&args).await?),
        Command::Compare { load, other, rounds } => {
            for round in 1..=rounds {
                let a = callbacks::run(&load).await?;
                let b = callbacks::run(&callbacks::CallbackLoad { ingress: other.clone(), ..load.clone() }).await?;
                let pair = serde_json::json!({
                    "round": round,
                    "a_requests_per_second": a.requests_per_second,
                    "b_requests_per_second": b.requests_per_second,
                    "b_over_a": b.requests_per_second / a.requests_per_second,
                    "a_p99_ms": a.latency_ms.p99,
                    "b_p99_ms": b.latency_ms.p99,
                });
                print_report("compare", &pair);
            }
        }
    }
    Ok(())
}
