//! Named scenarios and the runner: topology, warm-up, the fault phase with
//! the workload, the heal, the settling time, the checks.

use std::fmt;

use entente_node::sync::PlantedBug;

use crate::check::{self, CatchUpBound};
use crate::net::{NetOptions, Sim, Storage, Traffic};
use crate::workload::Workload;
use crate::{Rng, Violation};

/// Named scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    /// 3–5 fully linked nodes split into random groups (maybe regrouped
    /// halfway), written to on every side, then healed.
    PartitionHeal,
    /// 3–5 fully linked nodes whose links go down, come up, and go one-way,
    /// again and again while every node writes.
    FlappingLinks,
    /// 3–4 nodes on RocksDB that crash and restart while writing (engine
    /// state and frames in flight lost, store kept).
    CrashRestart,
    /// 3–5 nodes, the last of which joins halfway with an empty store.
    LateJoiner,
    /// A–B–C in a line (A and C never linked); a link is cut, later one
    /// direction of a link is blocked: A's writes reach C only through B.
    MultiHopLine,
    /// 3–6 isolated nodes that all insert the same fresh e-mails.
    DuplicateStorm,
    /// Two sides deleting what the other edits, referencing what the other
    /// deletes, and setting different bank accounts.
    DeleteVsEdit,
    /// 3–5 nodes of which one or two replicate only contacts (or contacts
    /// and addresses) and write only contacts, split and healed as in
    /// `partition-heal`: each holds exactly the records of its collections.
    PartialReplication,
    /// 2–4 nodes isolated while they write, whose stores are then made to
    /// differ behind the engines' back (every checkpoint moved to the end of
    /// the peer's feed, every engine restarted): after the heal nothing is
    /// pulled, and only compare-and-repair between each pair brings them
    /// together. Verify must report only records changed meanwhile.
    VerifyRepair,
    /// Every fault and every constructed situation, mixed.
    Random,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 10] = [
        Scenario::PartitionHeal,
        Scenario::FlappingLinks,
        Scenario::CrashRestart,
        Scenario::LateJoiner,
        Scenario::MultiHopLine,
        Scenario::DuplicateStorm,
        Scenario::DeleteVsEdit,
        Scenario::PartialReplication,
        Scenario::VerifyRepair,
        Scenario::Random,
    ];

    /// The scenario's name.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::PartitionHeal => "partition-heal",
            Scenario::FlappingLinks => "flapping-links",
            Scenario::CrashRestart => "crash-restart",
            Scenario::LateJoiner => "late-joiner",
            Scenario::MultiHopLine => "multi-hop-line",
            Scenario::DuplicateStorm => "duplicate-storm",
            Scenario::DeleteVsEdit => "delete-vs-edit",
            Scenario::PartialReplication => "partial-replication",
            Scenario::VerifyRepair => "verify-repair",
            Scenario::Random => "random",
        }
    }

    /// The scenario called `name`.
    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The scenario a seed runs when none is named: they take turns.
    pub fn for_seed(seed: u64) -> Scenario {
        Scenario::ALL[(seed % Scenario::ALL.len() as u64) as usize]
    }

    fn nodes(&self, rng: &mut Rng) -> usize {
        match self {
            Scenario::MultiHopLine => 3,
            Scenario::CrashRestart => 3 + rng.below(2),
            Scenario::DuplicateStorm => 3 + rng.below(4),
            Scenario::VerifyRepair => 2 + rng.below(3),
            _ => 3 + rng.below(3),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Nodes (default: drawn from the seed, per scenario).
    pub nodes: Option<usize>,
    /// Workload operations (a fifth before the faults, the rest during).
    pub ops: usize,
    /// Longest virtual pause between two operations (ms).
    pub op_gap_ms_max: u64,
    /// Virtual time after the heal before the checks (ms).
    pub settle_ms: u64,
    /// Test-only: never heal (the checker must notice).
    pub never_heal: bool,
    /// Test-only: `verify-repair` skips compare-and-repair (the checker
    /// must notice).
    pub never_verify: bool,
    /// Invariant 4's bound.
    pub bound: CatchUpBound,
    /// The network.
    pub net: NetOptions,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            nodes: None,
            ops: 500,
            op_gap_ms_max: 20,
            settle_ms: 12_000,
            never_heal: false,
            never_verify: false,
            bound: CatchUpBound::default(),
            net: NetOptions::default(),
        }
    }
}

