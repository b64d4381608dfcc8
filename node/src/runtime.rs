//! The running node: the store, the sync engine and the libp2p swarm wired on
//! tokio.
//!
//! As in rust-libp2p's file-sharing example, the node is two halves:
//!
//! - an **event loop** task ([`start`]) that owns the swarm and the
//!   [`SyncEngine`]. It turns swarm events into engine inputs (a first
//!   connection to a peer is `peer_connected`, the last one closing is
//!   `peer_disconnected`, an ordered replication frame is `handle_message`,
//!   a validated push is `handle_message` too, a timer is `tick`, and a
//!   parked response is `run_pending` once the swarm has taken the
//!   request for the next one), and hands
//!   the engine's outputs to [`EventLoop::apply`], the one thin function that
//!   carries them out (send a frame, publish a gossip, close a peer) and
//!   decides nothing;
//! - a cloneable [`NodeHandle`] (Clone + Send + Sync) with async methods for
//!   whoever drives the node: tests today, the HTTP API tomorrow. Store
//!   writes run on tokio's blocking pool under the store lock; the records
//!   a write changed are then handed to the loop (a bounded channel) for the
//!   engine's `local_change`, which gossips them.
//!
//! Every channel is bounded, and every answer travels on its own oneshot, so
//! responses cannot be confused. The store sits behind one mutex shared by
//! the loop (engine work under `block_in_place`, so the runtime keeps
//! polling connections meanwhile) and the handles.
//!
//! Shutdown ([`NodeHandle::shutdown`], or SIGINT/SIGTERM in `entente
//! serve`): the loop stops taking events, every connection is dropped with
//! the swarm, and the store is closed (RocksDB flushes and releases its
//! lock). A replication batch is one atomic RocksDB write, so a batch in
//! flight is either applied or not; its page is pulled again next time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use entente_model::record::heads_from_hex;
use entente_model::{Collision, CollisionId, NodeId, RecordId, ResolveRequest, Schema};
use futures::StreamExt;
use libp2p::gossipsub;
use libp2p::multiaddr::Protocol;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, Swarm};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Span;

use crate::WriteResult;
use crate::clock::SystemClock;
use crate::config::{Config, DataDir, node_id_for, peer_of};
use crate::error::{Error, Result};
use crate::net::{self, Behaviour, BehaviourEvent, Inbox};
use crate::store::{
    CollisionFilter, FeedEntry, NewRecord, RecordView, SharedStore, Store, StoreOptions,
};
use crate::sync::{Message, Output, SessionInfo, SyncConfig, SyncEngine, VerifyReport};

/// Commands queued from handles to the loop.
const COMMAND_QUEUE_CAP: usize = 256;
/// How often the engine's `tick` runs and static peers are redialed (ms).
const TICK_MS: u64 = 200;
/// A local write that changed more records than this is not gossiped record
/// by record; peers get it from their next anti-entropy pull.
pub const PUSH_MAX_PER_WRITE: usize = 64;

/// One peer as the node sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its libp2p peer id.
    pub peer_id: String,
    /// The address it is dialed at (static peers).
    pub address: Option<String>,
    /// Whether a connection is open.
    pub connected: bool,
    /// Whether its replication handshake completed.
    pub syncing: bool,
    /// Its node id (after the handshake).
    pub node_id: Option<String>,
    /// On the allow-list.
    pub allowed: bool,
    /// Blocked.
    pub blocked: bool,
    /// Dialed and redialed by this node.
    pub static_peer: bool,
    /// Dials of this static peer started so far.
    pub dial_attempts: u64,
    /// Milliseconds since its last replication frame arrived.
    pub last_frame_ms_ago: Option<u64>,
    /// This node's checkpoint in the peer's feed (while connected).
    pub checkpoint: Option<u64>,
    /// How far the peer is behind this node's feed: this node's feed
    /// sequence minus the peer's checkpoint as of its latest pull.
    pub behind: Option<u64>,
    /// Milliseconds since this node last caught up with the peer's whole
    /// feed (in the current session).
    pub last_sync_ms_ago: Option<u64>,
}

