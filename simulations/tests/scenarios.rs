//! The network scenarios, many seeds each. A failure names the scenario and
//! the seed that replays it.

use entente_sim::net::{NetOptions, Scenario, Sim};

/// Seeds per scenario in the ordinary test run.
const SEEDS: u64 = 20;

fn run_seeds(scenario: Scenario) {
    let mut acked = 0;
    let mut refused = 0;
    for seed in 0..SEEDS {
        match Sim::run(scenario, seed, NetOptions::default()) {
            Ok(o) => {
                assert!(
                    o.messages > 0,
                    "{} seed {seed}: no traffic",
                    scenario.name()
                );
                acked += o.acked;
                refused += o.refused;
            }
            Err(v) => panic!(
                "scenario {} failed: {v}\nreplay: Sim::run(Scenario::{scenario:?}, {}, NetOptions::default())",
                scenario.name(),
                v.seed
            ),
        }
    }
    // The workload really wrote (and really hit the duplicate refusal).
    assert!(acked as u64 >= SEEDS * 12, "{acked} writes acknowledged");
    assert!(refused > 0, "no unforced duplicate was refused");
}

#[test]
fn partition_heal_converges_for_many_seeds() {
    run_seeds(Scenario::PartitionHeal);
}

#[test]
fn multi_hop_line_converges_for_many_seeds() {
    run_seeds(Scenario::MultiHopLine);
}

#[test]
fn multi_hop_line_never_links_a_and_c() {
    // A partition that never heals: B is cut from one end, so that end and
    // the other two must differ, and A never has a session with C.
    let mut sim = Sim::new(3, 5, NetOptions::default());
    sim.link_up(0, 1);
    sim.link_up(1, 2);
    sim.run_for(500);
    sim.write(0, 0);
    sim.run_for(5_000);
    let peers = |sim: &Sim, i: usize| -> Vec<usize> {
        sim.engine(i)
            .ready_peers()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    };
    assert_eq!(peers(&sim, 0), [1]);
    assert_eq!(peers(&sim, 2), [1]);
    // A's write reached C through B.
    sim.check().unwrap();
    assert_eq!(
        sim.replicas.stores[2].changes_since(0, 10).unwrap().len(),
        1
    );
}

#[test]
fn same_seed_same_trace() {
    for scenario in Scenario::ALL {
        let opts = NetOptions {
            keep_trace: true,
            ..NetOptions::default()
        };
        let a = Sim::run(scenario, 99, opts.clone()).unwrap();
        let b = Sim::run(scenario, 99, opts.clone()).unwrap();
        assert_eq!(a.trace, b.trace, "{}", scenario.name());
        assert_eq!(a.digest, b.digest);
        assert!(a.trace.len() > 100, "{} trace lines", a.trace.len());
        let c = Sim::run(scenario, 100, opts).unwrap();
        assert_ne!(a.digest, c.digest, "another seed, another trace");
    }
}

#[test]
fn the_checker_reports_a_partition_that_never_heals_with_its_seed() {
    // Teeth: without healing, the sides cannot converge, and the violation
    // names the seed.
    let opts = NetOptions {
        never_heal: true,
        settle_ms: 5_000,
        ..NetOptions::default()
    };
    for scenario in Scenario::ALL {
        let v = Sim::run(scenario, 7, opts.clone()).unwrap_err();
        assert_eq!(v.seed, 7);
        assert!(v.to_string().starts_with("seed 7:"), "{v}");
    }
}