impl RunOptions {
    /// Plants a protocol bug in every engine (test-only).
    pub fn with_planted_bug(mut self, bug: PlantedBug) -> Self {
        self.net.sync.planted_bug = Some(bug);
        self
    }
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// The seed.
    pub seed: u64,
    /// Nodes.
    pub nodes: usize,
    /// Digest of the event trace.
    pub digest: u64,
    /// The trace lines (with [`NetOptions::keep_trace`]).
    pub trace: Vec<String>,
    /// Operations attempted.
    pub ops: u64,
    /// Writes acknowledged (changes).
    pub acked: usize,
    /// Operations the store refused.
    pub refused: u64,
    /// Resolutions made.
    pub resolutions: u64,
    /// Constructed situations (update-vs-delete, dangling, flagged,
    /// duplicate e-mails) the checks expected.
    pub constructed: usize,
    /// All traffic.
    pub traffic: Traffic,
    /// Traffic after the heal.
    pub after_heal: Traffic,
    /// Records changed during the faults.
    pub changed: usize,
    /// Virtual time simulated (ms).
    pub sim_ms: u64,
    /// Records that nodes up at the end received whole in a bulk full sync
    /// (a late joiner fills itself this way).
    pub records_bulk: u64,
    /// Bulk pages those nodes applied while the next page was on its way.
    pub bulk_overlapped: u64,
    /// Fetch responses those nodes applied while the next fetch was on its
    /// way.
    pub fetches_overlapped: u64,
    /// Batches those nodes' stores wrote on another thread while the node
    /// went on (large pages and fetch responses).
    pub batches_written_behind: u64,
    /// Crashes that dropped a bulk page or fetch response parked unapplied.
    pub parked_dropped: u64,
    /// `verify-repair`: records the verify runs reported differing, and
    /// repaired, summed over the runs.
    pub verify_differing: u64,
    /// See `verify_differing`.
    pub verify_repaired: u64,
    /// Records (deleted included) each node holds at the end; a node that
    /// replicates only some collections holds fewer.
    pub held: Vec<u64>,
}

/// The command that replays `seed` of `scenario` with `opts`.
pub fn replay_command(scenario: Scenario, seed: u64, opts: &RunOptions) -> String {
    let mut s = format!(
        "entente sim --seed {seed} --scenario {} --ops {}",
        scenario.name(),
        opts.ops
    );
    if let Some(n) = opts.nodes {
        s.push_str(&format!(" --nodes {n}"));
    }
    if let Some(bug) = opts.net.sync.planted_bug {
        s.push_str(" --planted-bug ");
        s.push_str(planted_bug_name(bug));
    }
    s
}

/// The planted bugs by their `--planted-bug` names.
pub const PLANTED_BUGS: [(&str, PlantedBug); 2] = [
    ("no-pull-after-reconnect", PlantedBug::NoPullAfterReconnect),
    ("checkpoint-when-parked", PlantedBug::CheckpointWhenParked),
];

/// `bug`'s `--planted-bug` name.
pub fn planted_bug_name(bug: PlantedBug) -> &'static str {
    PLANTED_BUGS
        .iter()
        .find(|(_, b)| *b == bug)
        .map(|(name, _)| *name)
        .expect("every planted bug is named")
}

