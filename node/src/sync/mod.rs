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
//! - [`SyncEngine::tick`]: the current time, at least every few hundred ms.
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
//!    size-capped, panic-guarded there).
//! 4. **Checkpoint.** When every record of a page is applied, the checkpoint
//!    moves to the page's end, and the next page is pulled. At most one
//!    request (pull or fetch) is outstanding per peer.
//! 5. **Push.** A local write, and every record a fetch changed, is gossiped
//!    as (id, heads) ([`Output::Broadcast`]); a receiver whose heads differ
//!    queues a fetch. Lost gossip is repaired by the next pull.
//! 6. **Anti-entropy.** An idle session pulls again every `pull_interval_ms`.
//!
//! Multi-hop needs nothing more: records applied from a peer enter the local
//! feed, which the next peer pulls.
//!
//! ## Checkpoint durability
//!
//! `Store::apply_remote` writes its batch itself, so the checkpoint cannot
//! join that batch; it is written right after the batch that completes its
//! page, never before. A crash in between leaves an older checkpoint: the
//! page is pulled again, its heads now match (or `apply_remote` counts the
//! changes as duplicates), so re-pulling is idempotent and nothing is lost.
//! A record the store refused (quarantined) does not hold the checkpoint
//! back: it is reported, not fetched again until the peer changes it.
//!
//! ## Order of effects
//!
//! Everything the engine persists is written before it returns; a driver then
//! sends the outputs in order (FIFO per peer).

pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use automerge::ChangeHash;
use entente_model::record::heads_from_hex;
use entente_model::{NodeId, RecordId};

use crate::error::{Error, Result};
use crate::store::{Cf, Store};
pub use wire::{Message, PROTOCOL_VERSION, WireHeads, heads_from_wire, heads_to_wire};

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
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            pull_interval_ms: 5_000,
            pull_limit: 1_000,
            fetch_batch: 500,
            fetch_budget_bytes: 4 << 20,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum InFlight {
    None,
    Pull,
    Fetch(Vec<RecordId>),
}

#[derive(Debug)]
struct Session {
    /// The peer's node id once its `Hello` was accepted.
    remote: Option<NodeId>,
    in_flight: InFlight,
    /// Records to fetch from this peer.
    queue: BTreeSet<RecordId>,
    /// The end of the page being fetched, and whether more pages follow.
    page_end: Option<(u64, bool)>,
    /// The persisted checkpoint in the peer's feed.
    checkpoint: u64,
    /// When an idle session pulls again (ms).
    next_pull_at: u64,
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
}

