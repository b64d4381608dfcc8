//! The network scenarios, many seeds each (1,000 seeds x 500 operations in
//! all), and the proofs that the checker has teeth. A failure prints the
//! seed and the `entente sim` command that replays it.

use entente_node::sync::PlantedBug;
use entente_sim::check::{self, CatchUpBound};
use entente_sim::net::{NetOptions, Sim, Storage};
use entente_sim::workload::Workload;
use entente_sim::{Outcome, RunOptions, Scenario, run};

/// Seeds per scenario: 100 (x 10 scenarios = 1,000 seeds of 500 operations),
/// or `ENTENTE_SIM_SEEDS` per scenario for a quicker local run.
fn seeds() -> u64 {
    std::env::var("ENTENTE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

fn run_seeds(scenario: Scenario) -> Vec<Outcome> {
    let opts = RunOptions::default();
    let seeds = seeds();
    let (mut acked, mut refused, mut constructed, mut resolutions) = (0, 0, 0, 0);
    let mut outcomes = Vec::new();
    for seed in 0..seeds {
        match run(scenario, seed, &opts) {
            Ok(o) => {
                assert!(o.traffic.messages > 0, "{scenario} seed {seed}: no traffic");
                acked += o.acked;
                refused += o.refused;
                constructed += o.constructed;
                resolutions += o.resolutions;
                outcomes.push(o);
            }
            Err(v) => panic!("{v}"),
        }
    }
    // The workload really wrote, hit refusals, settled collisions and built
    // the situations the oracle expects.
    assert!(acked as u64 >= seeds * 200, "{acked} writes acknowledged");
    assert!(refused > 0, "nothing was refused");
    assert!(resolutions > 0, "no collision was resolved");
    assert!(constructed > 0, "no situation was constructed");
    outcomes
}

#[test]
fn partition_heal() {
    run_seeds(Scenario::PartitionHeal);
    // After the heal, pages with more differing records than a fetch batch
    // park each whole fetch response while the next batch is asked for.
    let overlapped: u64 = (0..5)
        .map(|seed| {
            run(Scenario::PartitionHeal, seed, &RunOptions::default())
                .unwrap()
                .fetches_overlapped
        })
        .sum();
    assert!(
        overlapped > 0,
        "no fetch response was applied by the pending work"
    );
}

#[test]
fn flapping_links() {
    run_seeds(Scenario::FlappingLinks);
}

#[test]
fn crash_restart() {
    run_seeds(Scenario::CrashRestart);
}

#[test]
fn late_joiner() {
    run_seeds(Scenario::LateJoiner);
    // The late joiner starts with an empty store while the others hold
    // records: it fills itself by the bulk full sync, its pages applied
    // while the next is on its way and written while it takes in the next,
    // and the invariants above held for it.
    let (mut bulk, mut overlapped, mut behind) = (0, 0, 0);
    for seed in 0..10 {
        let report = run(Scenario::LateJoiner, seed, &RunOptions::default()).unwrap();
        bulk += report.records_bulk;
        overlapped += report.bulk_overlapped;
        behind += report.batches_written_behind;
    }
    assert!(bulk > 0, "no record came in bulk");
    assert!(
        overlapped > 0,
        "no bulk page was applied by the driver's pending work"
    );
    assert!(behind > 0, "no batch was written in the background");
}

#[test]
fn multi_hop_line() {
    run_seeds(Scenario::MultiHopLine);
}

#[test]
fn duplicate_storm() {
    run_seeds(Scenario::DuplicateStorm);
}

#[test]
fn delete_vs_edit() {
    run_seeds(Scenario::DeleteVsEdit);
}

#[test]
fn partial_replication() {
    // The partial nodes held fewer records than node 0, and (checked by the
    // run) exactly node 0's records of their collections.
    for o in run_seeds(Scenario::PartialReplication) {
        assert!(o.held[0] > 0, "seed {}: nothing written", o.seed);
        assert!(
            o.held.iter().any(|h| *h < o.held[0]),
            "seed {}: no node held fewer records than node 0: {:?}",
            o.seed,
            o.held
        );
    }
}

#[test]
fn verify_repair() {
    // Every seed diverged behind the engines' back, and verify found and
    // repaired it (the run checked convergence afterwards).
    for o in run_seeds(Scenario::VerifyRepair) {
        assert!(o.verify_differing > 0, "seed {}: nothing differed", o.seed);
        assert!(o.verify_repaired > 0, "seed {}: nothing repaired", o.seed);
    }
}

#[test]
fn without_verify_the_hidden_divergence_is_reported() {
    let opts = RunOptions {
        ops: 100,
        never_verify: true,
        ..RunOptions::default()
    };
    for seed in 0..3 {
        let v = run(Scenario::VerifyRepair, seed, &opts).unwrap_err();
        assert_eq!(v.seed, seed);
        assert!(v.what.contains("not converged"), "{v}");
    }
}

#[test]
fn a_partial_node_holding_what_it_does_not_replicate_is_reported() {
    let mut sim = Sim::new(2, 8, Storage::Memory, NetOptions::default()).unwrap();
    sim.set_collections(1, &["contacts"]);
    sim.add_link(0, 1);
    sim.start(0);
    sim.start(1);
    sim.run_for(1_000);
    let mut w = Workload::new(8, 10);
    let contact = w
        .create_contact(&mut sim, 0, "partial@example.org", false)
        .unwrap();
    sim.run_for(5_000);
    assert!(sim.store(1).unwrap().get(&contact).unwrap().is_some());
    check::convergence(&mut sim).unwrap();
    // A note written at node 1 itself stays there (README, "Partial
    // replication"): node 0 has no such record.
    let mut fields = serde_json::Map::new();
    fields.insert("contact_id".into(), contact.as_str().into());
    fields.insert("subject".into(), "kept local".into());
    sim.store(1)
        .unwrap()
        .create("notes", None, &fields, false)
        .unwrap();
    sim.run_for(5_000);
    let err = check::convergence(&mut sim).unwrap_err();
    assert!(
        err.contains("node 1 differs from node 0 in records"),
        "{err}"
    );
}

#[test]
fn random() {
    run_seeds(Scenario::Random);
}

#[test]
fn same_seed_same_trace() {
    for scenario in Scenario::ALL {
        let mut opts = RunOptions {
            ops: 120,
            ..RunOptions::default()
        };
        opts.net.keep_trace = true;
        let a = run(scenario, 99, &opts).unwrap();
        let b = run(scenario, 99, &opts).unwrap();
        assert_eq!(a.trace, b.trace, "{scenario}");
        assert_eq!(a.digest, b.digest);
        assert!(a.trace.len() > 100, "{} trace lines", a.trace.len());
        let c = run(scenario, 100, &opts).unwrap();
        assert_ne!(a.digest, c.digest, "another seed, another trace");
    }
}

#[test]
fn a_checkpoint_saved_before_its_parked_page_is_caught() {
    // Teeth for the parked bulk page: a late joiner that saves a page's
    // checkpoint when it parks the page, then crashes before applying it,
    // resumes after records it never stored.
    let opts = RunOptions::default().with_planted_bug(PlantedBug::CheckpointWhenParked);
    let (seed, v) = (0..30)
        .find_map(|seed| {
            run(Scenario::LateJoiner, seed, &opts)
                .err()
                .map(|v| (seed, v))
        })
        .expect("the planted bug is caught");
    assert!(
        v.to_string()
            .contains("--scenario late-joiner --ops 500 --planted-bug checkpoint-when-parked"),
        "{v}"
    );
    // The crash dropped a parked page there, and without the bug the same
    // seed holds.
    let clean = run(Scenario::LateJoiner, seed, &RunOptions::default()).unwrap();
    assert!(clean.parked_dropped > 0, "{clean:?}");
}

#[test]
fn a_planted_bug_is_reported_with_its_seed() {
    // Teeth: engines that never pull after a reconnect lose what was written
    // during the partition (gossip alone is lossy and only says "changed").
    let opts = RunOptions {
        ops: 150,
        ..RunOptions::default()
    }
    .with_planted_bug(PlantedBug::NoPullAfterReconnect);
    let v = (0..10)
        .find_map(|seed| run(Scenario::PartitionHeal, seed, &opts).err())
        .expect("the planted bug is caught");
    let text = v.to_string();
    assert!(text.starts_with(&format!("seed {}:", v.seed)), "{text}");
    assert!(
        text.contains(&format!(
            "replay: entente sim --seed {} --scenario partition-heal --ops 150 --planted-bug no-pull-after-reconnect",
            v.seed
        )),
        "{text}"
    );
    assert!(v.trace.is_empty(), "no trace unless asked for");
    // Replayed with the trace kept, the violation carries the event log up
    // to the checks (what `entente sim --seed S --trace` prints before it).
    let mut traced = opts.clone();
    traced.net.keep_trace = true;
    let again = run(Scenario::PartitionHeal, v.seed, &traced).expect_err("same seed, same bug");
    assert_eq!(again.what, v.what);
    assert!(
        again.trace[0].contains(&format!("scenario partition-heal seed {}", v.seed)),
        "{:?}",
        again.trace.first()
    );
    assert!(
        again.trace.last().is_some_and(|l| l.ends_with(" check")),
        "{:?}",
        again.trace.last()
    );
    // The same seed without the bug holds.
    let clean = RunOptions {
        ops: 150,
        ..RunOptions::default()
    };
    run(Scenario::PartitionHeal, v.seed, &clean).unwrap();
}

#[test]
fn a_partition_that_never_heals_is_reported() {
    let opts = RunOptions {
        ops: 100,
        never_heal: true,
        ..RunOptions::default()
    };
    for scenario in [Scenario::PartitionHeal, Scenario::MultiHopLine] {
        let v = run(scenario, 7, &opts).unwrap_err();
        assert_eq!(v.seed, 7);
        assert!(v.what.contains("not converged"), "{v}");
    }
}

#[test]
fn the_catch_up_bound_bites() {
    // A bound of nothing per record: the heal's real work exceeds it.
    let opts = RunOptions {
        ops: 100,
        bound: CatchUpBound {
            messages_per_round: 1,
            messages_per_record: 0,
            bytes_per_round: 10,
            bytes_per_record: 0,
        },
        ..RunOptions::default()
    };
    let v = run(Scenario::PartitionHeal, 3, &opts).unwrap_err();
    assert!(v.what.contains("catch-up out of proportion"), "{v}");
}

#[test]
fn a_line_never_links_its_ends_and_relays() {
    let mut sim = Sim::new(3, 5, Storage::Memory, NetOptions::default()).unwrap();
    sim.add_link(0, 1);
    sim.add_link(1, 2);
    for i in 0..3 {
        sim.start(i);
    }
    sim.run_for(1_000);
    let mut w = Workload::new(5, 10);
    let id = w
        .create_contact(&mut sim, 0, "line@example.org", false)
        .unwrap();
    sim.run_for(5_000);
    let peers = |sim: &Sim, i: usize| -> Vec<usize> {
        sim.engine(i)
            .unwrap()
            .ready_peers()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    };
    assert_eq!(peers(&sim, 0), [1]);
    assert_eq!(peers(&sim, 2), [1]);
    let at_c = sim.store(2).unwrap().get(&id).unwrap();
    assert!(at_c.is_some(), "A's write reached C through B");
}

#[test]
fn a_crashed_node_keeps_its_acknowledged_writes_in_rocksdb() {
    let mut sim = Sim::new(2, 11, Storage::Rocks, NetOptions::default()).unwrap();
    sim.add_link(0, 1);
    sim.start(0);
    sim.start(1);
    sim.run_for(500);
    let mut w = Workload::new(11, 10);
    // Node 1 is cut off, writes, crashes before anything left it.
    sim.block(1, 0);
    let id = w
        .create_contact(&mut sim, 1, "crash@example.org", false)
        .unwrap();
    sim.crash_restart(1, 300);
    assert!(!sim.is_up(1));
    sim.run_for(400);
    assert!(sim.is_up(1), "restarted");
    assert!(
        sim.store(1).unwrap().get(&id).unwrap().is_some(),
        "kept on disk"
    );
    sim.heal();
    sim.run_for(6_000);
    assert!(
        sim.store(0).unwrap().get(&id).unwrap().is_some(),
        "and sent after"
    );
}