/// The node at a glance.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// libp2p peer id.
    pub peer_id: String,
    /// Store node id (derived from the peer id).
    pub node_id: String,
    /// Addresses being listened on.
    pub listen_addrs: Vec<String>,
    /// Peers with an open connection.
    pub connected_peers: usize,
    /// The latest sequence of this node's changes feed.
    pub feed_seq: u64,
    /// Whether no replication work is outstanding.
    pub idle: bool,
    /// Pull requests sent.
    pub pulls: u64,
    /// Fetch requests sent.
    pub fetches: u64,
    /// Bulk full-sync pages requested (a node that started empty).
    pub bulk_pulls: u64,
    /// Records received whole in bulk full-sync pages.
    pub records_bulk: u64,
    /// Bulk pages applied while the peer was already reading the next.
    pub bulk_pages_overlapped: u64,
    /// Fetch responses applied while the peer was already reading the next.
    pub fetches_overlapped: u64,
    /// Changes applied from peers.
    pub changes_applied: u64,
    /// Records refused from peers.
    pub records_rejected: u64,
    /// Records of collections this node does not replicate that a peer
    /// sent anyway (dropped).
    pub records_ignored: u64,
    /// Replication and gossip payload bytes sent (frames and pushes as
    /// handed to libp2p, without Noise and Yamux framing).
    pub bytes_sent: u64,
    /// Replication and gossip payload bytes received.
    pub bytes_received: u64,
}

#[derive(Debug)]
enum Command {
    LocalChanges(Vec<(RecordId, Vec<ChangeHash>)>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    AddPeer {
        peer: PeerId,
        addr: Option<Multiaddr>,
        reply: oneshot::Sender<()>,
    },
    RemovePeer(PeerId, oneshot::Sender<bool>),
    Block(PeerId, oneshot::Sender<bool>),
    Unblock(PeerId, oneshot::Sender<bool>),
    Status(oneshot::Sender<NodeStatus>),
    /// Compare and repair with a connected peer; answered when the run ends.
    Verify(PeerId, oneshot::Sender<Result<VerifyReport>>),
    Shutdown,
}

/// A cloneable handle on a running node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    store: SharedStore,
    feed: Arc<watch::Sender<u64>>,
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    node_id: NodeId,
    /// The node runs inside a cluster key's private network (TCP only).
    keyed: bool,
}

/// A started node: its handle and the task running its event loop.
#[derive(Debug)]
pub struct RunningNode {
    /// The handle.
    pub handle: NodeHandle,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningNode {
    /// Waits until the event loop ended (after [`NodeHandle::shutdown`]) and
    /// the store is closed.
    pub async fn stopped(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::Network(format!("event loop panicked: {e}")))?
    }

    /// Shuts the node down and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.handle.shutdown().await;
        self.stopped().await
    }
}

fn stopped() -> Error {
    Error::Network("the node has stopped".into())
}

/// Opens the data dir's store with the identity's node id, refusing a store
/// made under another identity.
pub fn open_store(dir: &DataDir, config: &Config, opts: StoreOptions) -> Result<(Store, PeerId)> {
    let key = dir.load_identity()?;
    let peer_id = key.public().to_peer_id();
    let node_id = node_id_for(&peer_id);
    let schema = match &config.schema {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            Schema::from_toml(&text)?
        }
        None => Schema::default_crm(),
    };
    let store = Store::open(
        &dir.db_path(),
        Arc::new(schema),
        node_id,
        Arc::new(SystemClock),
        opts,
    )?;
    if store.node_id() != node_id {
        return Err(Error::Config(format!(
            "the store in {} belongs to node {}, this identity is node {node_id}",
            dir.root().display(),
            store.node_id()
        )));
    }
    Ok((store, peer_id))
}