impl<P: Ord + Clone + fmt::Debug> SyncEngine<P> {
    /// An engine for the node that owns `store`.
    pub fn new(store: &Store, config: SyncConfig) -> Result<Self> {
        config.validate()?;
        Ok(SyncEngine {
            node: store.node_id(),
            fingerprint: store.schema().fingerprint().to_string(),
            config,
            sessions: BTreeMap::new(),
            now_ms: 0,
            stats: SyncStats::default(),
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

    /// Whether no session has work outstanding or queued.
    pub fn is_idle(&self) -> bool {
        self.sessions
            .values()
            .all(|s| s.in_flight == InFlight::None && s.queue.is_empty() && s.page_end.is_none())
    }

    /// A connection to `peer` opened (a new one replaces any old session).
    pub fn peer_connected(&mut self, peer: P) -> Vec<Output<P>> {
        self.sessions.insert(
            peer.clone(),
            Session {
                remote: None,
                in_flight: InFlight::None,
                queue: BTreeSet::new(),
                page_end: None,
                checkpoint: 0,
                next_pull_at: 0,
            },
        );
        vec![Output::Send {
            peer,
            msg: Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: self.node,
                schema_fingerprint: self.fingerprint.clone(),
            },
        }]
    }

    /// The connection to `peer` closed: its session (and any request in
    /// flight) is dropped; the next session resumes from the checkpoint.
    pub fn peer_disconnected(&mut self, peer: &P) {
        self.sessions.remove(peer);
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
        let result = Message::decode(frame).and_then(|msg| self.handle(peer, msg, store, &mut out));
        if let Err(e) = result {
            match &e {
                Error::Protocol(_) | Error::SchemaMismatch { .. } => {
                    tracing::warn!(error = %e, "closing sync session")
                }
                _ => tracing::error!(error = %e, "closing sync session on a local error"),
            }
            self.sessions.remove(peer);
            out.push(Output::Disconnect {
                peer: peer.clone(),
                reason: e.to_string(),
            });
        }
        out
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
                    None
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
                let s = self.session(peer);
                s.remote = Some(node_id);
                s.checkpoint = checkpoint;
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
                let limit = (limit as usize).clamp(1, wire::MAX_ENTRIES);
                let mut page = store.changes_since(since, limit + 1)?;
                let more = page.len() > limit;
                page.truncate(limit);
                let next_since = page.last().map_or(since, |e| e.seq);
                let entries = page
                    .into_iter()
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
                if more && entries.is_empty() {
                    return Err(Error::Protocol("empty pull page claims more".into()));
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
                let mut wanted = Vec::new();
                for (id, theirs) in entries {
                    if differs(&store.heads(&id)?, &heads_from_wire(&theirs)) {
                        wanted.push(id);
                    }
                }
                self.session(peer).queue.extend(wanted);
                self.pump(peer, store, out)
            }
            Message::FetchRequest { items } => {
                let mut budget = self.config.fetch_budget_bytes;
                let mut answer = Vec::with_capacity(items.len());
                for (id, have) in items {
                    if budget == 0 {
                        break;
                    }
                    let changes = store.changes_for(&id, &heads_from_wire(&have))?;
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
                        break;
                    }
                    answer.push((id, taken, complete));
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
                let mut unanswered: BTreeSet<RecordId> = asked.iter().cloned().collect();
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
                let report = if batch.is_empty() {
                    Default::default()
                } else {
                    store.apply_remote(batch)?
                };
                let _applied = tracing::debug_span!(
                    "applied_batch",
                    records = report.records_changed,
                    changes = report.changes_applied,
                    pending = report.changes_pending,
                    rejected = report.rejected.len()
                )
                .entered();
                self.stats.changes_applied += report.changes_applied as u64;
                self.stats.records_rejected += report.rejected.len() as u64;
                let rejected: BTreeSet<&RecordId> =
                    report.rejected.iter().map(|(id, _)| id).collect();
                for (id, reason) in &report.rejected {
                    tracing::warn!(record = %id, %reason, "peer's changes refused");
                }
                let mut gossip = Vec::new();
                for (id, old) in before {
                    let now = store.heads(&id)?;
                    if !rejected.contains(&id) && differs(&old, &now) {
                        gossip.push((id, heads_to_wire(&now)));
                    }
                }
                let s = self.session(peer);
                s.in_flight = InFlight::None;
                s.queue.extend(
                    unanswered
                        .into_iter()
                        .chain(again)
                        .filter(|id| !rejected.contains(id)),
                );
                for chunk in gossip.chunks(wire::MAX_ENTRIES) {
                    out.push(Output::Broadcast {
                        msg: Message::Push {
                            entries: chunk.to_vec(),
                        },
                    });
                }
                self.pump(peer, store, out)
            }
        }
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
        s.in_flight = InFlight::Pull;
        let since = s.checkpoint;
        self.stats.pulls += 1;
        out.push(Output::Send {
            peer: peer.clone(),
            msg: Message::PullRequest { since, limit },
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
                s.next_pull_at = now.saturating_add(interval);
            }
        }
        Ok(())
    }
}

/// Whether two heads differ as sets.
fn differs(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    let a: BTreeSet<&ChangeHash> = a.iter().collect();
    let b: BTreeSet<&ChangeHash> = b.iter().collect();
    a != b
}

/// This node's checkpoint in `peer`'s feed (0: never pulled).
pub fn load_checkpoint(store: &Store, peer: &NodeId) -> Result<u64> {
    match store.kv().get(Cf::Checkpoints, &peer.0)? {
        None => Ok(0),
        Some(b) => {
            Ok(u64::from_be_bytes(b.as_slice().try_into().map_err(
                |_| Error::Corrupt(format!("checkpoint for {peer}")),
            )?))
        }
    }
}

/// Persists (durably) this node's checkpoint in `peer`'s feed.
pub fn save_checkpoint(store: &Store, peer: &NodeId, seq: u64) -> Result<()> {
    store.kv().write(vec![(
        Cf::Checkpoints,
        peer.0.to_vec(),
        Some(seq.to_be_bytes().to_vec()),
    )])
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
        let hello = Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: NodeId([2; 16]),
            schema_fingerprint: s.schema().fingerprint().to_string(),
        };
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
}
