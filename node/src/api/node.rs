//! The API of a running node: [`NodeApiHooks`] answers the peer and network
//! calls through the node's [`NodeHandle`], and [`state_for_node`] builds an
//! [`ApiState`] over the store the node's event loop shares, with the feed
//! channel the loop updates after every batch it applies from a peer (so a
//! long-polling `GET /changes` wakes up for remote changes too).
//!
//! The hooks are called on tokio's blocking pool (see [`NodeHooks`]), so
//! they wait for the event loop's answer with `Handle::block_on`;
//! `local_change` is called from async code and only queues.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use entente_model::RecordId;
use entente_model::record::heads_from_hex;
use libp2p::{Multiaddr, PeerId};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{ApiConfig, ApiState, HookError, NetMetrics, NodeHooks, PeerInfo};
use crate::config::peer_of;
use crate::runtime::{self, NodeHandle};

/// Hooks over a running node.
#[derive(Debug, Clone)]
pub struct NodeApiHooks {
    node: NodeHandle,
    rt: tokio::runtime::Handle,
}

impl NodeApiHooks {
    /// Hooks for `node`; must be made inside its tokio runtime.
    pub fn new(node: NodeHandle) -> Self {
        NodeApiHooks {
            node,
            rt: tokio::runtime::Handle::current(),
        }
    }

    fn wait<T>(&self, f: impl Future<Output = crate::Result<T>>) -> Result<T, HookError> {
        self.rt.block_on(f).map_err(|e| {
            // A stopped node, a refused dial: the service is unavailable;
            // a refusal with a status of its own keeps it.
            let status = match super::error::status_for(&e).as_u16() {
                500 => 503,
                s => s,
            };
            HookError {
                status,
                code: e.code(),
                message: e.to_string(),
            }
        })
    }

    fn peer_id(id: &str) -> Result<PeerId, HookError> {
        id.parse().map_err(|_| HookError {
            status: 400,
            code: "BAD_PEER_ID".into(),
            message: format!("`{id}` is not a libp2p peer id"),
        })
    }

    fn unknown(id: &str) -> HookError {
        HookError {
            status: 404,
            code: "UNKNOWN_PEER".into(),
            message: format!("peer {id} is not known to this node"),
        }
    }
}

fn to_api(p: runtime::PeerInfo) -> PeerInfo {
    PeerInfo {
        id: p.peer_id,
        addrs: p.address.into_iter().collect(),
        connected: p.connected,
        blocked: p.blocked,
        lag: p.behind,
        syncing: p.syncing,
        node_id: p.node_id,
        allowed: p.allowed,
        static_peer: p.static_peer,
        checkpoint: p.checkpoint,
        last_sync_ms_ago: p.last_sync_ms_ago,
    }
}

impl NodeHooks for NodeApiHooks {
    fn local_change(&self, id: &RecordId, heads: &[String]) {
        match heads_from_hex(heads) {
            Ok(h) => self.node.local_change_nowait(id.clone(), h),
            Err(e) => {
                tracing::error!(record = %id, error = %e, "heads of a local write unreadable")
            }
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        match self.wait(self.node.peers()) {
            Ok(peers) => peers.into_iter().map(to_api).collect(),
            Err(e) => {
                tracing::warn!(error = %e.message, "peer list unavailable");
                Vec::new()
            }
        }
    }

    fn add_peer(&self, addr: &str) -> Result<PeerInfo, HookError> {
        let bad = |message: String| HookError {
            status: 400,
            code: "BAD_ADDRESS".into(),
            message,
        };
        let addr: Multiaddr = addr
            .parse()
            .map_err(|e| bad(format!("`{addr}` is not a multiaddr: {e}")))?;
        let peer = peer_of(&addr).map_err(|e| bad(e.to_string()))?;
        self.wait(self.node.add_peer(peer, Some(addr)))?;
        let peers = self.wait(self.node.peers())?;
        let id = peer.to_string();
        peers
            .into_iter()
            .find(|p| p.peer_id == id)
            .map(to_api)
            .ok_or_else(|| Self::unknown(&id))
    }

    fn remove_peer(&self, id: &str) -> Result<(), HookError> {
        let peer = Self::peer_id(id)?;
        if self.wait(self.node.remove_peer(peer))? {
            Ok(())
        } else {
            Err(Self::unknown(id))
        }
    }

    fn block(&self, id: &str) -> Result<(), HookError> {
        let peer = Self::peer_id(id)?;
        // Blocking twice is not an error: the peer is blocked either way.
        self.wait(self.node.block_peer(peer)).map(drop)
    }

    fn unblock(&self, id: &str) -> Result<(), HookError> {
        let peer = Self::peer_id(id)?;
        if self.wait(self.node.unblock_peer(peer))? {
            Ok(())
        } else {
            Err(HookError {
                status: 409,
                code: "NOT_BLOCKED".into(),
                message: format!("peer {id} is not blocked"),
            })
        }
    }

    fn metrics(&self) -> NetMetrics {
        match self.wait(self.node.status()) {
            Ok(s) => NetMetrics {
                applied_changes: s.changes_applied,
                bytes_in: s.bytes_received,
                bytes_out: s.bytes_sent,
                records_rejected: s.records_rejected,
                records_ignored: s.records_ignored,
            },
            Err(_) => NetMetrics::default(),
        }
    }

    fn networked(&self) -> bool {
        true
    }

    fn verify(&self, id: &str) -> Result<crate::sync::VerifyReport, HookError> {
        let peer = Self::peer_id(id)?;
        self.wait(self.node.verify(peer))
    }
}

/// The API state of a running node: its shared store, its feed channel, and
/// [`NodeApiHooks`]. Call inside the node's tokio runtime.
pub fn state_for_node(node: &NodeHandle, config: ApiConfig) -> ApiState {
    ApiState::shared(
        node.shared_store(),
        node.feed(),
        Arc::new(NodeApiHooks::new(node.clone())),
        config,
    )
}

/// The HTTP API of a running node, served on its own task.
#[derive(Debug)]
pub struct RunningApi {
    /// The address it is bound to (a port 0 request is resolved here).
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningApi {
    /// Stops taking connections, finishes the requests in flight, and waits.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| std::io::Error::other(format!("API task failed: {e}")))?
    }
}

/// Binds `addr` and serves `node`'s API there. The token is the data dir's
/// (`token_dir/api-token`, made when missing); it is required when the
/// address is not loopback, or always with `require_token`.
pub async fn start(
    node: &NodeHandle,
    token_dir: &Path,
    addr: SocketAddr,
    require_token: bool,
) -> crate::Result<RunningApi> {
    let io = |what: String| crate::Error::Config(what);
    let token = super::token::load_or_create(token_dir)
        .map_err(|e| io(format!("API token in {}: {e}", token_dir.display())))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| io(format!("binding the API to {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| io(format!("the API's address: {e}")))?;
    let config = ApiConfig::for_addr(addr, Some(token), require_token).map_err(io)?;
    let state = state_for_node(node, config);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(super::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    tracing::info!(%addr, "HTTP API listening");
    Ok(RunningApi { addr, stop, task })
}
