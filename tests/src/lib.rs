//! # entente-tests
//!
//! Workspace-level tests that run the real `entente` binary. Cargo builds the
//! workspace's binaries before it runs these tests; [`entente_bin`] finds the
//! one built for the same profile.

use std::path::PathBuf;

/// The `entente` binary beside this test executable (`target/<profile>/`).
pub fn entente_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join(format!("entente{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests through `cargo test --workspace`",
        bin.display()
    );
    bin
}