/// Starts a node on the current (multi-threaded) tokio runtime: opens the
/// store, listens, dials the static peers, and runs the event loop until
/// [`NodeHandle::shutdown`].
pub async fn start(dir: &DataDir, config: Config) -> Result<RunningNode> {
    config.validate()?;
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::MultiThread
    {
        return Err(Error::Network(
            "the node needs a multi-threaded tokio runtime".into(),
        ));
    }
    let key = dir.load_identity()?;
    let (store, peer_id) = open_store(dir, &config, StoreOptions::default())?;
    let node_id = store.node_id();
    let engine = SyncEngine::new(
        &store,
        SyncConfig {
            pull_interval_ms: config.sync.pull_interval_ms,
            collections: config.sync.collections.iter().cloned().collect(),
            bulk_full_sync: config.sync.bulk_full_sync,
            ..SyncConfig::default()
        },
    )?;
    let mut swarm = net::build_swarm(key, &config)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| Error::Network(format!("listen on {addr}: {e}")))?;
    }
    let feed = Arc::new(watch::Sender::new(store.feed_seq()));
    let store: SharedStore = Arc::new(Mutex::new(Some(store)));
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE_CAP);
    let now = Instant::now();
    let mut statics = BTreeMap::new();
    for addr in &config.peers {
        statics.insert(
            peer_of(addr)?,
            StaticPeer {
                addr: addr.clone(),
                dial_attempts: 0,
                backoff_ms: config.sync.redial_min_ms,
                next_dial: now,
            },
        );
    }
    tracing::info!(%peer_id, %node_id, "node starting");
    let event_loop = EventLoop {
        swarm,
        engine,
        store: store.clone(),
        feed: feed.clone(),
        commands: rx,
        links: HashMap::new(),
        statics,
        topic: net::topic(&config.cluster),
        started: now,
        listen_addrs: Vec::new(),
        redial_min_ms: config.sync.redial_min_ms,
        redial_max_ms: config.sync.redial_max_ms,
        bytes_sent: 0,
        bytes_received: 0,
        verify_waiters: BTreeMap::new(),
    };
    let task = tokio::spawn(event_loop.run());
    Ok(RunningNode {
        handle: NodeHandle {
            store,
            feed,
            commands: tx,
            peer_id,
            node_id,
            keyed: config.cluster_key_file.is_some(),
        },
        task,
    })
}

impl NodeHandle {
    /// The node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The node's store id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The store, shared with the event loop (the HTTP API serves it).
    pub fn shared_store(&self) -> SharedStore {
        self.store.clone()
    }

    /// The latest sequence of the changes feed, updated after every local
    /// write made through this handle and every batch applied from a peer
    /// (long-polling feed readers wait on it).
    pub fn feed(&self) -> Arc<watch::Sender<u64>> {
        self.feed.clone()
    }

    /// Tells the engine that a write made directly on the shared store
    /// changed `id` to `heads`, so it is gossiped. Never blocks: when the
    /// loop's queue is full the push is skipped and peers get the change
    /// from their next pull.
    pub fn local_change_nowait(&self, id: RecordId, heads: Vec<ChangeHash>) {
        if self
            .commands
            .try_send(Command::LocalChanges(vec![(id, heads)]))
            .is_err()
        {
            tracing::debug!("push skipped: the node's command queue is full or closed");
        }
    }

