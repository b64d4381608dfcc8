//! Compare and repair: range-based set reconciliation over (record id,
//! heads), the state an initiator keeps, and the report it hands back.
//!
//! The protocol is described in the parent module's docs
//! ([`super`], "Compare and repair"). This module holds the pieces that do
//! not need the session machinery: fingerprints of a range of the store,
//! the responder's answer to a request, and the initiator's comparison of
//! one answered part.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;
use entente_model::{NodeId, RecordId};
use serde::{Deserialize, Serialize};

use super::wire::{
    Fingerprint, IdRange, MAX_ENTRIES, MAX_VERIFY_ITEMS, MAX_VERIFY_PARTS, Message, PartSummary,
};
use super::{Output, WireHeads, heads_to_wire};
use crate::error::{Error, Result};
use crate::store::Store;

/// A range whose fingerprints differ is split into this many parts.
pub const VERIFY_FANOUT: usize = 16;
/// A differing range holding at most this many records (at the responder) is
/// answered with its item list instead of being split.
pub const VERIFY_ITEMS: usize = 32;
/// A part of a split range holding at most this many records is listed
/// right away (saves a round for the last few records, costs little).
pub const VERIFY_LIST_PART: usize = 4;
/// Most ranges the initiator puts in one request.
pub const VERIFY_BATCH: usize = 64;
/// Estimated bytes of item lists a response carries before the responder
/// answers further parts by fingerprint only (always correct, one more round).
pub const VERIFY_RESPONSE_BUDGET: usize = 4 << 20;
/// Most record ids listed in a [`VerifyReport`] (counts are always whole).
pub const MAX_REPORTED_IDS: usize = 10_000;

/// What one compare-and-repair run found and did, from the initiator's side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The peer's node id.
    pub peer_node: Option<NodeId>,
    /// Whether the run finished (every range compared, every repair fetch
    /// answered). `false` with `error` when the session broke.
    pub complete: bool,
    /// Why the run stopped early.
    pub error: Option<String>,
    /// Records this node held when the run started.
    pub local_records: u64,
    /// Request/response rounds of the comparison.
    pub rounds: u64,
    /// Range fingerprints compared, on both sides.
    pub ranges_compared: u64,
    /// Verify and repair-offer messages sent by this node.
    pub messages_sent: u64,
    /// Verify messages received.
    pub messages_received: u64,
    /// Bytes of the messages sent (encoded frames).
    pub bytes_sent: u64,
    /// Bytes of the messages received.
    pub bytes_received: u64,
    /// Records whose heads differed (or that one side lacked).
    pub differing: u64,
    /// The first [`MAX_REPORTED_IDS`] of them, in id order.
    pub records_differing: Vec<RecordId>,
    /// Records asked from the peer through the fetch path.
    pub records_fetched: u64,
    /// Records whose heads changed here by the repair.
    pub repaired: u64,
    /// The first [`MAX_REPORTED_IDS`] of them.
    pub records_repaired: Vec<RecordId>,
    /// Records offered to the peer (it lacked changes of ours: it fetches
    /// them through its ordinary fetch path).
    pub records_offered: u64,
    /// Records the store refused while repairing (quarantined, reported).
    pub records_rejected: u64,
}

/// The initiator's state of a run with one peer.
#[derive(Debug)]
pub(crate) struct VerifyRun {
    pub(crate) report: VerifyReport,
    /// Ranges (with our fingerprints) still to ask about, in id order.
    pub(crate) pending: BTreeMap<String, (IdRange, Fingerprint)>,
    /// The ranges of the request in flight.
    pub(crate) asked: Option<Vec<IdRange>>,
    /// Records queued for fetching by this run, not yet answered, with the
    /// peer's heads (after the fetch, ours differing from them means the
    /// peer lacks changes of ours: it is offered them).
    pub(crate) awaiting: BTreeMap<RecordId, WireHeads>,
    pub(crate) differing: BTreeSet<RecordId>,
}

impl VerifyRun {
    pub(crate) fn new(peer_node: Option<NodeId>, whole: Fingerprint) -> VerifyRun {
        let mut pending = BTreeMap::new();
        pending.insert(String::new(), (IdRange::all(), whole));
        VerifyRun {
            report: VerifyReport {
                peer_node,
                local_records: whole.count,
                ..VerifyReport::default()
            },
            pending,
            asked: None,
            awaiting: BTreeMap::new(),
            differing: BTreeSet::new(),
        }
    }

