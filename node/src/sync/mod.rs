//! Replication as a sans-I/O state machine.
//!
//! [`SyncEngine`] never touches a socket, a timer, a thread or a clock. A
//! driver (the libp2p runtime, or `entente-sim`'s virtual network) feeds it
//! inputs and carries out the [`Output`]s it returns, in order, making no
//! protocol decision of its own:
//!
//! - [`SyncEngine::peer_connected`] / [`SyncEngine::peer_disconnected`]: a
//!   connection (ordered, reliable, or broken) to peer `P` opened or closed;
//! - [`SyncEngine::handle_message`]: a frame from `P` (decoded and validated
//!   here; bad bytes close the session, never panic);
//! - [`SyncEngine::local_change`]: a local write was committed;
//! - [`SyncEngine::tick`]: the current time, at least every few hundred ms;
//! - [`SyncEngine::run_pending`]: after sending the outputs, when
//!   [`SyncEngine::has_pending_work`] says a response waits.
//!
//! ## The protocol
//!
//! 1. **Handshake.** Both sides send `Hello` (protocol version, node id,
//!    schema fingerprint). A mismatch is answered with `HelloRefused` and a
//!    reason, and the session is closed ([`Output::Disconnect`]).
//! 2. **Pull.** Each side pulls the other's consolidated changes feed from
//!    its checkpoint for that peer (kept in `Cf::Checkpoints`, keyed by the
//!    peer's node id), one page of `pull_limit` entries (id, heads) at a time.
//! 3. **Fetch.** Of a page, only the records whose heads differ from ours are
//!    fetched, `fetch_batch` records per request, answered with the raw
//!    Automerge changes we lack (up to a byte budget; a record too big for one
//!    response arrives as a dependency-ordered prefix and is asked for again).
//!    Each response is applied with one `Store::apply_remote` batch (parsed,
//!    size-capped, panic-guarded there). A response that came whole while
//!    more of its page is left to fetch is parked, as a bulk page is (5):
//!    the next fetch goes out first, and the response is applied by
//!    [`SyncEngine::run_pending`] (gossiping what it changed then).
//! 4. **Checkpoint.** When every record of a page is applied, the checkpoint
//!    moves to the page's end, and the next page is pulled. At most one
//!    request (pull, bulk or fetch) is outstanding per peer.
//! 5. **Bulk full sync.** A node whose store is empty when a handshake
//!    completes (and whose checkpoint for that peer is 0) has none of the
//!    peer's records, so it asks for pages of the peer's feed as whole
//!    records (`BulkRequest`/`BulkResponse`): every change of each record,
//!    up to the byte budget (the first record of a page always goes, as a
//!    prefix if it must, and is fetched on from its new heads). Each page is
//!    applied as one batch, the checkpoint moves as in 4, and at the end of
//!    the peer's feed the session pulls the ordinary way. Only one session
//!    at a time is a bulk sync (a second would carry the same records), and
//!    records received in bulk are not gossiped (they enter the local feed,
//!    which the other peers pull). [`SyncConfig::bulk_full_sync`] turns it
//!    off. A page that came whole with more to follow is *parked*: the call
//!    that received it asks for the next page at once and returns, and the
//!    driver applies it with [`SyncEngine::run_pending`] while the peer
//!    reads the next one (a page still parked when the next arrives is
//!    applied first then). So one request is in flight and at most one page
//!    waits per session; a parked page whose session breaks is dropped
//!    unapplied, and its checkpoint never moved.
//! 6. **Push.** A local write, and every record a fetch changed, is gossiped
//!    as (id, heads) ([`Output::Broadcast`]); a receiver whose heads differ
//!    queues a fetch. Lost gossip is repaired by the next pull.
//! 7. **Anti-entropy.** An idle session pulls again every `pull_interval_ms`.
//! 8. **Partial replication.** A node with [`SyncConfig::collections`] set
//!    names them in its `Hello`. A responder serves a peer only the feed
//!    entries (and fetched records) of collections both replicate; a page's
//!    `next_since` stays the end of the scanned range, so a page can be
//!    empty and still move the checkpoint on. Pushes carry no collection: a
//!    partial node fetches a pushed record only if it holds it (so it is of
//!    its collections), and for one it has never seen only brings its next
//!    pull forward. Changes of other collections sent anyway are dropped by
//!    the store ([`Store::apply_remote_only`]), never stored.
//!
//! Multi-hop needs nothing more: records applied from a peer enter the local
//! feed, which the next peer pulls.
//!
//! ## Compare and repair
//!
//! Pulls trust the feed: a store that diverged behind the engine's back
//! (restored from a backup, edited by hand, a bug) is not noticed by them.
//! [`SyncEngine::start_verify`] compares this node's whole data with a peer's
//! by **range-based set reconciliation** over the set of (record id, heads)
//! pairs, and repairs exactly the records that differ:
//!
//! - A *fingerprint* of a range of ids (`lo <= id < hi`, in the byte order
//!   of the records column family) is the number of records in it and the
//!   wrapping 128-bit sum of BLAKE3(id, 0, sorted heads) of each. It is
//!   computed by a scan of the per-record metadata ([`Store::scan_heads`]),
//!   no document is loaded.
//! - The initiator sends `VerifyRequest` with its fingerprint of the whole
//!   id space. The responder (stateless) answers each requested range whose
//!   fingerprint differs from its own with `VerifyResponse`: its records of
//!   the range cut into [`verify::VERIFY_FANOUT`] parts of about equal count
//!   (the cuts are its own ids), each summarized by its fingerprint — or,
//!   when it holds at most [`verify::VERIFY_ITEMS`] records in the range,
//!   by the list of its (id, heads) there (parts of at most
//!   [`verify::VERIFY_LIST_PART`] are listed too). Ranges that match are not
//!   mentioned: a node that agrees costs one round trip and one scan on
//!   each side.
//! - The initiator compares each fingerprinted part with its own fingerprint
//!   of the same bounds and asks again (up to [`verify::VERIFY_BATCH`]
//!   ranges per request, one request in flight) about those that differ;
//!   each round divides the responder's count by the fanout, so the rounds
//!   are `log16(n / 32)` plus what the differences need, and the messages
//!   grow with the differences, not with `n`.
//! - An item list is compared id by id. A record the peer holds at other
//!   heads (or that we lack) is queued on the ordinary fetch path (the
//!   response carries only the changes we lack, applied through
//!   `Store::apply_remote`). A record the peer lacks, or one whose heads
//!   here still differ from the peer's once that fetch is applied (the peer
//!   lacks changes of ours), is offered with a `Push` of (id, our heads)
//!   sent to that peer only, and the peer fetches what it lacks the usual
//!   way. No document is loaded to decide any of this.
//! - The run ends when every range is settled and every repair fetch is
//!   answered; [`SyncEngine::take_verify_report`] then gives a
//!   [`VerifyReport`] (ranges compared, rounds, messages and bytes, the
//!   records that differed, were repaired here, were offered to the peer).
//!   A broken session ends the run with `complete: false` and the reason.
//!
//! Every part is checked to lie within a range that was asked about, items
//! within their part and in order, ranges sorted and disjoint, bounds and
//! counts capped ([`wire`]); a violation closes the session like any other.
//! A responder whose item lists would pass a byte budget answers the rest by
//! fingerprint (always correct, one more round).
//!
//! ## Checkpoint durability
//!
//! A checkpoint is written in the same atomic batch as the data it covers:
//! the fetch response (or bulk page) that completes a page hands the page's
//! end to `Store::apply_remote_only`, which writes it in the batch that
//! applies the records, so the data and the checkpoint land together or not
//! at all. A page that needs no data (every record already up to date, or
//! none it replicates) writes its checkpoint alone, since there is nothing
//! for it to cover; a page whose last record comes in several responses
//! (a record bigger than the byte budget) writes it once that record is
//! complete. A crash before a batch lands leaves the older checkpoint: the
//! page is pulled again, its heads now match (or `apply_remote` counts the
//! changes as duplicates), so re-pulling is idempotent and nothing is lost.
//! A record the store refused (quarantined) does not hold the checkpoint
//! back: it is reported, not fetched again until the peer changes it.
//!
//! ## Order of effects
//!
//! Everything the engine persists is written before it returns, except a
//! parked response, which waits for [`SyncEngine::run_pending`]; a driver
//! sends the outputs in order (FIFO per peer), then runs the pending work
//! ([`SyncEngine::has_pending_work`]).

pub mod verify;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use automerge::ChangeHash;
use entente_model::record::heads_from_hex;
use entente_model::{NodeId, RecordId};

use crate::error::{Error, Result};
use crate::store::Store;
pub use verify::VerifyReport;
use verify::VerifyRun;
pub use wire::{Message, PROTOCOL_VERSION, WireHeads, heads_from_wire, heads_to_wire};

/// Records whose changes an answer reads from the store at once (the store
/// loads the documents of a group on several threads; a budget that ends
/// an answer early wastes at most one group's reads).
const READ_GROUP: usize = 128;

/// Tuning knobs.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Anti-entropy: how long an idle session waits before pulling again (ms).
    pub pull_interval_ms: u64,
    /// Feed entries asked for per pull.
    pub pull_limit: u32,
    /// Records asked for per fetch.
    pub fetch_batch: usize,
    /// Change bytes a fetch response carries before it stops (at least one
    /// change always goes, so progress is certain).
    pub fetch_budget_bytes: usize,
    /// Partial replication: the collections this node replicates (empty:
    /// all). It pulls, fetches, stores and serves only these, and names
    /// them in its `Hello`.
    pub collections: BTreeSet<String>,
    /// Bulk full sync: a node whose store is empty pulls its first peer's
    /// feed as whole records ([`Message::BulkRequest`]) instead of ids and
    /// heads followed by fetches. On by default; off, a new node syncs the
    /// ordinary way (tests and benchmarks compare the two).
    pub bulk_full_sync: bool,
    /// Most request/response rounds one verify run may take. A run that
    /// reaches it ends incomplete (`error` says so): a peer that keeps
    /// answering without settling its ranges cannot hold a run forever.
    /// Each round settles up to [`verify::VERIFY_BATCH`] ranges, so the
    /// default covers millions of differing records.
    pub verify_max_rounds: u64,
    /// Test-only: a deliberately broken protocol step, so the simulator can
    /// prove its checker notices. Always `None` outside those tests.
    #[doc(hidden)]
    pub planted_bug: Option<PlantedBug>,
}

/// Test-only protocol faults (see [`SyncConfig::planted_bug`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// A session with a peer this node has pulled from before (a reconnect)
    /// never pulls: no pull after the handshake, no anti-entropy. Only
    /// gossip of new writes gets through.
    NoPullAfterReconnect,
    /// A parked bulk page's checkpoint is saved when the page is parked,
    /// before its records are stored: a crash in between skips them.
    CheckpointWhenParked,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            pull_interval_ms: 5_000,
            pull_limit: 1_000,
            fetch_batch: 500,
            fetch_budget_bytes: 4 << 20,
            collections: BTreeSet::new(),
            bulk_full_sync: true,
            verify_max_rounds: 10_000,
            planted_bug: None,
        }
    }
}

