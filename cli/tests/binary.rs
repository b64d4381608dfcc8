//! The `entente` binary as scripts call it.
//!
//! Being an integration test of this package also makes `cargo test
//! --workspace` build the binary itself, in the same build as the tests:
//! the workspace tests in `tests/` start it as a real process (`entente
//! serve`, `entente sim` …) from the target dir, and without this they would
//! run whatever binary an earlier build left there.

use std::process::Command;

#[test]
fn the_binary_lists_the_subcommands_scripts_rely_on_and_its_version() {
    let bin = env!("CARGO_BIN_EXE_entente");
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run entente");
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    for cmd in [
        "init",
        "serve",
        "status",
        "peers",
        "verify",
        "put",
        "get",
        "collisions",
        "changes",
        "import",
        "export",
        "demo",
        "bench",
        "sim",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(cmd)),
            "`{cmd}` missing from:\n{text}"
        );
    }
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .expect("run entente");
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("entente {}", env!("CARGO_PKG_VERSION"))
    );
    // An unknown subcommand is a usage error, not a success.
    let bad = Command::new(bin)
        .arg("frobnicate")
        .output()
        .expect("run entente");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