    /// Offers `entries` (id, our heads) to the peer: a push to it alone; it
    /// fetches what it lacks through its ordinary fetch path.
    pub(crate) fn offer<P: Clone>(
        &mut self,
        peer: &P,
        entries: Vec<(RecordId, WireHeads)>,
        out: &mut Vec<Output<P>>,
    ) {
        self.report.records_offered += entries.len() as u64;
        for chunk in entries.chunks(MAX_ENTRIES) {
            let msg = Message::Push {
                entries: chunk.to_vec(),
            };
            self.report.messages_sent += 1;
            self.report.bytes_sent += msg.encode().map_or(0, |b| b.len() as u64);
            out.push(Output::Send {
                peer: peer.clone(),
                msg,
            });
        }
    }

    /// Whether nothing is left to compare or fetch.
    pub(crate) fn done(&self) -> bool {
        self.pending.is_empty() && self.asked.is_none() && self.awaiting.is_empty()
    }

    pub(crate) fn finish(mut self, error: Option<String>) -> VerifyReport {
        self.report.complete = error.is_none();
        self.report.error = error;
        self.report.differing = self.differing.len() as u64;
        self.report.records_differing = self.differing.into_iter().take(MAX_REPORTED_IDS).collect();
        self.report
    }
}

/// The hash of one record for fingerprints: BLAKE3 of the id, a zero byte
/// and the heads sorted, cut to 128 bits.
fn item_hash(id: &str, heads: &[ChangeHash]) -> u128 {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut h = blake3::Hasher::new();
    h.update(id.as_bytes());
    h.update(&[0]);
    for c in sorted {
        h.update(&c.0);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    u128::from_le_bytes(out)
}

#[derive(Debug, Default, Clone, Copy)]
struct Acc {
    count: u64,
    sum: u128,
}

impl Acc {
    fn add(&mut self, id: &str, heads: &[ChangeHash]) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(item_hash(id, heads));
    }

    fn fingerprint(self) -> Fingerprint {
        Fingerprint {
            count: self.count,
            sum: self.sum.to_le_bytes(),
        }
    }
}

/// This store's fingerprint of `range` (one scan of the records metadata).
pub fn fingerprint(store: &Store, range: &IdRange) -> Result<Fingerprint> {
    let mut acc = Acc::default();
    store.scan_heads(&range.lo, range.hi.as_deref(), &mut |id, heads| {
        acc.add(id, &heads);
        true
    })?;
    Ok(acc.fingerprint())
}

/// This store's records in `range`, with their heads.
pub fn items(store: &Store, range: &IdRange) -> Result<BTreeMap<RecordId, Vec<ChangeHash>>> {
    let mut out = BTreeMap::new();
    let mut bad = None;
    store.scan_heads(
        &range.lo,
        range.hi.as_deref(),
        &mut |id, heads| match RecordId::parse(id) {
            Ok(id) => {
                out.insert(id, heads);
                true
            }
            Err(e) => {
                bad = Some(e);
                false
            }
        },
    )?;
    match bad {
        Some(e) => Err(Error::Corrupt(format!("a stored record id: {e}"))),
        None => Ok(out),
    }
}

/// One part of a range being cut by the responder.
struct Part {
    range: IdRange,
    acc: Acc,
    items: Vec<(RecordId, WireHeads)>,
}

fn item_bytes(id: &RecordId, heads: &WireHeads) -> usize {
    id.as_str().len() + 2 + heads.len() * 32
}