    /// Runs `f` on the store (on the blocking pool). For reads; a write made
    /// here is not gossiped (use [`NodeHandle::write`]).
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = store
                .lock()
                .map_err(|_| Error::Storage("the store lock is poisoned".into()))?;
            let s = guard.as_mut().ok_or_else(stopped)?;
            f(s)
        })
        .await
        .map_err(|e| Error::Storage(format!("store task failed: {e}")))?
    }

    /// Runs the write `f` on the store, then tells the sync engine which
    /// records it changed (their feed entries after the write), so they are
    /// gossiped. A write that changed more than [`PUSH_MAX_PER_WRITE`]
    /// records reaches peers through their next pull instead.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        let (value, changed, seq) = self
            .read(move |s| {
                let before = s.feed_seq();
                let value = f(s)?;
                let changed = s.changes_since(before, PUSH_MAX_PER_WRITE + 1)?;
                Ok((value, changed, s.feed_seq()))
            })
            .await?;
        publish_seq(&self.feed, seq);
        if !changed.is_empty() && changed.len() <= PUSH_MAX_PER_WRITE {
            let mut entries = Vec::with_capacity(changed.len());
            for FeedEntry { id, heads, .. } in changed {
                entries.push((id, heads_from_hex(&heads)?));
            }
            // A stopped loop cannot gossip; the write itself is durable.
            let _ = self.commands.send(Command::LocalChanges(entries)).await;
        }
        Ok(value)
    }

    /// Creates a record.
    pub async fn create(
        &self,
        collection: &str,
        id: Option<RecordId>,
        fields: serde_json::Map<String, serde_json::Value>,
        force: bool,
    ) -> Result<WriteResult> {
        let collection = collection.to_string();
        self.write(move |s| s.create(&collection, id, &fields, force))
            .await
    }

    /// Creates records in one atomic batch.
    pub async fn create_many(&self, items: Vec<NewRecord>) -> Result<Vec<WriteResult>> {
        self.write(move |s| s.create_many(items)).await
    }

    /// Updates a record, optionally as of `base` heads.
    pub async fn update(
        &self,
        id: RecordId,
        fields: serde_json::Map<String, serde_json::Value>,
        base: Option<Vec<String>>,
        force: bool,
    ) -> Result<WriteResult> {
        self.write(move |s| s.update(&id, &fields, base.as_deref(), force))
            .await
    }

    /// Deletes (tombstones) a record.
    pub async fn delete(&self, id: RecordId) -> Result<WriteResult> {
        self.write(move |s| s.delete(&id)).await
    }

    /// Reads a record.
    pub async fn get(&self, id: RecordId) -> Result<Option<RecordView>> {
        self.read(move |s| s.get(&id)).await
    }

    /// Lists collisions.
    pub async fn collisions(&self, filter: CollisionFilter) -> Result<Vec<Collision>> {
        self.read(move |s| s.collisions(&filter)).await
    }

    /// Settles a collision.
    pub async fn resolve(&self, id: CollisionId, request: ResolveRequest) -> Result<Collision> {
        self.write(move |s| s.resolve(&id, &request)).await
    }

    /// The changes feed after `since`.
    pub async fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>> {
        self.read(move |s| s.changes_since(since, limit)).await
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Every peer the node knows of: static, allowed, blocked or connected.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.ask(Command::Peers).await
    }

    /// Allow-lists `peer`; with an address (which may end in `/p2p/PEER`),
    /// also dials it now and redials it whenever the connection drops.
    pub async fn add_peer(&self, peer: PeerId, addr: Option<Multiaddr>) -> Result<()> {
        let addr = addr.map(|a| {
            if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                a
            } else {
                a.with(Protocol::P2p(peer))
            }
        });
        if let Some(a) = &addr
            && peer_of(a)? != peer
        {
            return Err(Error::Config(format!("{a} names another peer than {peer}")));
        }
        if let Some(a) = &addr {
            crate::config::check_transport(self.keyed, a)?;
        }
        self.ask(|reply| Command::AddPeer { peer, addr, reply })
            .await
    }

    /// Removes `peer` from the allow-list and the static peers, closing its
    /// connections. Whether it was known.
    pub async fn remove_peer(&self, peer: PeerId) -> Result<bool> {
        self.ask(|r| Command::RemovePeer(peer, r)).await
    }

    /// Blocks `peer`: its connections close at once and it cannot reconnect
    /// until unblocked. Whether it was newly blocked.
    pub async fn block_peer(&self, peer: PeerId) -> Result<bool> {
        self.ask(|r| Command::Block(peer, r)).await
    }

    /// Unblocks `peer` (a static peer is redialed at once). Whether it was
    /// blocked.
    pub async fn unblock_peer(&self, peer: PeerId) -> Result<bool> {
        self.ask(|r| Command::Unblock(peer, r)).await
    }

    /// The node's status.
    pub async fn status(&self) -> Result<NodeStatus> {
        self.ask(Command::Status).await
    }

    /// Compares this node's whole data with connected `peer`'s and repairs
    /// the records that differ (range-based set reconciliation, see
    /// `sync`'s docs); answers when the run ended. Refused with
    /// `PEER_NOT_READY` when the peer has no replication session, and
    /// `VERIFY_IN_PROGRESS` when a run with it is going on.
    pub async fn verify(&self, peer: PeerId) -> Result<VerifyReport> {
        self.ask(|r| Command::Verify(peer, r)).await?
    }

    /// Asks the event loop to stop (wait with [`RunningNode::stopped`]).
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}

