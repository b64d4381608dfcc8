//! The replication messages and their encoding on the wire.
//!
//! A frame is one version byte ([`WIRE_VERSION`]) followed by the message in
//! postcard (serde, varint-compact). Decoding refuses frames above
//! [`MAX_MESSAGE_BYTES`], unknown versions, trailing bytes, and messages whose
//! lists or strings exceed their caps ([`Message::validate`]). Record ids are
//! parsed (and so validated) by their serde implementation; change hashes are
//! fixed 32-byte arrays. Bad bytes give [`Error::Protocol`], never a panic.
//! Change bytes stay opaque here: the store parses each one on its own, size
//! capped and behind a panic guard, when it applies them.

use automerge::ChangeHash;
use entente_model::{NodeId, RecordId};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::MAX_CHANGE_BYTES;

/// The version byte every frame starts with (2: `Hello` carries the
/// replicated collections).
pub const WIRE_VERSION: u8 = 2;
/// The replication protocol version carried in the handshake (2: partial
/// replication; 3: the bulk full sync, `BulkRequest`/`BulkResponse`).
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest frame accepted or produced (bytes).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Most feed entries in one pull response, and most ids in one push.
pub const MAX_ENTRIES: usize = 4096;
/// Most records asked for (or answered) in one fetch.
pub const MAX_FETCH_ITEMS: usize = 4096;
/// Most heads one record may have on the wire.
pub const MAX_HEADS: usize = 256;
/// Longest schema fingerprint or refusal reason (bytes).
pub const MAX_TEXT_BYTES: usize = 1024;
/// Most collections named in a `Hello`.
pub const MAX_COLLECTIONS: usize = 256;
/// Longest collection name in a `Hello` (bytes).
pub const MAX_COLLECTION_NAME_BYTES: usize = 128;
/// Most ranges in one verify request.
pub const MAX_VERIFY_RANGES: usize = 1024;
/// Most parts in one verify response.
pub const MAX_VERIFY_PARTS: usize = 16_384;
/// Most (id, heads) items in one verify response, all parts together.
pub const MAX_VERIFY_ITEMS: usize = 65_536;
/// Longest range bound (bytes); record ids are 26 or 36.
pub const MAX_BOUND_BYTES: usize = 64;

/// A record's heads as raw 32-byte hashes.
pub type WireHeads = Vec<[u8; 32]>;

/// A summary of the records in a range of ids: how many, and the wrapping
/// sum of a 128-bit hash of each (id, sorted heads). Two nodes holding the
/// same records at the same heads in a range have the same fingerprint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Records in the range.
    pub count: u64,
    /// Sum (mod 2^128) of each record's hash, little-endian.
    pub sum: [u8; 16],
}

/// A range of record ids, `lo <= id < hi` in byte order of the ids; `lo`
/// empty is the start, `hi` absent is the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// Inclusive lower bound.
    pub lo: String,
    /// Exclusive upper bound (`None`: no bound).
    pub hi: Option<String>,
}

impl IdRange {
    /// Every id.
    pub fn all() -> IdRange {
        IdRange {
            lo: String::new(),
            hi: None,
        }
    }

    /// Whether `id` lies in the range.
    pub fn contains(&self, id: &str) -> bool {
        id >= self.lo.as_str() && self.hi.as_deref().is_none_or(|hi| id < hi)
    }

    /// Whether `inner` lies within this range.
    pub fn covers(&self, inner: &IdRange) -> bool {
        inner.lo >= self.lo
            && match (&self.hi, &inner.hi) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => b <= a,
            }
    }
}

/// What a verify responder says about one part of a range whose
/// fingerprints differed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartSummary {
    /// The responder's fingerprint of the part (the requester compares and
    /// asks again where it differs).
    Fingerprint(Fingerprint),
    /// Every record the responder holds in the part, in id order.
    Items(Vec<(RecordId, WireHeads)>),
}

