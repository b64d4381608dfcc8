//! The virtual network: N nodes, each a real [`SyncEngine`] over a real
//! [`Store`] (in memory, or RocksDB in a temporary directory), a virtual
//! clock, and the faults of issue #4. [`Sim`] decides nothing about the
//! protocol: [`Sim::apply`] carries out the engines' outputs, in order.
//!
//! ## What a connection is
//!
//! A pair of nodes the topology allows may hold one connection. A connection
//! delivers frames in order, each after a latency drawn from the seed
//! (uniform between [`NetOptions::latency_ms_min`] and `latency_ms_max`,
//! plus, for a few frames, a long tail), never faster than the frame before
//! it on the same direction — or it breaks, as TCP or QUIC do:
//!
//! - a frame whose direction is blocked when it should arrive (a partition,
//!   a one-way link) is lost, and from then on nothing more is delivered on
//!   that direction (no gap may be skipped); the connection *stalls* and
//!   breaks [`NetOptions::break_after_ms`] later (a keepalive timeout), even
//!   if the path came back meanwhile. Both engines then hear
//!   `peer_disconnected`.
//! - a crashed node's connections break at once (its peers see a reset).
//! - a connection idle across a short partition survives, as TCP does.
//!
//! A broken pair is redialed every [`NetOptions::redial_ms`]; the dial
//! succeeds only if both directions are open (a handshake needs both).
//!
//! ## Gossip
//!
//! [`Output::Broadcast`] (a push of record ids and heads) does not travel on
//! the connections: it takes its own lossy path, as gossipsub does. Each copy
//! has its own latency (so copies reorder, also relative to connection
//! frames), is lost with probability [`NetOptions::gossip_loss_permille`]
//! and duplicated with `gossip_dup_permille`. Like the runtime, a node hands
//! a push to its engine only from a peer whose handshake is done.
//!
//! ## Nodes
//!
//! Nodes can crash (engine state and frames in flight lost, store kept) and
//! restart (the store reopened: RocksDB from its directory, or the same
//! in-memory key-value map under a new `Store`), and a node can join late
//! with an empty store. A crash drops the `Store` as a killed process would:
//! RocksDB's write-ahead log has every acknowledged batch (the simulator
//! does not model a power loss, so stores skip the fsync for speed).
//!
//! Every event goes into a trace; its digest (FNV-1a) must be the same for
//! the same seed, byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::path::PathBuf;
use std::sync::Arc;

use entente_model::{NodeId, RecordId, Schema};
use entente_node::store::MemKv;
use entente_node::sync::{Message, Output, SyncConfig, SyncEngine, VerifyReport, save_checkpoint};
use entente_node::{ManualClock, Store, StoreOptions};

use crate::Rng;

/// Virtual epoch the stores' clocks start at (ms since the Unix epoch).
pub const EPOCH_MS: i64 = 1_700_000_000_000;

/// Network and timing knobs.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Shortest one-way latency of a connection frame (ms).
    pub latency_ms_min: u64,
    /// Longest ordinary one-way latency (ms).
    pub latency_ms_max: u64,
    /// Frames (per mille) that take the long tail instead.
    pub latency_tail_permille: u64,
    /// Extra latency of a tail frame, at most (ms).
    pub latency_tail_ms: u64,
    /// Gossip copies lost (per mille).
    pub gossip_loss_permille: u64,
    /// Gossip copies delivered twice (per mille).
    pub gossip_dup_permille: u64,
    /// Longest gossip latency (ms).
    pub gossip_latency_ms_max: u64,
    /// A stalled connection breaks after this long (ms).
    pub break_after_ms: u64,
    /// A broken pair is redialed this often (ms).
    pub redial_ms: u64,
    /// How often each node ticks (ms).
    pub tick_ms: u64,
    /// Longest delay before a node applies a response it parked while the
    /// next one is asked for (ms): a delay longer than a round trip lets the
    /// next response arrive first, which then applies the parked one.
    pub work_ms_max: u64,
    /// Keep the trace lines (not only their digest).
    pub keep_trace: bool,
    /// The engines' knobs.
    pub sync: SyncConfig,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            latency_ms_min: 1,
            latency_ms_max: 40,
            latency_tail_permille: 20,
            latency_tail_ms: 400,
            gossip_loss_permille: 150,
            gossip_dup_permille: 50,
            gossip_latency_ms_max: 120,
            break_after_ms: 800,
            redial_ms: 300,
            tick_ms: 100,
            work_ms_max: 30,
            keep_trace: false,
            sync: SyncConfig {
                pull_interval_ms: 2_000,
                pull_limit: 16,
                fetch_batch: 8,
                fetch_budget_bytes: 64 << 10,
                ..SyncConfig::default()
            },
        }
    }
}

