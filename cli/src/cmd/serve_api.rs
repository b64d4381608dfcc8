//! `entente api --data-dir DIR [--api ADDR:PORT]`: the HTTP API over a local
//! store, without networking. It opens (or creates) the data dir with the
//! built-in schema, makes the API token if there is none, prints
//! `listening on http://ADDR` once bound (port 0 picks a free one), and
//! serves until interrupted.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use entente_model::{NodeId, Schema};
use entente_node::api::{self, ApiConfig, ApiState, StandaloneHooks};
use entente_node::{Store, StoreOptions, SystemClock};

use crate::client::{CliError, CliResult};

/// `api`
#[derive(Debug, Args)]
pub struct Api {
    /// Address to listen on.
    #[arg(long = "api", default_value = api::DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// Require the token even on loopback.
    #[arg(long)]
    pub require_token: bool,
}

fn random_node_id() -> std::io::Result<NodeId> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(NodeId(b))
}

/// Runs `api` (the data dir comes from the global `--data-dir`).
pub fn run(a: Api, data_dir: Option<PathBuf>) -> CliResult {
    let dir = data_dir.ok_or_else(|| CliError::input("`entente api` needs --data-dir"))?;
    let fail = |e: String| CliError::other(e);
    let token = api::token::load_or_create(&dir)
        .map_err(|e| fail(format!("token in {}: {e}", dir.display())))?;
    let store = Store::open(
        &dir,
        Arc::new(Schema::default_crm()),
        random_node_id().map_err(|e| fail(e.to_string()))?,
        Arc::new(SystemClock),
        StoreOptions::default(),
    )
    .map_err(|e| fail(format!("opening {}: {e}", dir.display())))?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| fail(e.to_string()))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.addr)
            .await
            .map_err(|e| fail(format!("binding {}: {e}", a.addr)))?;
        let local = listener.local_addr().map_err(|e| fail(e.to_string()))?;
        // The Host check needs the bound port (port 0 picks one).
        let config = ApiConfig::for_addr(local, Some(token), a.require_token).map_err(fail)?;
        let state = ApiState::new(store, Arc::new(StandaloneHooks), config);
        println!("listening on http://{local}");
        let _ = std::io::stdout().flush();
        api::serve(listener, state, shutdown_signal())
            .await
            .map_err(|e| fail(e.to_string()))
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