/// One message between two sync engines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a session, sent by both sides.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        protocol_version: u32,
        /// The sender's node id (keys the receiver's checkpoint for it).
        node_id: NodeId,
        /// The sender's schema fingerprint; nodes with different schemas
        /// refuse to sync.
        schema_fingerprint: String,
        /// The collections the sender replicates, sorted; empty: all. The
        /// receiver serves it only these, and fetches only these from it.
        collections: Vec<String>,
    },
    /// The handshake was refused; the sender closes the session.
    HelloRefused {
        /// Why, for both sides' logs.
        reason: String,
    },
    /// "Your feed after `since`, at most `limit` entries."
    PullRequest {
        /// The requester's checkpoint in the responder's feed.
        since: u64,
        /// Most entries wanted.
        limit: u32,
    },
    /// A page of the responder's consolidated feed.
    PullResponse {
        /// Record ids with their heads at the responder, in feed order.
        entries: Vec<(RecordId, WireHeads)>,
        /// Where the next page starts (the last sequence in this one, or the
        /// request's `since` when empty).
        next_since: u64,
        /// Whether more entries follow `next_since`.
        more: bool,
    },
    /// "The changes of these records that are not in the past of my heads."
    FetchRequest {
        /// Record ids with the requester's heads.
        items: Vec<(RecordId, WireHeads)>,
    },
    /// Answers a fetch, in request order; may stop early to stay under the
    /// size budget (the requester asks again for what is missing).
    FetchResponse {
        /// Record id, raw Automerge changes in dependency order, and whether
        /// they are all of what the requester lacked (`false`: a prefix, the
        /// requester asks again from its new heads).
        items: Vec<(RecordId, Vec<Vec<u8>>, bool)>,
    },
    /// Gossip: these records changed here and now have these heads.
    Push {
        /// Record ids with the sender's heads.
        entries: Vec<(RecordId, WireHeads)>,
    },
    /// Compare and repair: "here are my fingerprints of these ranges".
    VerifyRequest {
        /// Sorted, disjoint ranges with the requester's fingerprints.
        ranges: Vec<(IdRange, Fingerprint)>,
    },
    /// Answers a verify request, for the ranges whose fingerprints differed
    /// at the responder: each split into parts, summarized by fingerprint or
    /// by the item list. Ranges that matched are not mentioned.
    VerifyResponse {
        /// Sorted, disjoint parts, each within a requested range.
        parts: Vec<(IdRange, PartSummary)>,
    },
    /// Bulk full sync: "your feed after `since` as whole records, at most
    /// `limit` of them". Sent by a node with an empty store instead of
    /// [`Message::PullRequest`]: it has none of the records, so naming their
    /// heads first and fetching them after would only cost a round trip.
    BulkRequest {
        /// The requester's checkpoint in the responder's feed.
        since: u64,
        /// Most records wanted.
        limit: u32,
    },
    /// A page of the responder's feed as whole records, in feed order.
    BulkResponse {
        /// Record id, every raw Automerge change of it in dependency order,
        /// and whether that is all of it (`false`: a record too big for the
        /// response's byte budget came as a prefix; the requester fetches
        /// the rest from its new heads).
        items: Vec<(RecordId, Vec<Vec<u8>>, bool)>,
        /// Where the next page starts (the last sequence this page covers,
        /// or the request's `since` when empty).
        next_since: u64,
        /// Whether more entries follow `next_since`.
        more: bool,
    },
}