/// Runs `scenario` for `seed`: warm-up, faults with the workload, heal,
/// settle, checks. A violation names the seed and the command replaying it.
pub fn run(scenario: Scenario, seed: u64, opts: &RunOptions) -> Result<Outcome, Violation> {
    let fail = |what: String| Violation {
        seed,
        what: format!("{scenario}: {what}"),
        replay: Some(replay_command(scenario, seed, opts)),
        trace: Vec::new(),
    };
    let mut rng = Rng::new(seed ^ 0x7363_656e_6172_696f);
    let drawn = scenario.nodes(&mut rng);
    let n = opts.nodes.unwrap_or(drawn).max(2);
    let n = if scenario == Scenario::MultiHopLine {
        n.max(3)
    } else {
        n
    };
    let storage = if scenario == Scenario::CrashRestart {
        Storage::Rocks
    } else {
        Storage::Memory
    };
    let mut net = opts.net.clone();
    if scenario == Scenario::LateJoiner {
        // Pages large enough that the late joiner's bulk pages and the
        // answers to them take the store's several-thread path (32 records
        // or more at once) and its background write (more than 64), as a
        // real node's pages of 1,000 do, and small enough that its full
        // sync takes several pages, parked and applied while the next is on
        // its way.
        net.sync.pull_limit = net.sync.pull_limit.max(80);
        net.sync.fetch_batch = net.sync.fetch_batch.max(80);
    }
    let mut sim = Sim::new(n, seed, storage, net).map_err(|e| fail(format!("temp dir: {e}")))?;
    sim.log(format_args!("scenario {scenario} seed {seed} nodes {n}"));
    if scenario == Scenario::MultiHopLine {
        for i in 0..n - 1 {
            sim.add_link(i, i + 1);
        }
    } else if scenario == Scenario::LateJoiner && rng.below(2) == 0 {
        // The others in a full mesh, the late joiner linked to one of them
        // only: nothing makes up for a page it loses.
        for a in 0..n - 1 {
            for b in a + 1..n - 1 {
                sim.add_link(a, b);
            }
        }
        sim.add_link(rng.below(n - 1), n - 1);
    } else if scenario == Scenario::Random && rng.below(2) == 0 {
        // A random connected graph: a random tree plus a few extra edges.
        for i in 1..n {
            sim.add_link(rng.below(i), i);
        }
        for _ in 0..rng.below(n) {
            let (a, b) = (rng.below(n), rng.below(n));
            if a != b {
                sim.add_link(a, b);
            }
        }
    } else {
        sim.full_mesh();
    }
    if scenario == Scenario::PartialReplication {
        // Never node 0: the checks compare every node with it.
        let k = 1 + rng.below((n - 2).clamp(1, 2));
        for i in 0..k {
            let only: &[&str] = if rng.below(2) == 0 {
                &["contacts"]
            } else {
                &["contacts", "addresses"]
            };
            sim.set_collections(n - 1 - i, only);
        }
    }
    let late = match scenario {
        Scenario::LateJoiner => Some(n - 1),
        Scenario::Random if rng.below(3) == 0 => Some(n - 1),
        _ => None,
    };
    for i in 0..n {
        if Some(i) != late {
            sim.start(i);
        }
    }
    sim.run_for(300);
    let mut w = Workload::new(seed, opts.ops);
    let warm = opts.ops / 5;
    let gap = |rng: &mut Rng| rng.below(opts.op_gap_ms_max as usize + 1) as u64;
    for _ in 0..warm {
        if let Some(site) = up_site(&sim, &mut rng) {
            work(&mut w, &mut sim, site);
        }
        let g = gap(&mut rng);
        sim.run_for(g);
    }
    sim.run_for(1_500);
    w.ledger.changed.clear();
    let fault_ops = opts.ops - warm;
    let join_at = rng.below(fault_ops / 2 + 1);
    // In half of the late-joiner seeds, the new node takes no write until
    // its first sync is done, so its store is still empty at the handshake
    // and it takes the bulk full sync; in the others it writes at once.
    let mut quiet = late.filter(|_| scenario == Scenario::LateJoiner && rng.below(2) == 0);
    // In a third of them it crashes in the middle of its full sync, the
    // moment it has parked a page unapplied, and restarts with what it had
    // stored.
    let crash_parked = scenario == Scenario::LateJoiner && rng.below(3) == 0;
    for step in 0..fault_ops {
        if let Some(l) = late
            && step == join_at
        {
            sim.start(l);
            if crash_parked {
                let after = 100 + rng.below(400) as u64;
                sim.crash_when_parked(l, after);
            }
        }
        if let Some(l) = quiet
            && sim
                .engine(l)
                .is_some_and(|e| !e.ready_peers().is_empty() && e.is_idle())
        {
            quiet = None;
        }
        fault(scenario, &mut sim, &mut rng, step, fault_ops);
        construct(scenario, &mut sim, &mut w, &mut rng, step, quiet);
        if let Some(site) = up_site(&sim, &mut rng).filter(|&s| Some(s) != quiet) {
            work(&mut w, &mut sim, site);
        }
        let g = gap(&mut rng);
        sim.run_for(g);
    }
    if scenario == Scenario::VerifyRepair {
        // Behind the engines' back: no pull will ever see what the isolated
        // nodes wrote, and their pushes were lost in the partition. The
        // restarted engines read the moved checkpoints at their handshakes.
        sim.hide_feeds();
        for i in 0..n {
            sim.crash(i);
        }
    }
    let before = sim.traffic();
    if !opts.never_heal {
        sim.heal();
    }
    let (mut verify_differing, mut verify_repaired) = (0, 0);
    if scenario == Scenario::VerifyRepair && !opts.never_verify {
        let mut pairs = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                pairs.push(if rng.below(2) == 0 { (a, b) } else { (b, a) });
            }
        }
        rng.shuffle(&mut pairs);
        for (a, b) in pairs {
            // The session comes up after a redial and a handshake.
            for _ in 0..40 {
                let ready = sim
                    .engine(a)
                    .is_some_and(|e| e.ready_peers().iter().any(|(p, _)| *p == b));
                if ready {
                    break;
                }
                sim.run_for(100);
            }
            let r = sim.verify(a, b, 60_000).map_err(&fail)?;
            if !r.complete {
                return Err(fail(format!(
                    "verify {a}->{b} did not complete: {}",
                    r.error.unwrap_or_default()
                )));
            }
            if let Some(id) = r
                .records_differing
                .iter()
                .find(|id| !w.ledger.changed.contains(*id))
            {
                return Err(fail(format!(
                    "verify {a}->{b} reported {id} differing, which nothing changed during the faults"
                )));
            }
            verify_differing += r.differing;
            verify_repaired += r.repaired;
        }
    }
    sim.run_for(opts.settle_ms);
    let now = sim.traffic();
    let after_heal = Traffic {
        messages: now.messages - before.messages,
        bytes: now.bytes - before.bytes,
        gossip: now.gossip - before.gossip,
        gossip_bytes: now.gossip_bytes - before.gossip_bytes,
    };
    sim.log(format_args!("check"));
    // A violation carries the trace (empty unless `keep_trace`): a failing
    // seed is exactly when one needs to read it.
    let trace = sim.trace().to_vec();
    let fail = |what: String| Violation {
        trace: trace.clone(),
        ..fail(what)
    };
    if let Some(b) = sim.broken().first() {
        return Err(fail(format!("a session broke: {b}")));
    }
    check::convergence(&mut sim).map_err(fail)?;
    check::acknowledged(&mut sim, &w.ledger).map_err(fail)?;
    let store = sim.store(0).expect("node 0 is up after the heal");
    check::oracle(store, &w.ledger).map_err(fail)?;
    check::deletes_hold(store, &w.ledger).map_err(fail)?;
    let rounds = opts.settle_ms / opts.net.sync.pull_interval_ms.max(1) + 1;
    let changed = w.ledger.changed.len();
    check::catch_up(
        after_heal,
        changed,
        n,
        sim.topology().len(),
        rounds,
        &opts.bound,
    )
    .map_err(fail)?;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let store = sim.store(i).expect("every node is up after the heal");
        held.push(store.stats().map_err(|e| fail(e.to_string()))?.records);
    }
    let l = &w.ledger;
    Ok(Outcome {
        scenario,
        seed,
        nodes: n,
        digest: sim.digest(),
        trace: sim.trace().to_vec(),
        ops: l.ops,
        acked: l.acked.len(),
        refused: l.refused,
        resolutions: l.resolutions,
        constructed: l.expect_update_delete.len()
            + l.expect_dangling.len()
            + l.expect_flagged.len()
            + l.expect_duplicate.len(),
        traffic: sim.traffic(),
        after_heal,
        changed,
        sim_ms: sim.now(),
        records_bulk: (0..n)
            .filter_map(|i| sim.engine(i))
            .map(|e| e.stats().records_bulk)
            .sum(),
        bulk_overlapped: (0..n)
            .filter_map(|i| sim.engine(i))
            .map(|e| e.stats().bulk_overlapped)
            .sum(),
        fetches_overlapped: (0..n)
            .filter_map(|i| sim.engine(i))
            .map(|e| e.stats().fetches_overlapped)
            .sum(),
        batches_written_behind: (0..n)
            .filter_map(|i| sim.engine(i))
            .map(|e| e.stats().batches_written_behind)
            .sum(),
        parked_dropped: sim.parked_dropped(),
        verify_differing,
        verify_repaired,
        held,
    })
}

