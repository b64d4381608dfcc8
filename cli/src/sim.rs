//! `entente sim`: the deterministic network-partition simulator
//! (`entente-sim`). Runs seeds of the named scenarios, prints every
//! violation with the command that replays it, and a summary line last:
//! seeds, simulated operations per second, violations. The exit status is
//! non-zero when any seed broke an invariant.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use entente_sim::scenario::PLANTED_BUGS;
use entente_sim::{Outcome, RunOptions, Scenario, Violation, run};

/// Arguments of `entente sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Run this many seeds (from --first-seed on); without --scenario the
    /// seeds take turns across all scenarios. Default 100 unless --seed.
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<u64>,
    /// Run this one seed (replays a reported violation).
    #[arg(long)]
    seed: Option<u64>,
    /// First seed of --seeds.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Scenario: partition-heal, flapping-links, crash-restart, late-joiner,
    /// multi-hop-line, duplicate-storm, delete-vs-edit, partial-replication,
    /// verify-repair, random.
    #[arg(long)]
    scenario: Option<String>,
    /// Nodes (default: drawn from the seed, per scenario).
    #[arg(long)]
    nodes: Option<usize>,
    /// Workload operations per seed.
    #[arg(long, default_value_t = 500)]
    ops: usize,
    /// Print the event log of the run (with --seed).
    #[arg(long)]
    trace: bool,
    /// Seeds run in parallel.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Test-only: plant a protocol bug in every engine
    /// (no-pull-after-reconnect, checkpoint-when-parked) to see the checker
    /// catch it.
    #[arg(long, hide = true)]
    planted_bug: Option<String>,
}

/// Runs the seeds; `Ok(false)` when an invariant broke.
pub fn run_cmd(args: SimArgs) -> Result<bool> {
    let scenario = match &args.scenario {
        None => None,
        Some(name) => match Scenario::parse(name) {
            Some(s) => Some(s),
            None => bail!(
                "unknown scenario `{name}` (one of: {})",
                Scenario::ALL.map(|s| s.name()).join(", ")
            ),
        },
    };
    let mut opts = RunOptions {
        nodes: args.nodes,
        ops: args.ops,
        ..RunOptions::default()
    };
    if args.ops < 5 {
        bail!("--ops must be at least 5");
    }
    if let Some(name) = args.planted_bug.as_deref() {
        let Some((_, bug)) = PLANTED_BUGS.iter().find(|(n, _)| *n == name) else {
            bail!(
                "unknown planted bug `{name}` (one of: {})",
                PLANTED_BUGS.map(|(n, _)| n).join(", ")
            );
        };
        opts = opts.with_planted_bug(*bug);
    }
    if let Some(seed) = args.seed {
        opts.net.keep_trace = args.trace;
        let sc = scenario.unwrap_or_else(|| Scenario::for_seed(seed));
        let started = Instant::now();
        let result = run(sc, seed, &opts);
        let elapsed = started.elapsed();
        let mut out = std::io::stdout().lock();
        return Ok(match result {
            Ok(o) => {
                for line in &o.trace {
                    writeln!(out, "{line}")?;
                }
                print_outcome(&mut out, &o)?;
                summary(&mut out, 1, o.ops, elapsed, 0)?;
                true
            }
            Err(v) => {
                // With --trace the log comes first, as on success: a
                // violation is when it is needed most.
                for line in &v.trace {
                    writeln!(out, "{line}")?;
                }
                writeln!(out, "VIOLATION {v}")?;
                summary(&mut out, 1, 0, elapsed, 1)?;
                false
            }
        });
    }
    let count = args.seeds.unwrap_or(100);
    let seeds: Vec<u64> = (args.first_seed..args.first_seed.saturating_add(count)).collect();
    let next = AtomicU64::new(0);
    let ops = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failed: Mutex<Vec<Violation>> = Mutex::new(Vec::new());
    let started = Instant::now();
    let progress = std::io::stderr().is_terminal();
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&seed) = seeds.get(i) else {
                        break;
                    };
                    let sc = scenario.unwrap_or_else(|| Scenario::for_seed(seed));
                    match run(sc, seed, &opts) {
                        Ok(o) => {
                            ops.fetch_add(o.ops, Ordering::Relaxed);
                        }
                        Err(v) => failed.lock().expect("lock").push(v),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        if progress {
            let total = seeds.len() as u64;
            loop {
                let d = done.load(Ordering::Relaxed);
                let bad = failed.lock().expect("lock").len();
                bar(d, total, bad, started.elapsed());
                if d >= total {
                    eprintln!();
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    let mut failed = failed.into_inner().expect("lock");
    failed.sort_by_key(|v| v.seed);
    let mut out = std::io::stdout().lock();
    for v in &failed {
        writeln!(out, "VIOLATION {v}")?;
    }
    summary(
        &mut out,
        seeds.len() as u64,
        ops.load(Ordering::Relaxed),
        started.elapsed(),
        failed.len(),
    )?;
    Ok(failed.is_empty())
}

fn bar(done: u64, total: u64, bad: usize, elapsed: Duration) {
    const WIDTH: u64 = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    eprint!(
        "\r[{bar}] {done}/{total} seeds, {bad} violations, {:.0} s",
        elapsed.as_secs_f64()
    );
    let _ = std::io::stderr().flush();
}

fn print_outcome(out: &mut impl Write, o: &Outcome) -> Result<()> {
    writeln!(
        out,
        "scenario {} seed {}: {} nodes, {} operations ({} changes acknowledged, {} refused, {} resolutions, {} constructed collisions), {} frames / {} B + {} gossip; after the heal {} frames / {} B + {} gossip for {} changed records; {} ms simulated; trace digest {:016x}",
        o.scenario,
        o.seed,
        o.nodes,
        o.ops,
        o.acked,
        o.refused,
        o.resolutions,
        o.constructed,
        o.traffic.messages,
        o.traffic.bytes,
        o.traffic.gossip,
        o.after_heal.messages,
        o.after_heal.bytes,
        o.after_heal.gossip,
        o.changed,
        o.sim_ms,
        o.digest
    )?;
    let held: Vec<String> = o.held.iter().map(u64::to_string).collect();
    write!(out, "  records held per node: {}", held.join(" / "))?;
    if o.scenario == Scenario::VerifyRepair {
        write!(
            out,
            "; verify runs: {} records differing, {} repaired",
            o.verify_differing, o.verify_repaired
        )?;
    }
    writeln!(out)?;
    Ok(())
}

fn summary(
    out: &mut impl Write,
    seeds: u64,
    ops: u64,
    elapsed: Duration,
    violations: usize,
) -> Result<()> {
    let secs = elapsed.as_secs_f64().max(1e-9);
    writeln!(
        out,
        "seeds {seeds}, simulated operations {ops} in {secs:.1} s ({:.0} ops/s), violations {violations}",
        ops as f64 / secs
    )?;
    Ok(())
}
