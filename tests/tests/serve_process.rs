//! `entente init` and `entente serve` as real processes: a node killed with
//! SIGKILL while it receives a large catch-up restarts from its data dir and
//! converges, holding every write its source acknowledged.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use entente_node::config::{Config, DataDir};
use entente_node::runtime;
use entente_node::{NewRecord, StoreOptions};
use entente_tests::entente_bin;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(120);
const RECORDS: usize = 2_500;

fn init(dir: &Path) -> String {
    let out = Command::new(entente_bin())
        .args(["init", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["peer_id"].as_str().unwrap().to_string()
}

/// Starts `entente serve` (API on a free loopback port), returning the
/// child, its first listen address and its API's base URL.
fn serve(dir: &Path, extra: &[String]) -> (Child, String, String) {
    let mut child = Command::new(entente_bin())
        .args([
            "serve",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // Drain stdout for the child's whole life.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut listen = None;
    loop {
        match rx.recv_timeout(PATIENCE) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("listening ") {
                    listen.get_or_insert_with(|| addr.to_string());
                } else if let Some(api) = line.strip_prefix("api ") {
                    let listen = listen.expect("listen addresses are printed before the API");
                    return (child, listen, api.to_string());
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve printed no listen or API address");
            }
        }
    }
}

fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "serve did not shut down cleanly: {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_catch_up_restarts_and_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir, c_dir) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let _a_peer = init(&a_dir);
    let b_peer = init(&b_dir);
    let c_peer = init(&c_dir);

    // Fill A through the library while it is stopped; every write returned
    // here was acknowledged (durable).
    let written: Vec<(entente_model::RecordId, Vec<String>)> = {
        let (mut store, _) = runtime::open_store(
            &DataDir::new(&a_dir),
            &Config::default(),
            StoreOptions::default(),
        )
        .unwrap();
        let mut out = Vec::new();
        for start in (0..RECORDS).step_by(500) {
            let items = (start..start + 500)
                .map(|i| NewRecord {
                    collection: "contacts".into(),
                    id: None,
                    fields: json!({"first_name": format!("P{i}"), "email": format!("p{i}@example.org"), "notes": "x".repeat(200)})
                        .as_object()
                        .unwrap()
                        .clone(),
                    force: false,
                })
                .collect();
            for w in store.create_many(items).unwrap() {
                out.push((w.record.id, w.record.heads));
            }
        }
        out
    };

    let (a, a_addr, _) = serve(&a_dir, &["--allow".into(), b_peer.clone()]);
    let b_args = vec![
        "--peer".to_string(),
        a_addr.clone(),
        "--allow".into(),
        c_peer.clone(),
    ];
    let (mut b, b_addr, _) = serve(&b_dir, &b_args);

    // C (in process) watches B: it talks to B only, so what C has, B had.
    let c_data = DataDir::new(&c_dir);
    let mut c_config = Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..Config::default()
    };
    c_config.sync.pull_interval_ms = 300;
    c_config.sync.redial_min_ms = 100;
    c_config.sync.redial_max_ms = 1_000;
    c_config.peers.push(b_addr.parse().unwrap());
    let c = runtime::start(&c_data, c_config).await.unwrap();
    let feed = |c: &runtime::NodeHandle| {
        let c = c.clone();
        async move { c.status().await.unwrap().feed_seq }
    };

    let deadline = tokio::time::Instant::now() + PATIENCE;
    while feed(&c.handle).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never passed anything on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B is receiving: kill it without warning.
    b.kill().unwrap();
    b.wait().unwrap();

    let (b2, b2_addr, _) = serve(&b_dir, &b_args);
    let b_peer_id: entente_node::libp2p::PeerId = b_peer.parse().unwrap();
    c.handle
        .add_peer(b_peer_id, Some(b2_addr.parse().unwrap()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while feed(&c.handle).await < RECORDS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "C stuck at {} of {RECORDS}",
            feed(&c.handle).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.stop().await.unwrap();
    terminate(b2);
    terminate(a);

    // Every acknowledged write of A is at B, at the same version.
    let (mut store, _) = runtime::open_store(
        &DataDir::new(&b_dir),
        &Config::default(),
        StoreOptions::default(),
    )
    .unwrap();
    for (id, heads) in &written {
        let r = store
            .get(id)
            .unwrap()
            .unwrap_or_else(|| panic!("{id} missing at B"));
        assert_eq!(&r.heads, heads, "{id} differs at B");
    }
    assert_eq!(store.changes_since(0, RECORDS + 10).unwrap().len(), RECORDS);
}

/// Runs the CLI against `api`, reading the token from `dir` when given.
fn cli(api: &str, dir: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(entente_bin());
    c.arg("--node")
        .arg(api)
        .args(args)
        .env_remove("ENTENTE_TOKEN");
    c.env_remove("ENTENTE_DATA_DIR");
    if let Some(d) = dir {
        c.arg("--data-dir").arg(d);
    }
    c.output().unwrap()
}

fn cli_json(api: &str, dir: Option<&Path>, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = cli(api, dir, &all);
    assert!(
        out.status.success(),
        "entente {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A plain HTTP/1.1 GET, for a long poll the CLI does not expose.
fn http_get(base: &str, path: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "gave up: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `entente serve` serves the running node's HTTP API: peers with their
/// replication state, block and unblock, a write at A readable at B, B's
/// long-polling feed woken by a change that came from A, and the token
/// required on B (`--require-token`).
#[test]
fn serve_runs_the_api_of_the_networked_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a_dir);
    let b_peer = init(&b_dir);
    let (a, a_addr, a_api) = serve(&a_dir, &["--allow".into(), b_peer.clone()]);
    let (b, _, b_api) = serve(&b_dir, &["--peer".into(), a_addr, "--require-token".into()]);
    let (a_dir, b_dir) = (Some(a_dir.as_path()), Some(b_dir.as_path()));

    eventually("A lists B as a syncing peer", || {
        cli_json(&a_api, a_dir, &["peers"])["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == b_peer.as_str() && p["syncing"] == true && p["connected"] == true)
    });
    let status = cli_json(&b_api, b_dir, &["status"]);
    assert_eq!(status["networked"], true);
    assert_eq!(status["connected_peers"], 1);
    // Without the token, B refuses (exit code 6); A, on loopback without
    // --require-token, does not ask for it.
    assert_eq!(cli(&b_api, None, &["status"]).status.code(), Some(6));
    assert!(cli(&a_api, None, &["status"]).status.success());

    // B's long poll wakes up for a write that arrives from A.
    let since = status["feed_seq"].as_u64().unwrap();
    let token = std::fs::read_to_string(b_dir.unwrap().join("api-token")).unwrap();
    let token = token.trim().to_string();
    let poll_api = b_api.clone();
    let poll = std::thread::spawn(move || {
        http_get(
            &poll_api,
            &format!("/changes?since={since}&wait=60"),
            &token,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let created = cli_json(
        &a_api,
        a_dir,
        &["put", "contacts", "email=ann@example.org", "first_name=Ann"],
    );
    let id = created["record"]["id"].as_str().unwrap().to_string();
    let answer = poll.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&id),
        "the long poll did not return {id}: {answer}"
    );
    let at_b = cli_json(&b_api, b_dir, &["get", &id]);
    assert_eq!(at_b["fields"]["email"], "ann@example.org");

    // Blocking B at A cuts the link; a write made meanwhile arrives after
    // the unblock.
    assert!(
        cli(&a_api, a_dir, &["peers", "block", &b_peer])
            .status
            .success()
    );
    eventually("A shows B blocked and disconnected", || {
        cli_json(&a_api, a_dir, &["peers"])["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == b_peer.as_str() && p["blocked"] == true && p["connected"] == false)
    });
    let cut = cli_json(&a_api, a_dir, &["put", "contacts", "email=cut@example.org"]);
    let cut_id = cut["record"]["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(
        cli(&b_api, b_dir, &["get", &cut_id]).status.code(),
        Some(3),
        "a write crossed a blocked link"
    );
    assert!(
        cli(&a_api, a_dir, &["peers", "unblock", &b_peer])
            .status
            .success()
    );
    eventually("the write made during the block reaches B", || {
        cli(&b_api, b_dir, &["get", &cut_id]).status.success()
    });
    terminate(b);
    terminate(a);
}
