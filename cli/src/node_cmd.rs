//! `entente init` and `entente serve`: make a data dir, run a node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use entente_node::config::{Config, DataDir, new_cluster_key, read_cluster_key};
use entente_node::libp2p::{Multiaddr, PeerId};
use entente_node::{api, runtime};

/// `entente init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The cluster's pre-shared key: a new random one is written there
    /// (mode 0600) unless the file exists, in which case it is checked and
    /// used. Either way the data dir's config names it (`cluster_key_file`),
    /// so `serve` joins only nodes holding the same key. Copy the file to
    /// the other sites and pass it to their `init` (or `serve`).
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
}

/// `entente serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file (default: `config.toml` in the data dir, if present).
    #[arg(long, env = "ENTENTE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API (default 127.0.0.1:7070; port 0 picks a free
    /// one). On a non-loopback address every route but /health needs the
    /// data dir's token.
    #[arg(long, env = "ENTENTE_API")]
    pub api: Option<SocketAddr>,
    /// Require the API token on loopback too.
    #[arg(long, env = "ENTENTE_API_REQUIRE_TOKEN")]
    pub require_token: bool,
    /// Listen multiaddr, repeatable; replaces the config's `listen`.
    #[arg(long = "listen", env = "ENTENTE_LISTEN", value_delimiter = ',')]
    pub listen: Vec<Multiaddr>,
    /// Static peer `MULTIADDR/p2p/PEER_ID`, repeatable: allow-listed, dialed,
    /// redialed with backoff. Added to the config's `peers`.
    #[arg(long = "peer", env = "ENTENTE_PEERS", value_delimiter = ',')]
    pub peers: Vec<Multiaddr>,
    /// Peer id allowed to connect (it dials us), repeatable. Added to the
    /// config's `allow`.
    #[arg(long = "allow", env = "ENTENTE_ALLOW", value_delimiter = ',')]
    pub allow: Vec<PeerId>,
    /// Discover peers on the LAN with mDNS (only allow-listed ones are dialed).
    #[arg(long, env = "ENTENTE_MDNS")]
    pub mdns: bool,
    /// Cluster name (gossip topic); overrides the config's `cluster`.
    #[arg(long, env = "ENTENTE_CLUSTER")]
    pub cluster: Option<String>,
    /// The cluster's pre-shared key file (libp2p private network); overrides
    /// the config's `cluster_key_file`.
    #[arg(long, env = "ENTENTE_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
}

/// `entente init`: the data dir comes from the global `--data-dir` (kept if
/// it exists; an existing key is never replaced); `--json` prints
/// `peer_id`, `node_id`, `listen` and file paths.
pub fn init(args: InitArgs, data_dir: PathBuf, json: bool) -> Result<()> {
    let dir = DataDir::new(&data_dir);
    let mut report = dir
        .init()
        .with_context(|| format!("initializing {}", data_dir.display()))?;
    let mut cluster_key = None;
    if let Some(path) = &args.cluster_key_file {
        let (key, created) = if path.exists() {
            (read_cluster_key(path)?, false)
        } else {
            (new_cluster_key(path)?, true)
        };
        // The config names the key by an absolute path: `serve` may run
        // from another directory.
        let abs =
            std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
        report.config.cluster_key_file = Some(abs.clone());
        report.config.validate()?;
        std::fs::write(dir.config_path(), report.config.to_toml())
            .with_context(|| format!("writing {}", dir.config_path().display()))?;
        cluster_key = Some((abs, key.fingerprint().to_string(), created));
    }
    let listen: Vec<String> = report
        .config
        .listen
        .iter()
        .map(|a| format!("{a}/p2p/{}", report.peer_id))
        .collect();
    if json {
        let v = serde_json::json!({
            "peer_id": report.peer_id.to_string(),
            "node_id": report.node_id.to_string(),
            "created": report.created,
            "data_dir": dir.root(),
            "listen": listen,
            "config_file": dir.config_path(),
            "identity_file": dir.identity_path(),
            "api_token_file": dir.token_path(),
            "cluster_key_file": cluster_key.as_ref().map(|k| &k.0),
            "cluster_key_fingerprint": cluster_key.as_ref().map(|k| &k.1),
            "cluster_key_created": cluster_key.as_ref().map(|k| k.2),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let verb = if report.created {
            "created"
        } else {
            "existing"
        };
        println!("data dir  {} ({verb})", dir.root().display());
        println!("peer id   {}", report.peer_id);
        println!("node id   {}", report.node_id);
        for a in &listen {
            println!("listen    {a}");
        }
        println!("config    {}", dir.config_path().display());
        println!("api token {}", dir.token_path().display());
        if let Some((path, fingerprint, created)) = &cluster_key {
            let verb = if *created { "new" } else { "existing" };
            println!(
                "cluster key {} ({verb}, fingerprint {fingerprint})",
                path.display()
            );
        }
    }
    Ok(())
}

/// The config `serve` runs with: file, then flags and `ENTENTE_*` variables.
pub fn effective_config(args: &ServeArgs, dir: &DataDir) -> Result<Config> {
    let path = args.config.clone().or_else(|| {
        let p = dir.config_path();
        p.exists().then_some(p)
    });
    let mut config = match &path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    for p in &args.peers {
        if !config.peers.contains(p) {
            config.peers.push(p.clone());
        }
    }
    for p in &args.allow {
        if !config.allow.contains(p) {
            config.allow.push(*p);
        }
    }
    if args.mdns {
        config.mdns = true;
    }
    if let Some(api) = args.api {
        config.api = api;
    }
    if args.require_token {
        config.api_require_token = true;
    }
    if let Some(c) = &args.cluster {
        config.cluster = c.clone();
    }
    if let Some(k) = &args.cluster_key_file {
        config.cluster_key_file = Some(k.clone());
    }
    config.validate()?;
    Ok(config)
}

pub fn serve(args: ServeArgs, data_dir: PathBuf) -> Result<()> {
    let dir = DataDir::new(&data_dir);
    if !dir.identity_path().exists() {
        bail!(
            "{} has no identity: run `entente init --data-dir {}` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    let config = effective_config(&args, &dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let api_addr = config.api;
        let require_token = config.api_require_token;
        let node = runtime::start(&dir, config).await?;
        let handle = node.handle.clone();
        let api = match api::node::start(&handle, dir.root(), api_addr, require_token).await {
            Ok(api) => api,
            Err(e) => {
                node.stop().await?;
                return Err(e.into());
            }
        };
        // Print the listen addresses once bound (scripts read these lines).
        for _ in 0..100 {
            let status = handle.status().await?;
            if !status.listen_addrs.is_empty() {
                for a in status.listen_addrs {
                    println!("listening {a}/p2p/{}", status.peer_id);
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("api http://{}", api.addr);
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
        tracing::info!("signal received, shutting down");
        // The API first (requests in flight finish), then the node, which
        // closes the store.
        if let Err(e) = api.stop().await {
            tracing::warn!(error = %e, "the API did not stop cleanly");
        }
        node.stop().await?;
        Ok(())
    })
}
