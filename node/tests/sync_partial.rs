//! Partial replication in the sync engine (`SyncConfig::collections`,
//! `[sync] collections` in the config): a node that replicates only some
//! collections says so in its `Hello`, is served only those, fetches only
//! those, stores only those, and serves only those.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use entente_model::{NodeId, RecordId, Schema};
use entente_node::sync::{Message, Output, PROTOCOL_VERSION, SyncConfig, SyncEngine};
use entente_node::{Error, ManualClock, Store};
use serde_json::{Value, json};

fn store(n: u8) -> Store {
    Store::memory(
        Arc::new(Schema::default_crm()),
        NodeId([n; 16]),
        Arc::new(ManualClock::new(1_700_000_000_000, n as u64)),
    )
}

fn config(collections: &[&str]) -> SyncConfig {
    SyncConfig {
        pull_interval_ms: 1_000,
        pull_limit: 2,
        fetch_batch: 2,
        fetch_budget_bytes: 4096,
        collections: collections.iter().map(|c| c.to_string()).collect(),
        // The ordinary path unless a test asks for the bulk full sync.
        bulk_full_sync: false,
        ..SyncConfig::default()
    }
}

fn put(s: &mut Store, collection: &str, fields: Value) -> RecordId {
    s.create(collection, None, fields.as_object().unwrap(), false)
        .unwrap()
        .record
        .id
}

/// Two engines over one FIFO link, 0 ↔ 1.
struct Pair {
    stores: [Store; 2],
    engines: [SyncEngine<usize>; 2],
    wire: VecDeque<(usize, Vec<u8>)>,
    /// (sender, message kind) of every message sent.
    sent: Vec<(usize, &'static str)>,
    closed: Vec<String>,
    now: u64,
}

impl Pair {
    fn new(a: &[&str], b: &[&str]) -> Pair {
        Pair::with(store(1), store(2), a, b)
    }

    fn with(s0: Store, s1: Store, a: &[&str], b: &[&str]) -> Pair {
        Pair::with_bulk(s0, s1, a, b, false)
    }

    fn with_bulk(s0: Store, s1: Store, a: &[&str], b: &[&str], bulk: bool) -> Pair {
        let engines = [
            SyncEngine::new(
                &s0,
                SyncConfig {
                    bulk_full_sync: bulk,
                    ..config(a)
                },
            )
            .unwrap(),
            SyncEngine::new(
                &s1,
                SyncConfig {
                    bulk_full_sync: bulk,
                    ..config(b)
                },
            )
            .unwrap(),
        ];
        Pair {
            stores: [s0, s1],
            engines,
            wire: VecDeque::new(),
            sent: Vec::new(),
            closed: Vec::new(),
            now: 0,
        }
    }

    fn apply(&mut self, from: usize, outs: Vec<Output<usize>>) {
        for o in outs {
            match o {
                Output::Send { msg, .. } | Output::Broadcast { msg } => {
                    self.sent.push((from, msg.kind()));
                    self.wire.push_back((1 - from, msg.encode().unwrap()));
                }
                Output::Disconnect { reason, .. } => self.closed.push(reason),
            }
        }
    }

    fn connect(&mut self) {
        for i in 0..2 {
            let o = self.engines[i].peer_connected(1 - i);
            self.apply(i, o);
        }
        self.run();
    }

