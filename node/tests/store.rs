//! Integration tests of the store: persistence across reopen, atomic batches,
//! the consolidated feed, the unique index, validation, edits based on older
//! heads, remote changes (out of order, pending, malformed), large remote
//! batches written in the background, compaction, and a property test that
//! any sequence of operations survives a reopen.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use entente_model::{Collision, CollisionKind, ModelError, NodeId, RecordId, Schema, Status};
use entente_node::store::{Cf, Kv, MemKv, RocksKv, TestFault};
use entente_node::{
    ApplyReport, CollisionFilter, Error, FeedEntry, ManualClock, NewRecord, RecordView, Store,
    StoreOptions, StoreStats,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------
// Helpers.

fn schema() -> Arc<Schema> {
    Arc::new(Schema::default_crm())
}

fn nid(b: u8) -> NodeId {
    NodeId([b; 16])
}

fn clock(seed: u64) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000, seed))
}

fn fast() -> StoreOptions {
    StoreOptions {
        sync: false,
        ..Default::default()
    }
}

fn f(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn rid(n: u32) -> RecordId {
    RecordId::parse(&format!("0190a000-0000-7000-8000-{n:012}")).expect("valid id")
}

fn open(path: &Path, node: NodeId, clock: &Arc<ManualClock>, opts: StoreOptions) -> Store {
    Store::open(path, schema(), node, clock.clone(), opts).expect("store opens")
}

fn mem(node: NodeId, clock: &Arc<ManualClock>) -> (Arc<MemKv>, Store) {
    let kv = Arc::new(MemKv::new());
    let store =
        Store::with_kv(kv.clone(), schema(), node, clock.clone(), fast()).expect("store opens");
    (kv, store)
}

fn create(store: &mut Store, collection: &str, fields: Value) -> RecordId {
    store
        .create(collection, None, &f(fields), false)
        .expect("create accepted")
        .record
        .id
}

/// `n` contacts `P0`, `P1`, … with e-mails `{prefix}0@x.org`, ….
fn contacts(store: &mut Store, n: usize, prefix: &str) -> Vec<RecordId> {
    (0..n)
        .map(|i| {
            create(
                store,
                "contacts",
                json!({"first_name": format!("P{i}"), "email": format!("{prefix}{i}@x.org")}),
            )
        })
        .collect()
}

fn view(store: &mut Store, id: &RecordId) -> RecordView {
    store.get(id).expect("get").expect("record exists")
}

fn all_collisions(store: &Store) -> Vec<Collision> {
    store
        .collisions(&CollisionFilter {
            include_resolved: true,
            ..Default::default()
        })
        .expect("collisions")
}

/// Everything a user can observe about a store.
#[derive(Debug, Clone, PartialEq)]
struct State {
    node: NodeId,
    feed_seq: u64,
    records: Vec<RecordView>,
    feed: Vec<FeedEntry>,
    stats: StoreStats,
    collisions: Vec<Collision>,
}

fn state(store: &mut Store) -> State {
    let mut records = Vec::new();
    let names: Vec<String> = store.schema().collections().keys().cloned().collect();
    for c in names {
        let mut after: Option<RecordId> = None;
        loop {
            let page = store.list(&c, after.as_ref(), 7, true).expect("list");
            records.extend(page.records);
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
    State {
        node: store.node_id(),
        feed_seq: store.feed_seq(),
        feed: store.changes_since(0, usize::MAX).expect("feed"),
        stats: store.stats().expect("stats"),
        collisions: all_collisions(store),
        records,
    }
}

/// Consistency every store state must have: one feed entry per record, at the
/// record's sequence and heads; counts that match the records.
fn check_invariants(s: &State) {
    assert_eq!(s.feed.len(), s.records.len(), "one feed entry per record");
    assert_eq!(s.stats.records, s.records.len() as u64);
    assert_eq!(
        s.stats.live_records,
        s.records.iter().filter(|r| !r.deleted).count() as u64
    );
    assert_eq!(s.stats.feed_seq, s.feed_seq);
    let mut last = 0;
    for e in &s.feed {
        assert!(e.seq > last, "feed strictly ordered");
        assert!(e.seq <= s.feed_seq, "feed entry beyond the sequence");
        last = e.seq;
        let r = s
            .records
            .iter()
            .find(|r| r.id == e.id)
            .expect("feed names a record");
        assert_eq!(r.seq, e.seq);
        assert_eq!(r.heads, e.heads);
        assert_eq!(r.deleted, e.deleted);
        assert_eq!(r.collection, e.collection);
    }
    let open = s.collisions.iter().filter(|c| c.is_open()).count() as u64;
    assert_eq!(s.stats.open_collisions.values().sum::<u64>(), open);
    assert_eq!(
        s.stats.resolved_collisions,
        s.collisions.len() as u64 - open
    );
    for r in &s.records {
        let mut expected: Vec<_> = s
            .collisions
            .iter()
            .filter(|c| c.is_open() && c.records.contains(&r.id))
            .map(|c| c.id.clone())
            .collect();
        expected.sort();
        let mut got = r.open_collisions.clone();
        got.sort();
        assert_eq!(got, expected, "open collisions of {}", r.id);
    }
}

fn one(name: impl Into<String>, v: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(name.into(), v);
    m
}

fn code(e: &Error) -> String {
    e.code()
}

// ---------------------------------------------------------------------------
// 1. Round trip across close and reopen.

#[test]
fn round_trip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let ck = clock(1);
    let mut store = open(&path, nid(1), &ck, fast());

    let mut ids = Vec::new();
    for i in 0..6 {
        ck.advance(10);
        ids.push(create(
            &mut store,
            "contacts",
            json!({"first_name": format!("Person {i}"), "email": format!("p{i}@example.org"),
                   "city": "Berlin", "credit_limit": "100.50", "do_not_email": i % 2 == 0,
                   "birth_date": "1980-01-02"}),
        ));
    }
    let addr = create(
        &mut store,
        "addresses",
        json!({"contact_id": ids[0].as_str(), "city": "Bonn"}),
    );
    ck.advance(10);
    store
        .update(
            &ids[1],
            &f(json!({"city": "Hamburg", "phone": "+49 1", "first_name": null})),
            None,
            false,
        )
        .unwrap();
    store
        .update(&ids[2], &f(json!({"notes": "likes tea"})), None, false)
        .unwrap();
    ck.advance(10);
    store.delete(&ids[3]).unwrap();
    store.delete(&ids[4]).unwrap();
    ck.advance(10);
    store
        .restore(&ids[4], &f(json!({"city": "Köln"})), false)
        .unwrap();
    // A forced duplicate leaves a resolved collision to carry over too.
    store
        .create(
            "contacts",
            None,
            &f(json!({"email": "P0@Example.org"})),
            true,
        )
        .unwrap();

    let before = state(&mut store);
    check_invariants(&before);
    assert_eq!(before.records.len(), 8);
    assert_eq!(before.stats.live_records, 7);
    assert_eq!(before.stats.resolved_collisions, 1);
    assert!(view(&mut store, &ids[3]).deleted);
    assert!(!view(&mut store, &ids[4]).deleted);
    assert_eq!(view(&mut store, &ids[4]).fields["city"], json!("Köln"));
    assert!(!view(&mut store, &ids[1]).fields.contains_key("first_name"));
    let seq = store.feed_seq();
    assert!(seq > 0);
    drop(store);

    // Reopened with another node id: the data dir keeps its identity.
    let mut store = open(&path, nid(7), &ck, fast());
    assert_eq!(store.node_id(), nid(1));
    assert_eq!(store.feed_seq(), seq);
    let after = state(&mut store);
    assert_eq!(after, before);
    assert_eq!(
        view(&mut store, &addr).fields["contact_id"],
        json!(ids[0].as_str())
    );

    // The sequence continues where it was.
    ck.advance(10);
    let w = store
        .update(&ids[0], &f(json!({"city": "Munich"})), None, false)
        .unwrap();
    assert_eq!(w.record.seq, seq + 1);
    assert_eq!(store.feed_seq(), seq + 1);
    // A write after reopen is made by the data dir's node.
    assert_eq!(w.record.updated_by, Some(nid(1)));
    let st = state(&mut store);
    check_invariants(&st);
    drop(store);

    // Another schema is refused.
    let other = Arc::new(
        Schema::from_toml("[collections.things]\nfields.name = { type = \"string\" }\n").unwrap(),
    );
    let err = Store::open(&path, other, nid(1), ck.clone(), fast()).unwrap_err();
    assert!(matches!(err, Error::SchemaMismatch { .. }), "got {err:?}");
    assert_eq!(code(&err), "SCHEMA_MISMATCH");

    // The refused open changed nothing.
    let mut store = open(&path, nid(1), &ck, fast());
    assert_eq!(state(&mut store), st);
}

// ---------------------------------------------------------------------------
// 2. Atomicity.

#[test]
fn failed_write_leaves_nothing() {
    let ck = clock(2);
    let (kv, mut store) = mem(nid(1), &ck);
    let first = create(&mut store, "contacts", json!({"email": "first@x.org"}));
    let before = state(&mut store);
    let seq = store.feed_seq();

    let batch = vec![
        NewRecord {
            collection: "contacts".into(),
            id: Some(rid(1)),
            fields: f(json!({"email": "new@x.org", "member_key": "M-1"})),
            force: false,
        },
        NewRecord {
            collection: "contacts".into(),
            id: Some(rid(2)),
            fields: f(json!({"user_name": "bob"})),
            force: false,
        },
        NewRecord {
            collection: "phones".into(),
            id: Some(rid(3)),
            fields: f(json!({"contact_id": rid(1).as_str(), "number": "123"})),
            force: false,
        },
    ];
    kv.fail_next_write();
    let err = store.create_many(batch.clone()).unwrap_err();
    assert!(matches!(err, Error::Storage(_)), "got {err:?}");
    assert_eq!(store.feed_seq(), seq);
    for i in 1..=3 {
        assert!(store.get(&rid(i)).unwrap().is_none());
    }
    assert_eq!(state(&mut store), before);

    // Nothing of the failed batch lingers: the same batch is accepted now,
    // numbered right after what was there.
    let out = store.create_many(batch).unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(
        out.iter().map(|w| w.record.seq).collect::<Vec<_>>(),
        vec![seq + 1, seq + 2, seq + 3]
    );
    check_invariants(&state(&mut store));

    // A failed update, delete and restore leave the record as it was (also
    // in the cache).
    let before = state(&mut store);
    kv.fail_next_write();
    assert!(
        store
            .update(&first, &f(json!({"city": "Rome"})), None, false)
            .is_err()
    );
    kv.fail_next_write();
    assert!(store.delete(&first).is_err());
    assert_eq!(state(&mut store), before);
    store.clear_cache();
    assert_eq!(state(&mut store), before);
    store.delete(&first).unwrap();
    let before = state(&mut store);
    kv.fail_next_write();
    assert!(store.restore(&first, &f(json!({})), false).is_err());
    assert_eq!(state(&mut store), before);
    assert!(view(&mut store, &first).deleted);
    // And the failed restore did not claim the e-mail.
    create(&mut store, "contacts", json!({"email": "first@x.org"}));
}

#[test]
fn refused_batch_writes_none() {
    let ck = clock(3);
    let (_kv, mut store) = mem(nid(1), &ck);
    create(&mut store, "contacts", json!({"email": "holder@x.org"}));
    let before = state(&mut store);

    let item = |n: u32, fields: Value| NewRecord {
        collection: "contacts".into(),
        id: Some(rid(n)),
        fields: f(fields),
        force: false,
    };
    let good = || {
        vec![
            item(1, json!({"email": "one@x.org"})),
            item(2, json!({"email": "two@x.org", "member_key": "K2"})),
            item(4, json!({"email": "four@x.org"})),
            item(5, json!({"user_name": "five"})),
        ]
    };
    let with_third = |third: NewRecord| {
        let mut b = good();
        b.insert(2, third);
        b
    };

    let refusals = [
        // Duplicate of an item earlier in the same batch (normalized).
        (item(3, json!({"email": "  ONE@x.org "})), "DUPLICATE_EMAIL"),
        // Duplicate of a stored record.
        (item(3, json!({"email": "Holder@X.org"})), "DUPLICATE_EMAIL"),
        (item(3, json!({"member_key": "K2"})), "DUPLICATE_MEMBER_KEY"),
        (item(3, json!({"nickname": "x"})), "UNKNOWN_FIELD"),
        (item(3, json!({"do_not_email": "yes"})), "WRONG_TYPE"),
        // The same id twice.
        (item(1, json!({"city": "x"})), "ALREADY_EXISTS"),
    ];
    for (third, expected) in refusals {
        let err = store.create_many(with_third(third)).unwrap_err();
        assert_eq!(code(&err), expected, "{err}");
        for n in 1..=5 {
            assert!(
                store.get(&rid(n)).unwrap().is_none(),
                "record {n} written by a refused batch"
            );
        }
        assert_eq!(state(&mut store), before);
    }
    // Nothing was claimed: the four good ones land.
    let out = store.create_many(good()).unwrap();
    assert_eq!(out.len(), 4);
    let s = state(&mut store);
    check_invariants(&s);
    assert_eq!(s.stats.records, 5);
}

// ---------------------------------------------------------------------------
// 3. The consolidated feed.

#[test]
fn feed_is_consolidated_and_scans_ranges() {
    let ck = clock(4);
    let (_kv, mut store) = mem(nid(1), &ck);
    let a = create(&mut store, "contacts", json!({"first_name": "A"}));
    let b = create(&mut store, "contacts", json!({"first_name": "B"}));
    for i in 0..50 {
        ck.advance(1);
        store
            .update(&a, &f(json!({"city": format!("c{i}")})), None, false)
            .unwrap();
    }
    let feed = store.changes_since(0, 1000).unwrap();
    assert_eq!(feed.len(), 2, "{feed:?}");
    assert_eq!(feed[0].id, b);
    assert_eq!(feed[0].seq, 2);
    assert_eq!(feed[1].id, a);
    assert_eq!(feed[1].seq, 52);
    assert_eq!(store.feed_seq(), 52);
    assert_eq!(feed[1].heads, view(&mut store, &a).heads);
    assert!(!feed[1].deleted);

    // A delete moves the record to the end, flagged deleted.
    store.delete(&b).unwrap();
    let feed = store.changes_since(0, 1000).unwrap();
    assert_eq!(
        feed.iter()
            .map(|e| (&e.id, e.seq, e.deleted))
            .collect::<Vec<_>>(),
        vec![(&a, 52, false), (&b, 53, true)]
    );

    // Range scans over many records.
    let mut ids = vec![a.clone(), b.clone()];
    for i in 0..10 {
        ids.push(create(
            &mut store,
            "contacts",
            json!({"first_name": format!("n{i}")}),
        ));
    }
    let all = store.changes_since(0, 1000).unwrap();
    assert_eq!(all.len(), 12);
    for n in [0, 1, 52, 53, 55, 63, 64, 1000] {
        let after = store.changes_since(n, 1000).unwrap();
        let expected: Vec<FeedEntry> = all.iter().filter(|e| e.seq > n).cloned().collect();
        assert_eq!(after, expected, "since {n}");
    }
    assert_eq!(store.changes_since(53, 3).unwrap(), all[2..5].to_vec());
    assert_eq!(store.changes_since(0, 1).unwrap(), all[..1].to_vec());
    assert!(
        store.changes_since(0, 0).unwrap().is_empty(),
        "limit 0 returns nothing"
    );
    assert!(
        store
            .changes_since(store.feed_seq(), 10)
            .unwrap()
            .is_empty()
    );

    // Paging through with the last seen sequence sees every record once.
    let mut since = 0;
    let mut seen = Vec::new();
    loop {
        let page = store.changes_since(since, 5).unwrap();
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        since = last.seq;
        seen.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(seen, all.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
    let mut sorted = seen.clone();
    sorted.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sorted, expected);
}

// ---------------------------------------------------------------------------
// 4. The unique index.

fn expect_duplicate(err: Error, want_code: &str, want_existing: &RecordId) {
    match err {
        Error::Duplicate { code, existing, .. } => {
            assert_eq!(code, want_code);
            assert_eq!(&existing, want_existing);
        }
        other => panic!("expected {want_code}, got {other:?}"),
    }
}

#[test]
fn unique_values_are_enforced() {
    let ck = clock(5);
    let (_kv, mut store) = mem(nid(1), &ck);
    let c1 = create(
        &mut store,
        "contacts",
        json!({"email": "Ann@Example.com", "member_key": "M-1", "user_name": "ann"}),
    );
    let before = state(&mut store);

    let tries = [
        (json!({"email": "  ann@example.COM "}), "DUPLICATE_EMAIL"),
        (json!({"member_key": " M-1 "}), "DUPLICATE_MEMBER_KEY"),
        (json!({"user_name": "ann"}), "DUPLICATE_USER_NAME"),
    ];
    for (fields, want) in &tries {
        let err = store
            .create("contacts", None, &f(fields.clone()), false)
            .unwrap_err();
        expect_duplicate(err, want, &c1);
        assert_eq!(state(&mut store), before);
    }
    // Values that differ after normalization are not duplicates.
    let c2 = create(
        &mut store,
        "contacts",
        json!({"email": "ann@example.org", "member_key": "m-1", "user_name": "Ann"}),
    );

    // An update that would take a held value is refused too, and changes nothing.
    let before = state(&mut store);
    let err = store
        .update(&c2, &f(json!({"email": "ANN@example.com"})), None, false)
        .unwrap_err();
    expect_duplicate(err, "DUPLICATE_EMAIL", &c1);
    assert_eq!(state(&mut store), before);
    // Re-writing the value a record holds itself is not a duplicate.
    store
        .update(&c1, &f(json!({"email": "ann@example.com"})), None, false)
        .unwrap();

    // Deleted records hold no value.
    store.delete(&c1).unwrap();
    let c3 = create(&mut store, "contacts", json!({"email": " ANN@example.com"}));
    // Restoring the deleted holder would duplicate: refused, nothing changes.
    let before = state(&mut store);
    let err = store.restore(&c1, &f(json!({})), false).unwrap_err();
    expect_duplicate(err, "DUPLICATE_EMAIL", &c3);
    assert_eq!(state(&mut store), before);
    assert!(view(&mut store, &c1).deleted);
    // Restoring while changing the value is fine.
    let c1v = store
        .restore(&c1, &f(json!({"email": "ann2@example.com"})), false)
        .unwrap();
    assert!(!c1v.record.deleted);
    store.delete(&c1).unwrap();
    let err = store
        .restore(&c1, &f(json!({"email": "ann@example.com"})), false)
        .unwrap_err();
    expect_duplicate(err, "DUPLICATE_EMAIL", &c3);

    // Forced: accepted, the duplicate is on record and resolved as "force".
    assert!(all_collisions(&store).is_empty());
    let c4 = store
        .create(
            "contacts",
            None,
            &f(json!({"email": "ann@EXAMPLE.com"})),
            true,
        )
        .unwrap()
        .record
        .id;
    let collisions = all_collisions(&store);
    assert_eq!(collisions.len(), 1, "{collisions:#?}");
    let c = &collisions[0];
    assert_eq!(c.kind, CollisionKind::Duplicate);
    assert_eq!(c.field.as_deref(), Some("email"));
    assert_eq!(c.value.as_deref(), Some("ann@example.com"));
    let mut holders = vec![c3.clone(), c4.clone()];
    holders.sort();
    assert_eq!(c.records, holders);
    match &c.status {
        Status::Resolved(r) => {
            assert_eq!(r.action, "force");
            assert_eq!(r.by, nid(1));
        }
        Status::Open => panic!("a forced duplicate is resolved"),
    }
    assert!(
        store
            .collisions(&CollisionFilter::default())
            .unwrap()
            .is_empty()
    );
    let by_record = store
        .collisions(&CollisionFilter {
            include_resolved: true,
            record: Some(c4.clone()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_record, collisions);
    assert!(view(&mut store, &c4).open_collisions.is_empty());
    let stats = store.stats().unwrap();
    assert_eq!(stats.resolved_collisions, 1);
    assert!(stats.open_collisions.values().all(|n| *n == 0));

    // A forced restore likewise.
    store
        .restore(&c1, &f(json!({"email": "ann@example.com"})), true)
        .unwrap();
    let dup: Vec<Collision> = all_collisions(&store)
        .into_iter()
        .filter(|c| c.records.contains(&c1))
        .collect();
    assert_eq!(dup.len(), 1);
    assert!(matches!(&dup[0].status, Status::Resolved(r) if r.action == "force"));
    check_invariants(&state(&mut store));

    // Composite unique group on phones: (contact_id, number).
    let p = create(
        &mut store,
        "phones",
        json!({"contact_id": c2.as_str(), "number": "555"}),
    );
    let err = store
        .create(
            "phones",
            None,
            &f(json!({"contact_id": c2.as_str(), "number": " 555 "})),
            false,
        )
        .unwrap_err();
    expect_duplicate(err, "DUPLICATE_CONTACT_NUMBER", &p);
    create(
        &mut store,
        "phones",
        json!({"contact_id": c3.as_str(), "number": "555"}),
    );
}

// ---------------------------------------------------------------------------
// 5. Validation.

#[test]
fn invalid_writes_are_refused_with_codes() {
    let ck = clock(6);
    let (_kv, mut store) = mem(nid(1), &ck);
    let c = create(&mut store, "contacts", json!({"email": "c@x.org"}));
    let gone = create(&mut store, "contacts", json!({"email": "gone@x.org"}));
    store.delete(&gone).unwrap();
    let phone = create(
        &mut store,
        "phones",
        json!({"contact_id": c.as_str(), "number": "1"}),
    );
    let before = state(&mut store);

    let creates = [
        ("widgets", json!({"name": "x"}), "UNKNOWN_COLLECTION"),
        ("widgets", json!({}), "UNKNOWN_COLLECTION"),
        ("contacts", json!({"nickname": "x"}), "UNKNOWN_FIELD"),
        ("contacts", json!({"_deleted": "x"}), "UNKNOWN_FIELD"),
        ("contacts", json!({"do_not_email": "yes"}), "WRONG_TYPE"),
        ("contacts", json!({"birth_date": "yesterday"}), "WRONG_TYPE"),
        ("contacts", json!({"credit_limit": "lots"}), "WRONG_TYPE"),
        ("contacts", json!({"first_name": 5}), "WRONG_TYPE"),
        (
            "tags",
            json!({"name": "t", "weight": "heavy"}),
            "WRONG_TYPE",
        ),
        (
            "phones",
            json!({"contact_id": "not an id", "number": "1"}),
            "WRONG_TYPE",
        ),
        (
            "phones",
            json!({"contact_id": c.as_str()}),
            "MISSING_REQUIRED_FIELD",
        ),
        ("phones", json!({"number": "1"}), "MISSING_REQUIRED_FIELD"),
        (
            "phones",
            json!({"contact_id": rid(99).as_str(), "number": "1"}),
            "BAD_REFERENCE",
        ),
        (
            "phones",
            json!({"contact_id": gone.as_str(), "number": "1"}),
            "BAD_REFERENCE",
        ),
        // A reference into the wrong collection.
        (
            "phones",
            json!({"contact_id": phone.as_str(), "number": "2"}),
            "BAD_REFERENCE",
        ),
    ];
    for (collection, fields, want) in creates {
        let err = store
            .create(collection, None, &f(fields.clone()), false)
            .unwrap_err();
        assert_eq!(code(&err), want, "{collection} {fields}: {err}");
        assert_eq!(
            state(&mut store),
            before,
            "{collection} {fields} wrote something"
        );
    }
    let err = store
        .create("widgets", None, &f(json!({})), false)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Model(ModelError::UnknownCollection(_))
    ));
    let err = store.create(
        "phones",
        None,
        &f(json!({"contact_id": rid(99).as_str(), "number": "1"})),
        false,
    );
    assert!(matches!(err, Err(Error::BadReference { .. })));

    let updates = [
        (&c, json!({"nickname": "x"}), "UNKNOWN_FIELD"),
        (&c, json!({"do_not_email": 1}), "WRONG_TYPE"),
        (&phone, json!({"number": null}), "MISSING_REQUIRED_FIELD"),
        (
            &phone,
            json!({"contact_id": gone.as_str()}),
            "BAD_REFERENCE",
        ),
        (
            &phone,
            json!({"contact_id": rid(99).as_str()}),
            "BAD_REFERENCE",
        ),
        (&gone, json!({"city": "x"}), "RECORD_DELETED"),
    ];
    for (id, fields, want) in updates {
        let err = store
            .update(id, &f(fields.clone()), None, false)
            .unwrap_err();
        assert_eq!(code(&err), want, "{fields}: {err}");
        assert_eq!(state(&mut store), before, "update {fields} wrote something");
    }
    let err = store
        .update(
            &c,
            &f(json!({"city": "x"})),
            Some(&["zz".to_string()]),
            false,
        )
        .unwrap_err();
    assert_eq!(code(&err), "INVALID_HEADS");
    let unknown = "00".repeat(32);
    let err = store
        .update(&c, &f(json!({"city": "x"})), Some(&[unknown]), false)
        .unwrap_err();
    assert_eq!(code(&err), "INVALID_HEADS");
    assert_eq!(
        code(
            &store
                .update(&rid(99), &f(json!({})), None, false)
                .unwrap_err()
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        code(&store.restore(&c, &f(json!({})), false).unwrap_err()),
        "RECORD_NOT_DELETED"
    );
    assert_eq!(state(&mut store), before);

    // A restore validates its fields like an update.
    store.delete(&phone).unwrap();
    let before = state(&mut store);
    let restores = [
        (json!({"nickname": "x"}), "UNKNOWN_FIELD"),
        (json!({"number": 7}), "WRONG_TYPE"),
        (json!({"number": null}), "MISSING_REQUIRED_FIELD"),
        (json!({"contact_id": gone.as_str()}), "BAD_REFERENCE"),
    ];
    for (fields, want) in restores {
        let err = store
            .restore(&phone, &f(fields.clone()), false)
            .unwrap_err();
        assert_eq!(code(&err), want, "restore {fields}: {err}");
        assert_eq!(
            state(&mut store),
            before,
            "restore {fields} wrote something"
        );
    }
}

// ---------------------------------------------------------------------------
// 6. Edits based on older heads.

#[test]
fn edits_based_on_older_heads_merge_field_by_field() {
    let ck = clock(7);
    let (_kv, mut store) = mem(nid(1), &ck);
    let id = create(
        &mut store,
        "contacts",
        json!({"city": "Paris", "phone": "1", "first_name": "Ann"}),
    );
    let h = view(&mut store, &id).heads;

    ck.advance(1000);
    store
        .update(&id, &f(json!({"city": "Lyon"})), None, false)
        .unwrap();

    // Another field, based on H: both edits kept, nothing concurrent.
    ck.advance(1000);
    let w = store
        .update(&id, &f(json!({"phone": "2"})), Some(&h), false)
        .unwrap();
    assert!(w.concurrent.is_empty(), "{:?}", w.concurrent);
    assert_eq!(w.record.fields["city"], json!("Lyon"));
    assert_eq!(w.record.fields["phone"], json!("2"));
    assert_eq!(w.record.fields["first_name"], json!("Ann"));
    assert!(w.change.is_some());

    // The same field, based on H: reported with existing vs new value.
    ck.advance(1000);
    let w = store
        .update(
            &id,
            &f(json!({"city": "Nice", "first_name": "Anne"})),
            Some(&h),
            false,
        )
        .unwrap();
    assert_eq!(w.concurrent.len(), 1, "{:?}", w.concurrent);
    let cf = &w.concurrent[0];
    assert_eq!(cf.field, "city");
    assert_eq!(cf.base_value, Some(json!("Paris")));
    assert_eq!(cf.existing_value, Some(json!("Lyon")));
    assert_eq!(cf.new_value, Some(json!("Nice")));
    assert_eq!(w.record.fields["city"], json!("Nice"));
    assert_eq!(w.record.fields["first_name"], json!("Anne"));
    assert_eq!(w.record.fields["phone"], json!("2"));
    // Both edits based on H are concurrent with the later one: three heads.
    assert_eq!(w.record.heads.len(), 3, "{:?}", w.record.heads);
    assert_eq!(view(&mut store, &id), w.record);

    // Unsetting a concurrently changed field reports it too.
    let h2 = w.record.heads.clone();
    store
        .update(&id, &f(json!({"phone": "3"})), None, false)
        .unwrap();
    let w = store
        .update(&id, &f(json!({"phone": null})), Some(&h2), false)
        .unwrap();
    assert_eq!(w.concurrent.len(), 1);
    assert_eq!(w.concurrent[0].existing_value, Some(json!("3")));
    assert_eq!(w.concurrent[0].new_value, None);
    // An unset made as of an older version removes only what that version
    // showed: the concurrent value survives (Automerge: put beats delete).
    assert_eq!(w.record.fields["phone"], json!("3"));

    // Based on the current heads: nothing concurrent.
    let cur = w.record.heads.clone();
    let w = store
        .update(&id, &f(json!({"city": "Metz"})), Some(&cur), false)
        .unwrap();
    assert!(w.concurrent.is_empty());

    // It all survives a reload from storage.
    let before = state(&mut store);
    store.clear_cache();
    assert_eq!(state(&mut store), before);
    check_invariants(&before);
}

// ---------------------------------------------------------------------------
// 7. Remote changes, pending, malformed input.

#[test]
fn remote_changes_out_of_order_with_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    let ca = clock(8);
    let (_akv, mut a) = mem(nid(1), &ca);
    let id = create(
        &mut a,
        "contacts",
        json!({"first_name": "Ann", "email": "ann@x.org"}),
    );
    for (i, fields) in [
        json!({"city": "Paris"}),
        json!({"phone": "12"}),
        json!({"city": "Lyon", "first_name": null}),
        json!({"bank_account": "DE00"}),
    ]
    .into_iter()
    .enumerate()
    {
        ca.advance(100 + i as i64);
        a.update(&id, &f(fields), None, false).unwrap();
    }
    let changes = a.changes_for(&id, &[]).unwrap();
    assert_eq!(changes.len(), 5);
    let av = view(&mut a, &id);

    let cb = clock(9);
    let n = changes.len();
    for (k, c) in changes.iter().rev().enumerate() {
        let mut b = open(&path, nid(2), &cb, fast());
        let report = b.apply_remote(vec![(id.clone(), vec![c.clone()])]).unwrap();
        assert!(report.rejected.is_empty(), "{report:?}");
        let stats = b.stats().unwrap();
        if k + 1 < n {
            assert_eq!(report.changes_applied, 0);
            assert_eq!(report.records_changed, 0);
            assert!(report.changes_pending >= 1);
            assert!(
                b.get(&id).unwrap().is_none(),
                "visible before its first change"
            );
            assert!(b.heads(&id).unwrap().is_empty());
            assert!(b.changes_since(0, 100).unwrap().is_empty());
            assert_eq!(stats.pending_changes, k as u64 + 1);
            assert_eq!(stats.records, 0);
            assert_eq!(b.feed_seq(), 0);
        } else {
            assert_eq!(report.changes_applied, n);
            assert_eq!(report.changes_pending, 0);
            assert_eq!(report.records_changed, 1);
            assert_eq!(stats.pending_changes, 0);
            assert_eq!(stats.records, 1);
        }
    }

    let mut b = open(&path, nid(2), &cb, fast());
    let bv = view(&mut b, &id);
    assert_eq!(bv.heads, av.heads);
    assert_eq!(bv.fields, av.fields);
    assert_eq!(bv.deleted, av.deleted);
    assert_eq!(bv.created_by, Some(nid(1)));
    assert_eq!(bv.updated_by, Some(nid(1)));
    assert_eq!(bv.created_at, av.created_at);
    assert_eq!(bv.updated_at, av.updated_at);
    assert_eq!(b.changes_since(0, 10).unwrap().len(), 1);
    assert_eq!(b.feed_seq(), 1);
    // The unique index knows the remote record.
    let err = b
        .create("contacts", None, &f(json!({"email": "ANN@x.org"})), false)
        .unwrap_err();
    expect_duplicate(err, "DUPLICATE_EMAIL", &id);

    // Delivering the same changes again changes nothing.
    let before = state(&mut b);
    let again = b.apply_remote(vec![(id.clone(), changes.clone())]).unwrap();
    assert_eq!(again.changes_duplicate, n);
    assert_eq!(again.changes_applied, 0);
    assert_eq!(again.records_changed, 0);
    assert_eq!(state(&mut b), before);
}

#[test]
fn malformed_remote_changes_are_rejected() {
    let ca = clock(10);
    let (_akv, mut a) = mem(nid(1), &ca);
    let id = create(
        &mut a,
        "contacts",
        json!({"first_name": "Ann", "city": "Paris"}),
    );
    let other = create(&mut a, "contacts", json!({"first_name": "Bob"}));
    let cb = clock(11);
    let (_bkv, mut b) = mem(nid(2), &cb);
    let r = b
        .apply_remote(vec![
            (id.clone(), a.changes_for(&id, &[]).unwrap()),
            (other.clone(), a.changes_for(&other, &[]).unwrap()),
        ])
        .unwrap();
    assert_eq!(r.records_changed, 2);

    ca.advance(1000);
    a.update(&id, &f(json!({"city": "Lyon"})), None, false)
        .unwrap();
    let fresh = a.changes_for(&id, &b.heads(&id).unwrap()).unwrap();
    assert_eq!(fresh.len(), 1);
    let good = fresh[0].clone();
    let before = state(&mut b);

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x5a;
    let mut flipped_tail = good.clone();
    *flipped_tail.last_mut().unwrap() ^= 0x01;
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"this is not an automerge change".to_vec()),
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("truncated by one", good[..good.len() - 1].to_vec()),
        ("flipped byte", flipped),
        ("flipped last byte", flipped_tail),
        ("bad magic", bad_magic),
        (
            "oversized",
            vec![0u8; entente_node::store::MAX_CHANGE_BYTES + 1],
        ),
    ];
    for (what, bytes) in inputs {
        let report: ApplyReport = b.apply_remote(vec![(id.clone(), vec![bytes])]).unwrap();
        assert_eq!(report.rejected.len(), 1, "{what}: {report:?}");
        assert_eq!(report.rejected[0].0, id);
        assert_eq!(report.changes_applied, 0, "{what}");
        assert_eq!(report.records_changed, 0, "{what}");
        let now = state(&mut b);
        assert_eq!(now.records, before.records, "{what} harmed the record");
        assert_eq!(now.feed, before.feed, "{what}");
        assert_eq!(now.feed_seq, before.feed_seq, "{what}");
        assert_eq!(now.stats.pending_changes, 0, "{what}");
        assert!(now.stats.quarantined >= 1, "{what}");
    }

    // A record's changes sent as another record's are refused: the creating
    // change (no dependencies) of `id` as `other`, and all of `id` as a new id.
    let creating = a.changes_for(&id, &[]).unwrap()[0].clone();
    let report = b
        .apply_remote(vec![(other.clone(), vec![creating])])
        .unwrap();
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert_eq!(state(&mut b).records, before.records);
    // ...and a creating change from another node sent as `other`.
    // (Its `_id` may win or lose the conflict with `other`'s: node 0 loses.)
    for node in [0, 3] {
        let cc = clock(13);
        let (_ckv, mut c) = mem(nid(node), &cc);
        let foreign = create(
            &mut c,
            "contacts",
            json!({"first_name": "Cleo", "email": "cleo@x.org"}),
        );
        let report = b
            .apply_remote(vec![(other.clone(), c.changes_for(&foreign, &[]).unwrap())])
            .unwrap();
        assert_eq!(report.rejected.len(), 1, "node {node}: {report:?}");
        assert_eq!(state(&mut b).records, before.records, "node {node}");
    }
    let all_of_id = a.changes_for(&id, &[]).unwrap();
    let report = b.apply_remote(vec![(rid(77), all_of_id)]).unwrap();
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert!(b.get(&rid(77)).unwrap().is_none());
    assert_eq!(state(&mut b).records, before.records);
    // A change whose dependencies the named record lacks waits, harmlessly.
    let report = b
        .apply_remote(vec![(other.clone(), vec![good.clone()])])
        .unwrap();
    assert_eq!(report.changes_pending, 1, "{report:?}");
    assert_eq!(state(&mut b).records, before.records);

    // One record's bad input does not hold back another's good one.
    let report = b
        .apply_remote(vec![
            (other.clone(), vec![b"junk".to_vec()]),
            (id.clone(), vec![good.clone()]),
        ])
        .unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].0, other);
    assert_eq!(report.changes_applied, 1);
    assert_eq!(view(&mut b, &id).heads, view(&mut a, &id).heads);
    assert_eq!(view(&mut b, &id).fields["city"], json!("Lyon"));
    b.clear_cache();
    assert_eq!(view(&mut b, &id).fields["city"], json!("Lyon"));
    assert_eq!(view(&mut b, &other), {
        let mut v = before
            .records
            .iter()
            .find(|r| r.id == other)
            .unwrap()
            .clone();
        v.open_collisions.clear();
        v
    });
}

