//! `entente bench` end to end: the figures a person reads are printed, and
//! bad usage fails with a clear message and a non-zero exit.

use std::process::Command;

use entente_tests::entente_bin;

/// Runs `cmd`, asserts that it succeeded, and returns what it printed.
fn bench_stdout(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bench_store_prints_node_and_raw_figures() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = bench_stdout(
        Command::new(entente_bin())
            .args([
                "bench",
                "store",
                "--records",
                "300",
                "--batch",
                "100",
                "--singles",
                "5",
                "--reads",
                "50",
                "--dir",
            ])
            .arg(dir.path()),
    );
    for line in [
        "raw: Automerge create+save",
        "raw: RocksDB fsynced puts",
        "node: batched creates",
        "node: single creates",
        "node: point reads",
        "| records stored | 305 |",
    ] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }
}

#[test]
fn bench_collisions_finds_the_update_delete_it_builds() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = bench_stdout(
        Command::new(entente_bin())
            .args([
                "bench",
                "collisions",
                "--records",
                "200",
                "--history",
                "30",
                "--dir",
            ])
            .arg(dir.path()),
    );
    assert!(
        stdout.contains("| update_delete collision found | true |"),
        "{stdout}"
    );
}

/// The engine benchmark runs each side on its own thread: every phase must
/// still end, and report what the engines did, not what a clock allowed.
#[test]
fn bench_sync_catches_up_in_pages_and_then_only_what_changed() {
    let stdout = bench_stdout(Command::new(entente_bin()).args([
        "bench",
        "sync",
        "--records",
        "2500",
        "--batch",
        "500",
    ]));
    let row = |label: &str| -> String {
        let head = format!("| {label} |");
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix(head.as_str()))
            .map(|v| v.trim_end_matches('|').trim().to_string())
            .collect::<Vec<_>>()
            .join(" ; ")
    };
    assert_eq!(row("records caught up"), "2500", "{stdout}");
    // Three pages of whole records (1,000, 1,000, 500), the first two
    // landed while A read the next.
    assert_eq!(
        row("B's bulk pages (landed while A read the next) / records received whole"),
        "3 (2) / 2500"
    );
    // The echo lists every record once; ten behind costs ten entries, one
    // pull, one fetch of ten records; all behind fetches every record.
    assert!(
        row("echo: A pulls B's feed once (2500 entries, no fetch)").ends_with("bytes"),
        "{stdout}"
    );
    assert_eq!(row("feed entries B read in pull responses"), "10");
    let fetched = row("B's pulls / fetches / records fetched");
    let phases: Vec<&str> = fetched.split(" ; ").collect();
    assert_eq!(phases.len(), 3, "{stdout}");
    assert_eq!(phases[0], "0 / 0 / 0", "the bulk sync pulls nothing");
    assert_eq!(phases[1], "1 / 1 / 10", "ten behind");
    assert!(phases[2].ends_with("/ 2500"), "all behind: {}", phases[2]);
}

#[test]
fn unknown_subcommand_fails_with_usage() {
    let out = Command::new(entente_bin())
        .args(["bench", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
