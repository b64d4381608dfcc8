//! `entente sim` end to end: a few seeds pass with the summary line last, a
//! planted protocol bug fails with the seed and its replay command, and one
//! seed replays with its trace.

use std::process::Command;

use entente_tests::entente_bin;

fn sim(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(entente_bin())
        .arg("sim")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_few_seeds_pass_with_the_summary_last() {
    let (ok, stdout, stderr) = sim(&["--seeds", "8", "--ops", "60"]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("seeds 8, simulated operations "),
        "{stdout}"
    );
    assert!(last.contains("ops/s"), "{last}");
    assert!(last.ends_with("violations 0"), "{last}");
}

#[test]
fn a_planted_bug_fails_with_the_replay_command() {
    let (ok, stdout, _) = sim(&[
        "--seeds",
        "4",
        "--scenario",
        "partition-heal",
        "--ops",
        "150",
        "--planted-bug",
        "no-pull-after-reconnect",
    ]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("VIOLATION seed "), "{stdout}");
    assert!(stdout.contains("replay: entente sim --seed "), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("seeds 4,"), "{last}");
    assert!(!last.ends_with("violations 0"), "{last}");
}

#[test]
fn one_seed_replays_with_its_trace() {
    let args = [
        "--seed",
        "3",
        "--scenario",
        "crash-restart",
        "--ops",
        "40",
        "--trace",
    ];
    let (ok, a, stderr) = sim(&args);
    assert!(ok, "{a}\n{stderr}");
    assert!(a.contains(" crash ") || a.contains(" start "), "{a}");
    assert!(a.contains("scenario crash-restart seed 3:"), "{a}");
    let (_, b, _) = sim(&args);
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with("seeds "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(strip(&a), strip(&b), "the same seed gives the same trace");
}

#[test]
fn an_unknown_scenario_is_bad_input() {
    let (ok, _, stderr) = sim(&["--seed", "1", "--scenario", "nope"]);
    assert!(!ok);
    assert!(stderr.contains("unknown scenario `nope`"), "{stderr}");
}