/// A large remote batch is tried on worker threads (each record is its own
/// document); what lands must not depend on it: the same batch applied
/// with one thread, with four, with four to records the receiver must load
/// from storage (on the workers: none is cached), and record by record
/// gives the same records and collisions, and the batched stores the same
/// report and feed.
#[test]
fn a_large_batch_tried_on_threads_lands_as_on_one() {
    let ca = clock(40);
    let (_akv, mut a) = mem(nid(1), &ca);
    // Every tenth contact is written at another site with the e-mail of
    // the contact before it: duplicates.
    let (_ckv, mut c) = mem(nid(3), &clock(42));
    let mut contacts = Vec::new();
    for i in 0..120 {
        let (site, n) = if i % 10 == 9 {
            (&mut c, i - 1)
        } else {
            (&mut a, i)
        };
        contacts.push(create(
            site,
            "contacts",
            json!({"first_name": format!("P{i}"), "email": format!("p{n}@x.org")}),
        ));
    }
    let changes_of = |a: &mut Store, c: &mut Store, id: &RecordId| match a.changes_for(id, &[]) {
        Ok(ch) if !ch.is_empty() => ch,
        _ => c.changes_for(id, &[]).unwrap(),
    };
    let mut addresses = Vec::new();
    for (i, c) in contacts
        .iter()
        .enumerate()
        .take(33)
        .filter(|(i, _)| i % 10 != 9)
    {
        addresses.push(create(
            &mut a,
            "addresses",
            json!({"contact_id": c.to_string(), "city": format!("C{i}")}),
        ));
    }
    // The receivers already hold the first 40 contacts as first written.
    let early: Vec<(RecordId, Vec<Vec<u8>>)> = contacts[..40]
        .iter()
        .map(|id| (id.clone(), changes_of(&mut a, &mut c, id)))
        .collect();
    for (i, id) in contacts
        .iter()
        .enumerate()
        .take(60)
        .filter(|(i, _)| i % 10 != 9)
    {
        ca.advance(10);
        a.update(id, &f(json!({"city": format!("T{i}")})), None, false)
            .unwrap();
    }
    // Deleted contacts, two of them held by the receivers already.
    for id in [&contacts[0], &contacts[1], &contacts[50]] {
        a.delete(id).unwrap();
    }
    let mut batch: Vec<(RecordId, Vec<Vec<u8>>)> = contacts
        .iter()
        .chain(&addresses)
        .map(|id| (id.clone(), changes_of(&mut a, &mut c, id)))
        .collect();
    // Bad input among the good: junk bytes, another record's changes, and a
    // change whose dependencies are missing (it waits).
    batch.push((rid(9001), vec![b"junk".to_vec()]));
    batch.push((rid(9002), a.changes_for(&contacts[100], &[]).unwrap()));
    let heads_before = a.heads(&contacts[110]).unwrap();
    ca.advance(10);
    a.update(&contacts[110], &f(json!({"city": "Late"})), None, false)
        .unwrap();
    let newest = a.changes_for(&contacts[110], &heads_before).unwrap();
    assert_eq!(newest.len(), 1);
    batch.retain(|(id, _)| id != &contacts[110]);
    batch.push((contacts[110].clone(), newest));

    // On RocksDB too, with what the receiver held in table files, the
    // batch lands as in memory.
    let receive_on = |threads: usize, one_by_one: bool, cold: bool, rocks: bool| {
        let dir = tempfile::tempdir().unwrap();
        let (rocks, kv) = rocks_or_mem(dir.path(), rocks);
        let opts = StoreOptions {
            apply_threads: threads,
            ..fast()
        };
        let mut b = Store::with_kv(kv, schema(), nid(2), clock(41), opts).unwrap();
        b.apply_remote(early.clone()).unwrap();
        if let Some(r) = &rocks {
            r.flush().unwrap();
        }
        if cold {
            b.clear_cache();
        }
        let reports: Vec<ApplyReport> = if one_by_one {
            batch
                .iter()
                .map(|item| b.apply_remote(vec![item.clone()]).unwrap())
                .collect()
        } else {
            vec![b.apply_remote(batch.clone()).unwrap()]
        };
        (reports, state(&mut b))
    };
    let receive = |threads, one_by_one, cold| receive_on(threads, one_by_one, cold, false);
    let (one, s1) = receive(1, false, false);
    let (four, s4) = receive(4, false, false);
    let (cold, sc) = receive(4, false, true);
    let (_, sn) = receive(1, true, false);
    let (rocks, sr) = receive_on(4, false, true, true);
    assert_eq!(one, four);
    assert_eq!(s1, s4);
    assert_eq!(cold, four);
    assert_eq!(sc, s4);
    assert_eq!(rocks, four);
    assert_eq!(sr, s4);
    check_invariants(&s4);
    assert_eq!(sn.records.len(), s4.records.len());
    for (x, y) in sn.records.iter().zip(&s4.records) {
        assert_eq!((&x.id, &x.heads, &x.fields), (&y.id, &y.heads, &y.fields));
    }
    let kinds = |s: &State| -> Vec<(String, Vec<RecordId>)> {
        let mut v: Vec<_> = s
            .collisions
            .iter()
            .map(|c| (format!("{:?}", c.kind), c.records.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(kinds(&sn), kinds(&s4));

    // What the batch held, as the report and the state say.
    let r = &four[0];
    let rejected: Vec<&RecordId> = r.rejected.iter().map(|(id, _)| id).collect();
    assert_eq!(rejected, vec![&rid(9001), &rid(9002)], "{r:?}");
    assert_eq!(r.changes_pending, 1, "{r:?}");
    // 150 records, less contact 110 (its change waits) and the four
    // contacts the receivers held already that did not change since.
    assert_eq!(r.records_changed, 145, "{r:?}");
    assert_eq!(r.changes_duplicate, 40, "{r:?}");
    assert_eq!(s4.records.len(), 149, "contact 110 waits for its creation");
    assert_eq!(s4.stats.pending_changes, 1);
    assert_eq!(
        s4.collisions
            .iter()
            .filter(|c| c.kind == CollisionKind::Duplicate)
            .count(),
        12,
        "every tenth contact shares an e-mail"
    );
}

/// Storage for a store under test: RocksDB in `dir` (also returned, to
/// flush it to table files), or memory.
fn rocks_or_mem(dir: &Path, rocks: bool) -> (Option<Arc<RocksKv>>, Arc<dyn Kv>) {
    if rocks {
        let r = Arc::new(RocksKv::open(dir, false).unwrap());
        (Some(r.clone()), r)
    } else {
        (None, Arc::new(MemKv::new()))
    }
}

/// Records with their changes, as a peer sends them.
type Batch = Vec<(RecordId, Vec<Vec<u8>>)>;

/// Records of one remote batch that change what the others' collisions
/// are: one gives up the e-mail another takes (no duplicate is left), and
/// one is deleted while another comes to reference it (a dangling
/// reference is left). The batch must find what applying the records one
/// by one finds, and what the sender found, whichever comes first in the
/// batch: ids made in the same millisecond are ordered by their random
/// part, so the seeds give both orders of each pair.
#[test]
fn records_that_change_each_other_s_collisions_land_in_one_batch_as_one_by_one() {
    let mut orders = BTreeSet::new();
    for seed in 0..16 {
        let (_pkv, mut p) = mem(nid(1), &clock(60 + seed));
        let h = create(
            &mut p,
            "contacts",
            json!({"first_name": "H", "email": "v@x.org"}),
        );
        let t = create(&mut p, "contacts", json!({"first_name": "T"}));
        let shared: Batch = [&h, &t]
            .iter()
            .map(|id| ((*id).clone(), p.changes_for(id, &[]).unwrap()))
            .collect();
        let (h0, t0) = (p.heads(&h).unwrap(), p.heads(&t).unwrap());
        p.update(&h, &f(json!({"email": "w@x.org"})), None, false)
            .unwrap();
        let r = create(
            &mut p,
            "contacts",
            json!({"first_name": "R", "email": "v@x.org"}),
        );
        let a = create(
            &mut p,
            "addresses",
            json!({"contact_id": t.to_string(), "city": "C"}),
        );
        p.delete(&t).unwrap();
        orders.insert((r < h, a < t));
        let open = |s: &Store| -> Vec<(CollisionKind, Vec<RecordId>)> {
            let mut v: Vec<_> = all_collisions(s)
                .into_iter()
                .filter(|c| c.is_open())
                .map(|c| (c.kind, c.records))
                .collect();
            v.sort_by_key(|c| format!("{c:?}"));
            v
        };
        let want = open(&p);
        let mut pair = vec![a.clone(), t.clone()];
        pair.sort();
        assert_eq!(
            want,
            vec![(CollisionKind::DanglingReference, pair)],
            "seed {seed}: the sender's own collisions"
        );
        let batch: Batch = vec![
            (h.clone(), p.changes_for(&h, &h0).unwrap()),
            (t.clone(), p.changes_for(&t, &t0).unwrap()),
            (r.clone(), p.changes_for(&r, &[]).unwrap()),
            (a.clone(), p.changes_for(&a, &[]).unwrap()),
        ];
        for whole in [true, false] {
            let (_bkv, mut b) = mem(nid(2), &clock(90 + seed));
            b.apply_remote(shared.clone()).unwrap();
            if whole {
                let report = b.apply_remote(batch.clone()).unwrap();
                assert_eq!(report.records_changed, 4, "seed {seed}: {report:?}");
            } else {
                for item in &batch {
                    b.apply_remote(vec![item.clone()]).unwrap();
                }
            }
            assert_eq!(open(&b), want, "seed {seed}, whole batch: {whole}");
            let ids = |s: &Store| -> BTreeSet<String> {
                all_collisions(s)
                    .into_iter()
                    .map(|c| c.id.to_string())
                    .collect()
            };
            assert_eq!(ids(&b), ids(&p), "seed {seed}, whole batch: {whole}");
        }
    }
    assert_eq!(orders.len(), 4, "every order of the two pairs: {orders:?}");
}

/// A peer's 100 contacts, and the batch that carries them whole.
fn peer_batch(seed: u64, prefix: &str) -> (Vec<RecordId>, Batch) {
    let (_kv, mut a) = mem(nid(1), &clock(seed));
    let ids = contacts(&mut a, 100, prefix);
    let batch = ids
        .iter()
        .map(|id| (id.clone(), a.changes_for(id, &[]).unwrap()))
        .collect();
    (ids, batch)
}

/// A page of a catch-up finds the duplicates its records make with records
/// the receiver already holds, whether those are in RocksDB's table files
/// or its memtable, as a store in memory and as record by record: the
/// holders of the page's unique values are read for the whole page at once
/// (one RocksDB iterator seeking each value in turn).
#[test]
fn a_page_finds_the_duplicates_it_makes_with_records_held_in_storage() {
    let (ids, batch) = peer_batch(70, "held");
    let receive = |rocks: bool, one_by_one: bool| {
        let dir = tempfile::tempdir().unwrap();
        let (rocks, kv) = rocks_or_mem(dir.path(), rocks);
        let mut b = Store::with_kv(kv, schema(), nid(2), clock(71), fast()).unwrap();
        // Every tenth of the peer's e-mails is held here already, half of
        // them in table files and half only in the memtable.
        let mut held = Vec::new();
        for i in (0..100).step_by(10) {
            held.push(create(
                &mut b,
                "contacts",
                json!({"first_name": format!("Q{i}"), "email": format!("held{i}@x.org")}),
            ));
            if i == 40
                && let Some(r) = &rocks
            {
                r.flush().unwrap();
            }
        }
        if one_by_one {
            for item in &batch {
                b.apply_remote(vec![item.clone()]).unwrap();
            }
        } else {
            let r = b.apply_remote(batch.clone()).unwrap();
            assert_eq!(r.records_changed, 100, "{r:?}");
        }
        let mut found: Vec<Vec<RecordId>> = all_collisions(&b)
            .into_iter()
            .filter(|c| c.kind == CollisionKind::Duplicate && c.is_open())
            .map(|c| c.records)
            .collect();
        found.sort();
        (held, found)
    };
    let (held, on_rocks) = receive(true, false);
    let mut want: Vec<Vec<RecordId>> = held
        .iter()
        .zip(ids.iter().step_by(10))
        .map(|(mine, theirs)| {
            let mut pair = vec![mine.clone(), theirs.clone()];
            pair.sort();
            pair
        })
        .collect();
    want.sort();
    assert_eq!(on_rocks, want);
    assert_eq!(receive(false, false), (held.clone(), want.clone()));
    assert_eq!(receive(true, true), (held, want));
}

/// A remote batch of more than 64 records is written on another thread and
/// the call returns, so the node takes in the next page meanwhile. Every
/// store operation after it waits for it first: none reads storage without
/// it, none writes before it (a checkpoint saved next must not be
/// overwritten by the batch's own), and closing the store lands it. The
/// fault delays the background write by 200 ms, so each of these fails if
/// that operation does not wait.
#[test]
fn a_large_batch_written_in_the_background_lands_before_anything_after_it() {
    let (ids, batch) = peer_batch(60, "bg");
    let peer = nid(1);
    let dir = tempfile::tempdir().unwrap();
    let slow = StoreOptions {
        fault: Some(TestFault::SlowBackgroundWrite),
        ..fast()
    };
    let no_filter = BTreeSet::new();
    let receive = |name: &str| {
        let mut b = open(&dir.path().join(name), nid(2), &clock(61), slow.clone());
        let r = b
            .apply_remote_only(Some(peer), &no_filter, batch.clone(), Some(100))
            .unwrap();
        assert_eq!(r.records_changed, 100);
        b
    };

    // A point read, a scan, a record read, a raw read.
    assert_eq!(receive("get").checkpoint(&peer).unwrap(), 100);
    assert_eq!(receive("scan").changes_since(0, 1_000).unwrap().len(), 100);
    assert!(receive("record").get(&ids[7]).unwrap().is_some());
    assert!(
        receive("raw")
            .kv()
            .get(Cf::Records, ids[9].as_str().as_bytes())
            .unwrap()
            .is_some()
    );
    // A local write checks its unique values against the batch's.
    let mut b = receive("write");
    let e = b
        .create("contacts", None, &f(json!({"email": "bg5@x.org"})), false)
        .unwrap_err();
    assert_eq!(code(&e), "DUPLICATE_EMAIL");
    // A checkpoint saved next lands after the batch's, not under it.
    let b = receive("checkpoint");
    b.save_checkpoint(&peer, 200).unwrap();
    drop(b);
    let b = open(&dir.path().join("checkpoint"), nid(2), &clock(62), fast());
    assert_eq!(b.checkpoint(&peer).unwrap(), 200);
    drop(b);
    // Closing the store right away lands the batch, note removed.
    drop(receive("close"));
    let mut b = open(&dir.path().join("close"), nid(2), &clock(63), fast());
    assert_eq!(b.checkpoint(&peer).unwrap(), 100);
    assert_eq!(b.changes_since(0, 1_000).unwrap().len(), 100);
    assert!(b.quarantine().unwrap().is_empty());
    assert_eq!(
        b.kv().get(Cf::Meta, b"applying_remote_batch").unwrap(),
        None
    );
    assert!(b.get(&ids[99]).unwrap().is_some());
}

/// A background write that fails stops the store: every operation after it
/// is a `STORAGE_ERROR` (none can build on a batch that did not land). After
/// a restart, what was acknowledged before is there, the batch and its
/// checkpoint are not (its page is pulled again), and its note does not make
/// it suspect: applied again, it lands.
#[test]
fn a_background_write_that_fails_stops_the_store_and_the_batch_is_pulled_again() {
    let (ids, batch) = peer_batch(64, "fail");
    let peer = nid(1);
    let kv = Arc::new(MemKv::new());
    let failing = StoreOptions {
        fault: Some(TestFault::FailBackgroundWrite),
        ..fast()
    };
    let no_filter = BTreeSet::new();
    let mut b = Store::with_kv(kv.clone(), schema(), nid(2), clock(65), failing).unwrap();
    let local = create(&mut b, "contacts", json!({"email": "local@x.org"}));
    b.apply_remote_only(Some(peer), &no_filter, batch.clone(), Some(100))
        .unwrap();
    let storage = |r: Result<(), Error>| code(&r.unwrap_err());
    assert_eq!(storage(b.changes_since(0, 10).map(drop)), "STORAGE_ERROR");
    assert_eq!(storage(b.checkpoint(&peer).map(drop)), "STORAGE_ERROR");
    assert_eq!(
        storage(
            b.create("contacts", None, &f(json!({"email": "later@x.org"})), false)
                .map(drop)
        ),
        "STORAGE_ERROR"
    );
    assert_eq!(
        storage(
            b.apply_remote_only(Some(peer), &no_filter, batch.clone(), Some(100))
                .map(drop)
        ),
        "STORAGE_ERROR"
    );
    drop(b);
    assert_eq!(kv.get(Cf::Meta, b"applying_remote_batch").unwrap(), None);

    let mut b = Store::with_kv(kv, schema(), nid(2), clock(66), fast()).unwrap();
    assert_eq!(b.checkpoint(&peer).unwrap(), 0);
    let feed = b.changes_since(0, 1_000).unwrap();
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0].id, local);
    assert!(b.get(&ids[0]).unwrap().is_none());
    let r = b
        .apply_remote_only(Some(peer), &no_filter, batch, Some(100))
        .unwrap();
    assert_eq!(r.records_changed, 100);
    assert!(r.rejected.is_empty());
    assert_eq!(b.checkpoint(&peer).unwrap(), 100);
    assert_eq!(b.changes_since(0, 1_000).unwrap().len(), 101);
    assert!(b.quarantine().unwrap().is_empty());
}

/// A page of a peer's sync reads many records at once (their documents
/// loaded on worker threads): the same changes as record by record, for
/// records in the cache or not, with appended chunks or not, with heads the
/// peer has, and nothing for an unknown id.
#[test]
fn changes_of_many_records_are_those_of_each() {
    let dir = tempfile::tempdir().unwrap();
    let ca = clock(44);
    let mut a = open(&dir.path().join("a"), nid(1), &ca, fast());
    let mut ids = Vec::new();
    for i in 0..80 {
        ids.push(create(
            &mut a,
            "contacts",
            json!({"first_name": format!("P{i}"), "email": format!("m{i}@x.org")}),
        ));
    }
    let mut have = Vec::new();
    let mut after_first = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        have.push(a.heads(id).unwrap());
        // Some records get appended chunks, a few of them several.
        for k in 0..(i % 4) {
            ca.advance(5);
            a.update(id, &f(json!({"city": format!("C{i}-{k}")})), None, false)
                .unwrap();
            if k == 0 {
                after_first.push((i, a.heads(id).unwrap()));
            }
        }
    }
    a.clear_cache();
    // Half of the records are read back into the cache.
    for id in ids.iter().step_by(2) {
        a.get(id).unwrap();
    }
    let mut wanted: Vec<_> = ids
        .iter()
        .zip(&have)
        .enumerate()
        .map(|(i, (id, h))| (id.clone(), if i % 3 == 0 { h.clone() } else { Vec::new() }))
        .collect();
    // Peers part-way through a record's chunks, cached or not; one lists a
    // change this store has never seen besides.
    for (i, h) in &after_first {
        wanted.push((ids[*i].clone(), h.clone()));
    }
    let mut foreign = after_first[0].1.clone();
    foreign.push(automerge::ChangeHash([7; 32]));
    wanted.push((ids[after_first[0].0].clone(), foreign));
    wanted.insert(40, (rid(4242), Vec::new()));
    let many = a.changes_for_many(&wanted).unwrap();
    assert_eq!(many.len(), wanted.len());
    for ((id, h), got) in wanted.iter().zip(&many) {
        assert_eq!(got, &a.changes_for(id, h).unwrap(), "{id}");
    }
    assert!(many[40].is_empty(), "an unknown record has no changes");
    assert_eq!(many[0].len(), 0, "record 0: the peer has all of it");
    assert_eq!(many[4].len(), 1, "record 4: its one change");
    assert_eq!(many[7].len(), 4, "record 7: its creation and 3 updates");
    assert_eq!(
        many[3].len(),
        3,
        "record 3 from its first version: its updates"
    );
    // Record 3 (not cached) from after its first update: the other two.
    let from_mid = wanted
        .iter()
        .position(|(id, h)| id == &ids[3] && after_first.iter().any(|(i, m)| *i == 3 && m == h))
        .unwrap();
    assert_eq!(many[from_mid].len(), 2);
}