/// Where a node keeps its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// In-memory key-value maps (kept across a crash, as a disk would be).
    Memory,
    /// RocksDB in a temporary directory.
    Rocks,
}

/// Traffic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Connection frames delivered.
    pub messages: u64,
    /// Bytes of connection frames delivered.
    pub bytes: u64,
    /// Gossip copies delivered to an engine.
    pub gossip: u64,
    /// Bytes of gossip delivered.
    pub gossip_bytes: u64,
}

impl Traffic {
    /// Everything delivered: (messages, bytes).
    pub fn total(&self) -> (u64, u64) {
        (self.messages + self.gossip, self.bytes + self.gossip_bytes)
    }
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        epoch: u64,
        frame: Arc<[u8]>,
    },
    Gossip {
        from: usize,
        to: usize,
        frame: Arc<[u8]>,
    },
    Tick(usize, u64),
    Break(usize, usize, u64),
    Dial(usize, usize),
    Restart(usize),
    /// The node's engine applies the responses it parked (incarnation).
    Work(usize, u64),
}

#[derive(Debug, Default)]
struct Link {
    up: bool,
    epoch: u64,
    /// Time of the last scheduled delivery, per direction (low→high, high→low).
    last_at: [u64; 2],
    /// A frame was lost on this direction: nothing more gets through.
    dead: [bool; 2],
    /// A break is scheduled for this epoch.
    breaking: bool,
    /// A dial is scheduled.
    dialing: bool,
}

enum Backing {
    Memory(Arc<MemKv>),
    Rocks(PathBuf),
}

struct Node {
    store: Option<Store>,
    engine: Option<SyncEngine<usize>>,
    clock: Arc<ManualClock>,
    backing: Backing,
    incarnation: u64,
    /// Partial replication: the collections this node replicates (empty:
    /// all), in its engine's `SyncConfig` from its next start on.
    collections: BTreeSet<String>,
}