/// One random workload operation at `site`: contacts only on a node that
/// replicates only some collections.
fn work(w: &mut Workload, sim: &mut Sim, site: usize) {
    if sim.is_partial(site) {
        w.step_contacts(sim, site);
    } else {
        w.step(sim, site);
    }
}

fn up_site(sim: &Sim, rng: &mut Rng) -> Option<usize> {
    let up: Vec<usize> = (0..sim.len()).filter(|&i| sim.is_up(i)).collect();
    (!up.is_empty()).then(|| up[rng.below(up.len())])
}

fn random_groups(sim: &mut Sim, rng: &mut Rng, max_groups: usize) {
    let n = sim.len();
    let k = 2 + rng.below(max_groups.clamp(2, n) - 1);
    let mut g: Vec<u32> = (0..n).map(|_| rng.below(k) as u32).collect();
    // At least two groups really exist.
    let a = rng.below(n);
    let mut b = rng.below(n - 1);
    if b >= a {
        b += 1;
    }
    g[a] = 0;
    g[b] = 1;
    sim.partition(&g);
}

fn random_pair(sim: &Sim, rng: &mut Rng) -> (usize, usize) {
    let t = sim.topology();
    let (a, b) = t[rng.below(t.len())];
    if rng.below(2) == 0 { (a, b) } else { (b, a) }
}