/// The responder's answer to one request: for each range whose fingerprint
/// differs from ours, our item list when we hold at most [`VERIFY_ITEMS`]
/// records in it, else ours split into [`VERIFY_FANOUT`] parts of about
/// equal count (cut at our own ids), each summarized by its fingerprint (by
/// its item list when it holds at most [`VERIFY_LIST_PART`]). Returns the
/// parts and the number of ranges compared.
pub(crate) fn answer(
    store: &Store,
    ranges: &[(IdRange, Fingerprint)],
) -> Result<(Vec<(IdRange, PartSummary)>, u64)> {
    let mut parts = Vec::new();
    let mut budget = VERIFY_RESPONSE_BUDGET;
    let mut item_total = 0usize;
    for (range, theirs) in ranges {
        let mine = fingerprint(store, range)?;
        if mine == *theirs {
            continue;
        }
        // Parts of `per` records each (the last one takes the rest).
        let count = mine.count as usize;
        let per = if count <= VERIFY_ITEMS {
            count.max(1)
        } else {
            count.div_ceil(VERIFY_FANOUT)
        };
        let listed = count <= VERIFY_ITEMS || per <= VERIFY_LIST_PART;
        let mut cut = vec![Part {
            range: range.clone(),
            acc: Acc::default(),
            items: Vec::new(),
        }];
        let mut seen = 0usize;
        let mut bad = None;
        store.scan_heads(&range.lo, range.hi.as_deref(), &mut |id, heads| {
            if seen > 0 && seen.is_multiple_of(per) {
                let last = cut.last_mut().expect("one part at least");
                last.range.hi = Some(id.to_string());
                cut.push(Part {
                    range: IdRange {
                        lo: id.to_string(),
                        hi: range.hi.clone(),
                    },
                    acc: Acc::default(),
                    items: Vec::new(),
                });
            }
            seen += 1;
            let part = cut.last_mut().expect("one part at least");
            part.acc.add(id, &heads);
            if listed {
                match RecordId::parse(id) {
                    Ok(rid) => part.items.push((rid, heads_to_wire(&heads))),
                    Err(e) => {
                        bad = Some(e);
                        return false;
                    }
                }
            }
            true
        })?;
        if let Some(e) = bad {
            return Err(Error::Corrupt(format!("a stored record id: {e}")));
        }
        for Part {
            range: r,
            acc,
            items: list,
        } in cut
        {
            if parts.len() >= MAX_VERIFY_PARTS {
                // Cannot happen with the caps in force (64 ranges x 16
                // parts); refuse rather than send a frame the peer refuses.
                return Err(Error::Protocol(
                    "verify response would exceed its caps".into(),
                ));
            }
            let bytes: usize = list.iter().map(|(id, h)| item_bytes(id, h)).sum();
            let summary = if listed
                && (bytes <= budget || parts.is_empty())
                && item_total + list.len() <= MAX_VERIFY_ITEMS
            {
                budget = budget.saturating_sub(bytes);
                item_total += list.len();
                PartSummary::Items(list)
            } else {
                PartSummary::Fingerprint(acc.fingerprint())
            };
            parts.push((r, summary));
        }
    }
    Ok((parts, ranges.len() as u64))
}

/// What the initiator makes of one item-listed part.
#[derive(Debug, Default)]
pub(crate) struct PartDiff {
    /// Records the peer holds at heads other than ours (or we lack), with
    /// the peer's heads: fetch (what we lack of them comes back; whether the
    /// peer lacks something of ours is known once it is applied).
    pub(crate) fetch: Vec<(RecordId, WireHeads)>,
    /// Records the peer lacks: offer.
    pub(crate) offer: Vec<(RecordId, WireHeads)>,
    /// Every differing record.
    pub(crate) differing: Vec<RecordId>,
}

/// Compares the peer's item list of `range` with ours.
pub(crate) fn compare_items(
    store: &Store,
    range: &IdRange,
    theirs: Vec<(RecordId, WireHeads)>,
) -> Result<PartDiff> {
    let mut mine = items(store, range)?;
    let mut diff = PartDiff::default();
    for (id, their_heads) in theirs {
        let their_set: BTreeSet<[u8; 32]> = their_heads.iter().copied().collect();
        match mine.remove(&id) {
            Some(my_heads) => {
                let my_set: BTreeSet<[u8; 32]> = my_heads.iter().map(|h| h.0).collect();
                if my_set != their_set {
                    diff.fetch.push((id.clone(), their_heads));
                    diff.differing.push(id);
                }
            }
            None => {
                diff.fetch.push((id.clone(), their_heads));
                diff.differing.push(id);
            }
        }
    }
    for (id, my_heads) in mine {
        diff.offer.push((id.clone(), heads_to_wire(&my_heads)));
        diff.differing.push(id);
    }
    diff.differing.sort();
    Ok(diff)
}