// ---------------------------------------------------------------------------
// 9. Compaction.

fn chunk_count(store: &Store, id: &RecordId) -> usize {
    let mut prefix = id.as_str().as_bytes().to_vec();
    prefix.push(0);
    let mut n = 0;
    store
        .kv()
        .scan(Cf::Chunks, &prefix, &prefix, &mut |_, _| {
            n += 1;
            true
        })
        .unwrap();
    n
}

#[test]
fn compaction_keeps_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let ck = clock(12);
    let opts = || StoreOptions {
        compact_after_chunks: 4,
        ..fast()
    };
    let mut store = open(&path, nid(1), &ck, opts());
    let id = create(
        &mut store,
        "contacts",
        json!({"first_name": "Ann", "city": "c"}),
    );
    let other = create(&mut store, "contacts", json!({"first_name": "Bob"}));
    let h0 = view(&mut store, &id).heads;
    let mut max_chunks = 0;
    for i in 0..20 {
        ck.advance(1);
        store
            .update(
                &id,
                &f(json!({"city": format!("city {i}"), "notes": format!("note {i}")})),
                None,
                false,
            )
            .unwrap();
        max_chunks = max_chunks.max(chunk_count(&store, &id));
    }
    assert!(max_chunks < 4, "chunks never compacted: {max_chunks}");
    let expected = view(&mut store, &id);
    assert_eq!(expected.fields["city"], json!("city 19"));
    assert_eq!(store.changes_for(&id, &[]).unwrap().len(), 21);

    store.clear_cache();
    assert_eq!(view(&mut store, &id), expected);
    assert_eq!(store.changes_for(&id, &[]).unwrap().len(), 21);
    let before = state(&mut store);
    drop(store);

    let mut store = open(&path, nid(1), &ck, opts());
    assert_eq!(view(&mut store, &id), expected);
    assert_eq!(state(&mut store), before);
    assert_eq!(view(&mut store, &other).fields["first_name"], json!("Bob"));
    // The full history survives compaction: an edit based on the very first
    // version still merges.
    let w = store
        .update(&id, &f(json!({"phone": "9"})), Some(&h0), false)
        .unwrap();
    assert!(w.concurrent.is_empty());
    assert_eq!(w.record.fields["city"], json!("city 19"));
    assert_eq!(store.history(&id).unwrap().len(), 22);
    drop(store);
    let mut store = open(&path, nid(1), &ck, opts());
    assert_eq!(view(&mut store, &id).fields["phone"], json!("9"));
    check_invariants(&state(&mut store));
}