impl Message {
    /// A short name for traces and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::HelloRefused { .. } => "hello-refused",
            Message::PullRequest { .. } => "pull-req",
            Message::PullResponse { .. } => "pull-resp",
            Message::FetchRequest { .. } => "fetch-req",
            Message::FetchResponse { .. } => "fetch-resp",
            Message::Push { .. } => "push",
            Message::VerifyRequest { .. } => "verify-req",
            Message::VerifyResponse { .. } => "verify-resp",
            Message::BulkRequest { .. } => "bulk-req",
            Message::BulkResponse { .. } => "bulk-resp",
        }
    }

    /// Checks every cap (list lengths, text lengths, change sizes).
    pub fn validate(&self) -> Result<()> {
        fn text(what: &str, s: &str) -> Result<()> {
            if s.len() > MAX_TEXT_BYTES {
                return Err(proto(format!("{what} of {} bytes", s.len())));
            }
            Ok(())
        }
        fn heads_list(what: &str, list: &[(RecordId, WireHeads)], cap: usize) -> Result<()> {
            if list.len() > cap {
                return Err(proto(format!("{what} with {} entries", list.len())));
            }
            if let Some((id, h)) = list.iter().find(|(_, h)| h.len() > MAX_HEADS) {
                return Err(proto(format!("{what}: {id} has {} heads", h.len())));
            }
            Ok(())
        }
        match self {
            Message::Hello {
                schema_fingerprint,
                collections,
                ..
            } => {
                text("schema fingerprint", schema_fingerprint)?;
                if collections.len() > MAX_COLLECTIONS {
                    return Err(proto(format!(
                        "hello names {} collections",
                        collections.len()
                    )));
                }
                if let Some(c) = collections
                    .iter()
                    .find(|c| c.is_empty() || c.len() > MAX_COLLECTION_NAME_BYTES)
                {
                    return Err(proto(format!("collection name of {} bytes", c.len())));
                }
                Ok(())
            }
            Message::HelloRefused { reason } => text("refusal reason", reason),
            Message::PullRequest { .. } => Ok(()),
            Message::PullResponse { entries, .. } => {
                heads_list("pull response", entries, MAX_ENTRIES)
            }
            Message::FetchRequest { items } => heads_list("fetch request", items, MAX_FETCH_ITEMS),
            Message::Push { entries } => heads_list("push", entries, MAX_ENTRIES),
            Message::FetchResponse { items } | Message::BulkResponse { items, .. } => {
                if items.len() > MAX_FETCH_ITEMS {
                    return Err(proto(format!("{} with {} items", self.kind(), items.len())));
                }
                for (id, changes, _) in items {
                    if let Some(c) = changes.iter().find(|c| c.len() > MAX_CHANGE_BYTES) {
                        return Err(proto(format!("{id}: change of {} bytes", c.len())));
                    }
                }
                Ok(())
            }
            Message::BulkRequest { .. } => Ok(()),
            Message::VerifyRequest { ranges } => {
                if ranges.len() > MAX_VERIFY_RANGES {
                    return Err(proto(format!(
                        "verify request with {} ranges",
                        ranges.len()
                    )));
                }
                sorted_ranges("verify request", ranges.iter().map(|(r, _)| r))
            }
            Message::VerifyResponse { parts } => {
                if parts.len() > MAX_VERIFY_PARTS {
                    return Err(proto(format!("verify response with {} parts", parts.len())));
                }
                sorted_ranges("verify response", parts.iter().map(|(r, _)| r))?;
                let mut total = 0;
                for (range, summary) in parts {
                    let PartSummary::Items(items) = summary else {
                        continue;
                    };
                    total += items.len();
                    if total > MAX_VERIFY_ITEMS {
                        return Err(proto(format!("verify response with {total}+ items")));
                    }
                    heads_list("verify part", items, MAX_VERIFY_ITEMS)?;
                    let mut prev: Option<&RecordId> = None;
                    for (id, _) in items {
                        if !range.contains(id.as_str()) || prev.is_some_and(|p| p >= id) {
                            return Err(proto(format!(
                                "verify part: {id} out of order or outside its range"
                            )));
                        }
                        prev = Some(id);
                    }
                }
                Ok(())
            }
        }
    }

    /// Encodes one frame. Fails (never panics) when the message breaks a cap.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut out = vec![WIRE_VERSION];
        postcard::to_io(self, &mut out).map_err(|e| proto(format!("encode: {e}")))?;
        if out.len() > MAX_MESSAGE_BYTES {
            return Err(proto(format!("message of {} bytes", out.len())));
        }
        Ok(out)
    }

    /// Decodes and validates one frame.
    pub fn decode(bytes: &[u8]) -> Result<Message> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(proto(format!("frame of {} bytes", bytes.len())));
        }
        let (&version, body) = bytes.split_first().ok_or_else(|| proto("empty frame"))?;
        if version != WIRE_VERSION {
            return Err(proto(format!("wire version {version}")));
        }
        let (msg, rest): (Message, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| proto(format!("decode: {e}")))?;
        if !rest.is_empty() {
            return Err(proto(format!("{} trailing bytes", rest.len())));
        }
        msg.validate()?;
        Ok(msg)
    }
}

