//! `entente demo --once`: three real sites in one process walk through the
//! story and exit 0 only if each step ended as it must (the demo checks the
//! merge, and that every site reports the same `duplicate` and
//! `update_delete` collision); here we check what it tells the person.

use std::process::Command;

use entente_tests::entente_bin;

#[test]
fn the_demo_walks_through_merge_duplicate_and_update_delete() {
    let out = Command::new(entente_bin())
        .args(["demo", "--once", "--api-port", "0", "--timeout", "120"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "merged field by field",
        "open collisions: none",
        "every site reports duplicate ",
        "every site reports update_delete ",
        "collisions resolve ",
        "--merge-into ",
        "--restore",
    ] {
        assert!(
            stdout.contains(expected),
            "`{expected}` missing in:\n{stdout}"
        );
    }
    // Three sites, each with its own API, named in the closing hints.
    let apis: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split("api http://").nth(1))
        .collect();
    assert_eq!(apis.len(), 3, "{stdout}");
    for a in &apis {
        assert!(
            stdout.contains(&format!("entente --node http://{a} ")),
            "no command for {a}:\n{stdout}"
        );
    }
}
