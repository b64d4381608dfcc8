//! `entente`: the one binary. Today it runs the benchmarks that measure the
//! store and collision detection; `serve`, `sim` and the API subcommands land
//! with the sync-engine, network and API issues.

mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Entente: a peer-to-peer sync node for business records.
#[derive(Debug, Parser)]
#[command(name = "entente", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks that print figures (recorded in BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { which } => bench::run(which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