/// Checks that ranges are well formed (bounds capped, `lo < hi`), sorted and
/// disjoint.
fn sorted_ranges<'a>(what: &str, ranges: impl Iterator<Item = &'a IdRange>) -> Result<()> {
    let mut prev_hi: Option<Option<&str>> = None;
    for r in ranges {
        if r.lo.len() > MAX_BOUND_BYTES || r.hi.as_ref().is_some_and(|h| h.len() > MAX_BOUND_BYTES)
        {
            return Err(proto(format!("{what}: a range bound is too long")));
        }
        if r.hi.as_deref().is_some_and(|hi| hi <= r.lo.as_str()) {
            return Err(proto(format!("{what}: an empty or inverted range")));
        }
        match prev_hi {
            Some(None) => return Err(proto(format!("{what}: a range after an unbounded one"))),
            Some(Some(h)) if r.lo.as_str() < h => {
                return Err(proto(format!("{what}: ranges overlap or are out of order")));
            }
            _ => {}
        }
        prev_hi = Some(r.hi.as_deref());
    }
    Ok(())
}

/// Heads to their wire form.
pub fn heads_to_wire(heads: &[ChangeHash]) -> WireHeads {
    heads.iter().map(|h| h.0).collect()
}

/// Heads from their wire form.
pub fn heads_from_wire(heads: &[[u8; 32]]) -> Vec<ChangeHash> {
    heads.iter().map(|h| ChangeHash(*h)).collect()
}

