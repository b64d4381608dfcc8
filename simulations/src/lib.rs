//! # entente-sim
//!
//! The deterministic network-partition simulator (issue #4). It runs several
//! Entente nodes — each the **real** sans-I/O [`SyncEngine`] of
//! `entente-node` over a **real** `Store` (in memory, or RocksDB in a
//! temporary directory) — over a virtual network and a virtual clock, breaks
//! the network in the ways real networks break, lets a workload write at
//! every site meanwhile, heals everything, and then checks from the outside
//! that nothing went wrong. Every random choice — latencies, losses, faults,
//! the workload, record ids, tokens — comes from one seed, so a seed replays
//! byte for byte, and a failure names its seed and the command replaying it
//! (`entente sim --seed S --scenario NAME --ops M`).
//!
//! One run ([`run`]) goes: start the nodes of the scenario's topology (a
//! full mesh, a line, or a random connected graph); a connected warm-up (a
//! fifth of the operations); the fault phase (the rest of the operations,
//! with the scenario's faults and constructed collisions between them); the
//! heal (partitions and blocks end, crashed and late nodes start); a
//! settling time; the checks.
//!
//! - [`net`]: the network — connections that deliver in order or break (as
//!   TCP does; a blocked direction stalls, then breaks after a keepalive
//!   timeout), gossip on its own lossy path (loss, duplication, reordering),
//!   partitions into arbitrary groups, one-way links, flapping, crash and
//!   restart of a node (engine and frames in flight lost, store kept), a
//!   late joiner with an empty store, and the trace with its digest.
//! - [`workload`]: the writes — creates, edits of random fields at several
//!   sites, deletes, restores, duplicate e-mails at different sites,
//!   children referring to contacts being deleted, resolutions of open
//!   collisions — and situations constructed so the generator knows which
//!   collisions it caused.
//! - [`check`]: the five invariants (convergence; no acknowledged write lost;
//!   exactly the collisions the workload caused, by an oracle independent of
//!   the store's detection code — its module docs say precisely what it
//!   covers; catch-up work proportional to divergence; no deleted record
//!   silently comes back).
//! - [`scenario`]: the named scenarios (`partition-heal`, `flapping-links`,
//!   `crash-restart`, `late-joiner`, `multi-hop-line`, `duplicate-storm`,
//!   `delete-vs-edit`, `partial-replication`, `verify-repair`, `random`) and
//!   the runner.
//!
//! The checker has teeth: the engine's test-only
//! `SyncConfig::planted_bug` (never pull after a reconnect) makes runs fail
//! with their seed, as do a partition that never heals, a catch-up bound
//! set too tight, `verify-repair` without its verify runs, and a partial
//! node holding what it does not replicate (see `tests/scenarios.rs`).
//!
//! [`Replicas`] is the simpler harness underneath some store tests: several
//! in-memory stores exchanging changes directly in a seeded order, with the
//! same convergence check.
//!
//! [`SyncEngine`]: entente_node::sync::SyncEngine

pub mod check;
pub mod net;
pub mod scenario;
pub mod workload;

use std::fmt;
use std::sync::Arc;

use entente_model::{NodeId, Schema};
use entente_node::{ApplyReport, ManualClock, Store};

pub use scenario::{Outcome, RunOptions, Scenario, run};

