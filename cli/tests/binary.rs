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

fn init_json(data: &std::path::Path, key: &std::path::Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_entente"))
        .args(["init", "--json", "--data-dir"])
        .arg(data)
        .arg("--cluster-key-file")
        .arg(key)
        .output()
        .expect("run entente");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("init prints JSON")
}

#[test]
fn init_makes_a_cluster_key_once_and_names_it_in_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("cluster.key");
    let first = init_json(&tmp.path().join("a"), &key);
    assert_eq!(first["cluster_key_created"], true, "{first}");
    let fingerprint = first["cluster_key_fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(fingerprint.len(), 32, "{first}");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(
        text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let config = std::fs::read_to_string(tmp.path().join("a/config.toml")).unwrap();
    assert!(config.contains("cluster_key_file"), "{config}");
    // A second site joins with the same file: the key is read, not replaced.
    let second = init_json(&tmp.path().join("b"), &key);
    assert_eq!(second["cluster_key_created"], false, "{second}");
    assert_eq!(second["cluster_key_fingerprint"], fingerprint.as_str());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
    // `serve` with a key file that is not there does not start.
    let out = Command::new(env!("CARGO_BIN_EXE_entente"))
        .args([
            "serve",
            "--api",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("a"))
        .arg("--cluster-key-file")
        .arg(tmp.path().join("missing.key"))
        .output()
        .expect("run entente");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.key"), "{err}");
    // A key others may read, or a file that is not a key, is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let loose = tmp.path().join("loose.key");
        std::fs::write(&loose, &text).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        let bad = tmp.path().join("bad.key");
        std::fs::write(&bad, "not a key\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (file, says) in [(&loose, "chmod 600"), (&bad, "/key/swarm/psk/1.0.0/")] {
            let out = Command::new(env!("CARGO_BIN_EXE_entente"))
                .args(["init", "--data-dir"])
                .arg(tmp.path().join("c"))
                .arg("--cluster-key-file")
                .arg(file)
                .output()
                .expect("run entente");
            assert!(!out.status.success(), "{out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(says), "{err}");
        }
    }
}