/// The scenario's faults at `step` of the fault phase.
fn fault(scenario: Scenario, sim: &mut Sim, rng: &mut Rng, step: usize, steps: usize) {
    let n = sim.len();
    match scenario {
        Scenario::PartitionHeal | Scenario::PartialReplication => {
            if step == 0 || (step == steps / 2 && rng.below(2) == 0) {
                random_groups(sim, rng, 3);
            }
        }
        Scenario::FlappingLinks => {
            if rng.below(6) == 0 {
                let (a, b) = random_pair(sim, rng);
                match rng.below(4) {
                    0 => {
                        sim.block(a, b);
                        sim.block(b, a);
                    }
                    1 => sim.block(a, b),
                    _ => {
                        sim.unblock(a, b);
                        sim.unblock(b, a);
                    }
                }
            }
        }
        Scenario::CrashRestart => {
            let up = (0..n).filter(|&i| sim.is_up(i)).count();
            if rng.below(25) == 0 && up > 1 {
                let i = rng.below(n);
                let after = 100 + rng.below(1_500) as u64;
                sim.crash_restart(i, after);
            }
        }
        Scenario::LateJoiner => {
            if step == 0 && rng.below(2) == 0 {
                random_groups(sim, rng, 2);
            }
        }
        Scenario::MultiHopLine => {
            if step == 0 {
                let cut = rng.below(n - 1);
                let g: Vec<u32> = (0..n).map(|i| u32::from(i > cut)).collect();
                sim.partition(&g);
            }
            if step == steps / 2 && rng.below(2) == 0 {
                sim.partition(&vec![0; n]);
                let i = rng.below(n - 1);
                if rng.below(2) == 0 {
                    sim.block(i, i + 1);
                } else {
                    sim.block(i + 1, i);
                }
            }
        }
        Scenario::DuplicateStorm | Scenario::VerifyRepair => {
            if step == 0 {
                let g: Vec<u32> = (0..n as u32).collect();
                sim.partition(&g);
            }
        }
        Scenario::DeleteVsEdit => {
            if step == 0 {
                random_groups(sim, rng, 2);
            }
        }
        Scenario::Random => {
            if rng.below(12) == 0 {
                match rng.below(7) {
                    0 => random_groups(sim, rng, 3),
                    1 => sim.partition(&vec![0; n]),
                    2 | 3 => {
                        let (a, b) = random_pair(sim, rng);
                        sim.block(a, b);
                        if rng.below(2) == 0 {
                            sim.block(b, a);
                        }
                    }
                    4 => {
                        let (a, b) = random_pair(sim, rng);
                        sim.unblock(a, b);
                        sim.unblock(b, a);
                    }
                    _ => {
                        let up = (0..n).filter(|&i| sim.is_up(i)).count();
                        if up > 1 {
                            let i = rng.below(n);
                            let after = 100 + rng.below(1_500) as u64;
                            sim.crash_restart(i, after);
                        }
                    }
                }
            }
        }
    }
}

/// Constructed situations: two (or more) writes at different sites at one
/// virtual instant.
/// `quiet`: a node that takes no write yet (a late joiner before its first
/// sync).
fn construct(
    scenario: Scenario,
    sim: &mut Sim,
    w: &mut Workload,
    rng: &mut Rng,
    step: usize,
    quiet: Option<usize>,
) {
    let every = match scenario {
        Scenario::DeleteVsEdit => 5,
        Scenario::DuplicateStorm => 8,
        Scenario::Random => 12,
        _ => 25,
    };
    if step % every != every - 1 {
        return;
    }
    // The constructed situations involve children (and every collection):
    // only nodes that replicate everything take part.
    let up: Vec<usize> = (0..sim.len())
        .filter(|&i| sim.is_up(i) && !sim.is_partial(i) && Some(i) != quiet)
        .collect();
    if up.len() < 2 {
        return;
    }
    let a = up[rng.below(up.len())];
    let mut b = up[rng.below(up.len() - 1)];
    if b == a {
        b = up[up.len() - 1];
    }
    let kind = match scenario {
        Scenario::DuplicateStorm => 3,
        Scenario::DeleteVsEdit => rng.below(3),
        _ => rng.below(4),
    };
    match kind {
        0 => w.delete_vs_edit(sim, a, b),
        1 => w.dangling(sim, a, b),
        2 => w.flagged(sim, a, b),
        _ => {
            let sites: Vec<usize> = if rng.below(2) == 0 {
                up.clone()
            } else {
                vec![a, b]
            };
            w.storm(sim, &sites);
        }
    }
}
