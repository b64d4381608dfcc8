//! `entente bench` end to end: the figures a person reads are printed, and
//! bad usage fails with a clear message and a non-zero exit.

use std::process::Command;

use entente_tests::entente_bin;

#[test]
fn bench_store_prints_node_and_raw_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(entente_bin())
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
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
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
    let out = Command::new(entente_bin())
        .args([
            "bench",
            "collisions",
            "--records",
            "200",
            "--history",
            "30",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| update_delete collision found | true |"),
        "{stdout}"
    );
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
