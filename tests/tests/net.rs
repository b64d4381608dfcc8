//! Three real nodes (real swarms, real RocksDB stores) on 127.0.0.1 with
//! ephemeral ports, in one process, driven through `NodeHandle`. Every wait
//! polls a condition with a generous timeout; nothing asserts on timing.

use std::future::Future;
use std::time::Duration;

use entente_model::{CollisionKind, RecordId, ResolveRequest};
use entente_node::config::new_cluster_key;
use entente_node::libp2p::{Multiaddr, PeerId};
use entente_node::runtime::{self, NodeHandle, RunningNode};
use entente_node::{CollisionFilter, Config, DataDir, NewRecord};
use serde_json::{Map, Value, json};
use tempfile::TempDir;

/// How long any one condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

struct TestNode {
    _dir: TempDir,
    running: RunningNode,
    h: NodeHandle,
    peer: PeerId,
    addr: Multiaddr,
}

fn test_config() -> Config {
    let mut c = Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..Config::default()
    };
    c.sync.pull_interval_ms = 300;
    c.sync.redial_min_ms = 100;
    c.sync.redial_max_ms = 1_000;
    c
}

async fn spawn_node() -> TestNode {
    spawn_node_with(test_config()).await
}

async fn spawn_node_with(config: Config) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    data.init().unwrap();
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

/// `dialer` dials `target`; each allows the other.
async fn link(dialer: &TestNode, target: &TestNode) {
    target.h.add_peer(dialer.peer, None).await.unwrap();
    dialer
        .h
        .add_peer(target.peer, Some(target.addr.clone()))
        .await
        .unwrap();
}

async fn syncing(a: &TestNode, b: &TestNode) -> bool {
    a.h.peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.peer_id == b.peer.to_string() && p.syncing)
}

async fn connected(a: &TestNode, b: &TestNode) -> bool {
    a.h.peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.peer_id == b.peer.to_string() && p.connected)
}

/// Polls `f` until it gives `Some`, failing the test after [`PATIENCE`].
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

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

async fn create(n: &TestNode, v: Value) -> RecordId {
    n.h.create("contacts", None, fields(v), false)
        .await
        .unwrap()
        .record
        .id
}

/// The record's (deleted, fields, heads) at `n`, if it has it.
async fn state(n: &TestNode, id: &RecordId) -> Option<(bool, Map<String, Value>, Vec<String>)> {
    n.h.get(id.clone())
        .await
        .unwrap()
        .map(|r| (r.deleted, r.fields, r.heads))
}

async fn has(n: &TestNode, id: &RecordId) -> bool {
    state(n, id).await.is_some()
}

async fn field(n: &TestNode, id: &RecordId, name: &str) -> Option<Value> {
    state(n, id)
        .await
        .and_then(|(_, f, _)| f.get(name).cloned())
}