impl SyncConfig {
    /// Checks the knobs against the wire caps.
    pub fn validate(&self) -> Result<()> {
        if self.pull_limit == 0 || self.pull_limit as usize > wire::MAX_ENTRIES {
            return Err(Error::Protocol(format!(
                "pull_limit must be 1..={}",
                wire::MAX_ENTRIES
            )));
        }
        if self.fetch_batch == 0 || self.fetch_batch > wire::MAX_FETCH_ITEMS {
            return Err(Error::Protocol(format!(
                "fetch_batch must be 1..={}",
                wire::MAX_FETCH_ITEMS
            )));
        }
        if self.fetch_budget_bytes == 0 || self.fetch_budget_bytes > wire::MAX_MESSAGE_BYTES / 2 {
            return Err(Error::Protocol(format!(
                "fetch_budget_bytes must be 1..={}",
                wire::MAX_MESSAGE_BYTES / 2
            )));
        }
        if self.collections.len() > wire::MAX_COLLECTIONS
            || self
                .collections
                .iter()
                .any(|c| c.is_empty() || c.len() > wire::MAX_COLLECTION_NAME_BYTES)
        {
            return Err(Error::Config(format!(
                "sync collections: at most {} names of 1..={} bytes",
                wire::MAX_COLLECTIONS,
                wire::MAX_COLLECTION_NAME_BYTES
            )));
        }
        if self.verify_max_rounds == 0 {
            return Err(Error::Config("verify_max_rounds must be at least 1".into()));
        }
        Ok(())
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<P> {
    /// Send `msg` to `peer` over its connection.
    Send {
        /// The peer.
        peer: P,
        /// The message ([`Message::encode`] gives the frame).
        msg: Message,
    },
    /// Gossip `msg` to every connected peer.
    Broadcast {
        /// A [`Message::Push`].
        msg: Message,
    },
    /// Close the connection to `peer`; the engine has dropped its session.
    Disconnect {
        /// The peer.
        peer: P,
        /// Why (refused handshake, protocol violation, local storage error).
        reason: String,
    },
}

/// What happened in a session, counted (for status and the simulator).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Pull requests sent.
    pub pulls: u64,
    /// Fetch requests sent.
    pub fetches: u64,
    /// Records asked for in fetches.
    pub records_fetched: u64,
    /// Changes applied from peers (new ones).
    pub changes_applied: u64,
    /// Records the store refused.
    pub records_rejected: u64,
    /// Records of collections this node does not replicate that a peer sent
    /// anyway (dropped).
    pub records_ignored: u64,
    /// Bulk requests sent (pages of a full sync as whole records).
    pub bulk_pulls: u64,
    /// Records received whole in bulk responses.
    pub records_bulk: u64,
    /// Bulk pages applied by [`SyncEngine::run_pending`], while the next
    /// page was on its way (the others were applied on arrival).
    pub bulk_overlapped: u64,
    /// Fetch responses applied by [`SyncEngine::run_pending`], while the
    /// next fetch was on its way.
    pub fetches_overlapped: u64,
    /// Batches the store wrote on another thread while this node went on
    /// (see [`crate::store::ApplyReport::written_behind`]).
    pub batches_written_behind: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum InFlight {
    None,
    Pull,
    Bulk,
    Fetch(Vec<RecordId>),
}

#[derive(Debug)]
struct Session {
    /// The peer's node id once its `Hello` was accepted.
    remote: Option<NodeId>,
    /// The collections the peer replicates (from its `Hello`; empty: all).
    wants: BTreeSet<String>,
    in_flight: InFlight,
    /// Records to fetch from this peer.
    queue: BTreeSet<RecordId>,
    /// The end of the page being fetched, and whether more pages follow.
    page_end: Option<(u64, bool)>,
    /// This session is a bulk full sync: its pages are pulled as whole
    /// records until the end of the peer's feed.
    bulk: bool,
    /// A bulk page or fetch response that came whole, waiting to be
    /// applied while the next request is on its way
    /// ([`SyncEngine::run_pending`]).
    parked: Option<Parked>,
    /// The persisted checkpoint in the peer's feed.
    checkpoint: u64,
    /// When an idle session pulls again (ms).
    next_pull_at: u64,
    /// The `since` of the peer's latest pull: its checkpoint in our feed.
    peer_checkpoint: Option<u64>,
    /// When this session last reached the end of the peer's feed with
    /// everything applied (ms, engine time).
    last_synced_ms: Option<u64>,
}

/// A response received whole whose successor was already asked for: it is
/// applied by [`SyncEngine::run_pending`] or, at the latest, when the next
/// response arrives.
#[derive(Debug)]
struct Parked {
    batch: Vec<(RecordId, Vec<Vec<u8>>)>,
    kind: ParkedKind,
}

#[derive(Debug)]
enum ParkedKind {
    /// A bulk page: lands with its checkpoint, the page's end.
    Bulk { next_since: u64 },
    /// A fetch response (not a page's last): its records' heads before, to
    /// gossip those it changes once it lands.
    Fetch {
        before: BTreeMap<RecordId, Vec<ChangeHash>>,
    },
}

/// A session as the driver may report it (peer lists, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// The peer's node id, once its handshake was accepted.
    pub remote: Option<NodeId>,
    /// This node's checkpoint in the peer's feed.
    pub checkpoint: u64,
    /// The peer's checkpoint in this node's feed, as of its latest pull:
    /// `feed_seq - peer_checkpoint` is how far behind it is.
    pub peer_checkpoint: Option<u64>,
    /// When this node last caught up with the peer's whole feed (engine
    /// time, ms), if it has in this session.
    pub last_synced_ms: Option<u64>,
}

/// The replication state machine of one node. `P` names a peer connection
/// as the driver knows it.
#[derive(Debug)]
pub struct SyncEngine<P> {
    node: NodeId,
    fingerprint: String,
    config: SyncConfig,
    sessions: BTreeMap<P, Session>,
    now_ms: u64,
    stats: SyncStats,
    /// Compare-and-repair runs this node started, by peer.
    verifies: BTreeMap<P, VerifyRun>,
    /// Finished runs, until the driver takes them.
    verified: BTreeMap<P, VerifyReport>,
    /// Size of the frame being handled (for verify byte counts).
    frame_len: usize,
}

impl<P: Ord + Clone + fmt::Debug> SyncEngine<P> {
    /// An engine for the node that owns `store`.
    pub fn new(store: &Store, config: SyncConfig) -> Result<Self> {
        config.validate()?;
        if let Some(c) = config
            .collections
            .iter()
            .find(|c| store.schema().collection(c).is_err())
        {
            return Err(Error::Config(format!(
                "sync collections: `{c}` is not a collection of the schema"
            )));
        }
        Ok(SyncEngine {
            node: store.node_id(),
            fingerprint: store.schema().fingerprint().to_string(),
            config,
            sessions: BTreeMap::new(),
            now_ms: 0,
            stats: SyncStats::default(),
            verifies: BTreeMap::new(),
            verified: BTreeMap::new(),
            frame_len: 0,
        })
    }

    /// Counters since start.
    pub fn stats(&self) -> SyncStats {
        self.stats
    }

    /// Peers whose handshake completed, with their node ids.
    pub fn ready_peers(&self) -> Vec<(P, NodeId)> {
        self.sessions
            .iter()
            .filter_map(|(p, s)| s.remote.map(|n| (p.clone(), n)))
            .collect()
    }

    /// Every session, in peer order.
    pub fn sessions(&self) -> Vec<(P, SessionInfo)> {
        self.sessions
            .iter()
            .map(|(p, s)| {
                (
                    p.clone(),
                    SessionInfo {
                        remote: s.remote,
                        checkpoint: s.checkpoint,
                        peer_checkpoint: s.peer_checkpoint,
                        last_synced_ms: s.last_synced_ms,
                    },
                )
            })
            .collect()
    }

    /// Whether no session has work outstanding or queued.
    pub fn is_idle(&self) -> bool {
        self.verifies.is_empty()
            && self.sessions.values().all(|s| {
                s.in_flight == InFlight::None && s.queue.is_empty() && s.page_end.is_none()
            })
    }

    /// A connection to `peer` opened (a new one replaces any old session).
    pub fn peer_connected(&mut self, peer: P) -> Vec<Output<P>> {
        self.abort_verify(&peer, "the session was replaced");
        self.sessions.insert(
            peer.clone(),
            Session {
                remote: None,
                wants: BTreeSet::new(),
                in_flight: InFlight::None,
                queue: BTreeSet::new(),
                page_end: None,
                bulk: false,
                parked: None,
                checkpoint: 0,
                next_pull_at: 0,
                peer_checkpoint: None,
                last_synced_ms: None,
            },
        );
        vec![Output::Send {
            peer,
            msg: Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: self.node,
                schema_fingerprint: self.fingerprint.clone(),
                collections: self.config.collections.iter().cloned().collect(),
            },
        }]
    }

    /// The connection to `peer` closed: its session (and any request in
    /// flight) is dropped; the next session resumes from the checkpoint.
    pub fn peer_disconnected(&mut self, peer: &P) {
        self.sessions.remove(peer);
        self.abort_verify(peer, "the peer disconnected");
    }

    /// A local write committed `id` at `heads`: gossip it.
    pub fn local_change(&mut self, id: RecordId, heads: &[ChangeHash]) -> Vec<Output<P>> {
        if self.sessions.values().all(|s| s.remote.is_none()) {
            return Vec::new();
        }
        vec![Output::Broadcast {
            msg: Message::Push {
                entries: vec![(id, heads_to_wire(heads))],
            },
        }]
    }