/// The type byte of the first Automerge chunk of a record's snapshot:
/// 0 a saved document, 1 a change.
fn snapshot_kind(store: &Store, id: &RecordId) -> u8 {
    let snap = store
        .kv()
        .get(Cf::Snapshots, id.as_str().as_bytes())
        .unwrap()
        .expect("a snapshot");
    assert_eq!(snap[..4], [0x85, 0x6f, 0x4a, 0x83], "an Automerge chunk");
    snap[8]
}

#[test]
fn a_new_record_is_stored_as_its_changes_and_served_whole_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let ck = clock(13);
    let opts = || StoreOptions {
        compact_after_chunks: 4,
        ..fast()
    };
    let mut a = open(&dir.path().join("a"), nid(1), &ck, opts());
    let ids = contacts(&mut a, 6, "p");
    // Record 1 gets a chunk, record 2 enough updates to be compacted.
    a.update(&ids[1], &f(json!({"city": "c"})), None, false)
        .unwrap();
    for k in 0..5 {
        ck.advance(1);
        a.update(&ids[2], &f(json!({"city": format!("c{k}")})), None, false)
            .unwrap();
    }
    assert_eq!(snapshot_kind(&a, &ids[0]), 1, "a new record: its change");
    assert_eq!(snapshot_kind(&a, &ids[1]), 1);
    assert_eq!(snapshot_kind(&a, &ids[2]), 0, "compacted: a document");

    // A peer with nothing is served every change, from storage or the
    // cache alike, the same as the document gives them.
    for cached in [false, true] {
        a.clear_cache();
        if cached {
            for id in &ids {
                a.get(id).unwrap();
            }
        }
        let wanted: Vec<_> = ids.iter().map(|id| (id.clone(), Vec::new())).collect();
        let many = a.changes_for_many(&wanted).unwrap();
        for (id, got) in ids.iter().zip(&many) {
            assert_eq!(got, &a.changes_for(id, &[]).unwrap(), "{id}");
        }
        assert_eq!(many[0].len(), 1);
        assert_eq!(many[1].len(), 2);
        assert_eq!(many[2].len(), 6);
    }

    // A node that gets them from a peer stores them as changes too, loads
    // them back after a restart and serves them on.
    let cb = clock(14);
    let path_b = dir.path().join("b");
    let mut b = open(&path_b, nid(2), &cb, opts());
    let batch: Vec<_> = ids
        .iter()
        .map(|id| (id.clone(), a.changes_for(id, &[]).unwrap()))
        .collect();
    let report = b.apply_remote(batch).unwrap();
    assert!(report.rejected.is_empty(), "{report:?}");
    for id in &ids {
        assert_eq!(snapshot_kind(&b, id), 1, "{id}: stored as its changes");
    }
    drop(b);
    let mut b = open(&path_b, nid(2), &cb, opts());
    for id in &ids {
        let (vb, va) = (view(&mut b, id), view(&mut a, id));
        assert_eq!((vb.fields, vb.heads), (va.fields, va.heads));
        assert_eq!(
            b.changes_for(id, &[]).unwrap().len(),
            a.changes_for(id, &[]).unwrap().len()
        );
    }
    check_invariants(&state(&mut b));
}

