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

/// Starts `entente serve`, returning the child and its first listen address.
fn serve(dir: &Path, extra: &[String]) -> (Child, String) {
    let mut child = Command::new(entente_bin())
        .args(["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
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
    loop {
        match rx.recv_timeout(PATIENCE) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("listening ") {
                    return (child, addr.to_string());
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve printed no listen address");
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

    let (a, a_addr) = serve(&a_dir, &["--allow".into(), b_peer.clone()]);
    let b_args = vec![
        "--peer".to_string(),
        a_addr.clone(),
        "--allow".into(),
        c_peer.clone(),
    ];
    let (mut b, b_addr) = serve(&b_dir, &b_args);

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

    let (b2, b2_addr) = serve(&b_dir, &b_args);
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