/// Moves the published feed sequence forward (never back).
pub(crate) fn publish_seq(feed: &watch::Sender<u64>, seq: u64) {
    feed.send_if_modified(|cur| {
        if seq > *cur {
            *cur = seq;
            true
        } else {
            false
        }
    });
}

#[derive(Debug)]
struct StaticPeer {
    addr: Multiaddr,
    dial_attempts: u64,
    backoff_ms: u64,
    next_dial: Instant,
}

/// One connected peer's replication link.
#[derive(Debug)]
struct Link {
    /// Next sequence number to send.
    out_seq: u64,
    inbox: Inbox,
    span: Span,
    last_frame: Option<Instant>,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    engine: SyncEngine<PeerId>,
    store: SharedStore,
    feed: Arc<watch::Sender<u64>>,
    commands: mpsc::Receiver<Command>,
    links: HashMap<PeerId, Link>,
    statics: BTreeMap<PeerId, StaticPeer>,
    topic: gossipsub::IdentTopic,
    started: Instant,
    listen_addrs: Vec<Multiaddr>,
    redial_min_ms: u64,
    redial_max_ms: u64,
    bytes_sent: u64,
    bytes_received: u64,
    /// Who waits for the verify run with each peer.
    verify_waiters: BTreeMap<PeerId, oneshot::Sender<Result<VerifyReport>>>,
}

