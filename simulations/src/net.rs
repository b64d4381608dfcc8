//! The deterministic network simulator: N real [`SyncEngine`]s over real
//! (memory) stores, a virtual clock, and FIFO links with seeded latency that
//! can be cut (partition) and healed.
//!
//! One event queue, ordered by (virtual time, insertion number), holds frame
//! deliveries and node ticks. A link keeps, per direction, the time of its
//! last delivery, so frames on one connection arrive in order, as on TCP or
//! QUIC. Cutting a link bumps its epoch: frames still in flight on the old
//! connection are dropped, and both engines hear `peer_disconnected`; healing
//! opens a new connection (`peer_connected` on both sides).
//!
//! [`Sim::apply`] is the driver's one thin function: it carries out the
//! engine's outputs and decides nothing. Every event is written to a trace
//! whose digest (FNV-1a) must be the same for the same seed.
//!
//! After the faults stop and the network heals, [`Sim::check`] asks, from
//! outside the system: did every node converge (records and collisions), was
//! any acknowledged write lost, did any session break the protocol?

use std::collections::BTreeMap;
use std::fmt;

use entente_model::RecordId;
use entente_model::automerge::ChangeHash;
use entente_node::sync::{Output, SyncConfig, SyncEngine};
use serde_json::json;

use crate::{Replicas, Rng, Violation};

/// Virtual epoch the stores' clocks start at (ms since the Unix epoch).
const EPOCH_MS: i64 = 1_700_000_000_000;

/// Named scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// 3–5 fully linked nodes split into two random groups, written to on
    /// both sides, then healed.
    PartitionHeal,
    /// A–B–C in a line (A and C never linked); one link is cut while every
    /// node writes, then healed: A's writes reach C only through B.
    MultiHopLine,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 2] = [Scenario::PartitionHeal, Scenario::MultiHopLine];

    /// The scenario's name.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::PartitionHeal => "partition-heal",
            Scenario::MultiHopLine => "multi-hop-line",
        }
    }

    /// The scenario called `name`.
    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Fault and workload knobs, in one place.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Shortest one-way latency (ms).
    pub latency_ms_min: u64,
    /// Longest one-way latency (ms).
    pub latency_ms_max: u64,
    /// How often each node ticks (ms).
    pub tick_ms: u64,
    /// Writes made while the network is partitioned.
    pub ops: usize,
    /// Longest virtual pause between two writes (ms).
    pub op_gap_ms_max: u64,
    /// Virtual time allowed after healing for the nodes to converge (ms).
    pub settle_ms: u64,
    /// Test-only fault: never heal the partition (the checker must notice).
    pub never_heal: bool,
    /// Keep the trace lines (not only their digest).
    pub keep_trace: bool,
    /// The engines' knobs.
    pub sync: SyncConfig,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            latency_ms_min: 1,
            latency_ms_max: 80,
            tick_ms: 100,
            ops: 20,
            op_gap_ms_max: 200,
            settle_ms: 6_000,
            never_heal: false,
            keep_trace: false,
            sync: SyncConfig {
                pull_interval_ms: 3_000,
                pull_limit: 8,
                fetch_batch: 4,
                fetch_budget_bytes: 64 << 10,
                ..SyncConfig::default()
            },
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Digest of the event trace.
    pub digest: u64,
    /// The trace lines (with [`NetOptions::keep_trace`]).
    pub trace: Vec<String>,
    /// Frames delivered.
    pub messages: u64,
    /// Bytes of frames delivered.
    pub bytes: u64,
    /// Writes acknowledged.
    pub acked: usize,
    /// Writes refused (e.g. an unforced duplicate e-mail).
    pub refused: usize,
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        epoch: u64,
        frame: Vec<u8>,
    },
    Tick(usize),
}

#[derive(Debug, Default)]
struct Link {
    up: bool,
    epoch: u64,
    /// Time of the last scheduled delivery, per direction (low→high, high→low).
    last_at: [u64; 2],
}

/// One simulated cluster.
pub struct Sim {
    /// The stores (and the convergence checker).
    pub replicas: Replicas,
    engines: Vec<SyncEngine<usize>>,
    opts: NetOptions,
    rng: Rng,
    now: u64,
    queue: BTreeMap<(u64, u64), Event>,
    next_event: u64,
    /// Links by (low, high) node index; pairs absent here are never linked.
    links: BTreeMap<(usize, usize), Link>,
    acked: Vec<(usize, RecordId, String)>,
    refused: usize,
    broken: Vec<String>,
    digest: u64,
    trace: Vec<String>,
    messages: u64,
    bytes: u64,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.replicas.seed())
            .field("now", &self.now)
            .field("nodes", &self.engines.len())
            .finish()
    }
}