/// One simulated cluster.
pub struct Sim {
    seed: u64,
    schema: Arc<Schema>,
    nodes: Vec<Node>,
    opts: NetOptions,
    rng: Rng,
    now: u64,
    queue: BTreeMap<(u64, u64), Event>,
    next_event: u64,
    topology: BTreeSet<(usize, usize)>,
    links: BTreeMap<(usize, usize), Link>,
    group: Vec<u32>,
    blocked: BTreeSet<(usize, usize)>,
    broken: Vec<String>,
    digest: u64,
    trace: Vec<String>,
    line: String,
    traffic: Traffic,
    /// Crashes that dropped a parked response.
    parked_dropped: u64,
    /// A node to crash the moment it parks a bulk page, and when it
    /// restarts (ms after the crash).
    crash_on_park: Option<(usize, u64)>,
    _dir: Option<tempfile::TempDir>,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Sim {
    /// `n` nodes (node ids `[1;16]`, `[2;16]`, …), none started, no links.
    pub fn new(n: usize, seed: u64, storage: Storage, opts: NetOptions) -> std::io::Result<Sim> {
        let schema = Arc::new(Schema::default_crm());
        let dir = match storage {
            Storage::Memory => None,
            Storage::Rocks => Some(tempfile::Builder::new().prefix("entente-sim").tempdir()?),
        };
        let nodes = (0..n)
            .map(|i| Node {
                store: None,
                engine: None,
                clock: Arc::new(ManualClock::new(EPOCH_MS, seed.wrapping_add(i as u64))),
                backing: match &dir {
                    None => Backing::Memory(Arc::new(MemKv::new())),
                    Some(d) => Backing::Rocks(d.path().join(format!("node{i}"))),
                },
                incarnation: 0,
                collections: BTreeSet::new(),
            })
            .collect();
        Ok(Sim {
            seed,
            schema,
            nodes,
            opts,
            rng: Rng::new(seed ^ 0x6e65_7477_6f72_6b21),
            now: 0,
            queue: BTreeMap::new(),
            next_event: 0,
            topology: BTreeSet::new(),
            links: BTreeMap::new(),
            group: vec![0; n],
            blocked: BTreeSet::new(),
            broken: Vec::new(),
            digest: 0xcbf2_9ce4_8422_2325,
            trace: Vec::new(),
            line: String::new(),
            traffic: Traffic::default(),
            parked_dropped: 0,
            crash_on_park: None,
            _dir: dir,
        })
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Virtual time (ms since the start).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Frames and bytes delivered so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Protocol breaks seen (sessions an engine closed).
    pub fn broken(&self) -> &[String] {
        &self.broken
    }

    /// The trace digest so far.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// The trace lines (with [`NetOptions::keep_trace`]).
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    /// Whether node `i` is running.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].engine.is_some()
    }

    /// Whether node `i` has ever been started (a late joiner has not).
    pub fn has_started(&self, i: usize) -> bool {
        self.nodes[i].incarnation > 0
    }

    /// Node `i`'s store (`None` while it is down).
    pub fn store(&mut self, i: usize) -> Option<&mut Store> {
        self.nodes[i].store.as_mut()
    }

    /// Makes node `i` replicate only `collections` (empty: all) from its
    /// next start on.
    pub fn set_collections(&mut self, i: usize, collections: &[&str]) {
        self.nodes[i].collections = collections.iter().map(|c| c.to_string()).collect();
        self.log(format_args!("collections {i} {collections:?}"));
    }

    /// Whether node `i` replicates `collection`.
    pub fn keeps(&self, i: usize, collection: &str) -> bool {
        let c = &self.nodes[i].collections;
        c.is_empty() || c.contains(collection)
    }

    /// Whether node `i` replicates only some collections.
    pub fn is_partial(&self, i: usize) -> bool {
        !self.nodes[i].collections.is_empty()
    }

    /// Moves every running node's checkpoint of every other running node's
    /// feed to that feed's end, in their stores: what the feeds hold now is
    /// never pulled. With the sessions down (a partition, until the links
    /// broke), this is how stores come to differ behind the engines' back —
    /// what compare-and-repair is for. A session reads its checkpoint at the
    /// handshake, so one still up would pull from the old one.
    pub fn hide_feeds(&mut self) {
        let seqs: Vec<Option<u64>> = self
            .nodes
            .iter()
            .map(|n| n.store.as_ref().map(|s| s.feed_seq()))
            .collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(store) = node.store.as_ref() else {
                continue;
            };
            for (j, seq) in seqs.iter().enumerate() {
                if let (true, Some(seq)) = (i != j, seq) {
                    save_checkpoint(store, &NodeId([j as u8 + 1; 16]), *seq)
                        .expect("the simulated store writes a checkpoint");
                }
            }
        }
        self.log(format_args!("hide-feeds {seqs:?}"));
    }

    /// Runs compare-and-repair from node `a` with its peer `b` to its end,
    /// letting the network run meanwhile (at most `max_ms` of virtual
    /// time). The report, or why there is none.
    pub fn verify(&mut self, a: usize, b: usize, max_ms: u64) -> Result<VerifyReport, String> {
        let node = &mut self.nodes[a];
        let (Some(engine), Some(store)) = (node.engine.as_mut(), node.store.as_ref()) else {
            return Err(format!("node {a} is down"));
        };
        let outs = engine
            .start_verify(&b, store)
            .map_err(|e| format!("node {a} could not verify with {b}: {e}"))?;
        self.log(format_args!("verify {a}->{b}"));
        self.apply(a, outs);
        let end = self.now + max_ms;
        while self.now < end {
            let finished = self.nodes[a]
                .engine
                .as_ref()
                .is_none_or(|e| !e.verifying(&b));
            if finished {
                break;
            }
            self.run_for(self.opts.tick_ms);
        }
        let report = self.nodes[a]
            .engine
            .as_mut()
            .and_then(|e| e.take_verify_report(&b))
            .ok_or_else(|| format!("verify {a}->{b} did not finish in {max_ms} ms"))?;
        self.log(format_args!(
            "verified {a}->{b} differing {} repaired {} complete {}",
            report.differing, report.repaired, report.complete
        ));
        Ok(report)
    }