fn proto(what: impl Into<String>) -> Error {
    Error::Protocol(what.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> RecordId {
        RecordId::new_v7(1_700_000_000_000, [n; 10])
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: NodeId([7; 16]),
                schema_fingerprint: "abc".into(),
                collections: vec!["addresses".into(), "contacts".into()],
            },
            Message::HelloRefused {
                reason: "schema".into(),
            },
            Message::PullRequest {
                since: 42,
                limit: 100,
            },
            Message::PullResponse {
                entries: vec![(id(1), vec![[1; 32], [2; 32]]), (id(2), vec![])],
                next_since: 9,
                more: true,
            },
            Message::FetchRequest {
                items: vec![(id(3), vec![[3; 32]])],
            },
            Message::FetchResponse {
                items: vec![(id(4), vec![vec![1, 2, 3], vec![]], false)],
            },
            Message::Push {
                entries: vec![(id(5), vec![[5; 32]])],
            },
            Message::VerifyRequest {
                ranges: vec![
                    (
                        IdRange {
                            lo: String::new(),
                            hi: Some(id(6).as_str().to_string()),
                        },
                        Fingerprint {
                            count: 3,
                            sum: [6; 16],
                        },
                    ),
                    (
                        IdRange {
                            lo: id(6).as_str().to_string(),
                            hi: None,
                        },
                        Fingerprint::default(),
                    ),
                ],
            },
            Message::VerifyResponse {
                parts: vec![
                    (
                        IdRange {
                            lo: String::new(),
                            hi: Some(id(7).as_str().to_string()),
                        },
                        PartSummary::Items(vec![(id(6), vec![[6; 32]])]),
                    ),
                    (
                        IdRange {
                            lo: id(7).as_str().to_string(),
                            hi: None,
                        },
                        PartSummary::Fingerprint(Fingerprint {
                            count: 9,
                            sum: [1; 16],
                        }),
                    ),
                ],
            },
            Message::BulkRequest {
                since: 7,
                limit: 1000,
            },
            Message::BulkResponse {
                items: vec![
                    (id(8), vec![vec![8, 8], vec![9]], true),
                    (id(9), vec![vec![1]], false),
                ],
                next_since: 12,
                more: false,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode().unwrap();
            assert_eq!(bytes[0], WIRE_VERSION);
            assert_eq!(Message::decode(&bytes).unwrap(), m, "{}", m.kind());
        }
    }

    #[test]
    fn truncated_mutated_and_foreign_frames_are_errors_not_panics() {
        assert!(Message::decode(&[]).is_err());
        assert!(Message::decode(&[WIRE_VERSION + 1, 0]).is_err());
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut decoded = 0;
        for m in samples() {
            let bytes = m.encode().unwrap();
            for cut in 1..bytes.len() {
                assert!(
                    Message::decode(&bytes[..cut]).is_err(),
                    "{} cut {cut}",
                    m.kind()
                );
            }
            let mut extra = bytes.clone();
            extra.push(0);
            assert!(Message::decode(&extra).is_err());
            for _ in 0..500 {
                let mut b = bytes.clone();
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = 1 + (rng as usize) % (b.len() - 1);
                b[i] = (rng >> 32) as u8;
                // Must not panic; whatever decodes must pass validation.
                if let Ok(m) = Message::decode(&b) {
                    m.validate().unwrap();
                    decoded += 1;
                }
            }
        }
        assert!(
            decoded > 0,
            "some mutations still decode (e.g. changed bytes)"
        );
    }

    #[test]
    fn bad_record_ids_and_oversized_lists_are_refused() {
        // A record id that is not a UUID/ULID fails in serde's try_from.
        let mut bytes = vec![WIRE_VERSION];
        bytes.extend(
            postcard::to_stdvec(&(6u8, vec![("not-an-id".to_string(), Vec::<[u8; 32]>::new())]))
                .unwrap(),
        );
        assert!(Message::decode(&bytes).is_err());
        let big = Message::Push {
            entries: (0..=MAX_ENTRIES).map(|_| (id(1), vec![])).collect(),
        };
        assert!(matches!(big.encode(), Err(Error::Protocol(_))));
        let big_bulk = Message::BulkResponse {
            items: (0..=MAX_FETCH_ITEMS)
                .map(|_| (id(1), vec![], true))
                .collect(),
            next_since: 1,
            more: true,
        };
        assert!(matches!(big_bulk.encode(), Err(Error::Protocol(_))));
        let fat_change = Message::BulkResponse {
            items: vec![(id(1), vec![vec![0; MAX_CHANGE_BYTES + 1]], true)],
            next_since: 1,
            more: false,
        };
        assert!(matches!(fat_change.encode(), Err(Error::Protocol(_))));
        // A length prefix claiming 2^32 entries is an error, not an allocation.
        let mut huge = vec![WIRE_VERSION, 6];
        huge.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Message::decode(&huge).is_err());
        // Verify ranges must be sorted and disjoint, items inside their part.
        let r = |lo: &str, hi: Option<&str>| IdRange {
            lo: lo.to_string(),
            hi: hi.map(str::to_string),
        };
        let overlapping = Message::VerifyRequest {
            ranges: vec![
                (r("", Some("b")), Fingerprint::default()),
                (r("a", None), Fingerprint::default()),
            ],
        };
        assert!(overlapping.encode().is_err());
        let inverted = Message::VerifyRequest {
            ranges: vec![(r("b", Some("a")), Fingerprint::default())],
        };
        assert!(inverted.encode().is_err());
        let outside = Message::VerifyResponse {
            parts: vec![(r("", Some("0")), PartSummary::Items(vec![(id(1), vec![])]))],
        };
        assert!(outside.encode().is_err());
        let long = Message::HelloRefused {
            reason: "x".repeat(MAX_TEXT_BYTES + 1),
        };
        assert!(long.encode().is_err());
        let hello = |collections: Vec<String>| Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: NodeId([1; 16]),
            schema_fingerprint: "f".into(),
            collections,
        };
        assert!(hello(vec!["contacts".into()]).encode().is_ok());
        assert!(hello(vec![String::new()]).encode().is_err());
        assert!(
            hello(vec!["x".repeat(MAX_COLLECTION_NAME_BYTES + 1)])
                .encode()
                .is_err()
        );
        assert!(
            hello((0..=MAX_COLLECTIONS).map(|i| format!("c{i}")).collect())
                .encode()
                .is_err()
        );
    }
}