/// (id, kind, open) of every collision, sorted.
async fn collisions(n: &TestNode) -> Vec<(String, CollisionKind, bool)> {
    let mut v: Vec<_> =
        n.h.collisions(CollisionFilter {
            include_resolved: true,
            ..CollisionFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.id.to_string(), c.kind, c.is_open()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

async fn stop_all(nodes: Vec<TestNode>) {
    for n in nodes {
        n.running.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_reach_every_site_and_hop_through_the_middle() {
    let (a, b, c) = (spawn_node().await, spawn_node().await, spawn_node().await);
    // A line: A — B — C. A and C neither know nor allow each other.
    link(&b, &a).await;
    link(&b, &c).await;
    wait_until("B syncing with A and C", || async {
        syncing(&b, &a).await && syncing(&b, &c).await
    })
    .await;

    let at_a = create(&a, json!({"first_name": "Ada", "email": "ada@example.org"})).await;
    let at_b = create(&b, json!({"first_name": "Bo", "email": "bo@example.org"})).await;
    let at_c = create(&c, json!({"first_name": "Cy", "email": "cy@example.org"})).await;
    for id in [&at_a, &at_b, &at_c] {
        for n in [&a, &b, &c] {
            wait_until("every write at every site", || has(n, id)).await;
        }
    }

    // A change made at A reaches C through B.
    a.h.update(at_a.clone(), fields(json!({"city": "Lyon"})), None, false)
        .await
        .unwrap();
    wait_until("A's edit at C", || async {
        field(&c, &at_a, "city").await == Some(json!("Lyon"))
    })
    .await;
    assert!(!connected(&a, &c).await && !connected(&c, &a).await);
    stop_all(vec![a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_node_fills_in_bulk_pages_applied_while_the_next_is_read() {
    let (a, b) = (spawn_node().await, spawn_node().await);
    // Four pages of 1,000 (the default `pull_limit`), written in batches
    // too large to be gossiped: B takes them all by its bulk full sync.
    const RECORDS: usize = 3_500;
    for start in (0..RECORDS).step_by(500) {
        let items = (start..start + 500)
            .map(|i| NewRecord {
                collection: "contacts".into(),
                id: None,
                fields: fields(
                    json!({"first_name": format!("P{i}"), "email": format!("p{i}@example.org")}),
                ),
                force: false,
            })
            .collect();
        a.h.create_many(items).await.unwrap();
    }
    link(&b, &a).await;
    wait_until("B holds A's records", || async {
        b.h.status().await.unwrap().feed_seq == RECORDS as u64
    })
    .await;
    let st = b.h.status().await.unwrap();
    assert_eq!(st.records_bulk, RECORDS as u64, "{st:?}");
    assert_eq!(st.bulk_pulls, 4, "{st:?}");
    // The first three pages had more behind them: the node asked for the
    // next one before applying each, and its loop applied it (in a test
    // machine's worst moment a page may wait for its successor instead).
    assert!((1..=3).contains(&st.bulk_pages_overlapped), "{st:?}");
    assert_eq!(st.records_rejected, 0, "{st:?}");
    stop_all(vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_then_heal_converges_with_the_same_collisions_everywhere() {
    let (a, b, c) = (spawn_node().await, spawn_node().await, spawn_node().await);
    link(&a, &b).await;
    link(&b, &c).await;
    link(&c, &a).await;
    wait_until("a full mesh", || async {
        syncing(&a, &b).await && syncing(&b, &c).await && syncing(&c, &a).await
    })
    .await;

    let shared = create(&a, json!({"first_name": "Sam", "email": "sam@example.org"})).await;
    let doomed = create(&a, json!({"first_name": "Dee", "email": "dee@example.org"})).await;
    for n in [&b, &c] {
        for id in [&shared, &doomed] {
            wait_until("the seed records everywhere", || has(n, id)).await;
        }
    }

    // Partition: A on one side, B and C on the other.
    for (x, y) in [(&a, &b), (&a, &c), (&b, &a), (&c, &a)] {
        x.h.block_peer(y.peer).await.unwrap();
    }
    wait_until("the partition", || async {
        !connected(&a, &b).await
            && !connected(&a, &c).await
            && !connected(&b, &a).await
            && !connected(&c, &a).await
    })
    .await;

    // Concurrent edits of different fields of one contact at two sites.
    a.h.update(
        shared.clone(),
        fields(json!({"city": "Paris"})),
        None,
        false,
    )
    .await
    .unwrap();
    b.h.update(
        shared.clone(),
        fields(json!({"phone": "+33 1 23"})),
        None,
        false,
    )
    .await
    .unwrap();
    // The same e-mail inserted at two sites.
    let dup_a = create(&a, json!({"first_name": "Eve", "email": "eve@example.org"})).await;
    let dup_b = create(
        &b,
        json!({"first_name": "Eva", "email": "EVE@example.org "}),
    )
    .await;
    // A delete at one site, an edit at another.
    a.h.delete(doomed.clone()).await.unwrap();
    c.h.update(
        doomed.clone(),
        fields(json!({"last_name": "Kept"})),
        None,
        false,
    )
    .await
    .unwrap();
    // B and C still talk across their side of the partition.
    wait_until("C sees B's edit", || async {
        field(&c, &shared, "phone").await == Some(json!("+33 1 23"))
    })
    .await;
    assert_eq!(
        field(&b, &shared, "city").await,
        None,
        "the partition leaked"
    );

    // Heal.
    for (x, y) in [(&a, &b), (&a, &c), (&b, &a), (&c, &a)] {
        x.h.unblock_peer(y.peer).await.unwrap();
    }
    let nodes = [&a, &b, &c];
    for n in nodes {
        wait_until("both edits merged everywhere", || async {
            field(n, &shared, "city").await == Some(json!("Paris"))
                && field(n, &shared, "phone").await == Some(json!("+33 1 23"))
        })
        .await;
        for id in [&dup_a, &dup_b] {
            wait_until("both duplicates everywhere", || has(n, id)).await;
        }
        wait_until("one duplicate and one update_delete", || async {
            let cs = collisions(n).await;
            cs.len() == 2
                && cs.iter().any(|c| c.1 == CollisionKind::Duplicate && c.2)
                && cs.iter().any(|c| c.1 == CollisionKind::UpdateDelete && c.2)
        })
        .await;
    }
    // Same records, same heads, same collisions on all three.
    let seen_a = collisions(&a).await;
    assert_eq!(seen_a, collisions(&b).await);
    assert_eq!(seen_a, collisions(&c).await);
    for id in [&shared, &doomed, &dup_a, &dup_b] {
        wait_until("identical heads", || async {
            let sa = state(&a, id).await;
            sa == state(&b, id).await && sa == state(&c, id).await
        })
        .await;
    }

    // A resolution made at B closes both collisions on all three.
    for (cid, kind, _) in &seen_a {
        let request = match kind {
            CollisionKind::Duplicate => ResolveRequest {
                merge_into: Some(dup_a.clone()),
                ..ResolveRequest::default()
            },
            CollisionKind::UpdateDelete => ResolveRequest {
                restore: true,
                ..ResolveRequest::default()
            },
            other => panic!("unexpected collision kind {other:?}"),
        };
        let id = entente_model::CollisionId::parse(cid).unwrap();
        b.h.resolve(id, request).await.unwrap();
    }
    for n in nodes {
        wait_until("both collisions resolved everywhere", || async {
            let cs = collisions(n).await;
            cs.len() == 2 && cs.iter().all(|c| !c.2)
        })
        .await;
        wait_until("the restored record live everywhere", || async {
            matches!(state(n, &doomed).await, Some((false, f, _)) if f.get("last_name") == Some(&json!("Kept")))
        })
        .await;
    }
    assert_eq!(collisions(&a).await, collisions(&c).await);
    stop_all(vec![a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_off_the_allow_list_cannot_connect_or_push() {
    let (a, b, intruder) = (spawn_node().await, spawn_node().await, spawn_node().await);
    link(&b, &a).await;
    wait_until("A and B syncing", || syncing(&a, &b)).await;

    intruder_kept_out(&a, &b, &intruder).await;
    stop_all(vec![a, b, intruder]).await;
}

/// The intruder allows and dials A; A never allowed it. Nothing of the
/// intruder's reaches A, A does not list it, while B (syncing with A) still
/// gets through.
async fn intruder_kept_out(a: &TestNode, b: &TestNode, intruder: &TestNode) {
    let secret = create(intruder, json!({"first_name": "Mallory"})).await;
    intruder
        .h
        .add_peer(a.peer, Some(a.addr.clone()))
        .await
        .unwrap();
    dialed_several_times(intruder, a).await;
    // Something written after those attempts arrives from B, so A was
    // listening and replicating all along.
    let later = create(b, json!({"first_name": "Later"})).await;
    wait_until("B's later write at A", || has(a, &later)).await;
    assert!(!has(a, &secret).await, "the intruder's record reached A");
    let peers = a.h.peers().await.unwrap();
    assert!(
        !peers.iter().any(|p| p.peer_id == intruder.peer.to_string()),
        "A lists the intruder: {peers:?}"
    );
    assert!(!syncing(intruder, a).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_listening_on_quic_only_replicate() {
    let quic = || Config {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        ..test_config()
    };
    let (a, b) = (spawn_node_with(quic()).await, spawn_node_with(quic()).await);
    assert!(a.addr.to_string().contains("/quic-v1"), "{}", a.addr);
    link(&b, &a).await;
    wait_until("A and B syncing over QUIC", || syncing(&a, &b)).await;
    let from_a = create(&a, json!({"first_name": "Quinn"})).await;
    let from_b = create(&b, json!({"first_name": "Udo"})).await;
    wait_until("A's write at B", || has(&b, &from_a)).await;
    wait_until("B's write at A", || has(&a, &from_b)).await;
    // The allow-list holds on QUIC as on TCP. (QUIC completes its TLS
    // handshake before A's allow-list closes the connection, so the
    // intruder may count itself connected for a moment.)
    let intruder = spawn_node_with(quic()).await;
    intruder_kept_out(&a, &b, &intruder).await;
    stop_all(vec![a, b, intruder]).await;
}

/// Waits until `dialer` has dialed `target` (and failed) three times.
async fn dialed_several_times(dialer: &TestNode, target: &TestNode) {
    wait_until("several failed dials", || async {
        dialer
            .h
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer_id == target.peer.to_string() && p.dial_attempts >= 3)
    })
    .await;
}

/// `dialer` keeps failing to connect to `target`.
async fn shut_out(dialer: &TestNode, target: &TestNode) {
    dialed_several_times(dialer, target).await;
    assert!(!connected(dialer, target).await);
    assert!(!connected(target, dialer).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_key_keeps_out_nodes_without_it() {
    let keys = tempfile::tempdir().unwrap();
    let (ours, theirs) = (keys.path().join("ours.key"), keys.path().join("theirs.key"));
    new_cluster_key(&ours).unwrap();
    new_cluster_key(&theirs).unwrap();
    let keyed = |path: &std::path::Path| Config {
        cluster_key_file: Some(path.to_path_buf()),
        ..test_config()
    };
    let a = spawn_node_with(keyed(&ours)).await;
    let b = spawn_node_with(keyed(&ours)).await;
    let other_key = spawn_node_with(keyed(&theirs)).await;
    let no_key = spawn_node().await;
    link(&b, &a).await;
    wait_until("A and B (same key) syncing", || syncing(&a, &b)).await;
    let from_b = create(&b, json!({"first_name": "Keyed"})).await;
    wait_until("B's write at A", || has(&a, &from_b)).await;

    // Both allow-list each other: only the key stands between them.
    for outsider in [&other_key, &no_key] {
        link(outsider, &a).await;
        let secret = create(outsider, json!({"first_name": "Outsider"})).await;
        shut_out(outsider, &a).await;
        assert!(!has(&a, &secret).await, "an outsider's record reached A");
    }
    // A QUIC address would bypass the key: refused, as in the config.
    let quic: Multiaddr = format!("/ip4/127.0.0.1/udp/9/quic-v1/p2p/{}", no_key.peer)
        .parse()
        .unwrap();
    let refused = a.h.add_peer(no_key.peer, Some(quic)).await.unwrap_err();
    assert_eq!(refused.code(), "CONFIG_ERROR", "{refused}");
    assert!(
        refused
            .to_string()
            .contains("QUIC cannot carry the cluster key")
    );
    // A, keyed, cannot reach the node without a key either.
    a.h.add_peer(no_key.peer, Some(no_key.addr.clone()))
        .await
        .unwrap();
    shut_out(&a, &no_key).await;
    // And A kept replicating with B all along.
    let later = create(&b, json!({"first_name": "Later"})).await;
    wait_until("B's later write at A", || has(&a, &later)).await;
    stop_all(vec![a, b, other_key, no_key]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_bytes_on_the_listen_port_harm_nothing() {
    use tokio::io::AsyncWriteExt;
    let (a, b) = (spawn_node().await, spawn_node().await);
    link(&b, &a).await;
    wait_until("A and B syncing", || syncing(&a, &b)).await;
    let before = create(&a, json!({"first_name": "Before"})).await;
    wait_until("A's write at B", || has(&b, &before)).await;

    let port = a
        .addr
        .iter()
        .find_map(|p| match p {
            entente_node::libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    // A deterministic byte soup: pure noise, a valid multistream header
    // followed by noise, and a megabyte of it.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let mut header = b"\x13/multistream/1.0.0\n".to_vec();
    header.extend(noise(4096));
    for payload in [noise(64), header, noise(1 << 20), Vec::new()] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        // The node may hang up mid-write; that is its right.
        let _ = s.write_all(&payload).await;
        let _ = s.shutdown().await;
    }

    let after_b = create(&b, json!({"first_name": "AfterB"})).await;
    let after_a = create(&a, json!({"first_name": "AfterA"})).await;
    wait_until("B's write at A", || has(&a, &after_b)).await;
    wait_until("A's write at B", || has(&b, &after_a)).await;
    assert!(has(&a, &before).await);
    assert_eq!(a.h.status().await.unwrap().records_rejected, 0);
    stop_all(vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_allowed_peer_sending_garbage_frames_is_disconnected() {
    use entente_node::libp2p::futures::StreamExt;
    use entente_node::libp2p::identity::Keypair;
    use entente_node::libp2p::request_response;
    use entente_node::libp2p::swarm::SwarmEvent;
    use entente_node::net::{self, BehaviourEvent};

    let (a, b) = (spawn_node().await, spawn_node().await);
    link(&b, &a).await;
    wait_until("A and B syncing", || syncing(&a, &b)).await;

    // A rogue node A does allow, speaking the replication protocol, answering
    // A's frames properly, and sending one frame that is not a message.
    let key = Keypair::generate_ed25519();
    a.h.add_peer(key.public().to_peer_id(), None).await.unwrap();
    let mut rogue = net::build_swarm(key, &test_config()).unwrap();
    rogue.behaviour_mut().allowed.allow_peer(a.peer);
    rogue.dial(a.addr.clone()).unwrap();
    let outcome = tokio::time::timeout(PATIENCE, async {
        let mut sent = false;
        loop {
            match rogue.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == a.peer => {
                    let garbage = net::seal(0, b"\xff not a sync message");
                    rogue.behaviour_mut().repl.send_request(&a.peer, garbage);
                    sent = true;
                }
                SwarmEvent::Behaviour(BehaviourEvent::Repl(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. },
                    ..
                })) => {
                    let _ = rogue.behaviour_mut().repl.send_response(channel, ());
                }
                SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == a.peer => {
                    return sent;
                }
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(outcome, Ok(true), "A did not close the rogue's connection");

    // A carries on with its data intact.
    let after = create(&b, json!({"first_name": "After"})).await;
    wait_until("B's write at A", || has(&a, &after)).await;
    assert!(syncing(&a, &b).await);
    stop_all(vec![a, b]).await;
}
