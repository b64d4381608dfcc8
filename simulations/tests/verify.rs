//! Compare and repair under the simulator's rules: two real sync engines
//! over real stores, the two directions of their connection delivered in
//! order each but interleaved at random (from the seed). Both nodes write
//! and replicate normally; then their stores are made to diverge behind the
//! engines' back (writes straight into one store, checkpoints moved to the
//! feeds' ends so no pull sees them). Verify must find exactly those records
//! and repair them, for every seed.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use entente_model::{NodeId, RecordId, Schema};
use entente_node::sync::{Output, SyncConfig, SyncEngine, VerifyReport, save_checkpoint};
use entente_node::{ManualClock, Store};
use entente_sim::Rng;
use serde_json::{Map, Value, json};

const SEEDS: u64 = 6;

struct Two {
    stores: [Store; 2],
    engines: [SyncEngine<usize>; 2],
    /// Frames in flight towards node 0 and towards node 1.
    wires: [VecDeque<Vec<u8>>; 2],
    rng: Rng,
    closed: Vec<String>,
    messages: u64,
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().expect("object").clone()
}

impl Two {
    fn new(seed: u64) -> Two {
        let schema = Arc::new(Schema::default_crm());
        let stores = [1u8, 2].map(|n| {
            Store::memory(
                schema.clone(),
                NodeId([n; 16]),
                Arc::new(ManualClock::new(1_700_000_000_000, seed * 10 + n as u64)),
            )
        });
        let config = SyncConfig {
            pull_interval_ms: 1_000,
            pull_limit: 50,
            fetch_batch: 20,
            fetch_budget_bytes: 16 << 10,
            ..SyncConfig::default()
        };
        let engines = [
            SyncEngine::new(&stores[0], config.clone()).unwrap(),
            SyncEngine::new(&stores[1], config).unwrap(),
        ];
        Two {
            stores,
            engines,
            wires: [VecDeque::new(), VecDeque::new()],
            rng: Rng::new(seed),
            closed: Vec::new(),
            messages: 0,
        }
    }

    fn out(&mut self, from: usize, outs: Vec<Output<usize>>) {
        for o in outs {
            match o {
                Output::Send { msg, .. } | Output::Broadcast { msg } => {
                    self.wires[1 - from].push_back(msg.encode().unwrap());
                }
                Output::Disconnect { reason, .. } => self.closed.push(reason),
            }
        }
    }

    fn connect(&mut self) {
        for i in 0..2 {
            let o = self.engines[i].peer_connected(1 - i);
            self.out(i, o);
        }
    }

    fn reconnect(&mut self) {
        for i in 0..2 {
            self.engines[i].peer_disconnected(&(1 - i));
        }
        self.wires = [VecDeque::new(), VecDeque::new()];
        self.connect();
        self.settle();
    }

    /// Delivers until both wires are empty, picking the direction at random.
    fn settle(&mut self) {
        let mut steps = 0;
        loop {
            let ready: Vec<usize> = (0..2).filter(|&i| !self.wires[i].is_empty()).collect();
            if ready.is_empty() {
                break;
            }
            let to = ready[self.rng.below(ready.len())];
            let frame = self.wires[to].pop_front().unwrap();
            self.messages += 1;
            let o = self.engines[to].handle_message(&(1 - to), &frame, &mut self.stores[to]);
            self.out(to, o);
            steps += 1;
            assert!(steps < 100_000, "no quiescence");
        }
        assert!(self.closed.is_empty(), "{:?}", self.closed);
    }

    fn create(&mut self, site: usize, k: u64) -> RecordId {
        let f = fields(json!({"email": format!("s{site}k{k}@x.org"), "city": "Bern"}));
        self.stores[site]
            .create("contacts", None, &f, false)
            .unwrap()
            .record
            .id
    }

    fn update(&mut self, site: usize, id: &RecordId, k: u64) {
        let f = fields(json!({ "city": format!("c{k}") }));
        self.stores[site].update(id, &f, None, false).unwrap();
    }

    /// Each record's heads at a node, in id order.
    fn state(&self, i: usize) -> Vec<(RecordId, Vec<String>)> {
        let mut v: Vec<_> = self.stores[i]
            .changes_since(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| {
                let mut h = e.heads;
                h.sort();
                (e.id, h)
            })
            .collect();
        v.sort();
        v
    }

    /// Checkpoints at the other's feed end: pulls will not see what is there.
    fn hide_feeds(&mut self) {
        let seqs = [self.stores[0].feed_seq(), self.stores[1].feed_seq()];
        save_checkpoint(&self.stores[0], &NodeId([2; 16]), seqs[1]).unwrap();
        save_checkpoint(&self.stores[1], &NodeId([1; 16]), seqs[0]).unwrap();
    }

    fn verify(&mut self, from: usize) -> VerifyReport {
        let o = self.engines[from]
            .start_verify(&(1 - from), &self.stores[from])
            .unwrap();
        self.out(from, o);
        self.settle();
        let r = self.engines[from]
            .take_verify_report(&(1 - from))
            .expect("the run finished");
        assert!(r.complete, "{r:?}");
        r
    }
}

fn run_seed(seed: u64) {
    let mut t = Two::new(seed);
    t.connect();
    t.settle();
    // Normal life: writes at both sites, replicated by pulls and pushes.
    let mut ids = Vec::new();
    for k in 0..120 {
        let site = t.rng.below(2);
        let id = t.create(site, k);
        let heads = t.stores[site].heads(&id).unwrap();
        let o = t.engines[site].local_change(id.clone(), &heads);
        t.out(site, o);
        ids.push(id);
        if k % 10 == 0 {
            t.settle();
        }
    }
    t.settle();
    for i in 0..2 {
        let o = t.engines[i].tick(1_000);
        t.out(i, o);
    }
    t.settle();
    assert_eq!(t.state(0), t.state(1), "seed {seed}: normal replication");

    // Divergence behind the engines' back.
    let mut diverged = BTreeSet::new();
    for k in 0..(1 + t.rng.below(6) as u64) {
        let site = t.rng.below(2);
        if t.rng.below(3) == 0 {
            diverged.insert(t.create(site, 1_000 + k));
        } else {
            let id = ids[t.rng.below(ids.len())].clone();
            t.update(site, &id, k);
            diverged.insert(id);
        }
    }
    t.hide_feeds();
    t.reconnect();
    assert_ne!(t.state(0), t.state(1), "seed {seed}: pulls saw nothing");

    let from = t.rng.below(2);
    let r = t.verify(from);
    let found: BTreeSet<RecordId> = r.records_differing.iter().cloned().collect();
    assert_eq!(found, diverged, "seed {seed}: exactly the diverged records");
    assert_eq!(r.differing as usize, diverged.len());
    assert_eq!(t.state(0), t.state(1), "seed {seed}: repaired");
    // Nothing left to find, from either side.
    for side in [from, 1 - from] {
        let again = t.verify(side);
        assert_eq!((again.differing, again.rounds), (0, 1), "seed {seed}");
    }
}

#[test]
fn verify_finds_and_repairs_a_store_diverged_behind_the_engines_back() {
    for seed in 0..SEEDS {
        run_seed(seed);
    }
}
