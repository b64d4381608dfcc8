//! `entente`: the one binary. `init` makes a data dir, `serve` runs a node
//! on libp2p, `bench` measures the store and collision detection; `sim` and
//! the API subcommands land with their issues.

mod bench;
mod bench_net;
mod node_cmd;

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
    /// Create a data dir: identity key, default config, API token.
    Init(node_cmd::InitArgs),
    /// Run a node: replicate with its peers over libp2p until SIGINT/SIGTERM.
    Serve(node_cmd::ServeArgs),
    /// Benchmarks that print figures (recorded in BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A running node logs its sessions; other commands only warnings.
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Init(args) => node_cmd::init(args),
        Command::Serve(args) => node_cmd::serve(args),
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