    fn run(&mut self) {
        let mut steps = 0;
        while let Some((to, frame)) = self.wire.pop_front() {
            let o = self.engines[to].handle_message(&(1 - to), &frame, &mut self.stores[to]);
            self.apply(to, o);
            steps += 1;
            assert!(steps < 10_000, "no quiescence");
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now += ms;
        for i in 0..2 {
            let o = self.engines[i].tick(self.now);
            self.apply(i, o);
        }
        self.run();
    }

    fn push(&mut self, from: usize, id: &RecordId) {
        let heads = self.stores[from].heads(id).unwrap();
        let o = self.engines[from].local_change(id.clone(), &heads);
        self.apply(from, o);
        self.run();
    }

    fn collections(&self, i: usize) -> BTreeSet<String> {
        self.stores[i]
            .changes_since(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.collection)
            .collect()
    }

    fn has(&self, i: usize, id: &RecordId) -> bool {
        !self.stores[i].heads(id).unwrap().is_empty()
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|c| c.to_string()).collect()
}

#[test]
fn the_hello_names_the_replicated_collections() {
    let s = store(1);
    let mut e: SyncEngine<u8> = SyncEngine::new(&s, config(&["contacts", "addresses"])).unwrap();
    let o = e.peer_connected(3);
    match &o[..] {
        [
            Output::Send {
                msg:
                    Message::Hello {
                        protocol_version,
                        collections,
                        ..
                    },
                ..
            },
        ] => {
            assert_eq!(*protocol_version, PROTOCOL_VERSION);
            assert_eq!(collections, &["addresses", "contacts"]);
        }
        other => panic!("{other:?}"),
    }
    // A full node names none.
    let mut e: SyncEngine<u8> = SyncEngine::new(&s, config(&[])).unwrap();
    assert!(matches!(
        &e.peer_connected(3)[..],
        [Output::Send { msg: Message::Hello { collections, .. }, .. }] if collections.is_empty()
    ));
}

#[test]
fn unknown_collections_are_refused_in_the_config_and_in_a_hello() {
    let mut s = store(1);
    let e = SyncEngine::<u8>::new(&s, config(&["contacts", "gizmos"])).unwrap_err();
    assert!(
        matches!(e, Error::Config(ref m) if m.contains("gizmos")),
        "{e}"
    );
    let mut e: SyncEngine<u8> = SyncEngine::new(&s, config(&[])).unwrap();
    e.peer_connected(3);
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: NodeId([9; 16]),
        schema_fingerprint: s.schema().fingerprint().to_string(),
        collections: vec!["gizmos".into()],
    };
    let o = e.handle_message(&3, &hello.encode().unwrap(), &mut s);
    assert!(
        matches!(
            &o[..],
            [
                Output::Send {
                    msg: Message::HelloRefused { reason },
                    ..
                },
                Output::Disconnect { .. }
            ] if reason.contains("gizmos")
        ),
        "{o:?}"
    );
}

#[test]
fn a_partial_node_is_served_and_stores_only_its_collections() {
    served_only_its_collections(false);
}

#[test]
fn a_partial_node_filled_in_bulk_gets_only_its_collections() {
    served_only_its_collections(true);
}

fn served_only_its_collections(bulk: bool) {
    let mut p = Pair::with_bulk(store(1), store(2), &[], &["contacts", "addresses"], bulk);
    // Pages of 2 entries: the tags come first, so whole pages hold nothing
    // the partial node wants and must still move its checkpoint on.
    for i in 0..5 {
        put(&mut p.stores[0], "tags", json!({"name": format!("t{i}")}));
    }
    let mut contacts = Vec::new();
    for i in 0..3 {
        let c = put(
            &mut p.stores[0],
            "contacts",
            json!({"email": format!("c{i}@x.org")}),
        );
        put(
            &mut p.stores[0],
            "addresses",
            json!({"contact_id": c.as_str(), "city": "Bern"}),
        );
        put(
            &mut p.stores[0],
            "notes",
            json!({"contact_id": c.as_str(), "subject": "hi"}),
        );
        contacts.push(c);
    }
    p.connect();
    assert!(p.closed.is_empty(), "{:?}", p.closed);
    assert_eq!(p.collections(1), set(&["addresses", "contacts"]));
    assert_eq!(p.stores[1].stats().unwrap().records, 6);
    let st = p.engines[1].stats();
    if bulk {
        assert_eq!(st.records_bulk, 6, "only the wanted records: {st:?}");
        assert_eq!(st.records_fetched, 0, "{st:?}");
    } else {
        assert_eq!(st.records_fetched, 6, "only the wanted records: {st:?}");
        assert_eq!(st.bulk_pulls, 0, "{st:?}");
    }
    assert_eq!(st.records_ignored, 0);
    // The checkpoint is at the end of node 0's feed, past the tags and notes.
    let cp = entente_node::sync::load_checkpoint(&p.stores[1], &NodeId([1; 16])).unwrap();
    assert_eq!(cp, p.stores[0].feed_seq());
    for c in &contacts {
        assert_eq!(p.stores[1].heads(c).unwrap(), p.stores[0].heads(c).unwrap());
    }
}

#[test]
fn pushes_of_other_collections_are_not_fetched() {
    let mut p = Pair::new(&[], &["contacts"]);
    let known = put(&mut p.stores[0], "contacts", json!({"email": "k@x.org"}));
    p.connect();
    assert!(p.has(1, &known));

    // A tag: pushed, never fetched, not even by the pull it prompts.
    let tag = put(&mut p.stores[0], "tags", json!({"name": "vip"}));
    p.sent.clear();
    p.push(0, &tag);
    assert_eq!(
        p.sent,
        [(0, "push")],
        "a push of an unknown record waits for the pull"
    );
    p.tick(1);
    assert!(!p.sent.contains(&(1, "fetch-req")), "{:?}", p.sent);
    assert!(!p.has(1, &tag));

    // An edit of a contact it holds: fetched at once.
    let f = json!({"city": "Basel"});
    p.stores[0]
        .update(&known, f.as_object().unwrap(), None, false)
        .unwrap();
    p.sent.clear();
    p.push(0, &known);
    assert_eq!(
        p.sent,
        [
            (0, "push"),
            (1, "fetch-req"),
            (0, "fetch-resp"),
            (1, "push")
        ]
    );
    assert_eq!(
        p.stores[1].heads(&known).unwrap(),
        p.stores[0].heads(&known).unwrap()
    );

    // A new contact: its push prompts a pull at the next tick, which brings it.
    let fresh = put(&mut p.stores[0], "contacts", json!({"email": "n@x.org"}));
    p.push(0, &fresh);
    assert!(!p.has(1, &fresh));
    p.tick(1);
    assert!(p.has(1, &fresh));
    assert_eq!(p.collections(1), set(&["contacts"]));
    assert!(p.closed.is_empty(), "{:?}", p.closed);
}

#[test]
fn records_of_other_collections_sent_anyway_are_dropped() {
    // A peer that ignores the Hello and answers a fetch with a tag's changes.
    let mut s = store(1);
    let mut e: SyncEngine<u8> = SyncEngine::new(&s, config(&["contacts"])).unwrap();
    let mut other = store(2);
    let tag = put(&mut other, "tags", json!({"name": "vip"}));
    let contact = put(&mut other, "contacts", json!({"email": "a@x.org"}));
    e.peer_connected(3);
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: NodeId([2; 16]),
        schema_fingerprint: s.schema().fingerprint().to_string(),
        collections: Vec::new(),
    };
    e.handle_message(&3, &hello.encode().unwrap(), &mut s);
    let page = Message::PullResponse {
        entries: vec![
            (tag.clone(), vec![[1; 32]]),
            (contact.clone(), vec![[2; 32]]),
        ],
        next_since: 2,
        more: false,
    };
    let o = e.handle_message(&3, &page.encode().unwrap(), &mut s);
    assert!(
        matches!(&o[..], [Output::Send { msg: Message::FetchRequest { items }, .. }] if items.len() == 2),
        "{o:?}"
    );
    let resp = Message::FetchResponse {
        items: vec![
            (
                contact.clone(),
                other.changes_for(&contact, &[]).unwrap(),
                true,
            ),
            (tag.clone(), other.changes_for(&tag, &[]).unwrap(), true),
        ],
    };
    let o = e.handle_message(&3, &resp.encode().unwrap(), &mut s);
    assert!(
        !o.iter().any(|x| matches!(x, Output::Disconnect { .. })),
        "{o:?}"
    );
    assert_eq!(e.stats().records_ignored, 1);
    assert!(!s.heads(&contact).unwrap().is_empty());
    assert!(s.heads(&tag).unwrap().is_empty());
    let st = s.stats().unwrap();
    assert_eq!((st.records, st.pending_changes, st.quarantined), (1, 0, 0));
    // Gossip names only the record that was stored.
    let pushed: Vec<&RecordId> = o
        .iter()
        .filter_map(|x| match x {
            Output::Broadcast {
                msg: Message::Push { entries },
            } => Some(entries.iter().map(|(id, _)| id)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(pushed, [&contact]);
}

#[test]
fn a_partial_node_serves_only_its_collections() {
    // Node 1 keeps only contacts but wrote a tag locally: a full peer pulling
    // from it gets the contacts only, and a fetch of the tag gets nothing.
    let mut s1 = store(2);
    let tag = put(&mut s1, "tags", json!({"name": "local"}));
    let c = put(&mut s1, "contacts", json!({"email": "c@x.org"}));
    let mut p = Pair::with(store(1), s1, &[], &["contacts"]);
    p.connect();
    assert!(p.has(0, &c));
    assert!(!p.has(0, &tag));
    // Asked directly (say, after a push), the tag is answered empty.
    let mut e: SyncEngine<u8> = SyncEngine::new(&p.stores[1], config(&["contacts"])).unwrap();
    e.peer_connected(5);
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: NodeId([7; 16]),
        schema_fingerprint: p.stores[1].schema().fingerprint().to_string(),
        collections: Vec::new(),
    };
    e.handle_message(&5, &hello.encode().unwrap(), &mut p.stores[1]);
    let ask = Message::FetchRequest {
        items: vec![(tag.clone(), vec![])],
    };
    let o = e.handle_message(&5, &ask.encode().unwrap(), &mut p.stores[1]);
    assert!(
        matches!(&o[..], [Output::Send { msg: Message::FetchResponse { items }, .. }]
            if items.len() == 1 && items[0].1.is_empty() && items[0].2),
        "{o:?}"
    );
}

#[test]
fn verify_is_refused_when_either_side_replicates_only_some_collections() {
    for (a, b) in [(&["contacts"][..], &[][..]), (&[][..], &["contacts"][..])] {
        let mut p = Pair::new(a, b);
        p.connect();
        for i in 0..2 {
            let e = p.engines[i]
                .start_verify(&(1 - i), &p.stores[i])
                .unwrap_err();
            assert_eq!(e.code(), "VERIFY_UNSUPPORTED", "{e}");
        }
    }
    // Two full nodes may.
    let mut p = Pair::new(&[], &[]);
    p.connect();
    assert!(p.engines[0].start_verify(&1, &p.stores[0]).is_ok());
}