    /// Node `i`'s engine (`None` while it is down).
    pub fn engine(&self, i: usize) -> Option<&SyncEngine<usize>> {
        self.nodes[i].engine.as_ref()
    }

    /// Starts (or restarts) node `i`: opens its store (empty the first
    /// time), makes a fresh engine, starts its ticks and dials its peers.
    pub fn start(&mut self, i: usize) {
        if self.is_up(i) {
            return;
        }
        let node = &mut self.nodes[i];
        let id = NodeId([i as u8 + 1; 16]);
        node.clock.set(EPOCH_MS + self.now as i64);
        let store = match &node.backing {
            Backing::Memory(kv) => Store::with_kv(
                kv.clone(),
                self.schema.clone(),
                id,
                node.clock.clone(),
                StoreOptions::default(),
            ),
            Backing::Rocks(path) => Store::open(
                path,
                self.schema.clone(),
                id,
                node.clock.clone(),
                StoreOptions {
                    sync: false,
                    // A few hundred records per node: small memtables open
                    // fast (every restart allocates them).
                    memtable_bytes: 512 << 10,
                    ..StoreOptions::default()
                },
            ),
        }
        .expect("the simulated node's store opens");
        let config = SyncConfig {
            collections: node.collections.clone(),
            ..self.opts.sync.clone()
        };
        let engine = SyncEngine::new(&store, config).expect("valid sync options");
        node.store = Some(store);
        node.engine = Some(engine);
        node.incarnation += 1;
        let inc = node.incarnation;
        self.log(format_args!("start {i} incarnation {inc}"));
        let phase = self.rng.below(self.opts.tick_ms as usize) as u64;
        self.schedule(self.now + phase, Event::Tick(i, inc));
        let pairs: Vec<(usize, usize)> = self
            .topology
            .iter()
            .copied()
            .filter(|&(a, b)| a == i || b == i)
            .collect();
        for (a, b) in pairs {
            self.dial_later(a, b, 0);
        }
    }

    /// Crashes that dropped a bulk page or fetch response parked unapplied
    /// (its node had asked for the next one and not yet applied it).
    pub fn parked_dropped(&self) -> u64 {
        self.parked_dropped
    }

    /// Crashes node `i`: its engine and the frames in flight to and from it
    /// are lost, its connections break at once; its store stays on "disk".
    pub fn crash(&mut self, i: usize) {
        if !self.is_up(i) {
            return;
        }
        let parked = self.nodes[i]
            .engine
            .as_ref()
            .is_some_and(|e| e.has_pending_work());
        if parked {
            self.parked_dropped += 1;
            self.log(format_args!("crash {i} with a parked response"));
        } else {
            self.log(format_args!("crash {i}"));
        }
        let pairs: Vec<(usize, usize)> = self
            .links
            .iter()
            .filter(|(k, l)| l.up && (k.0 == i || k.1 == i))
            .map(|(k, _)| *k)
            .collect();
        for (a, b) in pairs {
            self.link_down(a, b);
        }
        let node = &mut self.nodes[i];
        node.engine = None;
        node.store = None;
    }

    /// Crashes node `i` the next time it parks a response (having asked
    /// for the next one), and restarts it `after_ms` later.
    pub fn crash_when_parked(&mut self, i: usize, after_ms: u64) {
        self.crash_on_park = Some((i, after_ms));
    }

    /// Crashes node `i` now and restarts it after `after_ms`.
    pub fn crash_restart(&mut self, i: usize, after_ms: u64) {
        if !self.is_up(i) {
            return;
        }
        self.crash(i);
        self.schedule(self.now + after_ms, Event::Restart(i));
    }

