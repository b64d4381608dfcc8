//! Compare and repair over real libp2p: two real nodes on 127.0.0.1 whose
//! stores diverge behind their engines' back (writes straight into the
//! stores, not gossiped, and no anti-entropy pull for an hour), then
//! `NodeHandle::verify` finds and repairs exactly those records.

use std::future::Future;
use std::time::Duration;

use entente_model::RecordId;
use entente_node::libp2p::{Multiaddr, PeerId};
use entente_node::runtime::{self, NodeHandle, RunningNode};
use entente_node::{Config, DataDir};
use serde_json::{Map, Value, json};
use tempfile::TempDir;

const PATIENCE: Duration = Duration::from_secs(60);

struct TestNode {
    _dir: TempDir,
    running: RunningNode,
    h: NodeHandle,
    peer: PeerId,
    addr: Multiaddr,
}

async fn spawn_node() -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    data.init().unwrap();
    let mut config = Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..Config::default()
    };
    // Only the handshake's pull: later divergence is invisible to pulls.
    config.sync.pull_interval_ms = 3_600_000;
    config.sync.redial_min_ms = 100;
    config.sync.redial_max_ms = 1_000;
    let running = runtime::start(&data, config).await.unwrap();
    let h = running.handle.clone();
    let peer = h.peer_id();
    let addr = wait_for("a listen address", || async {
        h.status().await.unwrap().listen_addrs.first().cloned()
    })
    .await;
    TestNode {
        _dir: dir,
        running,
        h,
        peer,
        addr: addr.parse().unwrap(),
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

async fn heads(n: &TestNode, id: &RecordId) -> Option<Vec<String>> {
    let mut h = n.h.get(id.clone()).await.unwrap().map(|r| r.heads)?;
    h.sort();
    Some(h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_over_libp2p_repairs_what_pulls_cannot_see() {
    let a = spawn_node().await;
    let b = spawn_node().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let f = fields(json!({"email": format!("v{i}@x.org"), "city": "Bern"}));
        ids.push(
            a.h.create("contacts", None, f, false)
                .await
                .unwrap()
                .record
                .id,
        );
    }
    // Not connected yet: refused with a stable code.
    let e = b.h.verify(a.peer).await.unwrap_err();
    assert_eq!(e.code(), "PEER_NOT_READY", "{e}");

    b.h.add_peer(a.peer, None).await.unwrap();
    a.h.add_peer(b.peer, Some(b.addr.clone())).await.unwrap();
    let last = ids.last().unwrap().clone();
    wait_for("the handshake pull", || async { heads(&b, &last).await }).await;
    for id in &ids {
        wait_for("every record at B", || async { heads(&b, id).await }).await;
    }

    // Behind the engines' back: `read` writes are not gossiped.
    let changed = ids[7].clone();
    let c = changed.clone();
    a.h.read(move |s| {
        s.update(&c, &fields(json!({"city": "Basel"})), None, false)?;
        Ok(())
    })
    .await
    .unwrap();
    let only_b =
        b.h.read(|s| {
            let f = fields(json!({"email": "only-b@x.org"}));
            Ok(s.create("contacts", None, &f, false)?.record.id)
        })
        .await
        .unwrap();
    assert_ne!(heads(&a, &changed).await, heads(&b, &changed).await);

    let r = b.h.verify(a.peer).await.unwrap();
    assert!(r.complete, "{r:?}");
    let mut want = vec![changed.clone(), only_b.clone()];
    want.sort();
    assert_eq!(r.records_differing, want);
    assert_eq!(r.records_repaired, vec![changed.clone()]);
    assert_eq!(r.records_offered, 1);
    assert_eq!(heads(&b, &changed).await, heads(&a, &changed).await);
    // A fetches what B offered through its ordinary fetch path.
    wait_for("A fetches B's record", || async {
        heads(&a, &only_b).await
    })
    .await;
    assert_eq!(heads(&a, &only_b).await, heads(&b, &only_b).await);

    let again = b.h.verify(a.peer).await.unwrap();
    assert_eq!((again.differing, again.rounds), (0, 1), "{again:?}");
    a.running.stop().await.unwrap();
    b.running.stop().await.unwrap();
}
