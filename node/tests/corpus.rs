//! The automerge 0.12 regression corpus (`tests/fuzz/automerge-0.12/`,
//! see its README): every input still breaks automerge on its own, and none
//! of them gets past any peer-facing entry point of ours.
//!
//! The two allocation bombs abort a process, so they are replayed only in a
//! child process (this test binary, re-run) under a virtual-memory limit
//! (`ulimit -v` in `sh -c`): one child shows automerge's own call aborting
//! there, another feeds the bomb to our entry points and must exit cleanly.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use entente_model::{NodeId, RecordId, Schema};
use entente_node::sync::{Message, Output, PROTOCOL_VERSION, SyncConfig, SyncEngine};
use entente_node::{ManualClock, Store, StoreOptions};
use serde_json::json;

const PEER: NodeId = NodeId([2; 16]);
/// Set in a bomb child: `automerge:FILE` or `entente:FILE`.
const BOMB_ENV: &str = "ENTENTE_BOMB_CHILD";
/// The children's virtual-memory limit (KiB): far below the 4 GiB the bombs
/// ask for, far above what the child needs otherwise.
const CHILD_VMEM_KIB: u64 = 1 << 20;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/automerge-0.12")
}

/// (file name, bytes) of every input, bombs included, in name order.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir())
        .expect("corpus dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read input"))
        })
        .collect();
    v.sort();
    v
}

fn is_bomb(name: &str) -> bool {
    name.starts_with("ALLOCATION-BOMB-")
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::default_crm())
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000, 3))
}

fn rid(n: u32) -> RecordId {
    RecordId::parse(&format!("0190a000-0000-7000-8000-{n:012}")).unwrap()
}

/// What automerge itself does with an input: `Ok(())` means it coped.
fn automerge_direct(name: &str, bytes: &[u8]) -> Result<(), String> {
    use automerge::sync::SyncDoc;
    let b = bytes.to_vec();
    let r = catch_unwind(AssertUnwindSafe(move || -> Result<(), String> {
        if name.contains("load-") {
            automerge::Automerge::load(&b).map_err(|e| format!("error: {e}"))?;
        } else if name.contains("syncmsg-") {
            let m = automerge::sync::Message::decode(&b).map_err(|e| format!("error: {e}"))?;
            let mut doc = automerge::Automerge::new();
            let mut state = automerge::sync::State::new();
            doc.receive_sync_message(&mut state, m)
                .map_err(|e| format!("error: {e}"))?;
        } else {
            let c = automerge::Change::from_bytes(b).map_err(|e| format!("error: {e}"))?;
            let mut doc = automerge::Automerge::new();
            doc.apply_changes([c]).map_err(|e| format!("error: {e}"))?;
            automerge::Automerge::load(&doc.save())
                .map_err(|e| format!("accepted, but save() no longer loads: {e}"))?;
        }
        Ok(())
    }));
    match r {
        Ok(x) => x,
        Err(_) => Err("panicked".into()),
    }
}

#[test]
fn every_input_still_breaks_automerge() {
    let mut checked = 0;
    for (name, bytes) in corpus().into_iter().filter(|(n, _)| !is_bomb(n)) {
        let r = automerge_direct(&name, &bytes);
        if name.starts_with("change-") {
            let e = r.expect_err(&name);
            assert!(e.contains("save() no longer loads"), "{name}: {e}");
        } else {
            assert_eq!(r, Err("panicked".into()), "{name}");
        }
        checked += 1;
    }
    assert_eq!(checked, 18);
}

/// An engine with a handshake done and a fetch of `id` in flight.
fn engine_fetching(store: &mut Store, id: &RecordId) -> SyncEngine<u8> {
    let mut e = SyncEngine::new(store, SyncConfig::default()).unwrap();
    e.peer_connected(9);
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: PEER,
        schema_fingerprint: store.schema().fingerprint().to_string(),
        collections: Vec::new(),
    };
    let o = e.handle_message(&9, &hello.encode().unwrap(), store);
    assert!(
        matches!(
            &o[..],
            [Output::Send {
                msg: Message::PullRequest { .. },
                ..
            }]
        ),
        "{o:?}"
    );
    let page = Message::PullResponse {
        entries: vec![(id.clone(), vec![[7; 32]])],
        next_since: 1,
        more: false,
    };
    let o = e.handle_message(&9, &page.encode().unwrap(), store);
    assert!(
        matches!(
            &o[..],
            [Output::Send {
                msg: Message::FetchRequest { .. },
                ..
            }]
        ),
        "{o:?}"
    );
    e
}

