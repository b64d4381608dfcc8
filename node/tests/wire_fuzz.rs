//! Wire fuzzing: random bytes and mutated valid frames (bit flips, byte
//! edits, truncation, deletion, inserted oversized length prefixes) fed to
//! `Message::decode` and to `SyncEngine::handle_message` in each session
//! state. Always an error or a closed session, never a panic; the store is
//! unharmed (what it held is intact and loads, and it stays consistent).

use std::sync::Arc;

use entente_model::{NodeId, RecordId, Schema};
use entente_node::sync::wire::WIRE_VERSION;
use entente_node::sync::{Message, Output, PROTOCOL_VERSION, SyncConfig, SyncEngine};
use entente_node::{ManualClock, Store};
use proptest::prelude::*;
use serde_json::json;

const PEER: NodeId = NodeId([2; 16]);

fn schema() -> Arc<Schema> {
    Arc::new(Schema::default_crm())
}

fn rid(n: u8) -> RecordId {
    RecordId::new_v7(1_700_000_000_000, [n; 10])
}

/// A node with one local record, and a peer's record as raw changes.
struct Fixture {
    store: Store,
    local: RecordId,
    remote: RecordId,
    remote_changes: Vec<Vec<u8>>,
}

fn fixture() -> Fixture {
    let clock = |seed| Arc::new(ManualClock::new(1_700_000_000_000, seed));
    let mut store = Store::memory(schema(), NodeId([1; 16]), clock(5));
    let f = json!({"email": "local@x.org", "city": "Bern"});
    let local = store
        .create("contacts", None, f.as_object().unwrap(), false)
        .unwrap()
        .record
        .id;
    let mut peer = Store::memory(schema(), PEER, clock(6));
    let f = json!({"email": "remote@x.org"});
    let remote = peer
        .create("contacts", None, f.as_object().unwrap(), false)
        .unwrap()
        .record
        .id;
    let f = json!({"city": "Basel"});
    peer.update(&remote, f.as_object().unwrap(), None, false)
        .unwrap();
    let remote_changes = peer.changes_for(&remote, &[]).unwrap();
    Fixture {
        store,
        local,
        remote,
        remote_changes,
    }
}

fn hello(store: &Store) -> Message {
    Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: PEER,
        schema_fingerprint: store.schema().fingerprint().to_string(),
        collections: vec!["contacts".into()],
    }
}

/// Valid messages of every kind, some carrying real changes.
fn valid_messages(fx: &Fixture) -> Vec<Message> {
    vec![
        hello(&fx.store),
        Message::HelloRefused {
            reason: "no".into(),
        },
        Message::PullRequest { since: 3, limit: 7 },
        Message::PullResponse {
            entries: vec![
                (fx.remote.clone(), vec![[9; 32]]),
                (rid(4), vec![[1; 32], [2; 32]]),
            ],
            next_since: 5,
            more: true,
        },
        Message::FetchRequest {
            items: vec![(fx.local.clone(), vec![]), (rid(5), vec![[3; 32]])],
        },
        Message::FetchResponse {
            items: vec![(fx.remote.clone(), fx.remote_changes.clone(), true)],
        },
        Message::Push {
            entries: vec![(fx.remote.clone(), vec![[7; 32]])],
        },
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Truncate(usize),
    Delete(usize),
    /// A huge varint (a length or count field gone wild) inserted.
    InsertLength(usize, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<usize>().prop_map(Mutation::Delete),
        (
            any::<usize>(),
            prop_oneof![Just(u64::MAX), Just(1u64 << 32), 0u64..100_000]
        )
            .prop_map(|(i, n)| Mutation::InsertLength(i, n)),
    ]
}

fn mutate(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        if b.is_empty() {
            break;
        }
        match *m {
            Mutation::FlipBit(i, bit) => {
                let i = i % b.len();
                b[i] ^= 1 << bit;
            }
            Mutation::SetByte(i, v) => {
                let i = i % b.len();
                b[i] = v;
            }
            Mutation::Truncate(i) => b.truncate(i % b.len()),
            Mutation::Delete(i) => {
                b.remove(i % b.len());
            }
            Mutation::InsertLength(i, mut n) => {
                let at = i % (b.len() + 1);
                let mut varint = Vec::new();
                loop {
                    let byte = (n & 0x7f) as u8;
                    n >>= 7;
                    if n == 0 {
                        varint.push(byte);
                        break;
                    }
                    varint.push(byte | 0x80);
                }
                b.splice(at..at, varint);
            }
        }
    }
    b
}