    /// Allows `a` and `b` to connect (they dial each other from now on).
    pub fn add_link(&mut self, a: usize, b: usize) {
        let k = key(a, b);
        if self.topology.insert(k) {
            self.links.entry(k).or_default();
            self.dial_later(k.0, k.1, 0);
        }
    }

    /// Every pair may connect.
    pub fn full_mesh(&mut self) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                self.add_link(a, b);
            }
        }
    }

    /// The pairs that may connect.
    pub fn topology(&self) -> Vec<(usize, usize)> {
        self.topology.iter().copied().collect()
    }

    /// Splits the nodes into groups (`groups[i]` is node `i`'s group): no
    /// frame crosses between groups until [`Sim::heal`].
    pub fn partition(&mut self, groups: &[u32]) {
        self.group = groups.to_vec();
        self.log(format_args!("partition {groups:?}"));
    }

    /// Blocks the direction `from → to` (a one-way link).
    pub fn block(&mut self, from: usize, to: usize) {
        if self.blocked.insert((from, to)) {
            self.log(format_args!("block {from}->{to}"));
        }
    }

    /// Opens the direction `from → to` again.
    pub fn unblock(&mut self, from: usize, to: usize) {
        if self.blocked.remove(&(from, to)) {
            self.log(format_args!("unblock {from}->{to}"));
        }
    }

    /// Ends every partition and block and starts every node that is down.
    pub fn heal(&mut self) {
        self.log(format_args!("heal"));
        self.group = vec![0; self.nodes.len()];
        self.blocked.clear();
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// Whether a frame from `from` can reach `to` now.
    pub fn reachable(&self, from: usize, to: usize) -> bool {
        self.is_up(from)
            && self.is_up(to)
            && self.group[from] == self.group[to]
            && !self.blocked.contains(&(from, to))
    }

    /// Processes every event up to `now + ms`.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > end {
                break;
            }
            let ((at, _), event) = entry.remove_entry();
            self.now = at;
            self.step(event);
        }
        self.now = end;
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Tick(i, inc) => {
                if self.nodes[i].incarnation != inc || !self.is_up(i) {
                    return;
                }
                self.set_clock(i);
                let now = self.now;
                let outs = self.nodes[i].engine.as_mut().expect("up").tick(now);
                self.apply(i, outs);
                self.schedule(self.now + self.opts.tick_ms, Event::Tick(i, inc));
            }
            Event::Deliver {
                from,
                to,
                epoch,
                frame,
            } => {
                let reachable = self.reachable(from, to);
                let k = key(from, to);
                let dir = usize::from(from != k.0);
                let link = self.links.get_mut(&k).expect("links exist for sends");
                if !link.up || link.epoch != epoch {
                    self.log(format_args!("drop {from}->{to} {}B closed", frame.len()));
                    return;
                }
                if link.dead[dir] || !reachable {
                    link.dead[dir] = true;
                    let schedule_break = !link.breaking;
                    link.breaking = true;
                    self.log(format_args!("lost {from}->{to} {}B stalled", frame.len()));
                    if schedule_break {
                        let at = self.now + self.opts.break_after_ms;
                        self.schedule(at, Event::Break(k.0, k.1, epoch));
                    }
                    return;
                }
                self.traffic.messages += 1;
                self.traffic.bytes += frame.len() as u64;
                self.log(format_args!("deliver {from}->{to} {}B", frame.len()));
                self.handle(from, to, &frame);
            }
            Event::Gossip { from, to, frame } => {
                if !self.reachable(from, to) {
                    self.log(format_args!("gossip-lost {from}->{to}"));
                    return;
                }
                let ready = self.nodes[to]
                    .engine
                    .as_ref()
                    .expect("reachable means up")
                    .ready_peers()
                    .iter()
                    .any(|(p, _)| *p == from);
                if !ready {
                    self.log(format_args!("gossip-ignored {from}->{to}"));
                    return;
                }
                self.traffic.gossip += 1;
                self.traffic.gossip_bytes += frame.len() as u64;
                self.log(format_args!("gossip {from}->{to} {}B", frame.len()));
                self.handle(from, to, &frame);
            }
            Event::Break(a, b, epoch) => {
                let up = self
                    .links
                    .get(&(a, b))
                    .is_some_and(|l| l.up && l.epoch == epoch);
                if up {
                    self.log(format_args!("timeout {a}-{b}"));
                    self.link_down(a, b);
                }
            }
            Event::Dial(a, b) => {
                let link = self.links.get_mut(&(a, b)).expect("dials are for links");
                link.dialing = false;
                if link.up {
                    return;
                }
                if self.reachable(a, b) && self.reachable(b, a) {
                    self.link_up(a, b);
                } else if self.is_up(a) || self.is_up(b) {
                    self.dial_later(a, b, self.opts.redial_ms);
                }
            }
            Event::Restart(i) => self.start(i),
            Event::Work(i, inc) => {
                if self.nodes[i].incarnation != inc || !self.is_up(i) {
                    return;
                }
                let pending = self.nodes[i]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.has_pending_work());
                if !pending {
                    return;
                }
                self.set_clock(i);
                self.log(format_args!("work {i}"));
                let node = &mut self.nodes[i];
                let (Some(engine), Some(store)) = (node.engine.as_mut(), node.store.as_mut())
                else {
                    return;
                };
                let outs = engine.run_pending(store);
                self.apply(i, outs);
            }
        }
    }

    fn handle(&mut self, from: usize, to: usize, frame: &[u8]) {
        self.set_clock(to);
        let node = &mut self.nodes[to];
        let (Some(engine), Some(store)) = (node.engine.as_mut(), node.store.as_mut()) else {
            return;
        };
        let outs = engine.handle_message(&from, frame, store);
        let pending = engine.has_pending_work();
        let inc = node.incarnation;
        self.apply(to, outs);
        if pending && let Some((i, after)) = self.crash_on_park.filter(|&(i, _)| i == to) {
            self.crash_on_park = None;
            self.crash_restart(i, after);
            return;
        }
        if pending {
            // The driver runs the parked work after sending the outputs; how
            // long that takes is drawn from the seed.
            let after = self.rng.below(self.opts.work_ms_max as usize + 1) as u64;
            self.schedule(self.now + after, Event::Work(to, inc));
        }
    }

    fn dial_later(&mut self, a: usize, b: usize, after: u64) {
        let link = self.links.get_mut(&(a, b)).expect("dials are for links");
        if link.up || link.dialing {
            return;
        }
        link.dialing = true;
        let jitter = self.rng.below(after as usize / 2 + 1) as u64;
        self.schedule(self.now + after + jitter, Event::Dial(a, b));
    }

    fn link_up(&mut self, a: usize, b: usize) {
        let now = self.now;
        let link = self.links.get_mut(&(a, b)).expect("link exists");
        link.up = true;
        link.epoch += 1;
        link.dead = [false; 2];
        link.breaking = false;
        link.last_at = [now; 2];
        self.log(format_args!("link-up {a}-{b}"));
        for (x, y) in [(a, b), (b, a)] {
            self.set_clock(x);
            let outs = self.nodes[x].engine.as_mut().expect("up").peer_connected(y);
            self.apply(x, outs);
        }
    }

    fn link_down(&mut self, a: usize, b: usize) {
        let k = key(a, b);
        let Some(link) = self.links.get_mut(&k) else {
            return;
        };
        if !link.up {
            return;
        }
        link.up = false;
        link.epoch += 1;
        self.log(format_args!("link-down {}-{}", k.0, k.1));
        for (x, y) in [(k.0, k.1), (k.1, k.0)] {
            if let Some(e) = self.nodes[x].engine.as_mut() {
                e.peer_disconnected(&y);
            }
        }
        self.dial_later(k.0, k.1, self.opts.redial_ms);
    }

    /// Tells node `site`'s engine that local writes changed `ids`, and
    /// carries out what it answers.
    pub fn local_changes(&mut self, site: usize, ids: &[RecordId]) {
        for id in ids {
            let node = &mut self.nodes[site];
            let (Some(engine), Some(store)) = (node.engine.as_mut(), node.store.as_mut()) else {
                return;
            };
            let heads = store.heads(id).expect("the store reads its own heads");
            let outs = engine.local_change(id.clone(), &heads);
            self.apply(site, outs);
        }
    }

    /// The driver: carries out `node`'s outputs in order, deciding nothing.
    fn apply(&mut self, node: usize, outs: Vec<Output<usize>>) {
        for out in outs {
            match out {
                Output::Send { peer, msg } => {
                    let Some(frame) = self.encode(node, &msg) else {
                        continue;
                    };
                    self.log(format_args!("send {node}->{peer} {}", msg.kind()));
                    self.send(node, peer, frame);
                }
                Output::Broadcast { msg } => {
                    let Some(frame) = self.encode(node, &msg) else {
                        continue;
                    };
                    self.log(format_args!("broadcast {node} {}", msg.kind()));
                    let peers: Vec<usize> = self
                        .links
                        .iter()
                        .filter(|(_, l)| l.up)
                        .filter_map(|(&(a, b), _)| match node {
                            n if n == a => Some(b),
                            n if n == b => Some(a),
                            _ => None,
                        })
                        .collect();
                    for peer in peers {
                        self.gossip(node, peer, frame.clone());
                    }
                }
                Output::Disconnect { peer, reason } => {
                    self.log(format_args!("disconnect {node}->{peer} {reason}"));
                    self.broken
                        .push(format!("node {node} closed {peer}: {reason}"));
                    self.link_down(node, peer);
                }
            }
        }
    }

    fn encode(&mut self, node: usize, msg: &Message) -> Option<Arc<[u8]>> {
        match msg.encode() {
            Ok(f) => Some(f.into()),
            Err(e) => {
                self.broken.push(format!(
                    "node {node} made an unencodable {}: {e}",
                    msg.kind()
                ));
                None
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, frame: Arc<[u8]>) {
        let k = key(from, to);
        let mut latency = self.opts.latency_ms_min
            + self
                .rng
                .below((self.opts.latency_ms_max - self.opts.latency_ms_min) as usize + 1)
                as u64;
        if (self.rng.below(1000) as u64) < self.opts.latency_tail_permille {
            latency += self.rng.below(self.opts.latency_tail_ms as usize + 1) as u64;
        }
        let now = self.now;
        let Some(link) = self.links.get_mut(&k) else {
            return;
        };
        if !link.up {
            return;
        }
        let dir = usize::from(from != k.0);
        let at = (now + latency).max(link.last_at[dir]);
        link.last_at[dir] = at;
        let epoch = link.epoch;
        self.schedule(
            at,
            Event::Deliver {
                from,
                to,
                epoch,
                frame,
            },
        );
    }

    fn gossip(&mut self, from: usize, to: usize, frame: Arc<[u8]>) {
        if (self.rng.below(1000) as u64) < self.opts.gossip_loss_permille {
            self.log(format_args!("gossip-dropped {from}->{to}"));
            return;
        }
        let copies = if (self.rng.below(1000) as u64) < self.opts.gossip_dup_permille {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let latency = 1 + self.rng.below(self.opts.gossip_latency_ms_max as usize) as u64;
            self.schedule(
                self.now + latency,
                Event::Gossip {
                    from,
                    to,
                    frame: frame.clone(),
                },
            );
        }
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.queue.insert((at, self.next_event), event);
        self.next_event += 1;
    }

    /// Sets node `i`'s clock to the virtual time (before any call that may
    /// write).
    pub fn set_clock(&self, i: usize) {
        self.nodes[i].clock.set(EPOCH_MS + self.now as i64);
    }

    /// Adds a line to the trace (and its digest).
    pub fn log(&mut self, args: fmt::Arguments<'_>) {
        self.line.clear();
        let _ = write!(self.line, "{} {args}", self.now);
        for b in self.line.bytes().chain([b'\n']) {
            self.digest ^= u64::from(b);
            self.digest = self.digest.wrapping_mul(0x0100_0000_01b3);
        }
        if self.opts.keep_trace {
            self.trace.push(self.line.clone());
        }
    }
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}