impl Sim {
    /// `n` nodes, no links yet.
    pub fn new(n: usize, seed: u64, opts: NetOptions) -> Sim {
        let replicas = Replicas::new(n, seed);
        let engines = replicas
            .stores
            .iter()
            .map(|s| SyncEngine::new(s, opts.sync.clone()).expect("valid sync options"))
            .collect();
        let mut sim = Sim {
            replicas,
            engines,
            opts,
            rng: Rng::new(seed ^ 0x6e65_7477_6f72_6b21),
            now: 0,
            queue: BTreeMap::new(),
            next_event: 0,
            links: BTreeMap::new(),
            acked: Vec::new(),
            refused: 0,
            broken: Vec::new(),
            digest: 0xcbf2_9ce4_8422_2325,
            trace: Vec::new(),
            messages: 0,
            bytes: 0,
        };
        for i in 0..n {
            let phase = sim.rng.below(sim.opts.tick_ms as usize) as u64;
            sim.schedule(phase, Event::Tick(i));
        }
        sim
    }

    /// Runs `scenario` for `seed`: the workload, the faults, the healing and
    /// the settling time, then the checks.
    pub fn run(scenario: Scenario, seed: u64, opts: NetOptions) -> Result<Outcome, Violation> {
        let mut rng = Rng::new(seed ^ 0x7363_656e_6172_696f);
        let (n, links): (usize, Vec<(usize, usize)>) = match scenario {
            Scenario::PartitionHeal => {
                let n = 3 + rng.below(3);
                let all = (0..n)
                    .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                    .collect();
                (n, all)
            }
            Scenario::MultiHopLine => (3, vec![(0, 1), (1, 2)]),
        };
        let mut sim = Sim::new(n, seed, opts);
        for &(a, b) in &links {
            sim.link_up(a, b);
        }
        // Connected warm-up: a few records everyone gets.
        for _ in 0..3 {
            let site = rng.below(n);
            sim.write(site, 0);
            sim.run_for(rng.below(300) as u64);
        }
        sim.run_for(2_000);
        // The partition.
        let cut: Vec<(usize, usize)> = match scenario {
            Scenario::PartitionHeal => {
                let mut side: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
                side[0] = true;
                side[1 + rng.below(n - 1)] = false;
                links
                    .iter()
                    .copied()
                    .filter(|&(a, b)| side[a] != side[b])
                    .collect()
            }
            Scenario::MultiHopLine => vec![links[rng.below(2)]],
        };
        for &(a, b) in &cut {
            sim.link_down(a, b);
        }
        for _ in 0..sim.opts.ops {
            let site = rng.below(n);
            let kind = rng.below(10);
            sim.write(site, kind);
            let gap = rng.below(sim.opts.op_gap_ms_max as usize + 1) as u64;
            sim.run_for(gap);
        }
        if !sim.opts.never_heal {
            for &(a, b) in &cut {
                sim.link_up(a, b);
            }
        }
        let settle = sim.opts.settle_ms;
        sim.run_for(settle);
        sim.check()?;
        Ok(sim.outcome())
    }