impl EventLoop {
    async fn run(mut self) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let pending = self.engine.has_pending_work();
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => self.on_command(c),
                },
                _ = tick.tick() => self.on_tick(),
                // A response waits while its successor is asked for. The
                // yield lets the swarm be polled first, so that request is
                // on its way to the peer while this node applies it.
                _ = tokio::task::yield_now(), if pending => {
                    self.with_engine(|engine, store| engine.run_pending(store));
                }
            }
        }
        tracing::info!("node stopping");
        let EventLoop { swarm, store, .. } = self;
        drop(swarm);
        // Closing the store closes RocksDB; handles get "stopped" from now on.
        let closed = tokio::task::spawn_blocking(move || {
            store.lock().map(|mut s| s.take()).map(drop).is_ok()
        })
        .await
        .unwrap_or(false);
        if !closed {
            return Err(Error::Storage("the store lock is poisoned".into()));
        }
        tracing::info!("node stopped, store closed");
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Carries out the engine's outputs, in order. No decisions here.
    fn apply(&mut self, outputs: Vec<Output<PeerId>>) {
        for output in outputs {
            match output {
                Output::Send { peer, msg } => self.send(peer, &msg),
                Output::Broadcast { msg } => match msg.encode() {
                    Ok(frame) => {
                        self.bytes_sent += frame.len() as u64;
                        if let Err(e) = self
                            .swarm
                            .behaviour_mut()
                            .gossipsub
                            .publish(self.topic.clone(), frame)
                        {
                            // No subscribed peer yet, or a push over the cap:
                            // the next pull carries it.
                            tracing::debug!(error = %e, "push not gossiped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "push not encodable"),
                },
                Output::Disconnect { peer, reason } => {
                    self.close_peer(peer, &format!("sync engine: {reason}"));
                }
            }
        }
    }

    fn send(&mut self, peer: PeerId, msg: &Message) {
        let Some(link) = self.links.get_mut(&peer) else {
            tracing::debug!(%peer, "message for a peer no longer connected dropped");
            return;
        };
        match msg.encode() {
            Ok(frame) => {
                let request = net::seal(link.out_seq, &frame);
                self.bytes_sent += request.len() as u64;
                link.out_seq += 1;
                self.swarm.behaviour_mut().repl.send_request(&peer, request);
            }
            Err(e) => {
                tracing::error!(%peer, error = %e, "message not encodable");
                self.close_peer(peer, "a message could not be encoded");
            }
        }
    }

    /// Closes every connection to `peer`; its session ends when the last
    /// one is closed.
    fn close_peer(&mut self, peer: PeerId, reason: &str) {
        tracing::warn!(%peer, reason, "closing the connections to a peer");
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Runs `f` with the engine and the store (blocking the loop's thread,
    /// not the runtime), then applies the outputs.
    fn with_engine(
        &mut self,
        f: impl FnOnce(&mut SyncEngine<PeerId>, &mut Store) -> Vec<Output<PeerId>>,
    ) {
        let outputs = tokio::task::block_in_place(|| {
            let mut guard = match self.store.lock() {
                Ok(g) => g,
                Err(_) => {
                    tracing::error!("the store lock is poisoned");
                    return Vec::new();
                }
            };
            match guard.as_mut() {
                Some(store) => {
                    let outputs = f(&mut self.engine, store);
                    publish_seq(&self.feed, store.feed_seq());
                    outputs
                }
                None => Vec::new(),
            }
        });
        self.apply(outputs);
        self.answer_verifies();
    }

    /// Hands every finished verify report to whoever waits for it.
    fn answer_verifies(&mut self) {
        for peer in self.engine.verify_finished() {
            if !self.verify_waiters.contains_key(&peer) {
                continue;
            }
            if let Some(report) = self.engine.take_verify_report(&peer)
                && let Some(reply) = self.verify_waiters.remove(&peer)
            {
                let _ = reply.send(Ok(report));
            }
        }
    }

    fn start_verify(&mut self, peer: PeerId, reply: oneshot::Sender<Result<VerifyReport>>) {
        if self.verify_waiters.contains_key(&peer) || self.engine.verifying(&peer) {
            let _ = reply.send(Err(Error::VerifyInProgress(format!(
                "a verify with {peer} is running"
            ))));
            return;
        }
        self.verify_waiters.insert(peer, reply);
        let mut refused = None;
        self.with_engine(|engine, store| match engine.start_verify(&peer, store) {
            Ok(outputs) => outputs,
            Err(e) => {
                refused = Some(e);
                Vec::new()
            }
        });
        if let Some(e) = refused
            && let Some(reply) = self.verify_waiters.remove(&peer)
        {
            let _ = reply.send(Err(e));
        }
    }

    fn on_tick(&mut self) {
        let now_ms = self.now_ms();
        let outputs = self.engine.tick(now_ms);
        self.apply(outputs);
        let now = Instant::now();
        let blocked = self.swarm.behaviour().blocked.blocked_peers().clone();
        let mut due = Vec::new();
        for (peer, s) in &mut self.statics {
            if self.links.contains_key(peer) || blocked.contains(peer) || now < s.next_dial {
                continue;
            }
            due.push((*peer, s.addr.clone()));
            s.dial_attempts += 1;
            s.next_dial = now + Duration::from_millis(s.backoff_ms);
            s.backoff_ms = (s.backoff_ms * 2).min(self.redial_max_ms);
        }
        for (peer, addr) in due {
            tracing::debug!(%peer, %addr, "dialing static peer");
            let opts = DialOpts::peer_id(peer).addresses(vec![addr]).build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "dial not started");
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::LocalChanges(entries) => {
                for (id, heads) in entries {
                    let outputs = self.engine.local_change(id, &heads);
                    self.apply(outputs);
                }
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peer_infos());
            }
            Command::AddPeer { peer, addr, reply } => {
                self.swarm.behaviour_mut().allowed.allow_peer(peer);
                if let Some(addr) = addr {
                    tracing::info!(%peer, %addr, "static peer added");
                    self.statics.insert(
                        peer,
                        StaticPeer {
                            addr,
                            dial_attempts: 0,
                            backoff_ms: self.redial_min_ms,
                            next_dial: Instant::now(),
                        },
                    );
                } else {
                    tracing::info!(%peer, "peer allowed");
                }
                let _ = reply.send(());
            }
            Command::RemovePeer(peer, reply) => {
                let was_static = self.statics.remove(&peer).is_some();
                let was_allowed = self.swarm.behaviour_mut().allowed.disallow_peer(peer);
                tracing::info!(%peer, "peer removed");
                let _ = reply.send(was_static || was_allowed);
            }
            Command::Block(peer, reply) => {
                tracing::info!(%peer, "peer blocked");
                let _ = reply.send(self.swarm.behaviour_mut().blocked.block_peer(peer));
            }
            Command::Unblock(peer, reply) => {
                let was = self.swarm.behaviour_mut().blocked.unblock_peer(peer);
                if let Some(s) = self.statics.get_mut(&peer) {
                    s.backoff_ms = self.redial_min_ms;
                    s.next_dial = Instant::now();
                }
                tracing::info!(%peer, "peer unblocked");
                let _ = reply.send(was);
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Verify(peer, reply) => self.start_verify(peer, reply),
            Command::Shutdown => unreachable!("handled by the loop"),
        }
    }

    fn peer_infos(&self) -> Vec<PeerInfo> {
        let b = self.swarm.behaviour();
        // A session with a remote node id has finished its handshake.
        let sessions: BTreeMap<PeerId, SessionInfo> = self.engine.sessions().into_iter().collect();
        let ready = |p: &PeerId| sessions.get(p).and_then(|s| s.remote);
        let feed_seq = *self.feed.borrow();
        let now_ms = self.now_ms();
        let mut all: Vec<PeerId> = self.statics.keys().copied().collect();
        all.extend(b.allowed.allowed_peers().iter().copied());
        all.extend(b.blocked.blocked_peers().iter().copied());
        all.extend(self.links.keys().copied());
        all.sort();
        all.dedup();
        all.into_iter()
            .map(|p| PeerInfo {
                peer_id: p.to_string(),
                address: self.statics.get(&p).map(|s| s.addr.to_string()),
                connected: self.links.contains_key(&p),
                syncing: ready(&p).is_some(),
                node_id: ready(&p).map(|n| n.to_string()),
                allowed: b.allowed.allowed_peers().contains(&p),
                blocked: b.blocked.blocked_peers().contains(&p),
                static_peer: self.statics.contains_key(&p),
                dial_attempts: self.statics.get(&p).map_or(0, |s| s.dial_attempts),
                last_frame_ms_ago: self
                    .links
                    .get(&p)
                    .and_then(|l| l.last_frame)
                    .map(|t| t.elapsed().as_millis() as u64),
                checkpoint: ready(&p).and(sessions.get(&p)).map(|s| s.checkpoint),
                behind: sessions
                    .get(&p)
                    .and_then(|s| s.peer_checkpoint)
                    .map(|c| feed_seq.saturating_sub(c)),
                last_sync_ms_ago: sessions
                    .get(&p)
                    .and_then(|s| s.last_synced_ms)
                    .map(|t| now_ms.saturating_sub(t)),
            })
            .collect()
    }

    fn status(&self) -> NodeStatus {
        let stats = self.engine.stats();
        let feed_seq = self
            .store
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.feed_seq()))
            .unwrap_or(0);
        NodeStatus {
            peer_id: self.swarm.local_peer_id().to_string(),
            node_id: node_id_for(self.swarm.local_peer_id()).to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            connected_peers: self.links.len(),
            feed_seq,
            idle: self.engine.is_idle(),
            pulls: stats.pulls,
            fetches: stats.fetches,
            bulk_pulls: stats.bulk_pulls,
            records_bulk: stats.records_bulk,
            bulk_pages_overlapped: stats.bulk_overlapped,
            fetches_overlapped: stats.fetches_overlapped,
            changes_applied: stats.changes_applied,
            records_rejected: stats.records_rejected,
            records_ignored: stats.records_ignored,
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if let Some(s) = self.statics.get_mut(&peer_id) {
                    s.backoff_ms = self.redial_min_ms;
                }
                if num_established.get() == 1 {
                    let span = tracing::info_span!("peer_session", peer = %peer_id);
                    span.in_scope(|| {
                        tracing::info!(address = %endpoint.get_remote_address(), "peer connected")
                    });
                    self.links.insert(
                        peer_id,
                        Link {
                            out_seq: 0,
                            inbox: Inbox::default(),
                            span,
                            last_frame: None,
                        },
                    );
                    let outputs = self.engine.peer_connected(peer_id);
                    self.apply(outputs);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                if let Some(link) = self.links.remove(&peer_id) {
                    link.span.in_scope(|| {
                        tracing::info!(cause = ?cause.map(|c| c.to_string()), "peer disconnected")
                    });
                }
                self.engine.peer_disconnected(&peer_id);
                self.answer_verifies();
            }
            SwarmEvent::IncomingConnectionError {
                peer_id,
                send_back_addr,
                error,
                ..
            } => {
                // Unknown and blocked peers, garbage bytes and failed
                // handshakes all end here.
                tracing::warn!(peer = ?peer_id, from = %send_back_addr, error = %error, "incoming connection refused");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Repl(event) => self.on_repl_event(event),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Mdns(libp2p::mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    let b = self.swarm.behaviour();
                    if b.allowed.allowed_peers().contains(&peer)
                        && !b.blocked.blocked_peers().contains(&peer)
                        && !self.links.contains_key(&peer)
                    {
                        tracing::info!(%peer, %addr, "dialing a peer found by mDNS");
                        let opts = DialOpts::peer_id(peer).addresses(vec![addr]).build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_repl_event(&mut self, event: request_response::Event<Vec<u8>, ()>) {
        use request_response::{Event, Message as RrMessage};
        match event {
            Event::Message {
                peer,
                message:
                    RrMessage::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let _ = self.swarm.behaviour_mut().repl.send_response(channel, ());
                let Some(link) = self.links.get_mut(&peer) else {
                    return;
                };
                link.last_frame = Some(Instant::now());
                self.bytes_received += request.len() as u64;
                let span = link.span.clone();
                let _entered = span.enter();
                match link.inbox.accept(request) {
                    Ok(frames) => {
                        for frame in frames {
                            self.with_engine(|engine, store| {
                                engine.handle_message(&peer, &frame, store)
                            });
                        }
                    }
                    Err(e) => self.close_peer(peer, &format!("broken frame stream: {e}")),
                }
            }
            Event::Message {
                message: RrMessage::Response { .. },
                ..
            }
            | Event::ResponseSent { .. } => {}
            Event::OutboundFailure { peer, error, .. } => {
                // A frame may be lost: the ordered session is broken.
                self.close_peer(peer, &format!("a frame was not delivered: {error}"));
            }
            Event::InboundFailure { peer, error, .. } => {
                self.close_peer(peer, &format!("a frame could not be read: {error}"));
            }
        }
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        self.bytes_received += message.data.len() as u64;
        let valid = matches!(Message::decode(&message.data), Ok(Message::Push { .. }));
        let acceptance = if valid {
            gossipsub::MessageAcceptance::Accept
        } else {
            gossipsub::MessageAcceptance::Reject
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        if !valid {
            self.close_peer(source, "invalid gossip (not a well-formed push)");
            return;
        }
        // A push before the replication handshake finished cannot be acted
        // on; the pull that follows the handshake covers it.
        if self.engine.ready_peers().iter().any(|(p, _)| *p == source) {
            let span = self.links.get(&source).map(|l| l.span.clone());
            let _entered = span.as_ref().map(|s| s.enter());
            self.with_engine(|engine, store| engine.handle_message(&source, &message.data, store));
        }
    }
}
