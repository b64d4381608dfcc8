//! Crash containment: a remote batch that kills the process costs one
//! restart (containment (c) of issue #4), and compaction keeps a record's
//! chunks when its new snapshot does not load (containment (d)).
//!
//! The crash is real: the test re-runs its own binary as a child process
//! whose store aborts (`std::process::abort`, which no `catch_unwind` can
//! stop) inside `apply_remote`, through a test-only fault hook, then reopens
//! the data dir the child left behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use entente_model::{NodeId, RecordId, Schema};
use entente_node::store::TestFault;
use entente_node::{ManualClock, Store, StoreOptions};
use serde_json::{Value, json};

/// Set in the child: the data dir whose store dies inside an apply.
const CHILD_DIR_ENV: &str = "ENTENTE_CONTAINMENT_CHILD_DIR";
const PEER: NodeId = NodeId([2; 16]);

fn schema() -> Arc<Schema> {
    Arc::new(Schema::default_crm())
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000, 7))
}

/// The peer's clock: another seed, so it mints other record ids.
fn peer_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000, 8))
}

fn open(path: &Path, opts: StoreOptions) -> Store {
    Store::open(path, schema(), NodeId([1; 16]), clock(), opts).expect("store opens")
}

fn fields(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().expect("object").clone()
}

/// Records made at the peer, as the raw changes a fetch would carry.
fn peer_batch(peer: &mut Store, emails: &[&str]) -> Vec<(RecordId, Vec<Vec<u8>>)> {
    emails
        .iter()
        .map(|e| {
            let id = peer
                .create("contacts", None, &fields(json!({"email": e})), false)
                .expect("create")
                .record
                .id;
            let changes = peer.changes_for(&id, &[]).expect("changes");
            (id, changes)
        })
        .collect()
}

fn batch_file(dir: &Path) -> PathBuf {
    dir.join("batch.json")
}

/// The child: opens the store with the abort fault and applies the batch.
/// Run only as a child process of
/// `a_batch_that_kills_the_process_twice_is_quarantined`.
#[test]
#[ignore = "child process of a_batch_that_kills_the_process_twice_is_quarantined"]
fn child_dies_inside_an_apply() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let batch: Vec<(RecordId, Vec<Vec<u8>>)> =
        serde_json::from_slice(&std::fs::read(batch_file(&dir)).expect("batch file"))
            .expect("batch");
    let mut store = open(
        &dir.join("db"),
        StoreOptions {
            fault: Some(TestFault::AbortInApply),
            ..Default::default()
        },
    );
    let _ = store.apply_remote_from(Some(PEER), batch);
    panic!("the fault hook did not abort the process");
}

/// Runs the child that dies inside the apply of the batch in `dir`.
fn die_in_child(dir: &Path) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_dies_inside_an_apply",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .output()
        .expect("child runs");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(6),
            "the child must die of SIGABRT: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_batch_that_kills_the_process_twice_is_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let mut peer = Store::memory(schema(), PEER, peer_clock());
    let good_remote = peer_batch(&mut peer, &["remote@x.org"]);
    let poison = peer_batch(&mut peer, &["p1@x.org", "p2@x.org", "p3@x.org"]);
    let later = peer_batch(&mut peer, &["later@x.org"]);
    let (local, good_id) = {
        let mut store = open(&db, StoreOptions::default());
        let local = store
            .create(
                "contacts",
                None,
                &fields(json!({"email": "local@x.org"})),
                false,
            )
            .unwrap()
            .record
            .id;
        let r = store
            .apply_remote_from(Some(PEER), good_remote.clone())
            .unwrap();
        assert_eq!(r.changes_applied, 1);
        (local, good_remote[0].0.clone())
    };
    std::fs::write(batch_file(tmp.path()), serde_json::to_vec(&poison).unwrap()).unwrap();

    // The first death may have been a kill -9: nothing is quarantined, the
    // batch is only suspect and is retried (here it kills the process again).
    die_in_child(tmp.path());
    {
        let store = open(&db, StoreOptions::default());
        assert_eq!(store.stats().unwrap().quarantined, 0);
        assert_eq!(store.stats().unwrap().records, 2);
    }
    die_in_child(tmp.path());

    // Second death on the same changes: a quarantine entry per record.
    let mut store = open(&db, StoreOptions::default());
    let stats = store.stats().unwrap();
    assert_eq!(stats.quarantined, 3, "{stats:?}");
    let q = store.quarantine().unwrap();
    let mut named: Vec<String> = q.iter().map(|e| e.record.clone()).collect();
    named.sort();
    let mut expected: Vec<String> = poison.iter().map(|(id, _)| id.to_string()).collect();
    expected.sort();
    assert_eq!(named, expected);
    for e in &q {
        assert_eq!(e.peer.as_deref(), Some(PEER.to_string().as_str()));
        assert_eq!(e.changes.len(), 1, "{e:?}");
        assert!(e.reason.contains("twice"), "{e:?}");
    }
    // The good data is intact, the poison batch was not applied.
    assert!(store.get(&local).unwrap().is_some());
    assert!(store.get(&good_id).unwrap().is_some());
    for (id, _) in &poison {
        assert!(store.get(id).unwrap().is_none());
    }
    assert_eq!(stats.records, 2);

    // The peer sends the same changes again (with a new record beside them):
    // the poison is refused without reaching Automerge, the rest applies.
    let mut again = poison.clone();
    again.extend(later.clone());
    let r = store.apply_remote_from(Some(PEER), again).unwrap();
    assert_eq!(r.rejected.len(), 3, "{r:?}");
    assert_eq!(r.changes_applied, 1, "{r:?}");
    for (id, _) in &poison {
        assert!(store.get(id).unwrap().is_none());
    }
    assert!(store.get(&later[0].0).unwrap().is_some());
    drop(store);

    // Second restart: nothing new is quarantined (the note was cleared), and
    // the refusal holds across restarts.
    let mut store = open(&db, StoreOptions::default());
    assert_eq!(store.stats().unwrap().quarantined, 3);
    assert_eq!(store.stats().unwrap().records, 3);
    let r = store.apply_remote(poison.clone()).unwrap();
    assert_eq!(r.rejected.len(), 3);
    assert_eq!(r.changes_applied, 0);

    // The operator releases one record: only its changes are accepted
    // again (this process does not die on them), the others stay refused.
    let (released, _) = &poison[0];
    assert_eq!(store.release_quarantine(released).unwrap(), 1);
    assert_eq!(store.release_quarantine(released).unwrap(), 0);
    assert_eq!(store.stats().unwrap().quarantined, 2);
    let r = store.apply_remote(poison.clone()).unwrap();
    assert_eq!(r.rejected.len(), 2, "{r:?}");
    assert_eq!(r.changes_applied, 1, "{r:?}");
    assert!(store.get(released).unwrap().is_some());
    for (id, _) in &poison[1..] {
        assert!(store.get(id).unwrap().is_none());
    }
    drop(store);
    // The release is durable.
    let mut store = open(&db, StoreOptions::default());
    assert_eq!(store.stats().unwrap().quarantined, 2);
    assert!(store.get(released).unwrap().is_some());
}