    /// The run's counters and trace digest.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            digest: self.digest,
            trace: self.trace.clone(),
            messages: self.messages,
            bytes: self.bytes,
            acked: self.acked.len(),
            refused: self.refused,
        }
    }

    /// The engine of node `i` (for assertions about its sessions).
    pub fn engine(&self, i: usize) -> &SyncEngine<usize> {
        &self.engines[i]
    }

    /// The checks: no session broke the protocol, every node converged
    /// (records and collisions), every acknowledged write is in every node's
    /// history. (Engines are not required to be idle: anti-entropy pulls go
    /// on forever.)
    pub fn check(&mut self) -> Result<(), Violation> {
        let seed = self.replicas.seed();
        let err = |what: String| Violation { seed, what };
        if let Some(b) = self.broken.first() {
            return Err(err(format!("a session broke: {b}")));
        }
        self.replicas.check_converged()?;
        for (site, id, hex) in &self.acked {
            let hash: ChangeHash = hex
                .parse()
                .map_err(|_| err(format!("acknowledged change `{hex}` is not a hash")))?;
            for (node, store) in self.replicas.stores.iter_mut().enumerate() {
                let rec = store
                    .record(id)
                    .map_err(|e| err(e.to_string()))?
                    .ok_or_else(|| {
                        err(format!(
                            "record {id} written at site {site} is missing at node {node}"
                        ))
                    })?;
                if rec.doc().get_change_meta_by_hash(&hash).is_none() {
                    return Err(err(format!(
                        "acknowledged change {hex} of {id} (site {site}) lost at node {node}"
                    )));
                }
            }
        }
        Ok(())
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
            self.set_clocks();
            match event {
                Event::Tick(i) => {
                    let outs = self.engines[i].tick(self.now);
                    self.apply(i, outs);
                    let next = self.now + self.opts.tick_ms;
                    self.schedule(next, Event::Tick(i));
                }
                Event::Deliver {
                    from,
                    to,
                    epoch,
                    frame,
                } => {
                    let link = &self.links[&key(from, to)];
                    if !link.up || link.epoch != epoch {
                        self.log(format!("drop {from}->{to} {}B", frame.len()));
                        continue;
                    }
                    self.messages += 1;
                    self.bytes += frame.len() as u64;
                    self.log(format!("deliver {from}->{to} {}B", frame.len()));
                    let outs = self.engines[to].handle_message(
                        &from,
                        &frame,
                        &mut self.replicas.stores[to],
                    );
                    self.apply(to, outs);
                }
            }
        }
        self.now = end;
        self.set_clocks();
    }

    /// Opens a connection between `a` and `b`.
    pub fn link_up(&mut self, a: usize, b: usize) {
        let link = self.links.entry(key(a, b)).or_default();
        if link.up {
            return;
        }
        link.up = true;
        link.epoch += 1;
        self.log(format!("link-up {a}-{b}"));
        let outs = self.engines[a].peer_connected(b);
        self.apply(a, outs);
        let outs = self.engines[b].peer_connected(a);
        self.apply(b, outs);
    }

    /// Breaks the connection between `a` and `b` (frames in flight are lost).
    pub fn link_down(&mut self, a: usize, b: usize) {
        let Some(link) = self.links.get_mut(&key(a, b)) else {
            return;
        };
        if !link.up {
            return;
        }
        link.up = false;
        link.epoch += 1;
        self.log(format!("link-down {a}-{b}"));
        self.engines[a].peer_disconnected(&b);
        self.engines[b].peer_disconnected(&a);
    }

    /// One workload write at `site`: `kind` 0–3 creates a contact (with an
    /// e-mail from a small pool, so duplicates happen; half of them forced),
    /// 4–7 edits a field of a record the site knows, 8–9 deletes one.
    pub fn write(&mut self, site: usize, kind: usize) {
        self.set_clocks();
        let rng = &mut self.rng;
        let store = &mut self.replicas.stores[site];
        let known: Vec<RecordId> = store
            .changes_since(0, usize::MAX)
            .expect("memory feed")
            .into_iter()
            .filter(|e| !e.deleted)
            .map(|e| e.id)
            .collect();
        let (what, result) = if kind < 4 || known.is_empty() {
            let email = format!("user{}@example.org", rng.below(6));
            let force = rng.below(2) == 0;
            let f = json!({"email": email, "city": format!("c{}", rng.below(100))});
            (
                format!("create {email} force={force}"),
                store.create("contacts", None, f.as_object().expect("object"), force),
            )
        } else if kind < 8 {
            let id = known[rng.below(known.len())].clone();
            let field = ["city", "phone", "first_name", "bank_account"][rng.below(4)];
            let f = json!({ field: format!("v{}", rng.below(1000)) });
            (
                format!("edit {id} {field}"),
                store.update(&id, f.as_object().expect("object"), None, true),
            )
        } else {
            let id = known[rng.below(known.len())].clone();
            (format!("delete {id}"), store.delete(&id))
        };
        match result {
            Ok(w) => {
                let id = w.record.id.clone();
                self.log(format!("write {site} {what} ok"));
                if let Some(change) = w.change {
                    self.acked.push((site, id.clone(), change));
                }
                let heads = self.replicas.stores[site].heads(&id).expect("memory store");
                let outs = self.engines[site].local_change(id, &heads);
                self.apply(site, outs);
            }
            Err(e) => {
                self.refused += 1;
                self.log(format!("write {site} {what} refused {}", e.code()));
            }
        }
    }

    /// The driver: carries out `node`'s outputs in order, deciding nothing.
    fn apply(&mut self, node: usize, outs: Vec<Output<usize>>) {
        for out in outs {
            match out {
                Output::Send { peer, msg } => {
                    self.log(format!("send {node}->{peer} {}", msg.kind()));
                    self.send(node, peer, &msg);
                }
                Output::Broadcast { msg } => {
                    self.log(format!("broadcast {node} {}", msg.kind()));
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
                        self.send(node, peer, &msg);
                    }
                }
                Output::Disconnect { peer, reason } => {
                    self.log(format!("disconnect {node}->{peer} {reason}"));
                    self.broken
                        .push(format!("node {node} closed {peer}: {reason}"));
                    self.link_down(node, peer);
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: &entente_node::sync::Message) {
        let frame = match msg.encode() {
            Ok(f) => f,
            Err(e) => {
                self.broken.push(format!(
                    "node {from} made an unencodable {}: {e}",
                    msg.kind()
                ));
                return;
            }
        };
        let (lo, hi) = key(from, to);
        let span = self.opts.latency_ms_max - self.opts.latency_ms_min + 1;
        let latency = self.opts.latency_ms_min + self.rng.below(span as usize) as u64;
        let now = self.now;
        let Some(link) = self.links.get_mut(&(lo, hi)) else {
            return;
        };
        if !link.up {
            return;
        }
        let dir = usize::from(from != lo);
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

    fn schedule(&mut self, at: u64, event: Event) {
        self.queue.insert((at, self.next_event), event);
        self.next_event += 1;
    }

    fn set_clocks(&self) {
        for c in &self.replicas.clocks {
            c.set(EPOCH_MS + self.now as i64);
        }
    }

    fn log(&mut self, line: String) {
        let line = format!("{} {line}", self.now);
        for b in line.bytes().chain([b'\n']) {
            self.digest ^= u64::from(b);
            self.digest = self.digest.wrapping_mul(0x0100_0000_01b3);
        }
        if self.opts.keep_trace {
            self.trace.push(line);
        }
    }
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}