#[test]
fn stored_changes_cut_short_are_never_served_as_a_record_s_history() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cb) = (clock(15), clock(16));
    let mut a = open(&dir.path().join("a"), nid(1), &ca, fast());
    let mut b = open(&dir.path().join("b"), nid(2), &cb, fast());
    let r1 = create(&mut a, "contacts", json!({"first_name": "One"}));
    let r2 = create(&mut a, "contacts", json!({"first_name": "Two"}));
    for k in 0..2 {
        ca.advance(1);
        for id in [&r1, &r2] {
            a.update(id, &f(json!({"city": format!("c{k}")})), None, false)
                .unwrap();
        }
    }
    // B takes each record's three changes in one batch: its first stored
    // form holds all three.
    let all = |a: &mut Store, id: &RecordId| a.changes_for(id, &[]).unwrap();
    let batch = vec![
        (r1.clone(), all(&mut a, &r1)),
        (r2.clone(), all(&mut a, &r2)),
    ];
    assert!(b.apply_remote(batch).unwrap().rejected.is_empty());
    let base = b.heads(&r2).unwrap();
    // Two more changes of r2 land on B as one chunk, whose base is `base`.
    for k in 2..4 {
        ca.advance(1);
        a.update(&r2, &f(json!({"city": format!("c{k}")})), None, false)
            .unwrap();
    }
    let newer = a.changes_for(&r2, &base).unwrap();
    assert_eq!(newer.len(), 2);
    assert!(
        b.apply_remote(vec![(r2.clone(), newer.clone())])
            .unwrap()
            .rejected
            .is_empty()
    );
    b.clear_cache();
    let wanted = vec![(r1.clone(), Vec::new()), (r2.clone(), base.clone())];
    let served = b.changes_for_many(&wanted).unwrap();
    assert_eq!(served[0].len(), 3);
    assert_eq!(served[1], newer, "served from the chunk at B's heads");

    // Cut r1's stored changes short at a change boundary (the last change
    // dropped): serving them must not pass for r1's whole history.
    let key = r1.as_str().as_bytes().to_vec();
    let snap = b.kv().get(Cf::Snapshots, &key).unwrap().unwrap();
    let last = served[0].last().unwrap().len();
    let cut = snap[..snap.len() - last].to_vec();
    b.kv()
        .write(vec![(Cf::Snapshots, key.clone(), Some(cut))])
        .unwrap();
    b.clear_cache();
    let got = b.changes_for_many(&[(r1.clone(), Vec::new())]);
    assert!(
        matches!(got, Err(Error::Corrupt(_))),
        "a shortened history was served: {got:?}"
    );
    b.kv()
        .write(vec![(Cf::Snapshots, key, Some(snap))])
        .unwrap();
    assert_eq!(
        b.changes_for_many(&[(r1.clone(), Vec::new())]).unwrap()[0].len(),
        3
    );

    // The same for r2's chunk: its second change dropped.
    let mut chunk_key = None;
    b.kv()
        .scan(Cf::Chunks, b"", b"", &mut |k, _| {
            chunk_key = Some(k.to_vec());
            false
        })
        .unwrap();
    let chunk_key = chunk_key.expect("r2 has a chunk");
    let chunk = b.kv().get(Cf::Chunks, &chunk_key).unwrap().unwrap();
    let cut = chunk[..chunk.len() - newer[1].len()].to_vec();
    b.kv()
        .write(vec![(Cf::Chunks, chunk_key, Some(cut))])
        .unwrap();
    b.clear_cache();
    for have in [base, Vec::new()] {
        let got = b.changes_for_many(&[(r2.clone(), have)]);
        assert!(
            matches!(got, Err(Error::Corrupt(_))),
            "a shortened history was served: {got:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 8. Property: any sequence of operations survives close and reopen.

#[derive(Debug, Clone)]
enum Op {
    Create {
        email: u8,
        city: u8,
        force: bool,
    },
    Update {
        rec: u8,
        field: u8,
        value: u8,
        based: bool,
        force: bool,
    },
    Delete {
        rec: u8,
    },
    Restore {
        rec: u8,
        force: bool,
    },
    AddPhone {
        rec: u8,
        number: u8,
    },
    PeerCreate {
        email: u8,
    },
    PeerEdit {
        rec: u8,
        field: u8,
        value: u8,
        delete: bool,
    },
    Sync,
    Reopen,
}

const EMAILS: [&str; 4] = ["a@x.org", " A@X.org", "b@x.org", "c@x.org"];
const FIELDS: [&str; 5] = ["email", "city", "bank_account", "member_key", "phone"];

fn field_value(field: u8, value: u8) -> (String, Value) {
    let name = FIELDS[field as usize % FIELDS.len()];
    let v = match (name, value % 4) {
        (_, 3) => Value::Null,
        ("email", v) => json!(EMAILS[v as usize]),
        (_, v) => json!(format!("v{v}")),
    };
    (name.to_string(), v)
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4, 0u8..3, prop::bool::weighted(0.2))
            .prop_map(|(email, city, force)| Op::Create { email, city, force }),
        5 => (any::<u8>(), any::<u8>(), any::<u8>(), prop::bool::weighted(0.3), prop::bool::weighted(0.2))
            .prop_map(|(rec, field, value, based, force)| Op::Update { rec, field, value, based, force }),
        2 => any::<u8>().prop_map(|rec| Op::Delete { rec }),
        2 => (any::<u8>(), prop::bool::weighted(0.3)).prop_map(|(rec, force)| Op::Restore { rec, force }),
        1 => (any::<u8>(), 0u8..2).prop_map(|(rec, number)| Op::AddPhone { rec, number }),
        2 => (0u8..4).prop_map(|email| Op::PeerCreate { email }),
        3 => (any::<u8>(), any::<u8>(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(rec, field, value, delete)| Op::PeerEdit { rec, field, value, delete }),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

/// Refusals a random sequence runs into by design; anything else is a bug.
fn expected_refusal(r: Result<(), Error>) -> Result<(), TestCaseError> {
    match r {
        Ok(()) => Ok(()),
        Err(Error::Duplicate { .. } | Error::BadReference { .. }) => Ok(()),
        Err(Error::Model(
            ModelError::Deleted(_) | ModelError::NotDeleted(_) | ModelError::MissingRequired(_),
        )) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!("unexpected error: {e:?}"))),
    }
}

fn pick(ids: &[RecordId], n: u8) -> Option<RecordId> {
    if ids.is_empty() {
        None
    } else {
        Some(ids[n as usize % ids.len()].clone())
    }
}

fn ids_of(store: &mut Store) -> Vec<RecordId> {
    let mut out = Vec::new();
    for c in ["contacts", "phones"] {
        out.extend(
            store
                .list(c, None, 10_000, true)
                .unwrap()
                .records
                .into_iter()
                .map(|r| r.id),
        );
    }
    out
}

fn sync_into(from: &mut Store, to: &mut Store) -> Result<(), TestCaseError> {
    let mut batch = Vec::new();
    for id in ids_of(from) {
        let have = to.heads(&id).unwrap();
        let changes = from.changes_for(&id, &have).unwrap();
        if !changes.is_empty() {
            batch.push((id, changes));
        }
    }
    let report = to.apply_remote(batch).unwrap();
    prop_assert!(report.rejected.is_empty(), "{:?}", report);
    prop_assert_eq!(report.changes_pending, 0);
    Ok(())
}

fn run_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let ck = clock(21);
    let pk = clock(22);
    let opts = || StoreOptions {
        compact_after_chunks: 3,
        cache_records: 2,
        ..fast()
    };
    let mut main = Some(open(&path, nid(1), &ck, opts()));
    let (_pkv, mut peer) = mem(nid(9), &pk);
    let mut first_heads: std::collections::BTreeMap<RecordId, Vec<String>> = Default::default();

    for op in ops {
        ck.advance(3);
        pk.advance(3);
        let store = main.as_mut().unwrap();
        let ids = ids_of(store);
        match op {
            Op::Create { email, city, force } => {
                let fields =
                    f(json!({"email": EMAILS[*email as usize], "city": format!("c{city}")}));
                let r = store.create("contacts", None, &fields, *force).map(|w| {
                    first_heads.insert(w.record.id.clone(), w.record.heads.clone());
                });
                expected_refusal(r)?;
            }
            Op::Update {
                rec,
                field,
                value,
                based,
                force,
            } => {
                let Some(id) = pick(&ids, *rec) else { continue };
                let (name, v) = field_value(*field, *value);
                let collection = view(store, &id).collection;
                let fields = if collection == "phones" {
                    f(json!({"kind": v}))
                } else {
                    one(name, v)
                };
                let base = if *based {
                    first_heads.get(&id).cloned()
                } else {
                    None
                };
                let r = store
                    .update(&id, &fields, base.as_deref(), *force)
                    .map(|_| ());
                expected_refusal(r)?;
            }
            Op::Delete { rec } => {
                let Some(id) = pick(&ids, *rec) else { continue };
                expected_refusal(store.delete(&id).map(|_| ()))?;
            }
            Op::Restore { rec, force } => {
                let Some(id) = pick(&ids, *rec) else { continue };
                expected_refusal(store.restore(&id, &Map::new(), *force).map(|_| ()))?;
            }
            Op::AddPhone { rec, number } => {
                let Some(id) = pick(&ids, *rec) else { continue };
                let fields = f(json!({"contact_id": id.as_str(), "number": format!("{number}")}));
                expected_refusal(store.create("phones", None, &fields, false).map(|_| ()))?;
            }
            Op::PeerCreate { email } => {
                let fields = f(json!({"email": EMAILS[*email as usize]}));
                expected_refusal(peer.create("contacts", None, &fields, false).map(|_| ()))?;
            }
            Op::PeerEdit {
                rec,
                field,
                value,
                delete,
            } => {
                let pids = ids_of(&mut peer);
                let Some(id) = pick(&pids, *rec) else {
                    continue;
                };
                let r = if *delete {
                    peer.delete(&id).map(|_| ())
                } else if view(&mut peer, &id).collection == "phones" {
                    continue;
                } else {
                    let (name, v) = field_value(*field, *value);
                    peer.update(&id, &one(name, v), None, false).map(|_| ())
                };
                expected_refusal(r)?;
            }
            Op::Sync => {
                sync_into(&mut peer, store)?;
                sync_into(store, &mut peer)?;
            }
            Op::Reopen => {
                let before = state(store);
                drop(main.take());
                let mut reopened = open(&path, nid(1), &ck, opts());
                prop_assert_eq!(state(&mut reopened), before);
                main = Some(reopened);
            }
        }
    }

    let mut store = main.take().unwrap();
    let before = state(&mut store);
    check_invariants(&before);
    store.clear_cache();
    prop_assert_eq!(&state(&mut store), &before, "after clearing the cache");
    drop(store);
    let mut store = open(&path, nid(1), &ck, opts());
    prop_assert_eq!(&state(&mut store), &before, "after reopening");
    // And the peer, given everything, converges on the same records.
    sync_into(&mut peer, &mut store)?;
    sync_into(&mut store, &mut peer)?;
    for id in ids_of(&mut store) {
        let (m, p) = (view(&mut store, &id), view(&mut peer, &id));
        prop_assert_eq!(&m.heads, &p.heads);
        prop_assert_eq!(&m.fields, &p.fields);
        prop_assert_eq!(m.deleted, p.deleted);
    }
    let mut mine: Vec<_> = all_collisions(&store)
        .into_iter()
        .filter(|c| c.is_open())
        .map(|c| c.id)
        .collect();
    let mut theirs: Vec<_> = all_collisions(&peer)
        .into_iter()
        .filter(|c| c.is_open())
        .map(|c| c.id)
        .collect();
    mine.sort();
    theirs.sort();
    prop_assert_eq!(
        mine,
        theirs,
        "converged nodes show the same open collisions"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_survive_reopen(ops in prop::collection::vec(op_strategy(), 1..30)) {
        run_ops(&ops)?;
    }
}