/// SplitMix64: small, seedable, good enough to order deliveries.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Why replicas are not converged.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// The seed that reproduces it.
    pub seed: u64,
    /// What differs.
    pub what: String,
    /// The command that replays it, when a scenario run found it.
    pub replay: Option<String>,
    /// The event log up to the violation, when the run kept one
    /// (`NetOptions::keep_trace`); empty otherwise. Not part of the
    /// `Display` text: the caller prints it when asked (`entente sim --trace`).
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {}: {}", self.seed, self.what)?;
        if let Some(r) = &self.replay {
            write!(f, "\n  replay: {r}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Several sites, each a real store in memory.
#[derive(Debug)]
pub struct Replicas {
    /// The sites; index = site number.
    pub stores: Vec<Store>,
    /// The clocks, one per site.
    pub clocks: Vec<Arc<ManualClock>>,
    rng: Rng,
    seed: u64,
}

impl Replicas {
    /// `n` sites with node ids `[1;16]`, `[2;16]`, … and the built-in schema.
    pub fn new(n: usize, seed: u64) -> Replicas {
        let schema = Arc::new(Schema::default_crm());
        let mut stores = Vec::with_capacity(n);
        let mut clocks = Vec::with_capacity(n);
        for i in 0..n {
            let clock = Arc::new(ManualClock::new(
                1_700_000_000_000,
                seed.wrapping_add(i as u64),
            ));
            stores.push(Store::memory(
                schema.clone(),
                NodeId([i as u8 + 1; 16]),
                clock.clone(),
            ));
            clocks.push(clock);
        }
        Replicas {
            stores,
            clocks,
            rng: Rng::new(seed),
            seed,
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The generator (for workloads drawn from the same seed).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Moves every change `from` has and `to` lacks (by record heads) in one
    /// batch.
    pub fn deliver(&mut self, from: usize, to: usize) -> entente_node::Result<ApplyReport> {
        let entries = self.stores[from].changes_since(0, usize::MAX)?;
        let mut batch = Vec::new();
        for e in entries {
            let have = self.stores[to].heads(&e.id)?;
            let changes = self.stores[from].changes_for(&e.id, &have)?;
            if !changes.is_empty() {
                batch.push((e.id, changes));
            }
        }
        self.stores[to].apply_remote(batch)
    }

    /// Delivers between every ordered pair, in an order drawn from the seed,
    /// until every site has everything (at most `n` rounds).
    pub fn exchange_all(&mut self) -> entente_node::Result<()> {
        let n = self.stores.len();
        for _ in 0..n {
            let mut pairs: Vec<(usize, usize)> = (0..n)
                .flat_map(|a| (0..n).filter(move |b| *b != a).map(move |b| (a, b)))
                .collect();
            self.rng.shuffle(&mut pairs);
            for (a, b) in pairs {
                self.deliver(a, b)?;
            }
        }
        Ok(())
    }

    /// Every site's records (id -> deleted, heads and fields) and
    /// collisions (id -> JSON), for comparison.
    pub fn state(&mut self, site: usize) -> entente_node::Result<check::State> {
        check::state(&mut self.stores[site])
    }

    /// Checks that every site holds the same records and collisions as site 0.
    pub fn check_converged(&mut self) -> Result<(), Violation> {
        let seed = self.seed;
        let err = |what: String| Violation {
            seed,
            what,
            replay: None,
            trace: Vec::new(),
        };
        let reference = self.state(0).map_err(|e| err(e.to_string()))?;
        for site in 1..self.stores.len() {
            let other = self.state(site).map_err(|e| err(e.to_string()))?;
            if other.0 != reference.0 {
                let diff = reference
                    .0
                    .iter()
                    .find(|(k, v)| other.0.get(*k) != Some(*v))
                    .map(|(k, _)| k.to_string())
                    .unwrap_or_else(|| "record count".into());
                return Err(err(format!(
                    "site {site} differs from site 0 in records (first: {diff})"
                )));
            }
            if other.1 != reference.1 {
                return Err(err(format!(
                    "site {site} differs from site 0 in collisions ({} vs {})",
                    other.1.len(),
                    reference.1.len()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().expect("object").clone()
    }

    #[test]
    fn same_seed_same_order() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut va: Vec<u32> = (0..50).collect();
        let mut vb = va.clone();
        a.shuffle(&mut va);
        b.shuffle(&mut vb);
        assert_eq!(va, vb);
        assert_ne!(va, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn diverged_sites_converge_and_the_checker_sees_divergence() {
        let mut r = Replicas::new(3, 42);
        let id = r.stores[0]
            .create(
                "contacts",
                None,
                &fields(json!({"email": "a@x.org", "city": "Bern"})),
                false,
            )
            .unwrap()
            .record
            .id;
        r.exchange_all().unwrap();
        r.check_converged().unwrap();
        // Partitioned edits: the checker must notice before the exchange.
        r.stores[1]
            .update(&id, &fields(json!({"city": "Basel"})), None, false)
            .unwrap();
        r.stores[2]
            .update(&id, &fields(json!({"phone": "+41 1"})), None, false)
            .unwrap();
        r.stores[0]
            .create(
                "contacts",
                None,
                &fields(json!({"email": "A@x.org "})),
                true,
            )
            .unwrap();
        let v = r.check_converged().unwrap_err();
        assert!(v.to_string().starts_with("seed 42:"), "{v}");
        r.exchange_all().unwrap();
        r.check_converged().unwrap();
        let (records, collisions) = r.state(2).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(
            collisions.len(),
            1,
            "the forced duplicate is listed (resolved by force)"
        );
        let view = r.stores[2].get(&id).unwrap().unwrap();
        assert_eq!(view.fields["city"], json!("Basel"));
        assert_eq!(view.fields["phone"], json!("+41 1"));
    }
}