    /// The time moved to `now_ms`: idle sessions due for anti-entropy pull.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Output<P>> {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Vec::new();
        let limit = self.config.pull_limit;
        for (peer, s) in &mut self.sessions {
            if s.remote.is_some()
                && s.in_flight == InFlight::None
                && s.queue.is_empty()
                && s.page_end.is_none()
                && self.now_ms >= s.next_pull_at
            {
                s.in_flight = InFlight::Pull;
                self.stats.pulls += 1;
                out.push(Output::Send {
                    peer: peer.clone(),
                    msg: Message::PullRequest {
                        since: s.checkpoint,
                        limit,
                    },
                });
            }
        }
        out
    }

    /// A frame from `peer`. Any protocol violation or local storage failure
    /// closes that session ([`Output::Disconnect`]); the node carries on.
    pub fn handle_message(&mut self, peer: &P, frame: &[u8], store: &mut Store) -> Vec<Output<P>> {
        let _span = tracing::debug_span!("sync_session", peer = ?peer).entered();
        if !self.sessions.contains_key(peer) {
            // A frame of a connection already closed: nothing to answer.
            tracing::debug!("frame from a peer without a session dropped");
            return Vec::new();
        }
        let mut out = Vec::new();
        self.frame_len = frame.len();
        let result = Message::decode(frame).and_then(|msg| self.handle(peer, msg, store, &mut out));
        if let Err(e) = result {
            self.close(peer, e, &mut out);
        }
        out
    }

    /// Whether a response waits to be applied ([`SyncEngine::run_pending`]).
    pub fn has_pending_work(&self) -> bool {
        self.sessions.values().any(|s| s.parked.is_some())
    }

    /// Applies the responses that wait, each as one store batch. A bulk
    /// page that came whole with more to follow, or a fetch response that
    /// came whole with more of its page left to fetch, is not applied by the
    /// [`SyncEngine::handle_message`] that received it: that call sends the
    /// next request at once and returns, so the peer reads the next answer
    /// while this node applies this one. A driver calls this once it has
    /// sent those outputs; a response still waiting when the next one
    /// arrives is applied first then, and one whose session closes is
    /// dropped unapplied (the checkpoint did not move past it).
    pub fn run_pending(&mut self, store: &mut Store) -> Vec<Output<P>> {
        let mut out = Vec::new();
        let peers: Vec<P> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.parked.is_some())
            .map(|(p, _)| p.clone())
            .collect();
        for peer in peers {
            let _span = tracing::debug_span!("sync_session", peer = ?peer).entered();
            match self.land_parked(&peer, store, &mut out) {
                Ok(Some(true)) => self.stats.bulk_overlapped += 1,
                Ok(Some(false)) => self.stats.fetches_overlapped += 1,
                Ok(None) => {}
                Err(e) => self.close(&peer, e, &mut out),
            }
        }
        out
    }

    /// Ends `peer`'s session on `e` (a protocol violation or a local storage
    /// failure), and tells the driver to close the connection.
    fn close(&mut self, peer: &P, e: Error, out: &mut Vec<Output<P>>) {
        match &e {
            Error::Protocol(_) | Error::SchemaMismatch { .. } => {
                tracing::warn!(error = %e, "closing sync session")
            }
            _ => tracing::error!(error = %e, "closing sync session on a local error"),
        }
        self.sessions.remove(peer);
        self.abort_verify(peer, &format!("session closed: {e}"));
        out.push(Output::Disconnect {
            peer: peer.clone(),
            reason: e.to_string(),
        });
    }

    /// Applies `peer`'s parked response, if any: a bulk page with its
    /// checkpoint, a fetch response with the gossip of what it changed.
    /// Returns whether it was a bulk page, if there was one.
    fn land_parked(
        &mut self,
        peer: &P,
        store: &mut Store,
        out: &mut Vec<Output<P>>,
    ) -> Result<Option<bool>> {
        let Some(Parked { batch, kind }) = self.session(peer).parked.take() else {
            return Ok(None);
        };
        // It came whole, so no record of it is fetched again: what the store
        // refused is reported by `apply_batch` and left there.
        match kind {
            ParkedKind::Bulk { next_since } => {
                self.apply_batch(peer, batch, Some(next_since), store)?;
                Ok(Some(true))
            }
            ParkedKind::Fetch { before } => {
                let rejected = self.apply_batch(peer, batch, None, store)?;
                gossip_changed(before, &rejected, store, out)?;
                Ok(Some(false))
            }
        }
    }

    fn handle(
        &mut self,
        peer: &P,
        msg: Message,
        store: &mut Store,
        out: &mut Vec<Output<P>>,
    ) -> Result<()> {
        let ready = self.sessions[peer].remote.is_some();
        match msg {
            Message::Hello {
                protocol_version,
                node_id,
                schema_fingerprint,
                collections,
            } => {
                if ready {
                    return Err(Error::Protocol("second hello".into()));
                }
                let refusal = if protocol_version != PROTOCOL_VERSION {
                    Some(format!(
                        "protocol version {protocol_version}, this node speaks {PROTOCOL_VERSION}"
                    ))
                } else if schema_fingerprint != self.fingerprint {
                    Some(format!(
                        "schema mismatch: peer has {schema_fingerprint}, this node has {}",
                        self.fingerprint
                    ))
                } else if node_id == self.node {
                    Some("peer claims this node's own id".to_string())
                } else {
                    collections
                        .iter()
                        .find(|c| store.schema().collection(c).is_err())
                        .map(|c| format!("peer replicates `{c}`, not a collection here"))
                };
                if let Some(reason) = refusal {
                    out.push(Output::Send {
                        peer: peer.clone(),
                        msg: Message::HelloRefused {
                            reason: reason.clone(),
                        },
                    });
                    return Err(Error::Protocol(format!("handshake refused: {reason}")));
                }
                let checkpoint = load_checkpoint(store, &node_id)?;
                // A node with nothing stored has none of the peer's records:
                // it takes them whole, from one peer at a time (a second
                // bulk stream would carry the same records again).
                let bulk = self.config.bulk_full_sync
                    && checkpoint == 0
                    && store.feed_seq() == 0
                    && !self.sessions.values().any(|s| s.bulk);
                let s = self.session(peer);
                s.remote = Some(node_id);
                s.checkpoint = checkpoint;
                s.bulk = bulk;
                s.wants = collections.into_iter().collect();
                tracing::debug!(remote = %node_id, checkpoint, "handshake done");
                if checkpoint > 0
                    && self.config.planted_bug == Some(PlantedBug::NoPullAfterReconnect)
                {
                    self.session(peer).next_pull_at = u64::MAX;
                    return Ok(());
                }
                self.send_pull(peer, out);
                Ok(())
            }
            Message::HelloRefused { reason } => Err(Error::Protocol(format!(
                "peer refused the handshake: {reason}"
            ))),
            _ if !ready => Err(Error::Protocol(format!("{} before hello", msg.kind()))),
            Message::PullRequest { since, limit } => {
                self.session(peer).peer_checkpoint = Some(since);
                let limit = (limit as usize).clamp(1, wire::MAX_ENTRIES);
                let mut page = store.changes_since(since, limit + 1)?;
                let more = page.len() > limit;
                page.truncate(limit);
                let next_since = page.last().map_or(since, |e| e.seq);
                // Partial replication: the page's end stays the end of the
                // scanned range, so the peer's checkpoint moves past records
                // it does not replicate.
                let wants = &self.sessions[peer].wants;
                let entries = page
                    .into_iter()
                    .filter(|e| serves(&self.config.collections, wants, &e.collection))
                    .map(|e| Ok((e.id, heads_to_wire(&heads_from_hex(&e.heads)?))))
                    .collect::<Result<Vec<_>>>()?;
                out.push(Output::Send {
                    peer: peer.clone(),
                    msg: Message::PullResponse {
                        entries,
                        next_since,
                        more,
                    },
                });
                Ok(())
            }
            Message::PullResponse {
                entries,
                next_since,
                more,
            } => {
                if self.sessions[peer].in_flight != InFlight::Pull {
                    return Err(Error::Protocol("pull response without a request".into()));
                }
                if more && entries.is_empty() && next_since <= self.sessions[peer].checkpoint {
                    return Err(Error::Protocol(
                        "empty pull page claims more without moving on".into(),
                    ));
                }
                if next_since < self.sessions[peer].checkpoint {
                    return Err(Error::Protocol("pull response moves backwards".into()));
                }
                let mut wanted = Vec::new();
                for (id, theirs) in entries {
                    if differs(&store.heads(&id)?, &heads_from_wire(&theirs)) {
                        wanted.push(id);
                    }
                }
                let s = self.session(peer);
                s.in_flight = InFlight::None;
                s.queue.extend(wanted);
                s.page_end = Some((next_since, more));
                self.pump(peer, store, out)
            }
            Message::Push { entries } => {
                let partial = !self.config.collections.is_empty();
                let mut wanted = Vec::new();
                let mut unknown = false;
                for (id, theirs) in entries {
                    let ours = store.heads(&id)?;
                    if !differs(&ours, &heads_from_wire(&theirs)) {
                        continue;
                    }
                    if partial {
                        // A push names no collection. A record held here is
                        // of a known collection; one never seen may be of any,
                        // so it is left to the next pull, which the peer
                        // filters for this node.
                        match store.collection_of(&id)? {
                            Some(c) if self.config.collections.contains(&c) => wanted.push(id),
                            Some(_) => {}
                            None => unknown = true,
                        }
                    } else {
                        wanted.push(id);
                    }
                }
                let now = self.now_ms;
                let s = self.session(peer);
                if unknown {
                    s.next_pull_at = s.next_pull_at.min(now);
                }
                s.queue.extend(wanted);
                self.pump(peer, store, out)
            }
            Message::FetchRequest { items } => {
                let mut budget = self.config.fetch_budget_bytes;
                let mut answer = Vec::with_capacity(items.len());
                let wants = self.sessions[peer].wants.clone();
                let partial = !wants.is_empty() || !self.config.collections.is_empty();
                // Read in groups (the store loads a group's documents on
                // several threads); the budget can end the answer early.
                'items: for group in items.chunks(READ_GROUP) {
                    let mut served = Vec::with_capacity(group.len());
                    let mut wanted = Vec::with_capacity(group.len());
                    for (id, have) in group {
                        let serve = !partial
                            || store
                                .collection_of(id)?
                                .is_none_or(|c| serves(&self.config.collections, &wants, &c));
                        served.push(serve);
                        if serve {
                            wanted.push((id.clone(), heads_from_wire(have)));
                        }
                    }
                    let mut found = store.changes_for_many(&wanted)?.into_iter();
                    for ((id, _), serve) in group.iter().zip(served) {
                        if budget == 0 {
                            break 'items;
                        }
                        if !serve {
                            // Not replicated between us: nothing to send.
                            answer.push((id.clone(), Vec::new(), true));
                            continue;
                        }
                        let changes = found.next().expect("one answer per served item");
                        let mut taken = Vec::new();
                        let mut complete = true;
                        for c in changes {
                            if c.len() > budget && !(answer.is_empty() && taken.is_empty()) {
                                complete = false;
                                budget = 0;
                                break;
                            }
                            budget = budget.saturating_sub(c.len());
                            taken.push(c);
                        }
                        if !complete && taken.is_empty() {
                            break 'items;
                        }
                        answer.push((id.clone(), taken, complete));
                    }
                }
                out.push(Output::Send {
                    peer: peer.clone(),
                    msg: Message::FetchResponse { items: answer },
                });
                Ok(())
            }
            Message::FetchResponse { items } => {
                let InFlight::Fetch(asked) = &self.sessions[peer].in_flight else {
                    return Err(Error::Protocol("fetch response without a request".into()));
                };
                let asked_ids = asked.clone();
                // The response before this one, if it still waits, lands
                // first.
                self.land_parked(peer, store, out)?;
                let mut unanswered: BTreeSet<RecordId> = asked_ids.iter().cloned().collect();
                let mut again = Vec::new();
                let mut batch = Vec::new();
                let mut before = BTreeMap::new();
                for (id, changes, complete) in items {
                    if !unanswered.remove(&id) {
                        return Err(Error::Protocol(format!(
                            "fetch response names {id} twice or unasked"
                        )));
                    }
                    if !complete {
                        again.push(id.clone());
                    }
                    if !changes.is_empty() {
                        before.insert(id.clone(), store.heads(&id)?);
                        batch.push((id, changes));
                    }
                }
                let s = &self.sessions[peer];
                if unanswered.is_empty()
                    && again.is_empty()
                    && !batch.is_empty()
                    && !s.queue.is_empty()
                    && !self.verifies.contains_key(peer)
                {
                    // Whole, and more of the page to fetch: ask for the next
                    // batch now, and apply this one once that request is
                    // out.
                    let s = self.session(peer);
                    s.in_flight = InFlight::None;
                    s.parked = Some(Parked {
                        batch,
                        kind: ParkedKind::Fetch { before },
                    });
                    return self.pump(peer, store, out);
                }
                // The response that completes a page's last fetch carries
                // the page's checkpoint into the same batch as its data.
                let checkpoint = match s.page_end {
                    Some((next, _))
                        if unanswered.is_empty()
                            && again.is_empty()
                            && s.queue.is_empty()
                            && next != s.checkpoint =>
                    {
                        Some(next)
                    }
                    _ => None,
                };
                let rejected = self.apply_batch(peer, batch, checkpoint, store)?;
                if let Some(run) = self.verifies.get_mut(peer) {
                    let mut offer = Vec::new();
                    for id in asked_ids {
                        if unanswered.contains(&id) || again.contains(&id) {
                            continue;
                        }
                        let Some(theirs) = run.awaiting.remove(&id) else {
                            continue;
                        };
                        if rejected.contains(&id) {
                            run.report.records_rejected += 1;
                            continue;
                        }
                        let now = store.heads(&id)?;
                        if differs(&now, &heads_from_wire(&theirs)) {
                            offer.push((id.clone(), heads_to_wire(&now)));
                        }
                        if before.get(&id).is_some_and(|old| differs(old, &now)) {
                            run.report.repaired += 1;
                            if run.report.records_repaired.len() < verify::MAX_REPORTED_IDS {
                                run.report.records_repaired.push(id);
                            }
                        }
                    }
                    run.offer(peer, offer, out);
                }
                let s = self.session(peer);
                s.in_flight = InFlight::None;
                s.queue.extend(
                    unanswered
                        .into_iter()
                        .chain(again)
                        .filter(|id| !rejected.contains(id)),
                );
                gossip_changed(before, &rejected, store, out)?;
                self.pump(peer, store, out)?;
                self.finish_verify_if_done(peer);
                Ok(())
            }
            Message::BulkRequest { since, limit } => {
                let msg = self.answer_bulk(peer, since, limit, store)?;
                out.push(Output::Send {
                    peer: peer.clone(),
                    msg,
                });
                Ok(())
            }
            Message::BulkResponse {
                items,
                next_since,
                more,
            } => self.on_bulk_response(peer, items, next_since, more, store, out),
            Message::VerifyRequest { ranges } => {
                let (parts, compared) = verify::answer(store, &ranges)?;
                tracing::debug!(
                    ranges = compared,
                    parts = parts.len(),
                    "verify request answered"
                );
                out.push(Output::Send {
                    peer: peer.clone(),
                    msg: Message::VerifyResponse { parts },
                });
                Ok(())
            }
            Message::VerifyResponse { parts } => self.on_verify_response(peer, parts, store, out),
        }
    }

    /// Starts comparing this node's whole data with `peer`'s, and repairing
    /// exactly the records that differ (see "Compare and repair" above). The
    /// result is read with [`SyncEngine::take_verify_report`] once
    /// [`SyncEngine::verify_finished`] names the peer.
    pub fn start_verify(&mut self, peer: &P, store: &Store) -> Result<Vec<Output<P>>> {
        let Some(remote) = self.sessions.get(peer).and_then(|s| s.remote) else {
            return Err(Error::PeerNotReady(format!(
                "no replication session with {peer:?}"
            )));
        };
        if self.verifies.contains_key(peer) {
            return Err(Error::VerifyInProgress(format!(
                "a verify with {peer:?} is running"
            )));
        }
        if !self.config.collections.is_empty() || !self.sessions[peer].wants.is_empty() {
            // The fingerprints cover every record of a store; between nodes
            // that do not share every collection they would differ on
            // records that are not meant to be shared.
            return Err(Error::VerifyUnsupported(format!(
                "verify compares whole stores; this node or {peer:?} replicates only some collections"
            )));
        }
        self.verified.remove(peer);
        let whole = verify::fingerprint(store, &wire::IdRange::all())?;
        tracing::info!(?peer, records = whole.count, "verify started");
        self.verifies
            .insert(peer.clone(), VerifyRun::new(Some(remote), whole));
        let mut out = Vec::new();
        self.send_verify(peer, &mut out);
        Ok(out)
    }

    /// Peers whose verify run finished (completely or not) and whose report
    /// waits in [`SyncEngine::take_verify_report`].
    pub fn verify_finished(&self) -> Vec<P> {
        self.verified.keys().cloned().collect()
    }

    /// The report of a finished verify run with `peer` (once).
    pub fn take_verify_report(&mut self, peer: &P) -> Option<VerifyReport> {
        self.verified.remove(peer)
    }

    /// Whether a verify run with `peer` is in progress.
    pub fn verifying(&self, peer: &P) -> bool {
        self.verifies.contains_key(peer)
    }

    fn abort_verify(&mut self, peer: &P, why: &str) {
        if let Some(run) = self.verifies.remove(peer) {
            tracing::warn!(?peer, why, "verify stopped before it finished");
            self.verified
                .insert(peer.clone(), run.finish(Some(why.to_string())));
        }
    }

    fn finish_verify_if_done(&mut self, peer: &P) {
        if self.verifies.get(peer).is_some_and(VerifyRun::done) {
            let run = self.verifies.remove(peer).expect("checked");
            let report = run.finish(None);
            tracing::info!(
                ?peer,
                differing = report.differing,
                repaired = report.repaired,
                offered = report.records_offered,
                rounds = report.rounds,
                "verify finished"
            );
            self.verified.insert(peer.clone(), report);
        }
    }

    /// Sends the next verify request of the run with `peer`, if one is due.
    fn send_verify(&mut self, peer: &P, out: &mut Vec<Output<P>>) {
        let Some(run) = self.verifies.get_mut(peer) else {
            return;
        };
        if run.asked.is_some() || run.pending.is_empty() {
            return;
        }
        let mut ranges = Vec::new();
        while ranges.len() < verify::VERIFY_BATCH {
            match run.pending.pop_first() {
                Some((_, r)) => ranges.push(r),
                None => break,
            }
        }
        run.asked = Some(ranges.iter().map(|(r, _)| r.clone()).collect());
        let msg = Message::VerifyRequest { ranges };
        run.report.rounds += 1;
        run.report.messages_sent += 1;
        run.report.bytes_sent += msg.encode().map_or(0, |b| b.len() as u64);
        out.push(Output::Send {
            peer: peer.clone(),
            msg,
        });
    }

    fn on_verify_response(
        &mut self,
        peer: &P,
        parts: Vec<(wire::IdRange, wire::PartSummary)>,
        store: &mut Store,
        out: &mut Vec<Output<P>>,
    ) -> Result<()> {
        let frame_len = self.frame_len as u64;
        let Some(run) = self.verifies.get_mut(peer) else {
            return Err(Error::Protocol("verify response without a request".into()));
        };
        let Some(asked) = run.asked.take() else {
            return Err(Error::Protocol("verify response without a request".into()));
        };
        run.report.messages_received += 1;
        run.report.bytes_received += frame_len;
        run.report.ranges_compared += asked.len() as u64;
        // Every part must lie within a range we asked about (both sorted).
        let mut i = 0;
        for (part, _) in &parts {
            while i < asked.len() && !asked[i].covers(part) {
                i += 1;
            }
            if i == asked.len() {
                return Err(Error::Protocol(format!(
                    "verify part [{}, {:?}) outside the ranges asked",
                    part.lo, part.hi
                )));
            }
        }
        let mut fetch = Vec::new();
        let mut offer = Vec::new();
        for (range, summary) in parts {
            match summary {
                wire::PartSummary::Fingerprint(theirs) => {
                    run.report.ranges_compared += 1;
                    let mine = verify::fingerprint(store, &range)?;
                    if mine != theirs {
                        run.pending.insert(range.lo.clone(), (range, mine));
                    }
                }
                wire::PartSummary::Items(theirs) => {
                    let diff = verify::compare_items(store, &range, theirs)?;
                    run.differing.extend(diff.differing);
                    fetch.extend(diff.fetch);
                    offer.extend(diff.offer);
                }
            }
        }
        run.report.records_fetched += fetch.len() as u64;
        if !run.pending.is_empty() && run.report.rounds >= self.config.verify_max_rounds {
            let why = format!(
                "verify stopped after {} rounds (verify_max_rounds) with ranges left to compare",
                run.report.rounds
            );
            self.abort_verify(peer, &why);
            return Ok(());
        }
        run.offer(peer, offer, out);
        let ids: Vec<RecordId> = fetch.iter().map(|(id, _)| id.clone()).collect();
        run.awaiting.extend(fetch);
        self.session(peer).queue.extend(ids);
        self.send_verify(peer, out);
        self.pump(peer, store, out)?;
        self.finish_verify_if_done(peer);
        Ok(())
    }

    /// A page of this node's feed after `since` as whole records, for a
    /// peer's bulk full sync: at most `limit` entries, and no more change
    /// bytes than the fetch budget (past the first record, which goes, as a
    /// prefix if it must, so every page makes progress).
    fn answer_bulk(
        &mut self,
        peer: &P,
        since: u64,
        limit: u32,
        store: &mut Store,
    ) -> Result<Message> {
        self.session(peer).peer_checkpoint = Some(since);
        let limit = (limit as usize).clamp(1, wire::MAX_FETCH_ITEMS);
        let mut page = store.changes_since(since, limit + 1)?;
        let mut more = page.len() > limit;
        page.truncate(limit);
        let wants = &self.sessions[peer].wants;
        let mut budget = self.config.fetch_budget_bytes;
        let mut items = Vec::new();
        let mut next_since = since;
        'page: for group in page.chunks(READ_GROUP) {
            let wanted: Vec<(RecordId, Vec<ChangeHash>)> = group
                .iter()
                .filter(|e| serves(&self.config.collections, wants, &e.collection))
                .map(|e| (e.id.clone(), Vec::new()))
                .collect();
            let mut found = store.changes_for_many(&wanted)?.into_iter();
            for entry in group {
                if !serves(&self.config.collections, wants, &entry.collection) {
                    next_since = entry.seq;
                    continue;
                }
                let changes = found.next().expect("one answer per served entry");
                let size: usize = changes.iter().map(Vec::len).sum();
                if size > budget && !items.is_empty() {
                    more = true;
                    break 'page;
                }
                let count = changes.len();
                let mut taken = Vec::with_capacity(count);
                for c in changes {
                    if c.len() > budget && !taken.is_empty() {
                        break;
                    }
                    budget = budget.saturating_sub(c.len());
                    taken.push(c);
                }
                let complete = taken.len() == count;
                items.push((entry.id.clone(), taken, complete));
                next_since = entry.seq;
            }
        }
        Ok(Message::BulkResponse {
            items,
            next_since,
            more,
        })
    }

    /// A page of a bulk full sync: applied as one batch; a record that came
    /// as a prefix is fetched on from its new heads before the checkpoint
    /// moves to the page's end. Records received in bulk are not gossiped:
    /// they came from the peer's feed, and they enter this node's feed,
    /// which its other peers pull.
    fn on_bulk_response(
        &mut self,
        peer: &P,
        items: Vec<(RecordId, Vec<Vec<u8>>, bool)>,
        next_since: u64,
        more: bool,
        store: &mut Store,
        out: &mut Vec<Output<P>>,
    ) -> Result<()> {
        if self.sessions[peer].in_flight != InFlight::Bulk {
            return Err(Error::Protocol("bulk response without a request".into()));
        }
        // The page before this one, if it still waits, lands first.
        self.land_parked(peer, store, out)?;
        let s = &self.sessions[peer];
        if next_since < s.checkpoint || (more && next_since == s.checkpoint) {
            return Err(Error::Protocol(
                "bulk response does not move the checkpoint on".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut again = Vec::new();
        let mut batch = Vec::with_capacity(items.len());
        for (id, changes, complete) in items {
            if !seen.insert(id.clone()) {
                return Err(Error::Protocol(format!("bulk response names {id} twice")));
            }
            if !complete {
                again.push(id.clone());
            }
            if !changes.is_empty() {
                batch.push((id, changes));
            }
        }
        self.stats.records_bulk += seen.len() as u64;
        if more && again.is_empty() && !batch.is_empty() {
            // A whole page with more to come: ask for the next one now, and
            // apply this one (with its checkpoint) once that request is out.
            if self.config.planted_bug == Some(PlantedBug::CheckpointWhenParked) {
                let remote = self.sessions[peer]
                    .remote
                    .expect("bulk after the handshake");
                save_checkpoint(store, &remote, next_since)?;
                self.session(peer).checkpoint = next_since;
            }
            let s = self.session(peer);
            s.in_flight = InFlight::None;
            s.parked = Some(Parked {
                batch,
                kind: ParkedKind::Bulk { next_since },
            });
            self.send_pull(peer, out);
            return Ok(());
        }
        // A page that came whole lands with its checkpoint in one batch.
        let checkpoint = (again.is_empty() && next_since != self.sessions[peer].checkpoint)
            .then_some(next_since);
        let refused = self.apply_batch(peer, batch, checkpoint, store)?;
        let again: Vec<RecordId> = again
            .into_iter()
            .filter(|id| !refused.contains(id))
            .collect();
        let s = self.session(peer);
        s.in_flight = InFlight::None;
        s.queue.extend(again);
        s.page_end = Some((next_since, more));
        if !more {
            // The end of the peer's feed: from here on, ordinary pulls.
            s.bulk = false;
        }
        self.pump(peer, store, out)
    }

    /// Applies a peer's records as one store batch, with `checkpoint` (the
    /// end of the page they complete) in the same batch, and counts it.
    /// Returns the records the store refused or dropped (not fetched again).
    fn apply_batch(
        &mut self,
        peer: &P,
        batch: Vec<(RecordId, Vec<Vec<u8>>)>,
        checkpoint: Option<u64>,
        store: &mut Store,
    ) -> Result<BTreeSet<RecordId>> {
        if batch.is_empty() {
            return Ok(BTreeSet::new());
        }
        let remote = self.sessions[peer].remote;
        let report =
            store.apply_remote_only(remote, &self.config.collections, batch, checkpoint)?;
        if let (Some(seq), Some(_)) = (checkpoint, remote) {
            self.session(peer).checkpoint = seq;
        }
        tracing::debug!(
            records = report.records_changed,
            changes = report.changes_applied,
            pending = report.changes_pending,
            rejected = report.rejected.len(),
            "applied a batch"
        );
        self.stats.changes_applied += report.changes_applied as u64;
        self.stats.batches_written_behind += u64::from(report.written_behind);
        self.stats.records_rejected += report.rejected.len() as u64;
        self.stats.records_ignored += report.ignored.len() as u64;
        if !report.ignored.is_empty() {
            tracing::debug!(
                records = report.ignored.len(),
                "records of collections not replicated here dropped"
            );
        }
        for (id, reason) in &report.rejected {
            tracing::warn!(record = %id, %reason, "peer's changes refused");
        }
        Ok(report
            .rejected
            .into_iter()
            .map(|(id, _)| id)
            .chain(report.ignored)
            .collect())
    }

    fn session(&mut self, peer: &P) -> &mut Session {
        self.sessions
            .get_mut(peer)
            .expect("callers checked the session exists")
    }

    fn send_pull(&mut self, peer: &P, out: &mut Vec<Output<P>>) {
        let limit = self.config.pull_limit;
        let s = self.session(peer);
        debug_assert_eq!(s.in_flight, InFlight::None);
        // A parked page is as good as applied: the next page follows it.
        let since = match &s.parked {
            Some(Parked {
                kind: ParkedKind::Bulk { next_since },
                ..
            }) => *next_since,
            _ => s.checkpoint,
        };
        let msg = if s.bulk {
            s.in_flight = InFlight::Bulk;
            self.stats.bulk_pulls += 1;
            Message::BulkRequest { since, limit }
        } else {
            s.in_flight = InFlight::Pull;
            self.stats.pulls += 1;
            Message::PullRequest { since, limit }
        };
        out.push(Output::Send {
            peer: peer.clone(),
            msg,
        });
    }

    /// With nothing in flight: fetch the next batch of the queue, or close
    /// the page (persist the checkpoint, pull the next page or go idle).
    fn pump(&mut self, peer: &P, store: &mut Store, out: &mut Vec<Output<P>>) -> Result<()> {
        let batch = self.config.fetch_batch;
        let interval = self.config.pull_interval_ms;
        let now = self.now_ms;
        let s = self.sessions.get_mut(peer).expect("session exists");
        if s.in_flight != InFlight::None {
            return Ok(());
        }
        if !s.queue.is_empty() {
            let mut ids = Vec::with_capacity(batch.min(s.queue.len()));
            while ids.len() < batch {
                match s.queue.pop_first() {
                    Some(id) => ids.push(id),
                    None => break,
                }
            }
            let items = ids
                .iter()
                .map(|id| Ok((id.clone(), heads_to_wire(&store.heads(id)?))))
                .collect::<Result<Vec<_>>>()?;
            self.stats.fetches += 1;
            self.stats.records_fetched += ids.len() as u64;
            s.in_flight = InFlight::Fetch(ids);
            out.push(Output::Send {
                peer: peer.clone(),
                msg: Message::FetchRequest { items },
            });
            return Ok(());
        }
        if let Some((next_since, more)) = s.page_end.take() {
            let remote = s.remote.expect("pages are pulled after the handshake");
            if next_since != s.checkpoint {
                save_checkpoint(store, &remote, next_since)?;
                s.checkpoint = next_since;
            }
            if more {
                self.send_pull(peer, out);
            } else {
                s.last_synced_ms = Some(now);
                s.next_pull_at = now.saturating_add(interval);
            }
        }
        Ok(())
    }
}

/// Gossips the records of `before` (their heads before a fetch response was
/// applied) that it changed, except those the store refused.
fn gossip_changed<P>(
    before: BTreeMap<RecordId, Vec<ChangeHash>>,
    rejected: &BTreeSet<RecordId>,
    store: &Store,
    out: &mut Vec<Output<P>>,
) -> Result<()> {
    let mut gossip = Vec::new();
    for (id, old) in before {
        let now = store.heads(&id)?;
        if !rejected.contains(&id) && differs(&old, &now) {
            gossip.push((id, heads_to_wire(&now)));
        }
    }
    for chunk in gossip.chunks(wire::MAX_ENTRIES) {
        out.push(Output::Broadcast {
            msg: Message::Push {
                entries: chunk.to_vec(),
            },
        });
    }
    Ok(())
}

/// Whether a record of `collection` goes between this node (replicating
/// `ours`) and a peer (replicating `theirs`); an empty set means all.
fn serves(ours: &BTreeSet<String>, theirs: &BTreeSet<String>, collection: &str) -> bool {
    (ours.is_empty() || ours.contains(collection))
        && (theirs.is_empty() || theirs.contains(collection))
}

/// Whether two heads differ as sets.
fn differs(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    let a: BTreeSet<&ChangeHash> = a.iter().collect();
    let b: BTreeSet<&ChangeHash> = b.iter().collect();
    a != b
}

/// This node's checkpoint in `peer`'s feed (0: never pulled).
pub fn load_checkpoint(store: &Store, peer: &NodeId) -> Result<u64> {
    store.checkpoint(peer)
}

/// Persists (durably) this node's checkpoint in `peer`'s feed.
pub fn save_checkpoint(store: &Store, peer: &NodeId, seq: u64) -> Result<()> {
    store.save_checkpoint(peer, seq)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use entente_model::Schema;
    use serde_json::json;

    use super::*;
    use crate::clock::ManualClock;

    fn store(n: u8) -> Store {
        store_with(n, Arc::new(Schema::default_crm()))
    }

    fn store_with(n: u8, schema: Arc<Schema>) -> Store {
        Store::memory(
            schema,
            NodeId([n; 16]),
            Arc::new(ManualClock::new(1_700_000_000_000, n as u64)),
        )
    }

    fn small() -> SyncConfig {
        SyncConfig {
            pull_interval_ms: 1_000,
            pull_limit: 2,
            fetch_batch: 2,
            fetch_budget_bytes: 300,
            collections: BTreeSet::new(),
            bulk_full_sync: false,
            verify_max_rounds: 10_000,
            planted_bug: None,
        }
    }

    fn create(s: &mut Store, email: &str) -> RecordId {
        let f = json!({"email": email, "city": "Bern"});
        s.create("contacts", None, f.as_object().unwrap(), true)
            .unwrap()
            .record
            .id
    }

    /// Two engines over one FIFO link: 0 ↔ 1. Returns the messages sent and
    /// any disconnect reasons.
    struct Pair {
        stores: [Store; 2],
        engines: [SyncEngine<usize>; 2],
        wire: VecDeque<(usize, Vec<u8>)>,
        sent: Vec<&'static str>,
        closed: Vec<String>,
    }

    impl Pair {
        fn new(config: SyncConfig) -> Pair {
            let stores = [store(1), store(2)];
            let engines = [
                SyncEngine::new(&stores[0], config.clone()).unwrap(),
                SyncEngine::new(&stores[1], config).unwrap(),
            ];
            Pair {
                stores,
                engines,
                wire: VecDeque::new(),
                sent: Vec::new(),
                closed: Vec::new(),
            }
        }

        fn apply(&mut self, from: usize, outs: Vec<Output<usize>>) {
            for o in outs {
                match o {
                    Output::Send { msg, .. } | Output::Broadcast { msg } => {
                        self.sent.push(msg.kind());
                        self.wire.push_back((1 - from, msg.encode().unwrap()));
                    }
                    Output::Disconnect { reason, .. } => self.closed.push(reason),
                }
            }
        }

        fn connect(&mut self) {
            for i in 0..2 {
                let o = self.engines[i].peer_connected(1 - i);
                self.apply(i, o);
            }
        }

        fn run(&mut self) {
            let mut steps = 0;
            while let Some((to, frame)) = self.wire.pop_front() {
                let o = self.engines[to].handle_message(&(1 - to), &frame, &mut self.stores[to]);
                self.apply(to, o);
                steps += 1;
                assert!(steps < 10_000, "no quiescence");
            }
        }

        fn feed(&self, i: usize) -> Vec<(RecordId, Vec<String>)> {
            let mut v: Vec<_> = self.stores[i]
                .changes_since(0, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|e| (e.id, e.heads))
                .collect();
            v.sort();
            v
        }
    }

    #[test]
    fn pull_fetches_in_pages_and_batches_and_converges() {
        let mut p = Pair::new(small());
        for i in 0..7 {
            create(&mut p.stores[0], &format!("a{i}@x.org"));
        }
        for i in 0..3 {
            create(&mut p.stores[1], &format!("b{i}@x.org"));
        }
        p.connect();
        p.run();
        assert!(p.closed.is_empty(), "{:?}", p.closed);
        assert_eq!(p.feed(0), p.feed(1));
        assert_eq!(p.feed(0).len(), 10);
        assert!(p.engines.iter().all(|e| e.is_idle()));
        // Pages of 2 entries: 7 records take 4 pages at node 1.
        assert!(
            p.engines[1].stats().pulls >= 4,
            "{:?}",
            p.engines[1].stats()
        );
        // The checkpoint is persisted: node 1 stands at node 0's last seq.
        let cp = load_checkpoint(&p.stores[1], &NodeId([1; 16])).unwrap();
        assert_eq!(cp, p.stores[0].feed_seq());
        // And both sides report it: node 1 caught up with node 0's feed,
        // and node 0 saw node 1 pull from there.
        let [(_, at1)] = p.engines[1].sessions()[..] else {
            panic!("one session")
        };
        assert_eq!(at1.checkpoint, cp);
        assert_eq!(at1.remote, Some(NodeId([1; 16])));
        assert!(at1.last_synced_ms.is_some());
        // Node 0 knows node 1's checkpoint as of node 1's latest pull: the
        // start of the last page, then, after the next anti-entropy pull,
        // the end of its feed.
        let at0 = |p: &Pair| p.engines[0].sessions()[0].1.peer_checkpoint;
        assert!(at0(&p) < Some(cp), "{:?}", at0(&p));
        let o = p.engines[1].tick(1_000);
        p.apply(1, o);
        p.run();
        assert_eq!(at0(&p), Some(cp));
    }

    #[test]
    fn a_reconnect_resumes_from_the_checkpoint_and_fetches_only_what_changed() {
        let mut p = Pair::new(small());
        let ids: Vec<_> = (0..6)
            .map(|i| create(&mut p.stores[0], &format!("a{i}@x.org")))
            .collect();
        p.connect();
        p.run();
        for i in 0..2 {
            p.engines[i].peer_disconnected(&(1 - i));
        }
        let before = p.engines[1].stats();
        let f = json!({"city": "Basel"});
        p.stores[0]
            .update(&ids[3], f.as_object().unwrap(), None, false)
            .unwrap();
        p.connect();
        p.run();
        let after = p.engines[1].stats();
        assert_eq!(after.records_fetched - before.records_fetched, 1);
        assert_eq!(
            after.pulls - before.pulls,
            1,
            "one page from the checkpoint"
        );
        assert_eq!(p.feed(0), p.feed(1));
    }

    #[test]
    fn a_push_becomes_a_fetch_and_ticks_repair_lost_gossip() {
        let mut p = Pair::new(small());
        p.connect();
        p.run();
        let id = create(&mut p.stores[0], "p@x.org");
        let heads = p.stores[0].heads(&id).unwrap();
        let o = p.engines[0].local_change(id.clone(), &heads);
        assert!(matches!(&o[..], [Output::Broadcast { .. }]));
        p.sent.clear();
        p.apply(0, o);
        p.run();
        assert_eq!(p.sent, ["push", "fetch-req", "fetch-resp", "push"]);
        assert_eq!(p.stores[1].heads(&id).unwrap(), heads);
        // Lost gossip: the write is never pushed; the tick's pull repairs it.
        let lost = create(&mut p.stores[0], "lost@x.org");
        assert!(p.engines[1].tick(500).is_empty(), "not due yet");
        let o = p.engines[1].tick(1_000);
        p.apply(1, o);
        p.run();
        assert_eq!(
            p.stores[1].heads(&lost).unwrap(),
            p.stores[0].heads(&lost).unwrap()
        );
    }

    #[test]
    fn a_big_record_arrives_in_prefixes_under_the_budget() {
        let mut p = Pair::new(SyncConfig {
            fetch_budget_bytes: 1,
            ..small()
        });
        let id = create(&mut p.stores[0], "big@x.org");
        for i in 0..5 {
            let f = json!({"city": format!("c{i}")});
            p.stores[0]
                .update(&id, f.as_object().unwrap(), None, false)
                .unwrap();
        }
        p.connect();
        p.run();
        assert!(p.closed.is_empty(), "{:?}", p.closed);
        assert_eq!(p.feed(0), p.feed(1));
        assert_eq!(p.engines[1].stats().fetches, 6, "one change per response");
    }

    /// The `Hello` node 2 sends to an engine over `s`.
    fn hello_of_node_2(s: &Store) -> Message {
        Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: NodeId([2; 16]),
            schema_fingerprint: s.schema().fingerprint().to_string(),
            collections: Vec::new(),
        }
    }

    fn bulk() -> SyncConfig {
        SyncConfig {
            bulk_full_sync: true,
            pull_limit: 3,
            ..small()
        }
    }

    #[test]
    fn a_new_node_takes_whole_records_in_bulk_pages_then_pulls() {
        let mut p = Pair::new(SyncConfig {
            fetch_budget_bytes: 600,
            ..bulk()
        });
        for i in 0..8 {
            create(&mut p.stores[0], &format!("a{i}@x.org"));
        }
        // One record bigger than a page's byte budget: it comes as a prefix
        // and is fetched on.
        let big = create(&mut p.stores[0], "big@x.org");
        for i in 0..6 {
            let f = json!({"notes": format!("{i}").repeat(150)});
            p.stores[0]
                .update(&big, f.as_object().unwrap(), None, false)
                .unwrap();
        }
        p.connect();
        p.run();
        assert!(p.closed.is_empty(), "{:?}", p.closed);
        assert_eq!(p.feed(0), p.feed(1));
        assert_eq!(p.feed(1).len(), 9);
        assert!(p.engines.iter().all(|e| e.is_idle()));
        let b = p.engines[1].stats();
        // Every record came whole or as a prefix in bulk pages, none listed
        // by a pull first; only the big record's rest was fetched.
        assert_eq!(b.records_bulk, 9, "{b:?}");
        assert!(b.bulk_pulls >= 3, "pages of at most 3 records: {b:?}");
        assert!(b.fetches >= 1, "the big record's rest: {b:?}");
        assert_eq!(b.records_fetched, b.fetches, "{b:?}");
        assert!(p.sent.contains(&"bulk-resp"));
        assert_eq!(
            load_checkpoint(&p.stores[1], &NodeId([1; 16])).unwrap(),
            p.stores[0].feed_seq()
        );
        // Node 0 had records of its own: it pulled node 1 the ordinary way.
        assert_eq!(p.engines[0].stats().bulk_pulls, 0);
        // After the full sync, the session pulls the ordinary way.
        let pulls = b.pulls;
        let late = create(&mut p.stores[0], "late@x.org");
        let o = p.engines[1].tick(1_000_000);
        p.apply(1, o);
        p.run();
        let b = p.engines[1].stats();
        assert_eq!(b.pulls, pulls + 1, "{b:?}");
        assert_eq!(b.records_bulk, 9, "{b:?}");
        assert!(p.stores[1].get(&late).unwrap().is_some());
    }

    /// A key-value store that remembers which column families each batch
    /// wrote.
    #[derive(Default)]
    struct Recording {
        inner: crate::store::MemKv,
        batches: std::sync::Mutex<Vec<BTreeSet<crate::store::Cf>>>,
    }

    impl crate::store::Kv for Recording {
        fn get(&self, cf: crate::store::Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
            self.inner.get(cf, key)
        }
        fn scan(
            &self,
            cf: crate::store::Cf,
            prefix: &[u8],
            start: &[u8],
            visit: crate::store::kv::Visit<'_>,
        ) -> Result<()> {
            self.inner.scan(cf, prefix, start, visit)
        }
        fn write(&self, batch: Vec<crate::store::BatchOp>) -> Result<()> {
            let cfs = batch.iter().map(|(cf, _, _)| *cf).collect();
            self.batches.lock().unwrap().push(cfs);
            self.inner.write(batch)
        }
    }

    #[test]
    fn a_page_s_checkpoint_lands_in_the_batch_of_its_data() {
        use crate::store::{Cf, StoreOptions};
        for config in [bulk(), small()] {
            let mut p = Pair::new(config.clone());
            let kv = Arc::new(Recording::default());
            p.stores[1] = Store::with_kv(
                kv.clone(),
                Arc::new(Schema::default_crm()),
                NodeId([2; 16]),
                Arc::new(ManualClock::new(1_700_000_000_000, 2)),
                StoreOptions::default(),
            )
            .unwrap();
            p.engines[1] = SyncEngine::new(&p.stores[1], config).unwrap();
            for i in 0..5 {
                create(&mut p.stores[0], &format!("a{i}@x.org"));
            }
            p.connect();
            p.run();
            assert!(p.closed.is_empty(), "{:?}", p.closed);
            assert_eq!(p.feed(0), p.feed(1));
            assert_eq!(
                load_checkpoint(&p.stores[1], &NodeId([1; 16])).unwrap(),
                p.stores[0].feed_seq()
            );
            // Every page held data, so every checkpoint write is also the
            // write of the records it covers: never one without the other.
            let batches = kv.batches.lock().unwrap();
            let with_checkpoint: Vec<_> = batches
                .iter()
                .filter(|b| b.contains(&Cf::Checkpoints))
                .collect();
            assert!(with_checkpoint.len() >= 2, "{batches:?}");
            assert!(
                with_checkpoint
                    .iter()
                    .all(|b| b.contains(&Cf::Records) && b.contains(&Cf::Feed)),
                "{with_checkpoint:?}"
            );
        }
    }

    /// Bulk pages of 3 records, whatever their size.
    fn pages_of_3() -> SyncConfig {
        SyncConfig {
            fetch_budget_bytes: 64 << 10,
            ..bulk()
        }
    }

    /// The requests on their way to node 0.
    fn requests_to_node_0(p: &Pair) -> Vec<Message> {
        p.wire
            .iter()
            .filter(|(to, _)| *to == 0)
            .map(|(_, f)| Message::decode(f).unwrap())
            .filter(|m| m.kind().ends_with("-req"))
            .collect()
    }

    /// Delivers frames until node 1 has handled a bulk page; returns the
    /// page's end.
    fn until_bulk_page(p: &mut Pair) -> u64 {
        while let Some((to, frame)) = p.wire.pop_front() {
            let page = match Message::decode(&frame).unwrap() {
                Message::BulkResponse { next_since, .. } if to == 1 => Some(next_since),
                _ => None,
            };
            let o = p.engines[to].handle_message(&(1 - to), &frame, &mut p.stores[to]);
            p.apply(to, o);
            if let Some(next_since) = page {
                return next_since;
            }
        }
        panic!("no bulk page reached node 1");
    }

    #[test]
    fn a_whole_bulk_page_asks_for_the_next_before_it_is_applied() {
        let mut p = Pair::new(pages_of_3());
        for i in 0..7 {
            create(&mut p.stores[0], &format!("a{i}@x.org"));
        }
        let node0 = NodeId([1; 16]);
        p.connect();
        // Page 1 (3 of 7 records) arrives: the next page is asked for from
        // its end at once, and nothing of it is stored yet.
        let end1 = until_bulk_page(&mut p);
        assert!(end1 > 0);
        assert!(p.engines[1].has_pending_work());
        assert!(!p.engines[1].is_idle());
        assert_eq!(p.stores[1].feed_seq(), 0);
        assert_eq!(load_checkpoint(&p.stores[1], &node0).unwrap(), 0);
        let asks = requests_to_node_0(&p);
        assert!(
            matches!(&asks[..], [Message::BulkRequest { since, .. }] if *since == end1),
            "one request in flight, from the parked page's end: {asks:?}"
        );
        // The driver runs the parked work: the page lands with its
        // checkpoint.
        let o = p.engines[1].run_pending(&mut p.stores[1]);
        assert!(o.is_empty(), "{o:?}");
        assert!(!p.engines[1].has_pending_work());
        assert_eq!(p.engines[1].stats().bulk_overlapped, 1);
        assert_eq!(p.feed(1).len(), 3);
        assert_eq!(load_checkpoint(&p.stores[1], &node0).unwrap(), end1);
        // Page 2 is parked and never run by the driver: page 3, the last,
        // applies it first, then itself.
        let end2 = until_bulk_page(&mut p);
        assert!(end2 > end1);
        assert!(p.engines[1].has_pending_work());
        assert_eq!(p.feed(1).len(), 3);
        p.run();
        assert!(p.closed.is_empty(), "{:?}", p.closed);
        assert!(!p.engines[1].has_pending_work());
        assert_eq!(p.feed(0), p.feed(1));
        assert_eq!(
            load_checkpoint(&p.stores[1], &node0).unwrap(),
            p.stores[0].feed_seq()
        );
        assert!(p.engines.iter().all(|e| e.is_idle()));
        assert_eq!(p.engines[1].stats().records_bulk, 7);
        assert_eq!(p.engines[1].stats().bulk_overlapped, 1);
    }

    #[test]
    fn a_whole_fetch_response_asks_for_the_next_batch_before_it_is_applied() {
        // Node 1 holds a record of its own: it pulls the ordinary way, one
        // page of 6 entries fetched 2 records at a time.
        let mut p = Pair::new(SyncConfig {
            pull_limit: 6,
            fetch_budget_bytes: 64 << 10,
            ..small()
        });
        let ids: Vec<RecordId> = (0..6)
            .map(|i| create(&mut p.stores[0], &format!("a{i}@x.org")))
            .collect();
        create(&mut p.stores[1], "b@x.org");
        p.connect();
        // Until node 1 has handled its first fetch response.
        loop {
            let (to, frame) = p.wire.pop_front().expect("a fetch response comes");
            let fetched = to == 1
                && matches!(
                    Message::decode(&frame).unwrap(),
                    Message::FetchResponse { .. }
                );
            let o = p.engines[to].handle_message(&(1 - to), &frame, &mut p.stores[to]);
            p.apply(to, o);
            if fetched {
                break;
            }
        }
        // Its two records are not stored yet; the next two are asked for.
        assert!(p.engines[1].has_pending_work());
        assert_eq!(p.feed(1).len(), 1);
        let asks = requests_to_node_0(&p);
        assert!(
            matches!(&asks[..], [Message::FetchRequest { items }] if items.len() == 2),
            "{asks:?}"
        );
        // Applied by the driver: stored, and gossiped as changed.
        let o = p.engines[1].run_pending(&mut p.stores[1]);
        assert!(
            matches!(&o[..], [Output::Broadcast { msg: Message::Push { entries } }] if entries.len() == 2),
            "{o:?}"
        );
        assert_eq!(p.feed(1).len(), 3);
        assert_eq!(p.engines[1].stats().fetches_overlapped, 1);
        p.run();
        assert!(p.closed.is_empty(), "{:?}", p.closed);
        for id in &ids {
            assert_eq!(
                p.stores[0].heads(id).unwrap(),
                p.stores[1].heads(id).unwrap()
            );
        }
        // The page's end: node 0's 6 records (its 7th entry is node 1's own
        // record, pulled from node 1 meanwhile).
        assert_eq!(load_checkpoint(&p.stores[1], &NodeId([1; 16])).unwrap(), 6);
        assert!(p.engines.iter().all(|e| e.is_idle()));
        assert!(!p.engines[1].has_pending_work());
    }

    #[test]
    fn a_parked_bulk_page_of_a_broken_session_is_pulled_again() {
        // Broken while page 1 waits (the store still empty: bulk again), and
        // while page 2 waits (page 1 landed: ordinary pulls from its end).
        for landed in [0, 1] {
            let mut p = Pair::new(pages_of_3());
            for i in 0..7 {
                create(&mut p.stores[0], &format!("a{i}@x.org"));
            }
            p.connect();
            let mut end = until_bulk_page(&mut p);
            if landed == 1 {
                p.engines[1].run_pending(&mut p.stores[1]);
                end = until_bulk_page(&mut p);
            }
            assert!(p.engines[1].has_pending_work());
            for i in 0..2 {
                p.engines[i].peer_disconnected(&(1 - i));
            }
            p.wire.clear();
            assert!(!p.engines[1].has_pending_work());
            let o = p.engines[1].run_pending(&mut p.stores[1]);
            assert!(o.is_empty(), "{o:?}");
            let checkpoint = load_checkpoint(&p.stores[1], &NodeId([1; 16])).unwrap();
            assert!(checkpoint < end, "the dropped page is not covered");
            assert_eq!(p.feed(1).len(), 3 * landed);
            p.connect();
            p.run();
            assert!(p.closed.is_empty(), "{:?}", p.closed);
            assert_eq!(p.feed(0), p.feed(1));
            assert!(p.engines.iter().all(|e| e.is_idle()));
        }
    }

    #[test]
    fn a_node_with_records_or_with_bulk_off_pulls_the_ordinary_way() {
        for (config, seed_b) in [(bulk(), true), (small(), false)] {
            let mut p = Pair::new(config);
            for i in 0..4 {
                create(&mut p.stores[0], &format!("a{i}@x.org"));
            }
            if seed_b {
                create(&mut p.stores[1], "b@x.org");
            }
            p.connect();
            p.run();
            assert_eq!(p.feed(0), p.feed(1));
            let b = p.engines[1].stats();
            assert_eq!((b.bulk_pulls, b.records_bulk), (0, 0), "{b:?}");
            assert!(b.records_fetched >= 4, "{b:?}");
            assert_eq!(b.changes_applied, 4, "{b:?}");
            assert!(!p.sent.contains(&"bulk-req"));
        }
    }

    #[test]
    fn an_unasked_or_stuck_bulk_response_closes_the_session() {
        let mut s = store(1);
        let mut e: SyncEngine<u8> = SyncEngine::new(&s, bulk()).unwrap();
        let hello = hello_of_node_2(&s);
        e.peer_connected(7);
        let o = e.handle_message(&7, &hello.encode().unwrap(), &mut s);
        // An empty store asks for its first page in bulk.
        assert!(
            matches!(
                &o[..],
                [Output::Send {
                    msg: Message::BulkRequest { since: 0, .. },
                    ..
                }]
            ),
            "{o:?}"
        );
        // "More" without moving on would loop forever.
        let stuck = Message::BulkResponse {
            items: vec![],
            next_since: 0,
            more: true,
        };
        let o = e.handle_message(&7, &stuck.encode().unwrap(), &mut s);
        assert!(
            matches!(&o[..], [Output::Disconnect { reason, .. }] if reason.contains("checkpoint")),
            "{o:?}"
        );
        // A bulk response nobody asked for.
        e.peer_connected(7);
        let o = e.handle_message(&7, &hello.encode().unwrap(), &mut s);
        assert_eq!(o.len(), 1);
        let done = Message::BulkResponse {
            items: vec![],
            next_since: 0,
            more: false,
        };
        let o = e.handle_message(&7, &done.encode().unwrap(), &mut s);
        assert!(o.is_empty(), "an empty last page ends the bulk sync: {o:?}");
        let o = e.handle_message(&7, &done.encode().unwrap(), &mut s);
        assert!(
            matches!(&o[..], [Output::Disconnect { reason, .. }] if reason.contains("without a request")),
            "{o:?}"
        );
    }

    #[test]
    fn schema_mismatch_is_refused_with_a_reason_on_both_sides() {
        let mut p = Pair::new(small());
        let other =
            Schema::from_toml("[collections.things]\nfields.name = { type = \"string\" }\n")
                .unwrap();
        p.stores[1] = store_with(2, Arc::new(other));
        p.engines[1] = SyncEngine::new(&p.stores[1], small()).unwrap();
        p.connect();
        p.run();
        assert_eq!(p.closed.len(), 2, "{:?}", p.closed);
        assert!(
            p.closed.iter().all(|r| r.contains("schema mismatch")),
            "{:?}",
            p.closed
        );
        assert!(p.engines.iter().all(|e| e.ready_peers().is_empty()));
    }

    #[test]
    fn bad_frames_and_out_of_turn_messages_close_the_session() {
        let mut s = store(1);
        let mut e: SyncEngine<u8> = SyncEngine::new(&s, small()).unwrap();
        let hello = hello_of_node_2(&s);
        // Garbage.
        e.peer_connected(7);
        let o = e.handle_message(&7, &[1, 200, 3], &mut s);
        assert!(
            matches!(&o[..], [Output::Disconnect { peer: 7, .. }]),
            "{o:?}"
        );
        // A pull before the hello.
        e.peer_connected(7);
        let pull = Message::PullRequest { since: 0, limit: 5 }
            .encode()
            .unwrap();
        let o = e.handle_message(&7, &pull, &mut s);
        assert!(
            matches!(&o[..], [Output::Disconnect { reason, .. }] if reason.contains("before hello"))
        );
        // A fetch response nobody asked for.
        e.peer_connected(7);
        let o = e.handle_message(&7, &hello.encode().unwrap(), &mut s);
        assert!(matches!(
            &o[..],
            [Output::Send {
                msg: Message::PullRequest { since: 0, .. },
                ..
            }]
        ));
        let unasked = Message::FetchResponse { items: vec![] }.encode().unwrap();
        let o = e.handle_message(&7, &unasked, &mut s);
        assert!(matches!(&o[..], [Output::Disconnect { .. }]), "{o:?}");
        // Frames after the close are dropped.
        assert!(e.handle_message(&7, &pull, &mut s).is_empty());
        // Our own id is refused.
        e.peer_connected(8);
        let me = Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: NodeId([1; 16]),
            schema_fingerprint: s.schema().fingerprint().to_string(),
            collections: Vec::new(),
        };
        let o = e.handle_message(&8, &me.encode().unwrap(), &mut s);
        assert!(
            matches!(
                &o[..],
                [
                    Output::Send {
                        msg: Message::HelloRefused { .. },
                        ..
                    },
                    Output::Disconnect { .. }
                ]
            ),
            "{o:?}"
        );
    }

    /// Two stores holding the same `n` contacts at the same heads (copied
    /// change by change, not through the engine), engines connected and
    /// idle with checkpoints at each other's feed end.
    fn twins(n: usize) -> (Pair, Vec<RecordId>) {
        twins_with(n, SyncConfig::default())
    }

    fn twins_with(n: usize, config: SyncConfig) -> (Pair, Vec<RecordId>) {
        let mut p = Pair::new(config);
        let mut ids = Vec::new();
        for start in (0..n).step_by(500) {
            let items = (start..(start + 500).min(n))
                .map(|i| crate::store::NewRecord {
                    collection: "contacts".into(),
                    id: None,
                    fields: json!({"email": format!("t{i}@x.org"), "city": "Bern"})
                        .as_object()
                        .unwrap()
                        .clone(),
                    force: false,
                })
                .collect();
            let done = p.stores[0].create_many(items).unwrap();
            let batch: Vec<_> = done
                .iter()
                .map(|w| {
                    let id = w.record.id.clone();
                    (id.clone(), p.stores[0].changes_for(&id, &[]).unwrap())
                })
                .collect();
            ids.extend(done.into_iter().map(|w| w.record.id));
            p.stores[1].apply_remote(batch).unwrap();
        }
        hide_feeds(&mut p);
        p.connect();
        p.run();
        assert!(p.closed.is_empty(), "{:?}", p.closed);
        (p, ids)
    }

    /// Moves both checkpoints to the other's feed end: pulls see nothing.
    fn hide_feeds(p: &mut Pair) {
        save_checkpoint(&p.stores[0], &NodeId([2; 16]), p.stores[1].feed_seq()).unwrap();
        save_checkpoint(&p.stores[1], &NodeId([1; 16]), p.stores[0].feed_seq()).unwrap();
    }

    fn reconnect(p: &mut Pair) {
        for i in 0..2 {
            p.engines[i].peer_disconnected(&(1 - i));
        }
        p.connect();
        p.run();
    }

    fn verify(p: &mut Pair) -> VerifyReport {
        p.sent.clear();
        let o = p.engines[0].start_verify(&1, &p.stores[0]).unwrap();
        p.apply(0, o);
        p.run();
        assert!(p.closed.is_empty(), "{:?}", p.closed);
        assert_eq!(p.engines[0].verify_finished(), vec![1]);
        let r = p.engines[0].take_verify_report(&1).unwrap();
        assert!(r.complete, "{r:?}");
        assert!(p.engines.iter().all(|e| e.is_idle()));
        r
    }

    fn set_city(s: &mut Store, id: &RecordId, city: &str) {
        let f = json!({ "city": city });
        s.update(id, f.as_object().unwrap(), None, false).unwrap();
    }

    #[test]
    fn verify_of_equal_stores_is_one_round_trip() {
        let (mut p, _) = twins(200);
        let r = verify(&mut p);
        assert_eq!(r.rounds, 1);
        assert_eq!(r.ranges_compared, 1);
        assert_eq!(r.differing, 0);
        assert_eq!(r.local_records, 200);
        assert_eq!(p.sent, ["verify-req", "verify-resp"]);
    }

    #[test]
    fn verify_finds_and_repairs_exactly_the_records_that_differ() {
        let (mut p, ids) = twins(1_200);
        // Behind the engines' back: the pulls will not see these.
        set_city(&mut p.stores[1], &ids[10], "Basel");
        set_city(&mut p.stores[1], &ids[700], "Genf");
        set_city(&mut p.stores[0], &ids[300], "Chur");
        set_city(&mut p.stores[0], &ids[10], "Thun");
        let only1 = create(&mut p.stores[1], "only1@x.org");
        let only0 = create(&mut p.stores[0], "only0@x.org");
        hide_feeds(&mut p);
        reconnect(&mut p);
        assert_ne!(p.feed(0), p.feed(1), "pulls did not repair it");
        let before = p.engines[1].stats();
        let r = verify(&mut p);
        let mut want = vec![
            ids[10].clone(),
            ids[700].clone(),
            ids[300].clone(),
            only0,
            only1.clone(),
        ];
        want.sort();
        assert_eq!(r.records_differing, want);
        assert_eq!(r.differing, 5);
        // Asked from the peer: every record it holds at other heads (10,
        // 300, 700, only1); only 10, 700 and only1 changed here.
        assert_eq!(r.records_fetched, 4);
        let mut repaired = r.records_repaired.clone();
        repaired.sort();
        let mut want_repaired = vec![ids[10].clone(), ids[700].clone(), only1];
        want_repaired.sort();
        assert_eq!(repaired, want_repaired);
        // Offered to the peer: 10 (both changed), 300 and only0.
        assert_eq!(r.records_offered, 3);
        assert_eq!(p.feed(0), p.feed(1), "both repaired");
        // The peer fetched what it lacked (10 perhaps twice: once offered,
        // once gossiped after the merge here).
        let after = p.engines[1].stats();
        let fetched = after.records_fetched - before.records_fetched;
        assert!((3..=4).contains(&fetched), "{fetched}");
        // A second run finds nothing.
        let again = verify(&mut p);
        assert_eq!((again.differing, again.rounds), (0, 1));
    }

    #[test]
    fn verify_messages_grow_with_log_n_and_differences_not_n() {
        let mut figures = Vec::new();
        for n in [150, 2_400] {
            let (mut p, ids) = twins(n);
            for k in [1, n / 2, n - 2] {
                set_city(&mut p.stores[1], &ids[k], "Aarau");
            }
            hide_feeds(&mut p);
            reconnect(&mut p);
            let r = verify(&mut p);
            assert_eq!(r.differing, 3, "n={n}");
            assert_eq!(r.repaired, 3, "n={n}");
            assert_eq!(p.feed(0), p.feed(1));
            figures.push((n, r.rounds, r.bytes_sent + r.bytes_received));
        }
        eprintln!("verify figures (records, rounds, bytes): {figures:?}");
        let (small, big) = (figures[0], figures[1]);
        // 16x the records: one more round (log16), not 16x the traffic.
        assert_eq!(small.1, 2, "{figures:?}");
        assert_eq!(big.1, 3, "{figures:?}");
        assert!(big.2 < small.2 * 4, "{figures:?}");
        // Far below listing every record (~80 bytes each).
        assert!(big.2 < 2_400 * 80 / 10, "{figures:?}");
    }

    #[test]
    fn verify_fills_an_empty_peer_and_an_unasked_answer_closes_the_session() {
        let mut p = Pair::new(small());
        for i in 0..40 {
            create(&mut p.stores[0], &format!("e{i}@x.org"));
        }
        hide_feeds(&mut p);
        p.connect();
        p.run();
        assert_eq!(p.feed(1).len(), 0);
        let r = verify(&mut p);
        assert_eq!(
            (r.differing, r.records_offered, r.records_fetched),
            (40, 40, 0)
        );
        assert_eq!(p.feed(0), p.feed(1));
        // A response part outside the ranges asked closes the session.
        let o = p.engines[0].start_verify(&1, &p.stores[0]).unwrap();
        assert!(matches!(
            &o[..],
            [Output::Send {
                msg: Message::VerifyRequest { .. },
                ..
            }]
        ));
        assert!(matches!(
            p.engines[0].start_verify(&1, &p.stores[0]),
            Err(Error::VerifyInProgress(_))
        ));
        let bogus = Message::VerifyResponse { parts: vec![] }.encode().unwrap();
        let o = p.engines[0].handle_message(&1, &bogus, &mut p.stores[0]);
        assert!(o.is_empty(), "an empty answer is fine: {o:?}");
        let r = p.engines[0].take_verify_report(&1).unwrap();
        assert_eq!((r.complete, r.differing), (true, 0));
        let o = p.engines[0].handle_message(&1, &bogus, &mut p.stores[0]);
        assert!(matches!(&o[..], [Output::Disconnect { .. }]), "{o:?}");
        assert!(matches!(
            p.engines[0].start_verify(&1, &p.stores[0]),
            Err(Error::PeerNotReady(_))
        ));
    }

    #[test]
    fn a_peer_that_never_settles_its_ranges_cannot_hold_a_verify_run() {
        let config = SyncConfig {
            verify_max_rounds: 50,
            ..SyncConfig::default()
        };
        let (mut p, _) = twins_with(40, config);
        // A record only A holds, so the first comparison differs.
        create(&mut p.stores[0], "only-a@x.org");
        let mut o = p.engines[0].start_verify(&1, &p.stores[0]).unwrap();
        let mut answered = 0u64;
        // The hostile peer answers every range asked with the same range and
        // a fingerprint that never matches.
        while let [
            Output::Send {
                msg: Message::VerifyRequest { ranges },
                ..
            },
        ] = &o[..]
        {
            let parts = ranges
                .iter()
                .map(|(r, f)| {
                    let bogus = wire::Fingerprint {
                        count: f.count + 1,
                        sum: [answered as u8; 16],
                    };
                    (r.clone(), wire::PartSummary::Fingerprint(bogus))
                })
                .collect();
            let frame = Message::VerifyResponse { parts }.encode().unwrap();
            o = p.engines[0].handle_message(&1, &frame, &mut p.stores[0]);
            answered += 1;
            assert!(answered <= 50, "the run outlived its round cap");
        }
        assert!(
            o.iter().all(|x| !matches!(x, Output::Disconnect { .. })),
            "{o:?}"
        );
        assert_eq!(answered, 50);
        assert_eq!(p.engines[0].verify_finished(), vec![1]);
        let r = p.engines[0].take_verify_report(&1).unwrap();
        assert!(!r.complete);
        assert_eq!(r.rounds, 50);
        assert!(
            r.error.as_deref().unwrap().contains("verify_max_rounds"),
            "{r:?}"
        );
        // The session itself is intact: a new run can start.
        assert!(p.engines[0].start_verify(&1, &p.stores[0]).is_ok());
    }
}