#[test]
fn a_failed_apply_leaves_no_note_behind() {
    // A batch refused for its contents (not a crash) must not be quarantined
    // again as a crash batch on the next open.
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let mut peer = Store::memory(schema(), PEER, peer_clock());
    let mut batch = peer_batch(&mut peer, &["a@x.org"]);
    batch[0].1[0][20] ^= 0xff; // checksum no longer matches
    {
        let mut store = open(&db, StoreOptions::default());
        let r = store.apply_remote_from(Some(PEER), batch.clone()).unwrap();
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(store.stats().unwrap().quarantined, 1);
    }
    let store = open(&db, StoreOptions::default());
    let q = store.quarantine().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(q[0].changes.is_empty(), "not a crash entry: {q:?}");
}

#[test]
fn compaction_keeps_the_chunks_when_the_snapshot_does_not_load() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let opts = |fault| StoreOptions {
        compact_after_chunks: 3,
        sync: false,
        fault,
        ..Default::default()
    };
    let mut store = open(&db, opts(Some(TestFault::SnapshotDoesNotLoad)));
    let id = store
        .create(
            "contacts",
            None,
            &fields(json!({"email": "c@x.org"})),
            false,
        )
        .unwrap()
        .record
        .id;
    for i in 0..8 {
        store
            .update(&id, &fields(json!({"city": format!("c{i}")})), None, false)
            .unwrap();
    }
    let q = store.quarantine().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].record, id.to_string());
    assert!(q[0].reason.contains("chunks kept"), "{q:?}");
    // Every edit is still there, loaded from the old snapshot and the chunks.
    store.clear_cache();
    let v = store.get(&id).unwrap().unwrap();
    assert_eq!(v.fields["city"], "c7");
    assert_eq!(store.history(&id).unwrap().len(), 9);
    let heads = store.heads(&id).unwrap();
    drop(store);
    let mut store = open(&db, opts(None));
    assert_eq!(store.heads(&id).unwrap(), heads);
    assert_eq!(store.history(&id).unwrap().len(), 9);

    store
        .update(&id, &fields(json!({"city": "x"})), None, false)
        .unwrap();

    // Control: the same edits without the fault compact without a report.
    let mut store2 = open(&tmp.path().join("db2"), opts(None));
    let id2 = store2
        .create(
            "contacts",
            None,
            &fields(json!({"email": "d@x.org"})),
            false,
        )
        .unwrap()
        .record
        .id;
    for i in 0..8 {
        store2
            .update(&id2, &fields(json!({"city": format!("c{i}")})), None, false)
            .unwrap();
    }
    assert!(store2.quarantine().unwrap().is_empty());
}

#[test]
fn a_record_split_over_a_batch_is_applied_as_one_group() {
    // One record's changes in several entries of one batch (as a fetch that
    // arrives in prefixes could give them): grouped and applied once, one
    // feed entry, one record changed.
    let mut peer = Store::memory(schema(), PEER, peer_clock());
    let id = peer
        .create(
            "contacts",
            None,
            &fields(json!({"email": "g@x.org"})),
            false,
        )
        .unwrap()
        .record
        .id;
    for i in 0..4 {
        peer.update(&id, &fields(json!({"city": format!("c{i}")})), None, false)
            .unwrap();
    }
    let changes = peer.changes_for(&id, &[]).unwrap();
    assert_eq!(changes.len(), 5);
    let batch: Vec<(RecordId, Vec<Vec<u8>>)> = changes
        .into_iter()
        .rev()
        .map(|c| (id.clone(), vec![c]))
        .collect();
    let mut store = Store::memory(schema(), NodeId([1; 16]), clock());
    let seq = store.feed_seq();
    let r = store.apply_remote_from(Some(PEER), batch).unwrap();
    assert_eq!(
        (r.records_changed, r.changes_applied, r.changes_pending),
        (1, 5, 0)
    );
    assert_eq!(store.feed_seq(), seq + 1);
    assert_eq!(store.heads(&id).unwrap(), peer.heads(&id).unwrap());
}