/// Session states a frame can arrive in.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Connected, no hello yet.
    Fresh,
    /// Handshake done, a pull in flight.
    Pulling,
    /// A fetch of the peer's record in flight.
    Fetching,
}

fn engine_in(state: State, fx: &mut Fixture) -> SyncEngine<u8> {
    let mut e = SyncEngine::new(&fx.store, SyncConfig::default()).unwrap();
    e.peer_connected(1);
    if matches!(state, State::Pulling | State::Fetching) {
        let o = e.handle_message(&1, &hello(&fx.store).encode().unwrap(), &mut fx.store);
        assert!(!o.iter().any(|x| matches!(x, Output::Disconnect { .. })));
    }
    if matches!(state, State::Fetching) {
        let page = Message::PullResponse {
            entries: vec![(fx.remote.clone(), vec![[9; 32]])],
            next_since: 1,
            more: false,
        };
        let o = e.handle_message(&1, &page.encode().unwrap(), &mut fx.store);
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
    }
    e
}

/// Feeds `frame` in `state` and checks the aftermath.
fn feed(state: State, frame: &[u8]) -> Result<(), TestCaseError> {
    let mut fx = fixture();
    let before = fx.store.heads(&fx.local).unwrap();
    let mut e = engine_in(state, &mut fx);
    let out = e.handle_message(&1, frame, &mut fx.store);
    let closed = out.iter().any(|o| matches!(o, Output::Disconnect { .. }));
    // A closed session is gone: a later frame is dropped, not answered.
    if closed {
        prop_assert!(e.ready_peers().is_empty());
        prop_assert!(e.handle_message(&1, frame, &mut fx.store).is_empty());
    }
    // Every message the engine sends is well-formed.
    for o in &out {
        if let Output::Send { msg, .. } | Output::Broadcast { msg } = o {
            prop_assert!(msg.encode().is_ok(), "{msg:?}");
        }
    }
    // The store is unharmed: the local record is as it was; whatever is held
    // loads from storage; the remote record, if applied, is the real one.
    prop_assert_eq!(fx.store.heads(&fx.local).unwrap(), before);
    fx.store.clear_cache();
    let stats = fx.store.stats().unwrap();
    prop_assert!(stats.records <= 2);
    for entry in fx.store.changes_since(0, usize::MAX).unwrap() {
        prop_assert!(fx.store.get(&entry.id).unwrap().is_some());
        prop_assert!(
            entry.id == fx.local || entry.id == fx.remote,
            "{}",
            entry.id
        );
    }
    Ok(())
}

const STATES: [State; 3] = [State::Fresh, State::Pulling, State::Fetching];

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), versioned in any::<bool>()) {
        let mut frame = bytes;
        if versioned {
            frame.insert(0, WIRE_VERSION);
        }
        if let Ok(m) = Message::decode(&frame) {
            prop_assert!(m.validate().is_ok());
        }
        for state in STATES {
            feed(state, &frame)?;
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(which in 0usize..7, ms in proptest::collection::vec(mutation(), 1..4)) {
        let fx = fixture();
        let msg = valid_messages(&fx).swap_remove(which);
        let frame = mutate(msg.encode().unwrap(), &ms);
        if let Ok(m) = Message::decode(&frame) {
            prop_assert!(m.validate().is_ok());
            // What decodes re-encodes to a frame that decodes the same.
            let again = m.encode().unwrap();
            prop_assert_eq!(Message::decode(&again).unwrap(), m);
        }
        for state in STATES {
            feed(state, &frame)?;
        }
    }
}

#[test]
fn the_unmutated_frames_are_accepted_where_they_belong() {
    // The fixture's frames are valid: the fuzz cases start from real traffic.
    let mut fx = fixture();
    for m in valid_messages(&fx) {
        assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
    }
    let resp = valid_messages(&fx).swap_remove(5);
    let mut e = engine_in(State::Fetching, &mut fx);
    let o = e.handle_message(&1, &resp.encode().unwrap(), &mut fx.store);
    assert!(
        !o.iter().any(|x| matches!(x, Output::Disconnect { .. })),
        "{o:?}"
    );
    assert_eq!(e.stats().changes_applied, 2);
    assert!(!fx.store.heads(&fx.remote).unwrap().is_empty());
}
