//! `entente`: the one binary. `init` makes a data dir and `serve` runs a node
//! (replication over libp2p and the HTTP API); `demo` runs three sites in one
//! process; `sim` runs the deterministic network simulator; every other
//! subcommand but `bench` and `api` talks to a running node's HTTP API
//! (`--node`, default `http://127.0.0.1:7070`); `api` serves that API over a
//! local data dir without networking (development and tests); `bench` prints
//! the figures recorded in BENCHMARKS.md.
//!
//! One module per command group, dispatched from [`Command`]; each command
//! prints a readable table, or with `--json` the JSON the API answered.

mod bench;
mod bench_api;
mod bench_latency;
mod bench_net;
mod bench_sync;
mod client;
mod cmd;
mod demo;
mod node_cmd;
mod sim;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{CliError, Client, exit, token_from};

/// mimalloc instead of the system allocator: a node builds and drops many
/// small Automerge structures per record. Measured with `entente bench
/// store` (BENCHMARKS.md): batched creates about 20-25%, point reads
/// 15-25% and single creates 7-17% faster than with glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Entente: a peer-to-peer sync node for business records.
#[derive(Debug, Parser)]
#[command(name = "entente", version, about)]
struct Cli {
    /// The node's API.
    #[arg(
        long,
        global = true,
        env = "ENTENTE_NODE",
        default_value = "http://127.0.0.1:7070"
    )]
    node: String,
    /// Data dir of the node: its token file is read when ENTENTE_TOKEN is not
    /// set.
    #[arg(long, global = true, env = "ENTENTE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables (shapes in the README).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a data dir (`--data-dir`): identity key, default config, API token.
    Init(node_cmd::InitArgs),
    /// Run a node (`--data-dir`): replicate with its peers over libp2p until
    /// SIGINT/SIGTERM.
    Serve(node_cmd::ServeArgs),
    /// The node: id, peers, feed sequence, record and open-collision counts.
    Status,
    /// List peers, or add, remove, block, unblock one.
    Peers {
        #[command(subcommand)]
        action: Option<cmd::ops::PeerAction>,
    },
    /// Compare this node's data with a connected peer's and repair exactly
    /// the records that differ; prints what differed and what was repaired.
    Verify {
        /// The peer's id (as `entente peers` lists it).
        #[arg(long)]
        peer: String,
    },
    /// Create a record, or update fields of an existing one:
    /// `put COLLECTION [ID] FIELD=VALUE… ` (`FIELD:=JSON` for a raw JSON
    /// value, e.g. `note:=null` to unset).
    Put(cmd::records::Put),
    /// Show a record.
    Get {
        /// Record id.
        id: String,
    },
    /// Delete a record (a tombstone).
    Rm {
        /// Record id.
        id: String,
    },
    /// Restore a deleted record.
    Restore {
        /// Record id.
        id: String,
        /// Write through a duplicate.
        #[arg(long)]
        force: bool,
    },
    /// List a collection's records.
    Ls(cmd::records::Ls),
    /// A record's history: who changed what, where and when.
    History {
        /// Record id.
        id: String,
    },
    /// List open collisions, or show or resolve one.
    Collisions(cmd::collisions::Collisions),
    /// The changes feed: records changed since a sequence.
    Changes(cmd::feed::Changes),
    /// Import records from a JSON-lines file (`-` for stdin).
    Import(cmd::transfer::Import),
    /// Export records as JSON lines.
    Export(cmd::transfer::Export),
    /// Serve the HTTP API over a local data dir, without networking
    /// (development and tests; `entente serve` runs a networked node).
    #[command(hide = true)]
    Api(cmd::serve_api::Api),
    /// Three sites on loopback in this process walking through the story of
    /// a sync collision: merged edits, a duplicate, an update racing a delete.
    Demo(demo::DemoArgs),
    /// Benchmarks that print figures (recorded in BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// The deterministic network-partition simulator: real sync engines and
    /// stores over a virtual network with faults; checks the invariants and
    /// prints the command replaying any violation.
    Sim(sim::SimArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let token = token_from(std::env::var("ENTENTE_TOKEN").ok(), cli.data_dir.as_deref());
    let client = Client::new(&cli.node, token);
    let json = cli.json;
    let result: Result<(), CliError> = match cli.command {
        Command::Init(args) => match cli.data_dir {
            Some(d) => node_cmd::init(args, d, json).map_err(|e| CliError::other(format!("{e:#}"))),
            None => Err(CliError::input(
                "init needs --data-dir DIR (or ENTENTE_DATA_DIR)",
            )),
        },
        Command::Serve(args) => match cli.data_dir {
            Some(d) => node_cmd::serve(args, d).map_err(|e| CliError::other(format!("{e:#}"))),
            None => Err(CliError::input(
                "serve needs --data-dir DIR (or ENTENTE_DATA_DIR)",
            )),
        },
        Command::Status => cmd::ops::status(&client, json),
        Command::Peers { action } => cmd::ops::peers(&client, action, json),
        Command::Verify { peer } => cmd::ops::verify(&client, &peer, json),
        Command::Put(p) => cmd::records::put(&client, p, json),
        Command::Get { id } => cmd::records::get(&client, &id, json),
        Command::Rm { id } => cmd::records::rm(&client, &id, json),
        Command::Restore { id, force } => cmd::records::restore(&client, &id, force, json),
        Command::Ls(l) => cmd::records::ls(&client, l, json),
        Command::History { id } => cmd::records::history(&client, &id, json),
        Command::Collisions(c) => cmd::collisions::run(&client, c, json),
        Command::Changes(c) => cmd::feed::run(&client, c, json),
        Command::Import(i) => cmd::transfer::import(&client, i, json),
        Command::Export(e) => cmd::transfer::export(&client, e),
        Command::Api(a) => cmd::serve_api::run(a, cli.data_dir),
        Command::Demo(d) => demo::run(d).map_err(|e| CliError::other(format!("{e:#}"))),
        Command::Bench { which } => {
            bench::run(which).map_err(|e| CliError::other(format!("{e:#}")))
        }
        Command::Sim(args) => match sim::run_cmd(args) {
            Ok(true) => Ok(()),
            Ok(false) => Err(CliError::other("the simulation found violations")),
            Err(e) => Err(CliError::input(format!("{e:#}"))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if json && let Some(b) = &e.body {
                eprintln!("{b}");
            }
            ExitCode::from(if e.exit == exit::OK {
                exit::FAILURE
            } else {
                e.exit
            })
        }
    }
}