/// Feeds one input to every peer-facing entry point of `store` and asserts
/// each refuses it. Returns how many quarantine entries it should have made.
fn refuse_everywhere(store: &mut Store, name: &str, bytes: &[u8], known: &RecordId) -> u64 {
    let fresh = rid(1000);
    // As a change of a new record and of an existing one.
    for id in [&fresh, known] {
        let before = store.heads(id).unwrap();
        let r = store
            .apply_remote_from(Some(PEER), vec![(id.clone(), vec![bytes.to_vec()])])
            .unwrap_or_else(|e| panic!("{name}: apply_remote failed instead of refusing: {e}"));
        assert_eq!(r.rejected.len(), 1, "{name}: {r:?}");
        assert_eq!(r.changes_applied, 0, "{name}");
        assert_eq!(store.heads(id).unwrap(), before, "{name}");
    }
    // As a frame, bare and behind a valid version byte.
    assert!(Message::decode(bytes).is_err(), "{name}");
    let mut framed = vec![entente_node::sync::wire::WIRE_VERSION];
    framed.extend_from_slice(bytes);
    assert!(Message::decode(&framed).is_err(), "{name}");
    // Through the engine: as a frame (the session closes) ...
    let mut e = engine_fetching(store, &fresh);
    let o = e.handle_message(&9, bytes, store);
    assert!(
        matches!(&o[..], [Output::Disconnect { .. }]),
        "{name}: {o:?}"
    );
    // ... and as a change inside a well-formed fetch response (refused and
    // quarantined; the session carries on).
    let mut e = engine_fetching(store, &fresh);
    let resp = Message::FetchResponse {
        items: vec![(fresh.clone(), vec![bytes.to_vec()], true)],
    };
    let o = e.handle_message(&9, &resp.encode().unwrap(), store);
    assert!(
        !o.iter().any(|x| matches!(x, Output::Disconnect { .. })),
        "{name}: {o:?}"
    );
    assert_eq!(e.stats().records_rejected, 1, "{name}");
    assert!(store.heads(&fresh).unwrap().is_empty(), "{name}");
    3
}

fn seeded(store: &mut Store) -> (RecordId, RecordId) {
    let f = json!({"email": "local@x.org", "city": "Bern"});
    let local = store
        .create("contacts", None, f.as_object().unwrap(), false)
        .unwrap()
        .record
        .id;
    let mut peer = Store::memory(
        schema(),
        PEER,
        Arc::new(ManualClock::new(1_700_000_000_000, 4)),
    );
    let f = json!({"email": "remote@x.org"});
    let remote = peer
        .create("contacts", None, f.as_object().unwrap(), false)
        .unwrap()
        .record
        .id;
    let changes = peer.changes_for(&remote, &[]).unwrap();
    let r = store
        .apply_remote_from(Some(PEER), vec![(remote.clone(), changes)])
        .unwrap();
    assert_eq!(r.changes_applied, 1);
    (local, remote)
}

#[test]
fn no_input_gets_past_any_entry_point() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let open = || {
        Store::open(
            &db,
            schema(),
            NodeId([1; 16]),
            clock(),
            StoreOptions {
                sync: false,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let mut store = open();
    let (local, remote) = seeded(&mut store);
    let heads = (store.heads(&local).unwrap(), store.heads(&remote).unwrap());
    let mut quarantined = 0;
    let mut inputs = 0;
    for (name, bytes) in corpus().into_iter().filter(|(n, _)| !is_bomb(n)) {
        quarantined += refuse_everywhere(&mut store, &name, &bytes, &remote);
        inputs += 1;
    }
    assert_eq!(inputs, 18);
    let stats = store.stats().unwrap();
    assert_eq!(stats.records, 2, "{stats:?}");
    assert!(stats.quarantined > 0 && stats.quarantined <= quarantined);
    assert_eq!(stats.pending_changes, 0);
    drop(store);
    // Consistent and reopenable: both records load from storage, unchanged,
    // and their saved documents load in Automerge.
    let mut store = open();
    assert_eq!(
        (store.heads(&local).unwrap(), store.heads(&remote).unwrap()),
        heads
    );
    for id in [&local, &remote] {
        assert!(store.get(id).unwrap().is_some());
        automerge::Automerge::load(&store.raw_document(id).unwrap()).unwrap();
    }
    assert_eq!(
        store.quarantine().unwrap().len() as u64,
        store.stats().unwrap().quarantined
    );
}

/// A bomb child. Run only by `allocation_bombs_are_contained_under_a_memory_limit`.
#[test]
#[ignore = "child process of allocation_bombs_are_contained_under_a_memory_limit"]
fn bomb_child() {
    let Ok(spec) = std::env::var(BOMB_ENV) else {
        return;
    };
    let (mode, file) = spec.split_once(':').expect("MODE:FILE");
    let bytes = std::fs::read(corpus_dir().join(file)).expect("bomb");
    match mode {
        "automerge" => {
            let r = automerge_direct(file, &bytes);
            println!("AUTOMERGE-COPED {r:?}");
        }
        "entente" => {
            let mut store = Store::memory(schema(), NodeId([1; 16]), clock());
            let (_, remote) = seeded(&mut store);
            refuse_everywhere(&mut store, file, &bytes, &remote);
            assert_eq!(store.stats().unwrap().records, 2);
            println!("ENTENTE-CONTAINED {file}");
        }
        other => panic!("unknown mode {other}"),
    }
}

fn run_bomb_child(mode: &str, file: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {CHILD_VMEM_KIB} && exec \"$0\" \"$@\""))
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "bomb_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(BOMB_ENV, format!("{mode}:{file}"))
        .output()
        .expect("child runs")
}

#[test]
fn allocation_bombs_are_contained_under_a_memory_limit() {
    let bombs: Vec<String> = corpus()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| is_bomb(n))
        .collect();
    assert_eq!(bombs.len(), 2);
    for file in &bombs {
        // Teeth: automerge's own call dies under the limit.
        let out = run_bomb_child("automerge", file);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !stdout.contains("AUTOMERGE-COPED"),
            "{file}: automerge coped with the bomb: {stdout}"
        );
        assert!(
            stderr.contains("memory allocation"),
            "{file}: the child died, but not of the allocation: {:?}\n{stderr}",
            out.status
        );
        // Our entry points refuse it under the same limit.
        let out = run_bomb_child("entente", file);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("ENTENTE-CONTAINED {file}")),
            "{file}: {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
