//! The store: records as Automerge documents in RocksDB, their indexes, the
//! changes feed and the collisions, all changed together.
//!
//! Every operation — a local write, a batch of remote changes, a resolution —
//! runs the same way:
//!
//! 1. the records it touches are taken into a working set (from the bounded
//!    cache or from storage: snapshot plus appended change chunks);
//! 2. their documents are changed (validated first: nothing is written on a
//!    refused input);
//! 3. `finish` derives each touched record's index entries (unique values of
//!    live records, references), gives it the next feed sequence (dropping its
//!    previous feed entry: the feed is consolidated), appends the new change
//!    chunk (or a compacted snapshot), and re-evaluates every collision subject
//!    the change can affect;
//! 4. everything lands in **one** atomic, durable batch. Only then is the
//!    working set put back into the cache and the write acknowledged.
//!
//! A failure anywhere before step 4 leaves storage as it was, and the cache
//! never holds a document whose change was not persisted.

pub mod kv;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use automerge::{Automerge, Change, ChangeHash, ROOT, ReadDoc};
use entente_model::collision::{
    self, PlannedWrite, ResolutionEntry, ResolveRequest, Status, detect_dangling, detect_duplicate,
    detect_flagged_field, detect_update_delete, unique_values, unique_values_of_new,
};
use entente_model::ids::hex_lower;
use entente_model::record::{heads_from_hex, heads_to_hex};
use entente_model::value::FieldValue;
use entente_model::{
    Collision, CollisionId, CollisionKind, CommitCtx, ConcurrentField, Edit, HistoryEntry,
    MergePolicy, NodeId, Record, RecordId, Schema,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::clock::Clock;
use crate::error::{Error, Result};
use kv::Visit;
pub use kv::{BatchOp, Cf, Kv, MemKv, RocksKv};

/// Largest change accepted from a peer (bytes).
pub const MAX_CHANGE_BYTES: usize = 1 << 20;
/// Most changes accepted for one record in one batch.
pub const MAX_CHANGES_PER_RECORD: usize = 100_000;
/// How many hops of `merged_into` a read follows.
const MAX_ALIAS_HOPS: usize = 8;

/// A store shared between a running node's event loop and its API: one lock,
/// `None` once the node closed it.
pub type SharedStore = std::sync::Arc<std::sync::Mutex<Option<Store>>>;

/// Tuning knobs with their defaults.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Documents kept loaded (each ~20 KB of RAM for a contact).
    pub cache_records: usize,
    /// Compact a record once it has this many appended chunks...
    pub compact_after_chunks: u32,
    /// ...or once its chunks outweigh its snapshot by this factor.
    pub compact_bytes_factor: u64,
    /// fsync every batch (a write is acknowledged only once durable).
    pub sync: bool,
    /// RocksDB write buffer per column family (bytes). Larger buffers mean
    /// fewer, larger flushes; each open allocates arenas and filters sized
    /// from it (the simulator's many small stores use a small one).
    pub memtable_bytes: usize,
    /// Threads that try a large remote batch's changes on copies of the
    /// records' documents, and that load a page's documents when answering
    /// a peer (each record is its own document). Default: the machine's
    /// cores, at most 4. Nothing stored, reported or sent depends on it.
    pub apply_threads: usize,
    /// Test-only fault injection; `None` in every real node.
    #[doc(hidden)]
    pub fault: Option<TestFault>,
}

/// Faults a test can inject into the store (never set by a real node).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// `std::process::abort()` inside `apply_remote`, after the batch note is
    /// durable and before the batch lands: a poison input that kills the
    /// process.
    AbortInApply,
    /// Compaction's `load(save())` check fails, as for a document that
    /// accepted bad input and no longer saves into loadable bytes.
    SnapshotDoesNotLoad,
    /// A large remote batch written in the background waits 200 ms before
    /// it is written: whatever comes next runs before it lands, unless it
    /// waits for it.
    SlowBackgroundWrite,
    /// A large remote batch written in the background fails to be written.
    FailBackgroundWrite,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_records: 4096,
            compact_after_chunks: 32,
            compact_bytes_factor: 2,
            sync: true,
            memtable_bytes: kv::MEMTABLE_BYTES,
            apply_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            fault: None,
        }
    }
}

/// What the store keeps about a record beside its document.
///
/// Stored as [`META_BINARY`] followed by its postcard encoding; data dirs of
/// earlier versions hold it as JSON, which is still read (see
/// [`RecordMeta::decode`]). Every operation reads and writes it, and JSON
/// was 7% of the simulator's profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RecordMeta {
    collection: String,
    seq: u64,
    deleted: bool,
    #[serde(default)]
    merged_into: Option<RecordId>,
    heads: Vec<String>,
    snap_len: u64,
    next_chunk: u32,
    chunks: u32,
    chunk_bytes: u64,
    /// (unique key, normalized value) entries this record holds.
    unique: Vec<(String, String)>,
    /// (field, target) references this record holds.
    refs: Vec<(String, String)>,
}

/// First byte of a binary [`RecordMeta`] (a JSON one starts with `{`).
const META_BINARY: u8 = 1;

impl RecordMeta {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![META_BINARY];
        // Strings, integers and vectors only: postcard cannot fail on them.
        out.extend(postcard::to_stdvec(self).expect("a record meta encodes"));
        out
    }

    fn decode(b: &[u8]) -> Result<RecordMeta> {
        match b.first() {
            Some(&META_BINARY) => postcard::from_bytes(&b[1..])
                .map_err(|e| Error::Corrupt(format!("record meta: {e}"))),
            _ => parse("record meta", b),
        }
    }
}

/// A record as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordView {
    /// Record id.
    pub id: RecordId,
    /// Collection.
    pub collection: String,
    /// Current field values.
    pub fields: serde_json::Map<String, Json>,
    /// Tombstoned.
    pub deleted: bool,
    /// The survivor, for a merged-away record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<RecordId>,
    /// The record's heads (hex): pass them back as `base` to edit this version.
    pub heads: Vec<String>,
    /// The record's latest position in this node's feed.
    pub seq: u64,
    /// The node that created the record and when (ms).
    pub created_by: Option<NodeId>,
    /// Creation time (ms).
    pub created_at: i64,
    /// The node of the most recent change and when (ms).
    pub updated_by: Option<NodeId>,
    /// Time of the most recent change (ms).
    pub updated_at: i64,
    /// When a read named a merged-away id: that id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_id: Option<RecordId>,
    /// Open collisions involving the record.
    pub open_collisions: Vec<CollisionId>,
}

/// What a local write did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteResult {
    /// The record after the write.
    pub record: RecordView,
    /// The change made (hex), `None` when nothing changed.
    pub change: Option<String>,
    /// Fields changed concurrently since the edit's base version.
    pub concurrent: Vec<ConcurrentField>,
}

/// One entry of the consolidated changes feed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedEntry {
    /// Sequence number on this node.
    pub seq: u64,
    /// Record id.
    pub id: RecordId,
    /// Collection.
    pub collection: String,
    /// Tombstoned.
    pub deleted: bool,
    /// The record's heads at that point (hex).
    pub heads: Vec<String>,
}

/// One page of a listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page {
    /// The records.
    pub records: Vec<RecordView>,
    /// Pass as `after` for the next page; `None` at the end.
    pub next: Option<RecordId>,
}

/// A record to create in a batch.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Collection.
    pub collection: String,
    /// Id, or `None` to mint one.
    pub id: Option<RecordId>,
    /// Fields (JSON).
    pub fields: serde_json::Map<String, Json>,
    /// Write through a duplicate.
    pub force: bool,
}

/// What happened to a batch of remote changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ApplyReport {
    /// Records whose document changed.
    pub records_changed: usize,
    /// Changes applied.
    pub changes_applied: usize,
    /// Changes already known.
    pub changes_duplicate: usize,
    /// Changes kept waiting for their dependencies.
    pub changes_pending: usize,
    /// Records whose input was refused (bad bytes, a panic inside Automerge);
    /// the record stays as it was and the input is quarantined.
    pub rejected: Vec<(RecordId, String)>,
    /// Records of collections this node does not replicate, whose changes
    /// were dropped ([`Store::apply_remote_only`]).
    #[serde(default)]
    pub ignored: Vec<RecordId>,
    /// The batch was large, and is being written on another thread as the
    /// call returns; every later store operation waits for it first.
    #[serde(default)]
    pub written_behind: bool,
}

/// One quarantined input, as [`Store::quarantine`] lists it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QuarantineEntry {
    /// The record the input was for.
    pub record: String,
    /// Why it was quarantined.
    pub reason: String,
    /// The peer (node id) that sent it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// BLAKE3 (hex) of each change's raw bytes that is refused from now on
    /// (set for batches the process died applying).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// When it was quarantined (ms since the epoch), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<i64>,
}

/// The note written before a remote batch is applied and removed in the
/// batch that applies it: found on open, it names the batch the process
/// died in.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ApplyNote {
    peer: Option<String>,
    at_ms: i64,
    /// Record id and the BLAKE3 (hex) of each change's raw bytes.
    records: Vec<(String, Vec<String>)>,
}

/// BLAKE3 (hex) of a change's raw bytes: computed before anything parses
/// them, so even bytes that kill the parser have a name.
pub fn change_bytes_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Filter for listing collisions.
#[derive(Debug, Clone, Default)]
pub struct CollisionFilter {
    /// Include resolved ones.
    pub include_resolved: bool,
    /// Only this kind.
    pub kind: Option<CollisionKind>,
    /// Only this collection.
    pub collection: Option<String>,
    /// Only those involving this record.
    pub record: Option<RecordId>,
}

/// What a listing filters a stored collision on, read without the rest
/// (JSON objects: fields not named here are skipped, not built).
#[derive(Deserialize)]
struct CollisionPeek<'a> {
    kind: CollisionKind,
    #[serde(borrow)]
    collection: std::borrow::Cow<'a, str>,
    status: StatePeek<'a>,
}

#[derive(Deserialize)]
struct StatePeek<'a> {
    #[serde(borrow)]
    state: std::borrow::Cow<'a, str>,
}

impl CollisionPeek<'_> {
    fn is_open(&self) -> bool {
        self.status.state == "open"
    }
}

/// Counts for status pages and metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreStats {
    /// Records, deleted included.
    pub records: u64,
    /// Live records.
    pub live_records: u64,
    /// Latest feed sequence.
    pub feed_seq: u64,
    /// Open collisions by kind.
    pub open_collisions: BTreeMap<String, u64>,
    /// Resolved collisions.
    pub resolved_collisions: u64,
    /// Changes waiting for dependencies.
    pub pending_changes: u64,
    /// Quarantined inputs.
    pub quarantined: u64,
}

// ---------------------------------------------------------------------------
// Key encodings.

const SEP: u8 = 0;

fn key2(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a);
    k.push(SEP);
    k.extend_from_slice(b);
    k
}

fn value_hash(v: &str) -> String {
    hex_lower(&blake3::hash(v.as_bytes()).as_bytes()[..12])
}

fn unique_prefix(collection: &str, key: &str, value: &str) -> Vec<u8> {
    hashed_unique_prefix(collection, key, &value_hash(value))
}

/// [`unique_prefix`] of a value by its [`value_hash`].
fn hashed_unique_prefix(collection: &str, key: &str, hash: &str) -> Vec<u8> {
    let mut k = key2(collection.as_bytes(), key.as_bytes());
    k.push(SEP);
    k.extend_from_slice(hash.as_bytes());
    k.push(SEP);
    k
}

/// Key and value of this node's checkpoint in `peer`'s feed (`Cf::Checkpoints`).
fn checkpoint_entry(peer: &NodeId, seq: u64) -> (Vec<u8>, Vec<u8>) {
    (peer.0.to_vec(), seq.to_be_bytes().to_vec())
}

fn chunk_key(id: &RecordId, n: u32) -> Vec<u8> {
    let mut k = key2(id.as_str().as_bytes(), b"");
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn id_prefix(id: &RecordId) -> Vec<u8> {
    key2(id.as_str().as_bytes(), b"")
}

/// First byte of a stored chunk that names its base: the record's heads
/// before the chunk's changes (an Automerge chunk starts with `0x85`).
const CHUNK_WITH_BASE: u8 = 1;

/// A chunk as stored: `CHUNK_WITH_BASE`, the number of base heads, the
/// heads (32 bytes each, sorted), then the changes (`save_after(base)`).
fn encode_chunk(base: &[ChangeHash], changes: &[u8]) -> Vec<u8> {
    let mut base: Vec<ChangeHash> = base.to_vec();
    base.sort_unstable();
    base.dedup();
    // A record has a handful of heads; more than a byte counts is never
    // written, and a chunk without a base is still read correctly.
    if base.len() > u8::MAX as usize {
        return changes.to_vec();
    }
    let mut out = Vec::with_capacity(2 + 32 * base.len() + changes.len());
    out.push(CHUNK_WITH_BASE);
    out.push(base.len() as u8);
    for h in &base {
        out.extend_from_slice(&h.0);
    }
    out.extend_from_slice(changes);
    out
}

/// A stored chunk's base heads (sorted; `None` for a chunk stored without
/// them) and its changes.
fn decode_chunk(stored: &[u8]) -> Result<(Option<Vec<ChangeHash>>, &[u8])> {
    if stored.first() != Some(&CHUNK_WITH_BASE) {
        return Ok((None, stored));
    }
    let bad = || Error::Corrupt("stored chunk: truncated base heads".into());
    let n = *stored.get(1).ok_or_else(bad)? as usize;
    let end = 2 + 32 * n;
    let heads = stored.get(2..end).ok_or_else(bad)?;
    let base = heads
        .chunks_exact(32)
        .map(|h| ChangeHash::try_from(h).map_err(|_| bad()))
        .collect::<Result<Vec<_>>>()?;
    Ok((Some(base), &stored[end..]))
}

/// Every change of a record whose snapshot is still the changes it was
/// first stored as (not a saved document), with those of its chunks.
/// `None` for a record stored as a document.
fn all_changes(snapshot: &[u8], chunks: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    let mut out = split_changes(snapshot)?;
    out.extend(changes_of_chunks(chunks)?);
    Some(out)
}

/// Whether a record's stored chunks are all there and whole, as its
/// metadata counts them: their number, and the bytes of their changes.
/// Serving a peer from the stored changes relies on it, since splitting
/// them checks no heads (loading does): a chunk cut short at a change
/// boundary, or one missing, would otherwise be served as a shorter history.
fn chunks_as_counted(meta: &RecordMeta, chunks: &[Vec<u8>]) -> bool {
    let mut bytes = 0u64;
    for c in chunks {
        match decode_chunk(c) {
            Ok((_, changes)) => bytes += changes.len() as u64,
            Err(_) => return false,
        }
    }
    chunks.len() == meta.chunks as usize && bytes == meta.chunk_bytes
}

/// The changes of stored chunks, in order.
fn changes_of_chunks(chunks: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in chunks {
        let (_, changes) = decode_chunk(c).ok()?;
        out.extend(split_changes(changes)?);
    }
    Some(out)
}

/// Splits concatenated Automerge change chunks (what `save_after` returns)
/// into the bytes of each change, by their headers alone: magic bytes,
/// checksum, chunk type, LEB128 length. `None` for anything else (a
/// document chunk, a bundle, bytes that do not parse).
fn split_changes(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.get(..4)? != MAGIC {
            return None;
        }
        // 1: a change, 2: a compressed change.
        if !matches!(bytes.get(8)?, 1 | 2) {
            return None;
        }
        let mut len: u64 = 0;
        let mut at = 9;
        for shift in (0..64).step_by(7) {
            let b = *bytes.get(at)?;
            at += 1;
            len |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            if shift >= 56 {
                return None;
            }
        }
        let end = at.checked_add(usize::try_from(len).ok()?)?;
        out.push(bytes.get(..end)?.to_vec());
        bytes = &bytes[end..];
    }
    Some(out)
}

/// The changes a peer that has exactly `have` lacks, from a record's stored
/// chunks without loading its document: every change after the chunk whose
/// base is `have` (a document whose heads are `have` holds exactly what the
/// record held before that chunk). `None` when no chunk starts there.
fn changes_after_base(chunks: &[Vec<u8>], have: &[ChangeHash]) -> Option<Vec<Vec<u8>>> {
    let mut have = have.to_vec();
    have.sort_unstable();
    have.dedup();
    let from = chunks
        .iter()
        .position(|c| matches!(decode_chunk(c), Ok((Some(base), _)) if base == have))?;
    changes_of_chunks(&chunks[from..])
}

/// What a collision is about; one open collision at most stands for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    UpdateDelete(RecordId),
    Flagged(RecordId, String),
    Dangling(RecordId, String),
    Duplicate {
        collection: String,
        key: String,
        value: String,
        /// `value_hash(value)`, computed once: it names the subject in
        /// storage and prefixes the value's holders in `Cf::Unique`.
        hash: String,
    },
}

impl Subject {
    fn duplicate(collection: &str, key: &str, value: &str) -> Subject {
        Subject::Duplicate {
            collection: collection.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            hash: value_hash(value),
        }
    }

    /// Its key in `Cf::Subjects`: a letter for the kind, then its parts,
    /// each after a 0 byte (a unique value by its hash).
    fn key(&self) -> Vec<u8> {
        fn join(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
            let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
            k.push(kind);
            for part in parts {
                k.push(SEP);
                k.extend_from_slice(part);
            }
            k
        }
        match self {
            Subject::UpdateDelete(r) => join(b'u', &[r.as_str().as_bytes()]),
            Subject::Flagged(r, f) => join(b'f', &[r.as_str().as_bytes(), f.as_bytes()]),
            Subject::Dangling(r, f) => join(b'd', &[r.as_str().as_bytes(), f.as_bytes()]),
            Subject::Duplicate {
                collection,
                key,
                hash,
                ..
            } => join(
                b'k',
                &[collection.as_bytes(), key.as_bytes(), hash.as_bytes()],
            ),
        }
    }
}

/// The hasher of sets that are only looked up in, or iterated in an order
/// nothing depends on: fixed keys, so that order is the same on every run
/// (the simulator replays a seed byte for byte).
type FixedState = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// The collision subjects an operation touched, each with whether only
/// records that kept the unique value it names touched it (see
/// `Store::prepare_commit`). Set by hash: ordering them cost a fifth of
/// deciding a batch's records (comparing subjects field by field).
type Touched = HashMap<Subject, bool, FixedState>;

fn touch(subjects: &mut Touched, subject: Subject, kept: bool) {
    let only_kept = subjects.entry(subject).or_insert(kept);
    *only_kept &= kept;
}

/// Whether two lists of unique values hold the same values.
fn same_values(a: &[(String, String)], b: &[(String, String)]) -> bool {
    let mut a: Vec<&(String, String)> = a.iter().collect();
    let mut b: Vec<&(String, String)> = b.iter().collect();
    a.sort_unstable();
    a.dedup();
    b.sort_unstable();
    b.dedup();
    a == b
}

// ---------------------------------------------------------------------------
// A transaction: reads see its own writes; commit is one atomic batch.

struct Tx {
    kv: Arc<dyn Kv>,
    /// Its writes, by column family (indexed by `Cf as usize`): a lookup
    /// neither copies the key nor compares column families.
    ops: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; Cf::ALL.len()],
    /// Storage's keys for prefixes read ahead ([`Tx::read_prefixes`]), by
    /// column family and prefix; this transaction's writes are merged in
    /// when they are asked for. (Most transactions read none ahead: a
    /// list, not a map per family, costs them nothing.)
    scanned: Vec<(Cf, Scanned)>,
}

/// Storage's keys by prefix, read ahead for a transaction.
type Scanned = HashMap<Vec<u8>, Vec<Vec<u8>>, FixedState>;

// `Tx` finds a column family's writes at `cf as usize`, and writes them
// in the order of `Cf::ALL`.
const _: () = {
    let mut i = 0;
    while i < Cf::ALL.len() {
        assert!(Cf::ALL[i] as usize == i, "Cf::ALL is in declaration order");
        i += 1;
    }
};

impl Tx {
    fn new(kv: Arc<dyn Kv>) -> Tx {
        Tx {
            kv,
            ops: std::array::from_fn(|_| BTreeMap::new()),
            scanned: Vec::new(),
        }
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.ops[cf as usize].get(key) {
            Some(v) => Ok(v.clone()),
            None => self.kv.get(cf, key),
        }
    }

    fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops[cf as usize].insert(key, Some(value));
    }

    fn del(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops[cf as usize].insert(key, None);
    }

    /// Reads storage's keys for every one of `prefixes` at once, for
    /// [`Tx::keys_with_prefix`] to use instead of a scan each (one RocksDB
    /// iterator for all of them). What it read stays valid while this
    /// transaction is the only writer, that is until it commits: the store
    /// has one writer at a time, and every write of an operation goes
    /// through its transaction.
    fn read_prefixes(&mut self, cf: Cf, mut prefixes: Vec<Vec<u8>>) -> Result<()> {
        if let Some(scanned) = self.scanned(cf) {
            prefixes.retain(|p| !scanned.contains_key(p));
        }
        prefixes.sort_unstable();
        prefixes.dedup();
        if prefixes.is_empty() {
            return Ok(());
        }
        let refs: Vec<&[u8]> = prefixes.iter().map(Vec::as_slice).collect();
        let keys = self.kv.keys_with_prefixes(cf, &refs)?;
        let found = prefixes.into_iter().zip(keys);
        match self.scanned.iter_mut().find(|(c, _)| *c == cf) {
            Some((_, scanned)) => scanned.extend(found),
            None => self.scanned.push((cf, found.collect())),
        }
        Ok(())
    }

    fn scanned(&self, cf: Cf) -> Option<&Scanned> {
        self.scanned.iter().find(|(c, _)| *c == cf).map(|(_, s)| s)
    }

    /// Keys with `prefix`, merged with this transaction's writes.
    fn keys_with_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
        use std::ops::Bound;
        let mut found: BTreeSet<Vec<u8>> = BTreeSet::new();
        match self.scanned(cf).and_then(|s| s.get(prefix)) {
            Some(keys) => found.extend(keys.iter().cloned()),
            None => self.kv.scan(cf, prefix, prefix, &mut |k, _| {
                found.insert(k.to_vec());
                true
            })?,
        }
        let ops = &self.ops[cf as usize];
        for (k, v) in ops.range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(_) => found.insert(k.clone()),
                None => found.remove(k),
            };
        }
        Ok(found.into_iter().collect())
    }

    /// The batch this transaction would write.
    fn into_ops(self) -> Vec<BatchOp> {
        Cf::ALL
            .into_iter()
            .zip(self.ops)
            .flat_map(|(cf, ops)| ops.into_iter().map(move |(k, v)| (cf, k, v)))
            .collect()
    }

    fn commit(self) -> Result<()> {
        if self.ops.iter().all(BTreeMap::is_empty) {
            return Ok(());
        }
        let kv = self.kv.clone();
        kv.write(self.into_ops())
    }
}

// ---------------------------------------------------------------------------
// Writing a large remote batch in the background.

/// The store's key-value store, and a large remote batch being written to
/// it on another thread (see `Store::finish_remote`). Every access through
/// it — a read, a scan, a write, from any store operation — first waits
/// for that batch to land, so nothing sees or writes storage out of order;
/// meanwhile the node takes in the next page. A background write that
/// fails stops the store: every access from then on is an error, nothing
/// half-written is visible (a batch is one atomic write), and after a
/// restart the batch's page is pulled again (its checkpoint did not land).
struct Landing {
    inner: Arc<dyn Kv>,
    /// A batch may be being written (`pending` holds it): checked without
    /// the lock on every access, which is thousands per batch.
    busy: AtomicBool,
    pending: Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
    /// How a background write failed, once one did.
    failure: OnceLock<String>,
}

impl Landing {
    fn new(inner: Arc<dyn Kv>) -> Landing {
        Landing {
            inner,
            busy: AtomicBool::new(false),
            pending: Mutex::new(None),
            failure: OnceLock::new(),
        }
    }

    /// Waits for the batch being written, if any; an error if one failed.
    fn settle(&self) -> Result<()> {
        if self.busy.load(Ordering::Acquire) {
            self.join_pending();
        }
        if let Some(why) = self.failure.get() {
            return Err(Error::Storage(format!(
                "a remote batch written in the background failed ({why}); \
                 the store takes no more work until the node restarts"
            )));
        }
        Ok(())
    }

    /// Waits for the batch being written, if any. The lock is held while
    /// waiting, so a second thread that finds the batch gone waits for it
    /// too rather than reading before it lands.
    fn join_pending(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = pending.take() {
            let outcome = handle
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            if let Err(e) = outcome {
                tracing::error!(
                    error = %e,
                    "a remote batch written in the background failed; the store takes no more work"
                );
                let _ = self.failure.set(e.to_string());
            }
        }
        self.busy.store(false, Ordering::Release);
    }

    /// Writes `batch` on another thread; the next access waits for it.
    fn write_behind(&self, batch: Vec<BatchOp>, fault: Option<TestFault>) -> Result<()> {
        self.settle()?;
        let inner = self.inner.clone();
        let write = move || -> Result<()> {
            let outcome = match fault {
                Some(TestFault::FailBackgroundWrite) => {
                    Err(Error::Storage("injected background write failure".into()))
                }
                Some(TestFault::SlowBackgroundWrite) => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    inner.write(batch)
                }
                _ => inner.write(batch),
            };
            if outcome.is_err() {
                // The batch did not land, and not because the process died:
                // its note must not make the next open suspect it (best
                // effort: the disk may be what failed).
                let _ = inner.write(vec![(Cf::Meta, META_APPLYING.to_vec(), None)]);
            }
            outcome
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match std::thread::Builder::new()
            .name("entente-write".into())
            .spawn(write)
        {
            Ok(handle) => {
                *pending = Some(handle);
                self.busy.store(true, Ordering::Release);
                Ok(())
            }
            // No thread to be had: the batch fails as a failed write does,
            // before anything took it for landed.
            Err(e) => Err(Error::Storage(format!("no thread to write the batch: {e}"))),
        }
    }
}

impl Kv for Landing {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.settle()?;
        self.inner.get(cf, key)
    }

    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], visit: Visit<'_>) -> Result<()> {
        self.settle()?;
        self.inner.scan(cf, prefix, start, visit)
    }

    fn keys_with_prefixes(&self, cf: Cf, prefixes: &[&[u8]]) -> Result<Vec<Vec<Vec<u8>>>> {
        self.settle()?;
        self.inner.keys_with_prefixes(cf, prefixes)
    }

    fn write(&self, batch: Vec<BatchOp>) -> Result<()> {
        self.settle()?;
        self.inner.write(batch)
    }

    fn write_unsynced(&self, batch: Vec<BatchOp>) -> Result<()> {
        self.settle()?;
        self.inner.write_unsynced(batch)
    }
}

// ---------------------------------------------------------------------------
// The working set of one operation.

struct Slot {
    rec: Record,
    meta: Option<RecordMeta>,
    old_heads: Vec<ChangeHash>,
    dirty: bool,
    /// Unique keys written with `force` in this operation.
    forced: bool,
    /// Unique entries computed by `check_unique`, reused by `index`.
    unique_now: Option<Vec<(String, String)>>,
    /// Created by this operation, locally, without `force`: one change, no
    /// delete, unique values checked unclaimed. Its update_delete, flagged
    /// and duplicate subjects cannot hold a collision and are not evaluated;
    /// its references still are (see `finish`).
    fresh: bool,
    /// The record's metadata was in storage when the operation took it.
    stored: bool,
    /// A record applied from a peer: its bytes to store, saved while the
    /// batch was tried (see [`try_changes`]), valid while the document's
    /// heads are these.
    presaved: Option<(Vec<ChangeHash>, Presaved)>,
    /// A record applied from a peer: its resolution entries, read while the
    /// batch was tried, valid while the document's heads are these.
    preread: Option<(Vec<ChangeHash>, Resolutions)>,
}

impl Slot {
    /// A record as storage holds it, taken into a working set unchanged.
    fn stored(rec: Record, meta: RecordMeta) -> Slot {
        let old_heads = rec.heads();
        Slot {
            rec,
            meta: Some(meta),
            old_heads,
            dirty: false,
            forced: false,
            unique_now: None,
            fresh: false,
            stored: true,
            presaved: None,
            preread: None,
        }
    }
}

/// A record's bytes to store, saved on a worker while its batch was tried.
enum Presaved {
    /// A record new to this store: its first stored form, its changes
    /// (`save_after` of no heads; see `finish`).
    Snapshot(Vec<u8>),
    /// A record the store held: the chunk of the changes since it was taken
    /// (`save_after` its heads then), unless it is compacted instead.
    Chunk(Vec<u8>),
}

/// A record's resolution entries by collision id ([`Record::resolutions`]).
type Resolutions = BTreeMap<String, Vec<String>>;

#[derive(Default)]
struct Work {
    slots: BTreeMap<RecordId, Slot>,
}

/// One record of a remote batch, read for its attempt (see
/// [`Store::prepare`]): what stays with the thread that stores the batch,
/// and the attempt a worker runs.
struct Prepared {
    id: RecordId,
    /// Keys of the record's changes that waited in storage for their
    /// dependencies (their bytes are in the attempt).
    waiting_keys: Vec<Vec<u8>>,
    job: Job,
}

/// A record of a remote batch as the store holds it, handed to its attempt.
enum Base {
    /// Not in this store.
    New,
    /// From the cache, as storage holds it.
    Taken(Slot),
    /// Its stored bytes: the worker that tries it loads them.
    Stored {
        meta: RecordMeta,
        snap: Vec<u8>,
        chunks: Vec<Vec<u8>>,
    },
}

/// What is needed to try changes, shared by the worker threads.
struct TryCtx<'a> {
    schema: &'a Schema,
    node: NodeId,
    /// Partial replication: the collections kept (empty: all).
    only: &'a BTreeSet<String>,
    fault: Option<TestFault>,
}

/// One record's attempt: the record as the store holds it, and the changes
/// to try on a copy of its document.
struct Job {
    base: Base,
    id: RecordId,
    /// The peer's changes, as received.
    raw: Vec<Vec<u8>>,
    /// Changes of the record that waited in storage for their dependencies.
    waiting: Vec<Vec<u8>>,
}

/// A record's attempt as it comes back: the record taken into the working
/// set (if the store holds it), and the outcome.
type Attempt = Result<(Option<Slot>, Tried)>;

/// Runs one record's attempt: loads its stored document if it was not
/// cached, then tries the changes (see [`try_changes`]). Touches nothing
/// shared: worker threads run it.
fn attempt(ctx: &TryCtx<'_>, empty: &Automerge, job: Job) -> Attempt {
    let Job {
        base,
        id,
        raw,
        waiting,
    } = job;
    let slot = match base {
        Base::New => None,
        Base::Taken(slot) => Some(slot),
        Base::Stored { meta, snap, chunks } => {
            let rec = load_stored(ctx.node, &id, &meta, &snap, &chunks)?;
            Some(Slot::stored(rec, meta))
        }
    };
    let tried = try_changes(
        ctx,
        slot.as_ref().map_or(empty, |s| s.rec.doc()),
        &id,
        slot.is_some(),
        raw,
        waiting,
    );
    Ok((slot, tried))
}

/// The outcome of trying one record's changes.
enum Tried {
    /// Every change is in the document already.
    Nothing { duplicate: usize },
    /// The copy with the changes applied, checked, and what the batch will
    /// need of it.
    Applied(Box<Applied>),
    /// The changes may not be applied (the reason is quarantined).
    Rejected(String),
}

/// A record's changes applied to a copy of its document.
struct Applied {
    rec: Record,
    /// How many changes that were not in the document before it now holds.
    applied: usize,
    /// The changes that were not in the document before and still wait for
    /// their dependencies (kept under the record's id until they arrive).
    waiting: Vec<Change>,
    duplicate: usize,
    /// Its bytes to store, with its heads.
    presaved: Option<(Vec<ChangeHash>, Presaved)>,
    /// Its unique values, as `Store::index` computes them.
    unique: Option<Vec<(String, String)>>,
    /// Its resolution entries, with its heads.
    resolutions: Option<(Vec<ChangeHash>, Resolutions)>,
}

/// Records per thread below which a batch's changes are tried on fewer
/// threads (a thread costs tens of microseconds; a record's attempt tens).
pub const PARALLEL_APPLY_MIN_PER_THREAD: usize = 16;

/// `f` of every item, in order, on up to `threads` threads (the calling
/// one included): fewer for few items (see
/// [`PARALLEL_APPLY_MIN_PER_THREAD`]), one thread for under 32.
fn par_map<T: Send, R: Send>(threads: usize, items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let mut out = Vec::with_capacity(items.len());
    let Ok(()) = par_each(threads, items, f, |r| {
        out.push(r);
        Ok::<(), std::convert::Infallible>(())
    });
    out
}

/// `f` of every item on up to `threads` threads (the calling one included;
/// fewer for few items, see [`PARALLEL_APPLY_MIN_PER_THREAD`]), each result
/// handed to `take` in item order as soon as it and every one before it are
/// done. The calling thread takes results while the others go on, and runs
/// items itself while the next result is not ready: work that must be done
/// in order on one thread overlaps the rest. The first error of `take`
/// stops the items not yet started and is returned.
fn par_each<T: Send, R: Send, E>(
    threads: usize,
    items: Vec<T>,
    f: impl Fn(T) -> R + Sync,
    mut take: impl FnMut(R) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc::{TryRecvError, channel};
    let threads = threads
        .min(items.len() / PARALLEL_APPLY_MIN_PER_THREAD)
        .max(1);
    if threads == 1 {
        for item in items {
            take(f(item))?;
        }
        return Ok(());
    }
    let n = items.len();
    // Items are claimed in order, by whichever thread is free.
    let jobs: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let next = AtomicUsize::new(0);
    let claim = || -> Option<(usize, T)> {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let job = jobs.get(i)?;
        let item = job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each item is claimed once");
        Some((i, item))
    };
    let (claim, f) = (&claim, &f);
    let mut done: Vec<Option<R>> = (0..n).map(|_| None).collect();
    std::thread::scope(|scope| {
        let (send, recv) = channel::<(usize, R)>();
        let handles: Vec<_> = (1..threads)
            .map(|_| {
                let send = send.clone();
                scope.spawn(move || {
                    while let Some((i, item)) = claim() {
                        if send.send((i, f(item))).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(send);
        let mut taken = 0;
        let outcome = loop {
            if taken == n {
                break Ok(());
            }
            if let Some(r) = done[taken].take() {
                if let Err(e) = take(r) {
                    break Err(e);
                }
                taken += 1;
                continue;
            }
            match recv.try_recv() {
                Ok((i, r)) => {
                    done[i] = Some(r);
                    continue;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
            if let Some((i, item)) = claim() {
                done[i] = Some(f(item));
                continue;
            }
            match recv.recv() {
                Ok((i, r)) => done[i] = Some(r),
                Err(_) => {
                    // Every other thread is gone with results missing: one
                    // panicked, a bug of ours rather than a peer's input
                    // (those are caught per item). It propagates as it
                    // would on one thread.
                    for h in handles {
                        if let Err(e) = h.join() {
                            std::panic::resume_unwind(e);
                        }
                    }
                    unreachable!("a result is missing but no thread failed");
                }
            }
        };
        // After an error, the items not started are not run.
        next.store(n, Ordering::Relaxed);
        outcome
    })
}

/// A record from its stored bytes, checked against its metadata's heads,
/// under a panic guard. Touches nothing shared: worker threads run it.
fn load_stored(
    node: NodeId,
    id: &RecordId,
    meta: &RecordMeta,
    snap: &[u8],
    chunks: &[Vec<u8>],
) -> Result<Record> {
    let loaded = catch_unwind(AssertUnwindSafe(
        || -> std::result::Result<Automerge, String> {
            let mut doc = Automerge::load(snap).map_err(|e| e.to_string())?;
            for c in chunks {
                let (_, changes) = decode_chunk(c).map_err(|e| e.to_string())?;
                doc.load_incremental(changes).map_err(|e| e.to_string())?;
            }
            Ok(doc)
        },
    ))
    .map_err(|_| {
        Error::Corrupt(format!(
            "{id}: automerge panicked loading the stored document"
        ))
    })?
    .map_err(|e| Error::Corrupt(format!("{id}: {e}")))?;
    let mut rec = Record::from_doc(loaded);
    rec.set_writer(node);
    if heads_to_hex(&rec.heads()) != meta.heads {
        return Err(Error::Corrupt(format!(
            "{id}: stored heads do not match the document"
        )));
    }
    Ok(rec)
}

/// The changes of `rec` a peer that has `have` lacks, as bytes (hashes it
/// does not know are ignored).
fn changes_missing(rec: &Record, have: &[ChangeHash]) -> Vec<Vec<u8>> {
    let have: Vec<ChangeHash> = have
        .iter()
        .filter(|h| rec.doc().get_change_meta_by_hash(h).is_some())
        .copied()
        .collect();
    rec.doc()
        .get_changes(&have)
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

/// Parses a record's changes, applies the new ones to a copy of its
/// document under a panic guard, checks the copy, and prepares what
/// storing it will need. Touches nothing shared: worker threads run it.
fn try_changes(
    ctx: &TryCtx<'_>,
    base: &Automerge,
    id: &RecordId,
    known: bool,
    raw: Vec<Vec<u8>>,
    waiting: Vec<Vec<u8>>,
) -> Tried {
    if raw.len() > MAX_CHANGES_PER_RECORD {
        return Tried::Rejected(format!("{} changes in one batch", raw.len()));
    }
    let mut incoming: BTreeMap<ChangeHash, Change> = BTreeMap::new();
    for bytes in raw {
        match parse_change(bytes) {
            Ok(c) => {
                incoming.insert(c.hash(), c);
            }
            Err(e) => return Tried::Rejected(e),
        }
    }
    // Changes that were waiting for this record join the attempt.
    for b in waiting {
        if let Ok(c) = parse_change(b) {
            incoming.entry(c.hash()).or_insert(c);
        }
    }
    let old_heads = base.get_heads();
    let fresh: Vec<Change> = incoming
        .values()
        .filter(|c| base.get_change_meta_by_hash(&c.hash()).is_none())
        .cloned()
        .collect();
    let duplicate = incoming.len() - fresh.len();
    if fresh.is_empty() {
        return Tried::Nothing { duplicate };
    }
    // On the heap from the start: the document (3.5 KB) is then not
    // copied on each move out of the guard and into its record.
    let mut copy = Box::new(base.clone());
    if ctx.fault == Some(TestFault::AbortInApply) {
        std::process::abort();
    }
    type Checked = (Box<Automerge>, BTreeSet<ChangeHash>, Vec<Change>);
    let applied = catch_unwind(AssertUnwindSafe(
        || -> std::result::Result<Checked, String> {
            copy.apply_changes(fresh.clone())
                .map_err(|e| e.to_string())?;
            // A document that accepted bad input can disagree with itself:
            // the change metadata and the rebuilt changes must name the same
            // hashes before the copy may replace the original.
            let meta: BTreeSet<ChangeHash> = copy
                .get_changes_meta(&old_heads)
                .iter()
                .map(|m| m.hash)
                .collect();
            let rebuilt = copy.get_changes(&old_heads);
            let full: BTreeSet<ChangeHash> = rebuilt.iter().map(|c| c.hash()).collect();
            if meta != full {
                return Err("document inconsistent after applying".into());
            }
            Ok((copy, meta, rebuilt))
        },
    ));
    let (doc, added, rebuilt) = match applied {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return Tried::Rejected(e),
        Err(_) => return Tried::Rejected("automerge panicked applying the changes".into()),
    };
    let mut rec = Record::from_boxed(doc);
    rec.set_writer(ctx.node);
    // The record must say it is the record it was sent as: every value of
    // `_id`, not only the one winning a conflict (another record's
    // creating change merged in would otherwise lose quietly and stay).
    let foreign = rec.with_root(entente_model::record::KEY_ID, |vals| {
        vals.iter()
            .find_map(|(v, _)| match v.as_str().map(RecordId::parse) {
                Some(Ok(doc_id)) if &doc_id == id => None,
                Some(Ok(doc_id)) => Some(doc_id.to_string()),
                _ => Some(format!("{v}")),
            })
    });
    if let Some(doc_id) = foreign {
        return Tried::Rejected(format!("changes belong to record {doc_id}"));
    }
    // What storing the record will need, computed here while other threads
    // do the same for other records: its unique values, its resolution
    // entries, and its bytes (for a record new to this store, kept here,
    // with its identity, its changes; for one the store held, the chunk of
    // the new changes).
    let mut presaved = None;
    let mut unique = None;
    let mut resolutions = None;
    if let Some(collection) = rec.collection()
        && rec.id().is_some()
        && ctx.schema.collection(&collection).is_ok()
        && (ctx.only.is_empty() || ctx.only.contains(&collection))
    {
        let mut values = Vec::new();
        for key in ctx.schema.unique_keys(&collection) {
            for v in unique_values(ctx.schema, &rec, &key) {
                values.push((key.name.clone(), v));
            }
        }
        unique = Some(values);
        let heads = rec.heads();
        // What `save_after(old_heads)` returns, from the changes the check
        // above rebuilt (saving would rebuild them again): for a record new
        // here, all of its changes, its first stored form (see `finish`).
        let changes = rebuilt
            .iter()
            .flat_map(|c| c.raw_bytes())
            .copied()
            .collect();
        let bytes = if known {
            Presaved::Chunk(changes)
        } else {
            Presaved::Snapshot(changes)
        };
        presaved = Some((heads.clone(), bytes));
        resolutions = Some((heads, rec.resolutions()));
    }
    // Which new changes the document took: those it now holds beyond its
    // old heads (found here, not on the thread that stores the batch).
    let fresh_count = fresh.len();
    let waiting: Vec<Change> = fresh
        .into_iter()
        .filter(|c| !added.contains(&c.hash()))
        .collect();
    Tried::Applied(Box::new(Applied {
        rec,
        applied: fresh_count - waiting.len(),
        waiting,
        duplicate,
        presaved,
        unique,
        resolutions,
    }))
}

/// An operation that touched more records than this does not put them in
/// the document cache (see `Store::settle`).
pub const CACHE_MAX_PER_OPERATION: usize = 64;

/// The store. One writer at a time (`&mut self`); the node serializes access.
pub struct Store {
    /// Every storage access goes through it (see [`Landing`]).
    kv: Arc<Landing>,
    schema: Arc<Schema>,
    node: NodeId,
    clock: Arc<dyn Clock>,
    cache: lru::LruCache<RecordId, Record>,
    seq: u64,
    opts: StoreOptions,
    /// Change-bytes hashes quarantined after a crash: refused on arrival.
    poisoned: BTreeSet<String>,
    /// The thread freeing the last large operation's documents, if any
    /// (see [`Store::drop_behind`]).
    dropping: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Store {
    /// A batch still being written lands before the store closes.
    fn drop(&mut self) {
        self.kv.join_pending();
        if let Some(h) = self.dropping.take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("node", &self.node)
            .field("seq", &self.seq)
            .finish()
    }
}

const META_NODE: &[u8] = b"node_id";
const META_SCHEMA: &[u8] = b"schema_fingerprint";
const META_SEQ: &[u8] = b"feed_seq";
const META_APPLYING: &[u8] = b"applying_remote_batch";
const META_SUSPECT: &[u8] = b"suspect_remote_batch";

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializable")
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

impl Store {
    /// Opens (or creates) a RocksDB data dir. A new dir takes `node` as its
    /// identity; an existing one keeps the identity it has.
    pub fn open(
        path: &Path,
        schema: Arc<Schema>,
        node: NodeId,
        clock: Arc<dyn Clock>,
        opts: StoreOptions,
    ) -> Result<Store> {
        std::fs::create_dir_all(path)?;
        let kv = RocksKv::open_with(path, opts.sync, opts.memtable_bytes)?;
        Store::with_kv(Arc::new(kv), schema, node, clock, opts)
    }

    /// Opens a store over any [`Kv`].
    pub fn with_kv(
        kv: Arc<dyn Kv>,
        schema: Arc<Schema>,
        node: NodeId,
        clock: Arc<dyn Clock>,
        opts: StoreOptions,
    ) -> Result<Store> {
        let mut first = Vec::new();
        let node = match kv.get(Cf::Meta, META_NODE)? {
            Some(b) => NodeId(
                b.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("node id".into()))?,
            ),
            None => {
                first.push((Cf::Meta, META_NODE.to_vec(), Some(node.0.to_vec())));
                node
            }
        };
        match kv.get(Cf::Meta, META_SCHEMA)? {
            Some(b) if b != schema.fingerprint().as_bytes() => {
                return Err(Error::SchemaMismatch {
                    stored: String::from_utf8_lossy(&b).into_owned(),
                    given: schema.fingerprint().to_string(),
                });
            }
            Some(_) => {}
            None => first.push((
                Cf::Meta,
                META_SCHEMA.to_vec(),
                Some(schema.fingerprint().as_bytes().to_vec()),
            )),
        }
        if !first.is_empty() {
            kv.write(first)?;
        }
        let seq = match kv.get(Cf::Meta, META_SEQ)? {
            Some(b) => u64::from_be_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("feed seq".into()))?,
            ),
            None => 0,
        };
        recover_apply_note(kv.as_ref(), clock.now_ms())?;
        let mut poisoned = BTreeSet::new();
        kv.scan(Cf::Quarantine, b"", b"", &mut |_, v| {
            if let Ok(q) = serde_json::from_slice::<QuarantineEntry>(v) {
                poisoned.extend(q.changes);
            }
            true
        })?;
        let cap = NonZeroUsize::new(opts.cache_records.max(1)).expect("non-zero");
        Ok(Store {
            kv: Arc::new(Landing::new(kv)),
            schema,
            node,
            clock,
            cache: lru::LruCache::new(cap),
            dropping: None,
            seq,
            opts,
            poisoned,
        })
    }

    /// Every quarantined input: refused remote changes, batches the process
    /// died applying, records whose compaction was skipped.
    pub fn quarantine(&self) -> Result<Vec<QuarantineEntry>> {
        let mut out = Vec::new();
        let mut bad = 0usize;
        self.kv.scan(Cf::Quarantine, b"", b"", &mut |_, v| {
            match serde_json::from_slice::<QuarantineEntry>(v) {
                Ok(q) => out.push(q),
                Err(_) => bad += 1,
            }
            true
        })?;
        if bad > 0 {
            return Err(Error::Corrupt(format!(
                "{bad} unreadable quarantine entries"
            )));
        }
        Ok(out)
    }

    /// Releases every quarantine entry of `record` (an operator's decision,
    /// for instance after an upgrade fixed what the input broke): its
    /// refused change hashes are accepted again and the entries are removed
    /// in one write. Nothing is fetched here; the record's changes arrive
    /// with the next push of it or through `entente verify`. Returns the
    /// number of entries removed.
    pub fn release_quarantine(&mut self, record: &RecordId) -> Result<usize> {
        let prefix = id_prefix(record);
        let mut keys = Vec::new();
        self.kv
            .scan(Cf::Quarantine, &prefix, &prefix, &mut |k, _| {
                keys.push(k.to_vec());
                true
            })?;
        if keys.is_empty() {
            return Ok(0);
        }
        let n = keys.len();
        self.kv.write(
            keys.into_iter()
                .map(|k| (Cf::Quarantine, k, None))
                .collect(),
        )?;
        // What stays refused: the hashes of the entries left.
        let mut poisoned = BTreeSet::new();
        for q in self.quarantine()? {
            poisoned.extend(q.changes);
        }
        self.poisoned = poisoned;
        tracing::info!(%record, entries = n, "quarantine released");
        Ok(n)
    }

    /// An in-memory store (tests, simulation).
    pub fn memory(schema: Arc<Schema>, node: NodeId, clock: Arc<dyn Clock>) -> Store {
        Store::with_kv(
            Arc::new(MemKv::new()),
            schema,
            node,
            clock,
            StoreOptions::default(),
        )
        .expect("a new memory store opens")
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The schema.
    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// The latest feed sequence.
    pub fn feed_seq(&self) -> u64 {
        self.seq
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Direct access to the key-value layer (the sync engine keeps its
    /// checkpoints beside the data).
    pub fn kv(&self) -> &dyn Kv {
        self.kv.as_ref()
    }

    /// Drops every cached document (tests use it to force reloads).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    fn ctx(&self, op: &'static str) -> CommitCtx {
        CommitCtx {
            node: self.node,
            time_ms: self.clock.now_ms(),
            op,
        }
    }

    // -- loading -----------------------------------------------------------

    fn meta(&self, tx: &Tx, id: &RecordId) -> Result<Option<RecordMeta>> {
        match tx.get(Cf::Records, id.as_str().as_bytes())? {
            Some(b) => Ok(Some(RecordMeta::decode(&b)?)),
            None => Ok(None),
        }
    }

    fn load_doc(&self, id: &RecordId, meta: &RecordMeta) -> Result<Record> {
        let (snap, chunks) = self.read_stored(id, meta)?;
        load_stored(self.node, id, meta, &snap, &chunks)
    }

    /// A record's stored bytes: its snapshot, and the chunks appended since.
    fn read_stored(&self, id: &RecordId, meta: &RecordMeta) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
        Ok((self.read_snapshot(id)?, self.read_chunks(id, meta)?))
    }

    fn read_snapshot(&self, id: &RecordId) -> Result<Vec<u8>> {
        self.kv
            .get(Cf::Snapshots, id.as_str().as_bytes())?
            .ok_or_else(|| Error::Corrupt(format!("{id}: snapshot missing")))
    }

    /// A record's chunks appended since its snapshot, in order (as stored:
    /// see [`decode_chunk`]).
    fn read_chunks(&self, id: &RecordId, meta: &RecordMeta) -> Result<Vec<Vec<u8>>> {
        let mut chunks = Vec::new();
        // The metadata counts them; most records have none, and a scan
        // costs an iterator. (A count that is wrong shows as heads that do
        // not match, never as a quietly older record.)
        if meta.chunks > 0 {
            self.kv
                .scan(Cf::Chunks, &id_prefix(id), &id_prefix(id), &mut |_, v| {
                    chunks.push(v.to_vec());
                    true
                })?;
        }
        Ok(chunks)
    }

    /// Takes a record into the working set (from the cache or storage).
    /// Returns false when the store does not have it.
    fn take(&mut self, work: &mut Work, tx: &Tx, id: &RecordId) -> Result<bool> {
        if work.slots.contains_key(id) {
            return Ok(true);
        }
        let Some(meta) = self.meta(tx, id)? else {
            return Ok(false);
        };
        let rec = match self.cache.pop(id) {
            Some(r) => r,
            None => self.load_doc(id, &meta)?,
        };
        work.slots.insert(id.clone(), Slot::stored(rec, meta));
        Ok(true)
    }

    /// Runs `f` on a record without taking it into a working set, from the
    /// cache or storage, and without copying its document. With `cache`, a
    /// record read from storage stays in the cache afterwards; without it
    /// (serving a peer's fetch, a listing page) only records that were
    /// already cached stay there, so bulk reads do not push out the
    /// documents in use.
    fn with_record<T>(
        &mut self,
        id: &RecordId,
        cache: bool,
        f: impl FnOnce(&Self, &Record, &RecordMeta) -> T,
    ) -> Result<Option<T>> {
        let tx = Tx::new(self.kv.clone());
        let Some(meta) = self.meta(&tx, id)? else {
            return Ok(None);
        };
        let (rec, cached) = match self.cache.pop(id) {
            Some(r) => (r, true),
            None => (self.load_doc(id, &meta)?, false),
        };
        let out = f(self, &rec, &meta);
        if cache || cached {
            self.cache.put(id.clone(), rec);
        }
        Ok(Some(out))
    }

    /// Follows `merged_into` to the survivor.
    fn resolve_alias(&mut self, id: &RecordId) -> Result<RecordId> {
        let tx = Tx::new(self.kv.clone());
        let mut cur = id.clone();
        for _ in 0..MAX_ALIAS_HOPS {
            match self.meta(&tx, &cur)? {
                Some(RecordMeta {
                    merged_into: Some(s),
                    ..
                }) if s != cur => cur = s,
                _ => break,
            }
        }
        Ok(cur)
    }

    // -- reads ---------------------------------------------------------------

    /// A record by id; a merged-away id is answered by its survivor.
    pub fn get(&mut self, id: &RecordId) -> Result<Option<RecordView>> {
        let target = self.resolve_alias(id)?;
        let Some(view) =
            self.with_record(&target, true, |s, rec, meta| s.view(&target, rec, meta))?
        else {
            return Ok(None);
        };
        let mut view = view?;
        if &target != id {
            view.requested_id = Some(id.clone());
        }
        Ok(Some(view))
    }

    /// The record's document (for history, raw bytes, sync): a copy.
    pub fn record(&mut self, id: &RecordId) -> Result<Option<Record>> {
        self.with_record(id, true, |_, rec, _| rec.clone())
    }

    /// Runs `f` on the record's document in place (no copy) and returns what
    /// it gives. A record read from storage for it is not cached, so a read
    /// of many records (a feed page, a whole-store check) does not push out
    /// the documents in use.
    pub fn read_record<T>(
        &mut self,
        id: &RecordId,
        f: impl FnOnce(&Record) -> T,
    ) -> Result<Option<T>> {
        self.with_record(id, false, |_, rec, _| f(rec))
    }

    fn view(&self, id: &RecordId, rec: &Record, meta: &RecordMeta) -> Result<RecordView> {
        let doc = rec.doc();
        let (created_by, created_at) = doc
            .get(ROOT, entente_model::record::KEY_ID)
            .ok()
            .flatten()
            .and_then(|(_, op)| doc.hash_for_opid(&op))
            .map(|h| rec.change_origin(&h))
            .unwrap_or((None, 0));
        let (updated_by, updated_at) = rec
            .heads()
            .iter()
            .map(|h| rec.change_origin(h))
            .max_by_key(|(n, t)| (*t, *n))
            .unwrap_or((None, 0));
        let mut open = Vec::new();
        for cid in self.collision_ids_for(id)? {
            if let Some(c) = self.collision(&cid)?
                && c.is_open()
            {
                open.push(cid);
            }
        }
        Ok(RecordView {
            id: id.clone(),
            collection: meta.collection.clone(),
            fields: rec.fields_json(&self.schema),
            deleted: meta.deleted,
            merged_into: meta.merged_into.clone(),
            heads: meta.heads.clone(),
            seq: meta.seq,
            created_by,
            created_at,
            updated_by,
            updated_at,
            requested_id: None,
            open_collisions: open,
        })
    }

    /// A page of a collection in id order, after `after`.
    pub fn list(
        &mut self,
        collection: &str,
        after: Option<&RecordId>,
        limit: usize,
        include_deleted: bool,
    ) -> Result<Page> {
        self.schema.collection(collection)?;
        let prefix = key2(collection.as_bytes(), b"");
        let start = match after {
            Some(a) => {
                let mut k = key2(collection.as_bytes(), a.as_str().as_bytes());
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let limit = limit.clamp(1, 10_000);
        let mut ids = Vec::new();
        let mut more = false;
        {
            let tx = Tx::new(self.kv.clone());
            let mut candidates = Vec::new();
            self.kv
                .scan(Cf::ByCollection, &prefix, &start, &mut |k, _| {
                    candidates.push(k[prefix.len()..].to_vec());
                    true
                })?;
            for raw in candidates {
                let id = RecordId::parse(&String::from_utf8_lossy(&raw))?;
                if !include_deleted {
                    match self.meta(&tx, &id)? {
                        Some(m) if !m.deleted => {}
                        _ => continue,
                    }
                }
                if ids.len() == limit {
                    more = true;
                    break;
                }
                ids.push(id);
            }
        }
        let mut records = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(view) = self.with_record(id, false, |s, rec, meta| s.view(id, rec, meta))? {
                records.push(view?);
            }
        }
        Ok(Page {
            next: if more { ids.last().cloned() } else { None },
            records,
        })
    }

    /// Feed entries after `since`, oldest first, at most `limit`: every
    /// record changed since, once, at its latest sequence.
    pub fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>> {
        let mut out = Vec::new();
        let start = since.saturating_add(1).to_be_bytes();
        let mut raw = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.kv.scan(Cf::Feed, b"", &start, &mut |k, v| {
            raw.push((k.to_vec(), v.to_vec()));
            raw.len() < limit
        })?;
        let tx = Tx::new(self.kv.clone());
        for (k, v) in raw {
            let seq = u64::from_be_bytes(
                k.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("feed key".into()))?,
            );
            let id = RecordId::parse(&String::from_utf8_lossy(&v))?;
            let meta = self
                .meta(&tx, &id)?
                .ok_or_else(|| Error::Corrupt(format!("feed names unknown record {id}")))?;
            out.push(FeedEntry {
                seq,
                id,
                collection: meta.collection,
                deleted: meta.deleted,
                heads: meta.heads,
            });
        }
        Ok(out)
    }

    /// The record's history: every change, who, where, when, what it wrote.
    pub fn history(&mut self, id: &RecordId) -> Result<Vec<HistoryEntry>> {
        let target = self.resolve_alias(id)?;
        self.with_record(&target, true, |s, rec, _| rec.history(&s.schema))?
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// The record's whole Automerge document, saved (for any Automerge reader).
    pub fn raw_document(&mut self, id: &RecordId) -> Result<Vec<u8>> {
        let target = self.resolve_alias(id)?;
        self.with_record(&target, false, |_, rec, _| rec.doc().save())?
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// The collection of a record (`None` when unknown), from its metadata.
    pub fn collection_of(&self, id: &RecordId) -> Result<Option<String>> {
        let tx = Tx::new(self.kv.clone());
        Ok(self.meta(&tx, id)?.map(|m| m.collection))
    }

    /// The heads of a record (empty when unknown).
    pub fn heads(&self, id: &RecordId) -> Result<Vec<ChangeHash>> {
        let tx = Tx::new(self.kv.clone());
        match self.meta(&tx, id)? {
            Some(m) => Ok(heads_from_hex(&m.heads)?),
            None => Ok(Vec::new()),
        }
    }

    /// Visits, in id order, every record with `lo <= id < hi` (`hi` absent:
    /// to the end) with its heads, reading only the per-record metadata (no
    /// document is loaded), until `visit` returns false. Compare and repair
    /// fingerprints ranges of the store with it.
    pub fn scan_heads(
        &self,
        lo: &str,
        hi: Option<&str>,
        visit: &mut dyn FnMut(&str, Vec<ChangeHash>) -> bool,
    ) -> Result<()> {
        let mut failed = None;
        self.kv.scan(Cf::Records, b"", lo.as_bytes(), &mut |k, v| {
            if hi.is_some_and(|hi| k >= hi.as_bytes()) {
                return false;
            }
            let parsed = std::str::from_utf8(k)
                .map_err(|_| Error::Corrupt("a record key is not UTF-8".into()))
                .and_then(|id| {
                    let m = RecordMeta::decode(v)?;
                    Ok((id, heads_from_hex(&m.heads)?))
                });
            match parsed {
                Ok((id, heads)) => visit(id, heads),
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        failed.map_or(Ok(()), Err)
    }

    /// The raw bytes of the record's changes that are not in the past of
    /// `have` (all of them for an empty `have`), in dependency order.
    pub fn changes_for(&mut self, id: &RecordId, have: &[ChangeHash]) -> Result<Vec<Vec<u8>>> {
        // Not cached: a peer's full sync reads every record once.
        let changes = self.with_record(id, false, |_, rec, _| changes_missing(rec, have))?;
        Ok(changes.unwrap_or_default())
    }

    /// [`Store::changes_for`] of many records, for a page of a peer's sync:
    /// the stored bytes are read in order, and the documents not in the
    /// cache are loaded and taken apart on up to
    /// [`StoreOptions::apply_threads`] threads. Nothing is cached.
    pub fn changes_for_many(
        &mut self,
        wanted: &[(RecordId, Vec<ChangeHash>)],
    ) -> Result<Vec<Vec<Vec<u8>>>> {
        enum Source {
            Done(Vec<Vec<u8>>),
            Stored(RecordMeta, Vec<u8>, Vec<Vec<u8>>),
        }
        let tx = Tx::new(self.kv.clone());
        let mut sources = Vec::with_capacity(wanted.len());
        for (id, have) in wanted {
            let Some(meta) = self.meta(&tx, id)? else {
                sources.push((id, have, Source::Done(Vec::new())));
                continue;
            };
            // A peer behind by the last few chunks (the usual fetch) is
            // served from them, and a peer that has none of a record still
            // stored as its changes from those: no document is loaded or
            // taken apart. Stored bytes that are not what the metadata
            // counts are served only by loading them, which checks the heads.
            let chunks = self.read_chunks(id, &meta)?;
            let counted = chunks_as_counted(&meta, &chunks);
            if counted && let Some(changes) = changes_after_base(&chunks, have) {
                sources.push((id, have, Source::Done(changes)));
                continue;
            }
            let source = match self.cache.peek(id) {
                Some(rec) if !have.is_empty() => Source::Done(changes_missing(rec, have)),
                cached => {
                    let snap = self.read_snapshot(id)?;
                    let whole = if have.is_empty() && counted && snap.len() as u64 == meta.snap_len
                    {
                        all_changes(&snap, &chunks)
                    } else {
                        None
                    };
                    match (whole, cached) {
                        (Some(changes), _) => Source::Done(changes),
                        (None, Some(rec)) => Source::Done(changes_missing(rec, have)),
                        (None, None) => Source::Stored(meta, snap, chunks),
                    }
                }
            };
            sources.push((id, have, source));
        }
        let node = self.node;
        par_map(
            self.opts.apply_threads,
            sources,
            |(id, have, source)| match source {
                Source::Done(changes) => Ok(changes),
                Source::Stored(meta, snap, chunks) => {
                    let rec = load_stored(node, id, &meta, &snap, &chunks)?;
                    Ok(changes_missing(&rec, have))
                }
            },
        )
        .into_iter()
        .collect()
    }

    /// This node's checkpoint in `peer`'s changes feed: the sequence up to
    /// which everything of it is applied here (0: never pulled).
    pub fn checkpoint(&self, peer: &NodeId) -> Result<u64> {
        match self.kv.get(Cf::Checkpoints, &peer.0)? {
            None => Ok(0),
            Some(b) => {
                Ok(u64::from_be_bytes(b.as_slice().try_into().map_err(
                    |_| Error::Corrupt(format!("checkpoint for {peer}")),
                )?))
            }
        }
    }

    /// Persists (durably) this node's checkpoint in `peer`'s feed on its
    /// own, for a page that needed no data ([`Store::apply_remote_only`]
    /// writes it with the data otherwise).
    pub fn save_checkpoint(&self, peer: &NodeId, seq: u64) -> Result<()> {
        let (k, v) = checkpoint_entry(peer, seq);
        self.kv.write(vec![(Cf::Checkpoints, k, Some(v))])
    }

    /// Counts.
    pub fn stats(&self) -> Result<StoreStats> {
        let mut s = StoreStats {
            feed_seq: self.seq,
            ..Default::default()
        };
        self.kv.scan(Cf::Records, b"", b"", &mut |_, v| {
            s.records += 1;
            if let Ok(m) = RecordMeta::decode(v)
                && !m.deleted
            {
                s.live_records += 1;
            }
            true
        })?;
        self.kv.scan(Cf::Collisions, b"", b"", &mut |_, v| {
            if let Ok(c) = serde_json::from_slice::<CollisionPeek>(v) {
                if c.is_open() {
                    *s.open_collisions
                        .entry(c.kind.as_str().to_string())
                        .or_default() += 1;
                } else {
                    s.resolved_collisions += 1;
                }
            }
            true
        })?;
        self.kv.scan(Cf::Pending, b"", b"", &mut |_, _| {
            s.pending_changes += 1;
            true
        })?;
        self.kv.scan(Cf::Quarantine, b"", b"", &mut |_, _| {
            s.quarantined += 1;
            true
        })?;
        Ok(s)
    }

    // -- collisions ------------------------------------------------------------

    /// One collision.
    pub fn collision(&self, id: &CollisionId) -> Result<Option<Collision>> {
        match self.kv.get(Cf::Collisions, id.as_str().as_bytes())? {
            Some(b) => Ok(Some(parse("collision", &b)?)),
            None => Ok(None),
        }
    }

    fn collision_ids_for(&self, id: &RecordId) -> Result<Vec<CollisionId>> {
        let mut out = Vec::new();
        self.kv.scan(
            Cf::CollisionIndex,
            &id_prefix(id),
            &id_prefix(id),
            &mut |k, _| {
                if let Ok(c) =
                    CollisionId::parse(&String::from_utf8_lossy(&k[id.as_str().len() + 1..]))
                {
                    out.push(c);
                }
                true
            },
        )?;
        Ok(out)
    }

    /// Collisions matching a filter, ordered by id.
    pub fn collisions(&self, filter: &CollisionFilter) -> Result<Vec<Collision>> {
        let mut out = Vec::new();
        let keep = |open: bool, kind: CollisionKind, collection: &str| {
            (filter.include_resolved || open)
                && filter.kind.is_none_or(|k| kind == k)
                && filter
                    .collection
                    .as_ref()
                    .is_none_or(|col| collection == col)
        };
        if let Some(r) = &filter.record {
            for cid in self.collision_ids_for(r)? {
                if let Some(c) = self.collision(&cid)?
                    && keep(c.is_open(), c.kind, &c.collection)
                {
                    out.push(c);
                }
            }
            return Ok(out);
        }
        let mut err = None;
        // Most stored collisions are resolved ones a listing of open ones
        // skips: the fields filtered on are read first, without building
        // the records, sides and resolution.
        self.kv.scan(Cf::Collisions, b"", b"", &mut |_, v| {
            let parsed = serde_json::from_slice::<CollisionPeek>(v).and_then(|p| {
                keep(p.is_open(), p.kind, &p.collection)
                    .then(|| serde_json::from_slice::<Collision>(v))
                    .transpose()
            });
            match parsed {
                Ok(Some(c)) => out.push(c),
                Ok(None) => {}
                Err(e) => {
                    err = Some(Error::Corrupt(format!("collision: {e}")));
                    return false;
                }
            }
            true
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    // -- local writes ------------------------------------------------------------

    /// Creates one record.
    pub fn create(
        &mut self,
        collection: &str,
        id: Option<RecordId>,
        fields: &serde_json::Map<String, Json>,
        force: bool,
    ) -> Result<WriteResult> {
        let mut out = self.create_many(vec![NewRecord {
            collection: collection.to_string(),
            id,
            fields: fields.clone(),
            force,
        }])?;
        Ok(out.pop().expect("one result per record"))
    }

    /// Creates many records in one atomic batch: all land or none does (the
    /// first refusal refuses the batch). Duplicates within the batch count.
    pub fn create_many(&mut self, items: Vec<NewRecord>) -> Result<Vec<WriteResult>> {
        let ctx = self.ctx("create");
        let mut work = Work::default();
        let mut order = Vec::with_capacity(items.len());
        let result = (|| -> Result<()> {
            let mut tx = Tx::new(self.kv.clone());
            for item in &items {
                let id = item.id.clone().unwrap_or_else(|| self.clock.new_id());
                if work.slots.contains_key(&id) || self.meta(&tx, &id)?.is_some() {
                    return Err(Error::AlreadyExists(id));
                }
                let edit = Edit::from_json(&self.schema, &item.collection, &item.fields)?;
                let rec = Record::create(&self.schema, &item.collection, &id, &edit.set, &ctx)?;
                self.check_references(&mut work, &tx, &item.collection, &edit)?;
                work.slots.insert(
                    id.clone(),
                    Slot {
                        rec,
                        meta: None,
                        old_heads: Vec::new(),
                        dirty: true,
                        forced: item.force,
                        unique_now: None,
                        fresh: !item.force,
                        stored: false,
                        presaved: None,
                        preread: None,
                    },
                );
                // Index this record now so later items of the batch see it.
                self.check_unique(
                    &mut work,
                    &tx,
                    &id,
                    item.force,
                    Some((&item.collection, &edit.set)),
                )?;
                self.index(&mut work, &mut tx, &id)?;
                let fields: serde_json::Map<String, Json> = edit
                    .set
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect();
                order.push((id, fields));
            }
            self.finish(&mut work, tx)
        })();
        // The views are built from what this batch wrote (a fresh record's
        // fields are exactly its input), without reloading the documents.
        let mut out = Vec::with_capacity(order.len());
        if result.is_ok() {
            for (id, fields) in order {
                let meta = work.slots[&id].meta.clone().expect("indexed");
                let mut open = Vec::new();
                for cid in self.collision_ids_for(&id)? {
                    if let Some(c) = self.collision(&cid)?
                        && c.is_open()
                    {
                        open.push(cid);
                    }
                }
                out.push(WriteResult {
                    change: meta.heads.first().cloned(),
                    record: RecordView {
                        id,
                        collection: meta.collection,
                        fields,
                        deleted: false,
                        merged_into: None,
                        heads: meta.heads,
                        seq: meta.seq,
                        created_by: Some(self.node),
                        created_at: ctx.time_ms,
                        updated_by: Some(self.node),
                        updated_at: ctx.time_ms,
                        requested_id: None,
                        open_collisions: open,
                    },
                    concurrent: Vec::new(),
                });
            }
        }
        self.settle(work, result.is_ok());
        result?;
        Ok(out)
    }

    /// Updates fields (`null` unsets). With `base` (heads the client read), the
    /// edit is applied as of that version and merged; the result lists fields
    /// changed concurrently since.
    pub fn update(
        &mut self,
        id: &RecordId,
        fields: &serde_json::Map<String, Json>,
        base: Option<&[String]>,
        force: bool,
    ) -> Result<WriteResult> {
        let id = self.resolve_alias(id)?;
        let ctx = self.ctx("update");
        let mut work = Work::default();
        let mut outcome = None;
        let result = (|| -> Result<()> {
            let mut tx = Tx::new(self.kv.clone());
            if !self.take(&mut work, &tx, &id)? {
                return Err(Error::NotFound(id.to_string()));
            }
            let collection = work.slots[&id]
                .meta
                .as_ref()
                .expect("stored")
                .collection
                .clone();
            let edit = Edit::from_json(&self.schema, &collection, fields)?;
            let base = match base {
                Some(b) => Some(heads_from_hex(b)?),
                None => None,
            };
            self.check_references(&mut work, &tx, &collection, &edit)?;
            let slot = work.slots.get_mut(&id).expect("taken");
            let out = slot
                .rec
                .update(&self.schema, &edit, base.as_deref(), &[], &ctx)?;
            slot.dirty = out.change.is_some();
            slot.forced = force;
            outcome = Some(out);
            if work.slots[&id].dirty {
                self.check_unique(&mut work, &tx, &id, force, None)?;
                self.index(&mut work, &mut tx, &id)?;
            }
            self.finish(&mut work, tx)
        })();
        self.settle(work, result.is_ok());
        result?;
        let out = outcome.expect("set on success");
        let record = self
            .get(&id)?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        Ok(WriteResult {
            record,
            change: out.change.map(|h| hex_lower(&h.0)),
            concurrent: out.concurrent,
        })
    }

    /// Deletes a record (a tombstone). Deleting a deleted record changes
    /// nothing.
    pub fn delete(&mut self, id: &RecordId) -> Result<WriteResult> {
        let id = self.resolve_alias(id)?;
        let ctx = self.ctx("delete");
        let mut work = Work::default();
        let mut change = None;
        let result = (|| -> Result<()> {
            let mut tx = Tx::new(self.kv.clone());
            if !self.take(&mut work, &tx, &id)? {
                return Err(Error::NotFound(id.to_string()));
            }
            let slot = work.slots.get_mut(&id).expect("taken");
            if slot.rec.is_deleted() {
                return Ok(());
            }
            change = Some(slot.rec.delete(None, &[], &ctx)?);
            slot.dirty = true;
            self.index(&mut work, &mut tx, &id)?;
            self.finish(&mut work, tx)
        })();
        self.settle(work, result.is_ok());
        result?;
        let record = self
            .get(&id)?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        Ok(WriteResult {
            record,
            change: change.map(|h| hex_lower(&h.0)),
            concurrent: Vec::new(),
        })
    }

    /// Restores a deleted record, optionally setting fields. The restored
    /// record claims its unique values again: a clash is refused unless
    /// `force`.
    pub fn restore(
        &mut self,
        id: &RecordId,
        fields: &serde_json::Map<String, Json>,
        force: bool,
    ) -> Result<WriteResult> {
        let ctx = self.ctx("restore");
        let id = id.clone();
        let mut work = Work::default();
        let mut change = None;
        let result = (|| -> Result<()> {
            let mut tx = Tx::new(self.kv.clone());
            if !self.take(&mut work, &tx, &id)? {
                return Err(Error::NotFound(id.to_string()));
            }
            let collection = work.slots[&id]
                .meta
                .as_ref()
                .expect("stored")
                .collection
                .clone();
            let edit = Edit::from_json(&self.schema, &collection, fields)?;
            self.check_references(&mut work, &tx, &collection, &edit)?;
            let slot = work.slots.get_mut(&id).expect("taken");
            change = Some(slot.rec.restore(&self.schema, &edit, &[], &ctx)?);
            slot.dirty = true;
            slot.forced = force;
            self.check_unique(&mut work, &tx, &id, force, None)?;
            self.index(&mut work, &mut tx, &id)?;
            self.finish(&mut work, tx)
        })();
        self.settle(work, result.is_ok());
        result?;
        let record = self
            .get(&id)?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        Ok(WriteResult {
            record,
            change: change.map(|h| hex_lower(&h.0)),
            concurrent: Vec::new(),
        })
    }

    /// Settles an open collision. The resolution is a change to every record
    /// involved (its effect plus the resolution entry) in one batch; it
    /// replicates like any change.
    pub fn resolve(&mut self, cid: &CollisionId, req: &ResolveRequest) -> Result<Collision> {
        let c = self
            .collision(cid)?
            .ok_or_else(|| Error::CollisionNotFound(cid.to_string()))?;
        let ctx = self.ctx("resolve");
        let mut work = Work::default();
        let result = (|| -> Result<()> {
            let mut tx = Tx::new(self.kv.clone());
            for r in &c.records {
                if !self.take(&mut work, &tx, r)? {
                    return Err(Error::NotFound(r.to_string()));
                }
            }
            let token = {
                let mut h = blake3::Hasher::new();
                h.update(cid.as_str().as_bytes());
                h.update(&self.node.0);
                h.update(&ctx.time_ms.to_le_bytes());
                for s in work.slots.values() {
                    for head in s.rec.heads() {
                        h.update(&head.0);
                    }
                }
                hex_lower(&h.finalize().as_bytes()[..8])
            };
            let plan = {
                let recs: BTreeMap<RecordId, &Record> = work
                    .slots
                    .iter()
                    .map(|(k, s)| (k.clone(), &s.rec))
                    .collect();
                collision::plan_resolution(
                    &self.schema,
                    &c,
                    req,
                    &recs,
                    self.node,
                    ctx.time_ms,
                    token,
                )?
            };
            let entry = vec![(cid.to_string(), plan.entry.to_text())];
            for (rid, w) in &plan.writes {
                let collection = c.collection.clone();
                if let PlannedWrite::Update(e) | PlannedWrite::Restore(e) = w {
                    self.check_references(&mut work, &tx, &collection, e)?;
                }
                let slot = work.slots.get_mut(rid).expect("taken");
                match w {
                    PlannedWrite::Update(e) => {
                        if slot.rec.is_deleted() {
                            slot.rec.restore(&self.schema, e, &entry, &ctx)?;
                        } else {
                            slot.rec.update(&self.schema, e, None, &entry, &ctx)?;
                        }
                    }
                    PlannedWrite::Restore(e) => {
                        slot.rec.restore(&self.schema, e, &entry, &ctx)?;
                    }
                    PlannedWrite::Delete { merged_into } => {
                        slot.rec.delete(merged_into.as_ref(), &entry, &ctx)?;
                    }
                    PlannedWrite::Annotate => {
                        slot.rec.annotate(&entry, &ctx)?;
                    }
                }
                slot.dirty = true;
            }
            let ids: Vec<RecordId> = plan.writes.keys().cloned().collect();
            for rid in &ids {
                self.index(&mut work, &mut tx, rid)?;
            }
            self.finish(&mut work, tx)
        })();
        self.settle(work, result.is_ok());
        result?;
        self.collision(cid)?
            .ok_or_else(|| Error::CollisionNotFound(cid.to_string()))
    }

    // -- remote changes ---------------------------------------------------------

    /// Applies raw Automerge changes received from a peer, grouped by record,
    /// in one atomic batch. Each change is parsed on its own, size-capped and
    /// checksum-verified; each record's changes are applied to a copy of its
    /// document under a panic guard and checked before the copy replaces the
    /// original. Changes whose dependencies are missing wait (durably) until
    /// they arrive. A record whose input is refused keeps its old state; the
    /// input is quarantined and reported.
    pub fn apply_remote(&mut self, batch: Vec<(RecordId, Vec<Vec<u8>>)>) -> Result<ApplyReport> {
        self.apply_remote_from(None, batch)
    }

    /// [`Store::apply_remote`] for a batch that came from `peer`.
    ///
    /// Before anything parses the batch, a note naming it (the peer, its
    /// records, a BLAKE3 hash of each change's raw bytes) is written where
    /// the process dying cannot take it (the operating system holds it; a
    /// power cut may, which only means the batch is fetched again without
    /// suspicion, as after a kill); the atomic batch that applies the data
    /// removes it. A note found on open means the process died inside that
    /// batch (an input that aborts rather than panics, or a `kill -9`): the
    /// batch is retried once, and if the process dies again on the same
    /// changes they are quarantined and refused by hash whenever a peer
    /// sends them again. A poison input costs two restarts, never a crash
    /// loop; a kill mid-batch costs nothing.
    pub fn apply_remote_from(
        &mut self,
        peer: Option<NodeId>,
        batch: Vec<(RecordId, Vec<Vec<u8>>)>,
    ) -> Result<ApplyReport> {
        self.apply_remote_only(peer, &BTreeSet::new(), batch, None)
    }

    /// [`Store::apply_remote_from`] on a node that replicates only
    /// `collections` (empty: all): changes of a record of another collection
    /// are neither applied nor kept; the record is listed in
    /// [`ApplyReport::ignored`]. With `checkpoint` (and a `peer`), this
    /// node's checkpoint in the peer's feed is set to it in the same atomic
    /// batch as the data (or on its own when nothing in the batch is
    /// applied): the data a checkpoint covers and the checkpoint land
    /// together or not at all.
    pub fn apply_remote_only(
        &mut self,
        peer: Option<NodeId>,
        collections: &BTreeSet<String>,
        batch: Vec<(RecordId, Vec<Vec<u8>>)>,
        checkpoint: Option<u64>,
    ) -> Result<ApplyReport> {
        let checkpoint = peer.zip(checkpoint);
        let mut report = ApplyReport::default();
        let mut grouped: BTreeMap<RecordId, Vec<Vec<u8>>> = BTreeMap::new();
        for (id, changes) in batch {
            grouped.entry(id).or_default().extend(changes);
        }
        let mut note = ApplyNote {
            peer: peer.map(|p| p.to_string()),
            at_ms: self.clock.now_ms(),
            records: Vec::with_capacity(grouped.len()),
        };
        grouped.retain(|id, raw| {
            let hashes: Vec<String> = raw.iter().map(|c| change_bytes_hash(c)).collect();
            if hashes.iter().any(|h| self.poisoned.contains(h)) {
                let reason = "changes quarantined: the process died applying them before";
                tracing::warn!(record = %id, "refused a batch quarantined after a crash");
                report.rejected.push((id.clone(), reason.to_string()));
                return false;
            }
            note.records.push((id.to_string(), hashes));
            true
        });
        if grouped.is_empty() {
            if let Some((p, seq)) = checkpoint {
                self.save_checkpoint(&p, seq)?;
            }
            return Ok(report);
        }
        // The note guards against the process dying, which the operating
        // system's copy survives; the batch's own write, which removes it,
        // waits for the disk. Waiting here too cost a millisecond or more
        // per batch, on the path that applies it.
        self.kv
            .write_unsynced(vec![(Cf::Meta, META_APPLYING.to_vec(), Some(json(&note)))])?;
        let mut work = Work::default();
        let result = (|| -> Result<()> {
            let mut tx = Tx::new(self.kv.clone());
            tx.del(Cf::Meta, META_APPLYING.to_vec());
            if let Some((p, seq)) = checkpoint {
                let (k, v) = checkpoint_entry(&p, seq);
                tx.put(Cf::Checkpoints, k, v);
            }
            // Changes waiting for their dependencies are rare; when none
            // waits for any record, no record of the batch looks for them
            // (a prefix scan per record, 5% of a catch-up). The batch adds
            // waiting changes only under its own records' ids, each of
            // which it reads once, before.
            let mut waiting = false;
            self.kv.scan(Cf::Pending, b"", b"", &mut |_, _| {
                waiting = true;
                false
            })?;
            // Every record is read first (metadata, and its stored bytes
            // when it is not cached). Then each is loaded and its changes
            // tried on a copy of its document, on worker threads when the
            // batch is large (each record is its own document; loading them
            // here was 14% of catching up on records this node holds), and
            // the outcomes are taken in batch order into the working set.
            let mut prepared = Vec::with_capacity(grouped.len());
            for (id, raw) in grouped {
                prepared.push(self.prepare(&tx, id, raw, waiting)?);
            }
            let schema = self.schema.clone();
            let ctx = TryCtx {
                schema: &schema,
                node: self.node,
                only: collections,
                fault: self.opts.fault,
            };
            // The base of every record new to this store (`Automerge::new`
            // costs as much as a small record's indexing).
            let empty = Automerge::new();
            let (kept, jobs): (Vec<_>, Vec<_>) = prepared
                .into_iter()
                .map(|p| ((p.id, p.waiting_keys), p.job))
                .unzip();
            // Each outcome is taken (in batch order, on this thread) as soon
            // as it is ready, while the other threads try the next records.
            let mut kept = kept.into_iter();
            par_each(
                self.opts.apply_threads,
                jobs,
                |job| attempt(&ctx, &empty, job),
                |outcome| {
                    let kept = kept.next().expect("one kept entry per job");
                    self.take_attempt(
                        &mut work,
                        &mut tx,
                        kept,
                        outcome?,
                        collections,
                        peer,
                        &mut report,
                    )
                },
            )?;
            report.records_changed = work.slots.values().filter(|s| s.dirty).count();
            report.written_behind = self.finish_remote(&mut work, tx)?;
            Ok(())
        })();
        if result.is_err() {
            // The batch did not land, and not because the process died: the
            // note must not make the next open quarantine it.
            if let Err(e) = self
                .kv
                .write(vec![(Cf::Meta, META_APPLYING.to_vec(), None)])
            {
                tracing::error!(error = %e, "could not clear the remote batch note");
            }
        }
        self.settle(work, result.is_ok());
        result?;
        Ok(report)
    }

    /// Takes one record's attempt into the working set and the batch, in
    /// batch order: the record's outcome (a rejected record quarantined),
    /// then its index entries when it changed.
    #[allow(clippy::too_many_arguments)]
    fn take_attempt(
        &mut self,
        work: &mut Work,
        tx: &mut Tx,
        (id, waiting_keys): (RecordId, Vec<Vec<u8>>),
        (slot, tried): (Option<Slot>, Tried),
        collections: &BTreeSet<String>,
        peer: Option<NodeId>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        if let Some(slot) = slot {
            work.slots.insert(id.clone(), slot);
        }
        match self.conclude(work, tx, &id, waiting_keys, tried, collections, report) {
            Ok(()) => {}
            Err(Error::RejectedChange { reason, .. }) => {
                let now = self.clock.now_ms();
                let key = key2(id.as_str().as_bytes(), &now.to_be_bytes());
                let entry = QuarantineEntry {
                    record: id.to_string(),
                    reason: reason.clone(),
                    peer: peer.map(|p| p.to_string()),
                    changes: Vec::new(),
                    at_ms: Some(now),
                };
                tx.put(Cf::Quarantine, key, json(&entry));
                tracing::warn!(record = %id, %reason, "quarantined remote input");
                report.rejected.push((id, reason));
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if work.slots.get(&id).is_some_and(|s| s.dirty) {
            self.index(work, tx, &id)?;
        }
        Ok(())
    }

    /// Reads one record of a remote batch for its attempt: whether this
    /// store holds it (and its document, from the cache, or its stored
    /// bytes), and the changes that waited in storage for it.
    fn prepare(
        &mut self,
        tx: &Tx,
        id: RecordId,
        raw: Vec<Vec<u8>>,
        waiting: bool,
    ) -> Result<Prepared> {
        let mut waiting_keys = Vec::new();
        let mut waiting_raw = Vec::new();
        if waiting {
            for k in tx.keys_with_prefix(Cf::Pending, &id_prefix(&id))? {
                if let Some(b) = tx.get(Cf::Pending, &k)? {
                    waiting_keys.push(k);
                    waiting_raw.push(b);
                }
            }
        }
        let base = match self.meta(tx, &id)? {
            None => Base::New,
            Some(meta) => match self.cache.pop(&id) {
                Some(rec) => Base::Taken(Slot::stored(rec, meta)),
                None => {
                    let (snap, chunks) = self.read_stored(&id, &meta)?;
                    Base::Stored { meta, snap, chunks }
                }
            },
        };
        Ok(Prepared {
            id: id.clone(),
            waiting_keys,
            job: Job {
                base,
                id,
                raw,
                waiting: waiting_raw,
            },
        })
    }

    /// Takes one tried record's outcome into the working set and the batch.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        work: &mut Work,
        tx: &mut Tx,
        id: &RecordId,
        waiting_keys: Vec<Vec<u8>>,
        tried: Tried,
        only: &BTreeSet<String>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let Applied {
            rec,
            applied,
            waiting,
            duplicate,
            presaved,
            unique,
            resolutions,
        } = match tried {
            Tried::Rejected(reason) => {
                return Err(Error::RejectedChange {
                    record: id.to_string(),
                    reason,
                });
            }
            Tried::Nothing { duplicate } => {
                report.changes_duplicate += duplicate;
                for k in waiting_keys {
                    tx.del(Cf::Pending, k);
                }
                return Ok(());
            }
            Tried::Applied(applied) => *applied,
        };
        report.changes_duplicate += duplicate;
        for k in waiting_keys {
            tx.del(Cf::Pending, k);
        }
        if !only.is_empty()
            && let Some(c) = rec.collection()
            && !only.contains(&c)
        {
            // Partial replication: not a collection this node keeps. Neither
            // the changes nor any that waited for them are stored.
            report.ignored.push(id.clone());
            return Ok(());
        }
        report.changes_applied += applied;
        report.changes_pending += waiting.len();
        for c in &waiting {
            let mut k = id_prefix(id);
            k.extend_from_slice(&c.hash().0);
            tx.put(Cf::Pending, k, c.raw_bytes().to_vec());
        }
        if rec.id().is_none() {
            // Nothing but pending changes yet: no record to index.
            return Ok(());
        }
        let Some(collection) = rec.collection() else {
            return Ok(());
        };
        if self.schema.collection(&collection).is_err() {
            return Err(Error::RejectedChange {
                record: id.to_string(),
                reason: format!("unknown collection `{collection}`"),
            });
        }
        match work.slots.get_mut(id) {
            Some(slot) => {
                slot.dirty = rec.heads() != slot.rec.heads();
                slot.rec = rec;
                slot.unique_now = unique;
                slot.presaved = presaved;
                slot.preread = resolutions;
            }
            None => {
                // New to this store, and it has its creating change.
                work.slots.insert(
                    id.clone(),
                    Slot {
                        rec,
                        meta: None,
                        old_heads: Vec::new(),
                        dirty: true,
                        forced: false,
                        unique_now: unique,
                        fresh: false,
                        stored: false,
                        presaved,
                        preread: resolutions,
                    },
                );
            }
        }
        Ok(())
    }

    // -- the shared write path ------------------------------------------------

    fn check_references(
        &mut self,
        work: &mut Work,
        tx: &Tx,
        collection: &str,
        edit: &Edit,
    ) -> Result<()> {
        for (field, to) in self.schema.references(collection) {
            let Some(v) = edit.set.get(&field) else {
                continue;
            };
            let target = RecordId::parse(&v.to_text())?;
            let target = self.resolve_alias(&target)?;
            let live = match work.slots.get(&target) {
                Some(s) => {
                    Some(!s.rec.is_deleted() && s.rec.collection().as_deref() == Some(to.as_str()))
                }
                None => self
                    .meta(tx, &target)?
                    .map(|m| !m.deleted && m.collection == to),
            };
            match live {
                None => {
                    return Err(Error::BadReference {
                        field,
                        target: target.to_string(),
                        why: "does not exist",
                    });
                }
                Some(false) => {
                    return Err(Error::BadReference {
                        field,
                        target: target.to_string(),
                        why: "is deleted or not in the referenced collection",
                    });
                }
                Some(true) => {}
            }
        }
        Ok(())
    }

    /// Refuses a unique value another live record holds, unless forced.
    /// `created`: the collection and fields of a record this operation just
    /// created, so its claims are computed from them, not read back.
    fn check_unique(
        &mut self,
        work: &mut Work,
        tx: &Tx,
        id: &RecordId,
        force: bool,
        created: Option<(&str, &BTreeMap<String, FieldValue>)>,
    ) -> Result<()> {
        let slot = &work.slots[id];
        let collection = match created {
            Some((c, _)) => c.to_string(),
            None => match slot.rec.collection() {
                Some(c) => c,
                None => return Ok(()),
            },
        };
        let mut now = Vec::new();
        for key in self.schema.unique_keys(&collection) {
            let values = match created {
                Some((c, fields)) => unique_values_of_new(&self.schema, c, fields, &key),
                None => unique_values(&self.schema, &slot.rec, &key),
            };
            for value in values {
                now.push((key.name.clone(), value));
            }
        }
        if !force {
            let held: BTreeSet<(String, String)> = slot
                .meta
                .as_ref()
                .map(|m| m.unique.iter().cloned().collect())
                .unwrap_or_default();
            for (name, value) in &now {
                // A value the record already held (and shares) is not new.
                if held.contains(&(name.clone(), value.clone())) {
                    continue;
                }
                let prefix = unique_prefix(&collection, name, value);
                for k in tx.keys_with_prefix(Cf::Unique, &prefix)? {
                    let other = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                    if other != id.as_str() {
                        let key = self
                            .schema
                            .unique_keys(&collection)
                            .into_iter()
                            .find(|k| &k.name == name)
                            .expect("key of this collection");
                        return Err(Error::Duplicate {
                            code: key.code(),
                            field: name.clone(),
                            value: value.replace('\u{1f}', " + "),
                            existing: RecordId::parse(&other)?,
                        });
                    }
                }
            }
        }
        work.slots.get_mut(id).expect("in work").unique_now = Some(now);
        Ok(())
    }

    /// Brings a dirty record's unique and reference index entries up to date
    /// in `tx` (so the rest of the operation sees them).
    fn index(&mut self, work: &mut Work, tx: &mut Tx, id: &RecordId) -> Result<()> {
        let slot = work.slots.get_mut(id).expect("in work");
        let collection = slot
            .rec
            .collection()
            .expect("dirty records have a collection");
        let old = slot.meta.clone();
        // `check_unique` just computed them when it ran for this write.
        let unique = match slot.unique_now.take() {
            Some(u) => u,
            None => {
                let mut unique = Vec::new();
                for key in self.schema.unique_keys(&collection) {
                    for v in unique_values(&self.schema, &slot.rec, &key) {
                        unique.push((key.name.clone(), v));
                    }
                }
                unique
            }
        };
        let mut refs = Vec::new();
        for (field, _) in self.schema.references(&collection) {
            for v in slot.rec.values_of(&self.schema, &collection, &field) {
                refs.push((field.clone(), v.to_text()));
            }
        }
        refs.sort();
        refs.dedup();
        let (old_unique, old_refs) = old
            .as_ref()
            .map(|m| (m.unique.clone(), m.refs.clone()))
            .unwrap_or_default();
        for (k, v) in &old_unique {
            if !unique.contains(&(k.clone(), v.clone())) {
                let mut key = unique_prefix(&collection, k, v);
                key.extend_from_slice(id.as_str().as_bytes());
                tx.del(Cf::Unique, key);
            }
        }
        // Entries the record held already are in the index (the metadata
        // lists exactly what was written): writing them again on every
        // change only grew the memtable that duplicate checks seek in.
        for (k, v) in &unique {
            if old_unique.contains(&(k.clone(), v.clone())) {
                continue;
            }
            let mut key = unique_prefix(&collection, k, v);
            key.extend_from_slice(id.as_str().as_bytes());
            tx.put(Cf::Unique, key, Vec::new());
        }
        for (f, t) in &old_refs {
            if !refs.contains(&(f.clone(), t.clone())) {
                tx.del(Cf::Refs, ref_key(t, id, f));
            }
        }
        for (f, t) in &refs {
            if !old_refs.contains(&(f.clone(), t.clone())) {
                tx.put(Cf::Refs, ref_key(t, id, f), Vec::new());
            }
        }
        // Keep what is held on the slot's meta (persisted by finish).
        let deleted = slot.rec.is_deleted();
        let merged_into = slot.rec.merged_into();
        let meta = slot.meta.get_or_insert_with(|| RecordMeta {
            collection: collection.clone(),
            seq: 0,
            deleted,
            merged_into: None,
            heads: Vec::new(),
            snap_len: 0,
            next_chunk: 0,
            chunks: 0,
            chunk_bytes: 0,
            unique: Vec::new(),
            refs: Vec::new(),
        });
        meta.deleted = deleted;
        meta.merged_into = merged_into;
        meta.heads = heads_to_hex(&slot.rec.heads());
        // Storage fields are updated by finish; the index view is current now.
        meta.unique = unique;
        meta.refs = refs;
        tx.put(Cf::Records, id.as_str().as_bytes().to_vec(), meta.encode());
        if old.is_none() {
            tx.put(
                Cf::ByCollection,
                key2(collection.as_bytes(), id.as_str().as_bytes()),
                Vec::new(),
            );
        }
        Ok(())
    }

    /// Persists dirty records (document bytes, feed), re-evaluates the
    /// collisions their change can affect, and commits everything as one batch.
    fn finish(&mut self, work: &mut Work, tx: Tx) -> Result<()> {
        self.prepare_commit(work, tx)?.commit()
    }

    /// [`Store::finish`] for a remote batch, which needs nothing of its
    /// working set afterwards when it is large (it is not cached: see
    /// `settle`). Such a batch is written on another thread and the call
    /// returns: its documents, a few microseconds each to free, are freed
    /// here meanwhile, and the node takes in the next page while it lands.
    /// Every later storage access waits for it first (see [`Landing`]).
    /// Freeing them on a thread of their own instead (`drop_behind`) made
    /// a 100,000-record catch-up between two nodes about 8% slower
    /// (BENCHMARKS.md, "Network catch-up", stop 24).
    /// Returns whether the batch is written so.
    fn finish_remote(&mut self, work: &mut Work, tx: Tx) -> Result<bool> {
        let tx = self.prepare_commit(work, tx)?;
        if work.slots.len() <= CACHE_MAX_PER_OPERATION {
            tx.commit()?;
            return Ok(false);
        }
        let slots = std::mem::take(&mut work.slots);
        self.kv.write_behind(tx.into_ops(), self.opts.fault)?;
        drop(slots);
        Ok(true)
    }

    /// Everything [`Store::finish`] does but the commit: the batch to write.
    fn prepare_commit(&mut self, work: &mut Work, mut tx: Tx) -> Result<Tx> {
        let dirty: Vec<RecordId> = work
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| k.clone())
            .collect();
        if dirty.is_empty() {
            return Ok(tx);
        }
        // Subjects touched, from the state before and after.
        // About six subjects per record (its references, update_delete,
        // flagged fields, unique values).
        let mut subjects =
            Touched::with_capacity_and_hasher(dirty.len().saturating_mul(6), FixedState::default());
        let mut before_unique: BTreeMap<RecordId, Vec<(String, String)>> = BTreeMap::new();
        for id in &dirty {
            if work.slots[id].fresh || !work.slots[id].stored {
                continue; // nothing stored before
            }
            // What the record held before this operation (from storage).
            if let Some(b) = self.kv.get(Cf::Records, id.as_str().as_bytes())? {
                let m = RecordMeta::decode(&b)?;
                before_unique.insert(id.clone(), m.unique.clone());
                for (f, _) in m.refs {
                    touch(&mut subjects, Subject::Dangling(id.clone(), f), false);
                }
            }
        }
        // Storage's part of the scans below, read for all of them at once.
        tx.read_prefixes(Cf::Refs, dirty.iter().map(id_prefix).collect())?;
        for id in &dirty {
            let slot = &work.slots[id];
            let meta = slot.meta.as_ref().expect("indexed");
            let collection = meta.collection.clone();
            // Records pointing at this one (a remote reference may name an
            // id before the record exists here).
            for k in tx.keys_with_prefix(Cf::Refs, &id_prefix(id))? {
                let rest = String::from_utf8_lossy(&k[id.as_str().len() + 1..]).into_owned();
                if let Some((referrer, field)) = rest.split_once('\0')
                    && let Ok(r) = RecordId::parse(referrer)
                {
                    touch(
                        &mut subjects,
                        Subject::Dangling(r, field.to_string()),
                        false,
                    );
                }
            }
            for (f, _) in self.schema.references(&collection) {
                touch(&mut subjects, Subject::Dangling(id.clone(), f), false);
            }
            if slot.fresh {
                // A record this operation created locally without `force`
                // has one change and no delete (no update_delete, no
                // flagged field) and unique values `check_unique` found
                // unclaimed by any other live record, in storage or earlier
                // in this batch (not a duplicate). Its id is new, so no
                // such subject has a stored collision to update. Evaluating
                // them would find nothing, at about a third of the batched
                // create path's detection cost.
                continue;
            }
            touch(&mut subjects, Subject::UpdateDelete(id.clone()), false);
            if let Ok(def) = self.schema.collection(&collection) {
                for (f, d) in &def.fields {
                    if d.policy == MergePolicy::Flag {
                        touch(
                            &mut subjects,
                            Subject::Flagged(id.clone(), f.clone()),
                            false,
                        );
                    }
                }
            }
            // A record that holds the same unique values it held before
            // (so it is live as before) leaves each value's holders as they
            // were: where no collision stands for the value, none can now.
            let kept = !slot.forced
                && before_unique
                    .get(id)
                    .is_some_and(|b| same_values(b, &meta.unique));
            let before = before_unique.get(id).into_iter().flatten();
            for (key, value) in meta
                .unique
                .iter()
                .chain(before.filter(|v| !meta.unique.contains(v)))
            {
                touch(
                    &mut subjects,
                    Subject::duplicate(&collection, key, value),
                    kept,
                );
            }
        }
        // Forced writes record a "force" resolution of the duplicate they make.
        let forced: Vec<RecordId> = dirty
            .iter()
            .filter(|id| work.slots[*id].forced)
            .cloned()
            .collect();
        for id in &forced {
            let meta = work.slots[id].meta.clone().expect("indexed");
            let mut entries = Vec::new();
            for (key, value) in &meta.unique {
                let subject = Subject::duplicate(&meta.collection, key, value);
                if let Some(c) = self.evaluate(work, &tx, &subject)? {
                    let at = self.clock.now_ms();
                    let entry = ResolutionEntry {
                        resolution: collision::Resolution {
                            by: self.node,
                            at_ms: at,
                            action: "force".into(),
                            detail: serde_json::json!({"record": id, "field": key}),
                            token: hex_lower(
                                &blake3::hash(c.id.as_str().as_bytes()).as_bytes()[..8],
                            ),
                        },
                        collision: c.clone(),
                    };
                    entries.push((c.id.to_string(), entry.to_text()));
                }
            }
            if !entries.is_empty() {
                let ctx = self.ctx("force");
                work.slots
                    .get_mut(id)
                    .expect("present")
                    .rec
                    .annotate(&entries, &ctx)?;
            }
        }

        // Document bytes, feed, metadata.
        for id in &dirty {
            let slot = work.slots.get_mut(id).expect("present");
            let meta = slot.meta.as_mut().expect("indexed");
            meta.heads = heads_to_hex(&slot.rec.heads());
            if meta.seq > 0 {
                tx.del(Cf::Feed, meta.seq.to_be_bytes().to_vec());
            }
            self.seq += 1;
            meta.seq = self.seq;
            tx.put(
                Cf::Feed,
                self.seq.to_be_bytes().to_vec(),
                id.as_str().as_bytes().to_vec(),
            );
            let doc = slot.rec.doc();
            let (pre_snapshot, pre_chunk) = match slot.presaved.take() {
                Some((heads, bytes)) if heads == doc.get_heads() => match bytes {
                    Presaved::Snapshot(b) => (Some(b), None),
                    Presaved::Chunk(b) => (None, Some(b)),
                },
                _ => (None, None),
            };
            let is_new = meta.snap_len == 0;
            let compact = !is_new
                && (meta.chunks + 1 >= self.opts.compact_after_chunks
                    || meta.chunk_bytes
                        > meta.snap_len.saturating_mul(self.opts.compact_bytes_factor));
            let mut snapshot = None;
            if is_new || compact {
                // A new record is first stored as its changes, not as a
                // document: a peer's full sync is then served from them
                // without loading the record (see `Store::changes_for_many`),
                // and a document is saved when compaction comes due.
                let bytes = match pre_snapshot {
                    Some(bytes) if is_new => bytes,
                    _ if is_new => doc.save_after(&[]),
                    _ => doc.save(),
                };
                // Compaction replaces chunks only when the snapshot loads.
                let loads = is_new
                    || (self.opts.fault != Some(TestFault::SnapshotDoesNotLoad)
                        && catch_unwind(AssertUnwindSafe(|| Automerge::load(&bytes).is_ok()))
                            .unwrap_or(false));
                if loads {
                    snapshot = Some(bytes);
                } else {
                    tracing::error!(record = %id, "compaction skipped: the new snapshot does not load");
                    tx.put(
                        Cf::Quarantine,
                        key2(id.as_str().as_bytes(), b"compaction"),
                        json(&serde_json::json!({"record": id, "reason": "snapshot failed to load; chunks kept"})),
                    );
                }
            }
            match snapshot {
                Some(bytes) => {
                    for n in meta.next_chunk.saturating_sub(meta.chunks)..meta.next_chunk {
                        tx.del(Cf::Chunks, chunk_key(id, n));
                    }
                    meta.snap_len = bytes.len() as u64;
                    meta.chunks = 0;
                    meta.chunk_bytes = 0;
                    tx.put(Cf::Snapshots, id.as_str().as_bytes().to_vec(), bytes);
                }
                None => {
                    let chunk = pre_chunk.unwrap_or_else(|| doc.save_after(&slot.old_heads));
                    meta.chunk_bytes += chunk.len() as u64;
                    meta.chunks += 1;
                    tx.put(
                        Cf::Chunks,
                        chunk_key(id, meta.next_chunk),
                        encode_chunk(&slot.old_heads, &chunk),
                    );
                    meta.next_chunk += 1;
                }
            }
            tx.put(Cf::Records, id.as_str().as_bytes().to_vec(), meta.encode());
        }
        tx.put(Cf::Meta, META_SEQ.to_vec(), self.seq.to_be_bytes().to_vec());

        // Resolution entries first: a resolved collision stays resolved.
        for id in &dirty {
            if work.slots[id].fresh {
                continue; // a new document holds no resolution entries
            }
            let slot = work.slots.get_mut(id).expect("present");
            let resolutions = match slot.preread.take() {
                Some((heads, r)) if heads == slot.rec.doc().get_heads() => r,
                _ => slot.rec.resolutions(),
            };
            for (cid, texts) in resolutions {
                let Ok(cid) = CollisionId::parse(&cid) else {
                    continue;
                };
                let mut entries: Vec<ResolutionEntry> = texts
                    .iter()
                    .filter_map(|t| ResolutionEntry::parse(t))
                    .collect();
                let existing: Option<Collision> =
                    match tx.get(Cf::Collisions, cid.as_str().as_bytes())? {
                        Some(b) => Some(parse("collision", &b)?),
                        None => None,
                    };
                if let Some(Collision {
                    status: Status::Resolved(r),
                    ..
                }) = &existing
                {
                    // The resolution shown so far (perhaps from another
                    // record's entries) competes together with the snapshot
                    // it was shown with; pairing it with another entry's
                    // snapshot made the result depend on arrival order.
                    let mut shown = existing.clone().expect("matched above");
                    shown.status = Status::Open;
                    entries.push(ResolutionEntry {
                        collision: shown,
                        resolution: r.clone(),
                    });
                }
                let Some(win) = ResolutionEntry::winner(entries) else {
                    continue;
                };
                let mut c = win.collision.clone();
                c.id = cid.clone();
                c.status = Status::Resolved(win.resolution);
                if existing.as_ref() != Some(&c) {
                    self.put_collision(&mut tx, &c, existing.as_ref());
                }
            }
        }

        // Duplicate subjects only records that kept their values touch are
        // skipped without a standing collision (checking them is a prefix
        // scan each, the largest part of storing a batch of edits). The
        // others' holders are read from storage in one pass.
        let holders = subjects
            .iter()
            .filter_map(|(subject, kept)| match subject {
                Subject::Duplicate {
                    collection,
                    key,
                    hash,
                    ..
                } if !kept => Some(hashed_unique_prefix(collection, key, hash)),
                _ => None,
            })
            .collect();
        tx.read_prefixes(Cf::Unique, holders)?;
        for (subject, kept) in &subjects {
            let key = subject.key();
            // A subject of one record is decided (and its entry written)
            // only with the record in the same batch, so one of a record
            // storage did not hold has no entry (a catch-up's records).
            let unstored = match subject {
                Subject::UpdateDelete(id) | Subject::Flagged(id, _) | Subject::Dangling(id, _) => {
                    work.slots.get(id).is_some_and(|s| !s.stored)
                }
                Subject::Duplicate { .. } => false,
            };
            let old = if unstored {
                None
            } else {
                tx.get(Cf::Subjects, &key)?
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            };
            if old.is_none() && *kept {
                continue;
            }
            let new = self.evaluate(work, &tx, subject)?;
            if let Some(old) = &old
                && new.as_ref().map(|c| c.id.as_str()) != Some(old.as_str())
                && let Some(b) = tx.get(Cf::Collisions, old.as_bytes())?
            {
                let c: Collision = parse("collision", &b)?;
                if c.is_open() {
                    self.remove_collision(&mut tx, &c);
                }
            }
            match new {
                Some(c) => {
                    tx.put(Cf::Subjects, key, c.id.as_str().as_bytes().to_vec());
                    let existing: Option<Collision> =
                        match tx.get(Cf::Collisions, c.id.as_str().as_bytes())? {
                            Some(b) => Some(parse("collision", &b)?),
                            None => None,
                        };
                    match &existing {
                        Some(e) if !e.is_open() => {}
                        Some(e) if e == &c => {}
                        _ => self.put_collision(&mut tx, &c, existing.as_ref()),
                    }
                }
                None => {
                    if old.is_some() {
                        tx.del(Cf::Subjects, key);
                    }
                }
            }
        }
        Ok(tx)
    }

    fn put_collision(&self, tx: &mut Tx, c: &Collision, old: Option<&Collision>) {
        if let Some(o) = old {
            for r in &o.records {
                if !c.records.contains(r) {
                    tx.del(
                        Cf::CollisionIndex,
                        key2(r.as_str().as_bytes(), o.id.as_str().as_bytes()),
                    );
                }
            }
        }
        for r in &c.records {
            tx.put(
                Cf::CollisionIndex,
                key2(r.as_str().as_bytes(), c.id.as_str().as_bytes()),
                Vec::new(),
            );
        }
        tx.put(Cf::Collisions, c.id.as_str().as_bytes().to_vec(), json(c));
    }

    fn remove_collision(&self, tx: &mut Tx, c: &Collision) {
        for r in &c.records {
            tx.del(
                Cf::CollisionIndex,
                key2(r.as_str().as_bytes(), c.id.as_str().as_bytes()),
            );
        }
        tx.del(Cf::Collisions, c.id.as_str().as_bytes().to_vec());
    }

    /// Loads a record for reading during an operation (into the working set,
    /// not dirty).
    fn peek<'w>(
        &mut self,
        work: &'w mut Work,
        tx: &Tx,
        id: &RecordId,
    ) -> Result<Option<&'w Record>> {
        if !self.take(work, tx, id)? {
            return Ok(None);
        }
        Ok(work.slots.get(id).map(|s| &s.rec))
    }

    /// The collision standing for a subject now, if any.
    fn evaluate(
        &mut self,
        work: &mut Work,
        tx: &Tx,
        subject: &Subject,
    ) -> Result<Option<Collision>> {
        Ok(match subject {
            Subject::UpdateDelete(id) => self
                .peek(work, tx, id)?
                .and_then(|r| detect_update_delete(&self.schema, r)),
            Subject::Flagged(id, field) => self
                .peek(work, tx, id)?
                .and_then(|r| detect_flagged_field(&self.schema, r, field)),
            Subject::Dangling(id, field) => {
                let target = match self.peek(work, tx, id)? {
                    Some(r) if !r.is_deleted() => r
                        .field_values(&self.schema, field)
                        .pop()
                        .and_then(|(v, _)| RecordId::parse(&v.to_text()).ok()),
                    _ => None,
                };
                match target {
                    Some(t) if self.take(work, tx, &t)? => {
                        let referrer = &work.slots[id].rec;
                        let target = &work.slots[&t].rec;
                        detect_dangling(&self.schema, referrer, field, target)
                    }
                    _ => None,
                }
            }
            Subject::Duplicate {
                collection,
                key,
                value,
                hash,
            } => {
                let prefix = hashed_unique_prefix(collection, key, hash);
                let mut holders = Vec::new();
                for k in tx.keys_with_prefix(Cf::Unique, &prefix)? {
                    holders.push(RecordId::parse(&String::from_utf8_lossy(
                        &k[prefix.len()..],
                    ))?);
                }
                if holders.len() < 2 {
                    return Ok(None);
                }
                for h in &holders {
                    self.take(work, tx, h)?;
                }
                let Some(ukey) = self
                    .schema
                    .unique_keys(collection)
                    .into_iter()
                    .find(|k| &k.name == key)
                else {
                    return Ok(None);
                };
                let recs: Vec<&Record> = holders
                    .iter()
                    .filter_map(|h| work.slots.get(h).map(|s| &s.rec))
                    .collect();
                detect_duplicate(&self.schema, collection, &ukey, value, &recs)
            }
        })
    }

    /// After an operation: on success the working set goes back into the
    /// cache; on failure it is dropped (storage is unchanged, so the next
    /// read loads the persisted state).
    fn settle(&mut self, work: Work, ok: bool) {
        if !ok {
            if let Err(e) = self.reload_seq() {
                tracing::error!(error = %e, "could not re-read the feed sequence");
            }
            return;
        }
        // A bulk operation (an import, a page of a catch-up) would replace
        // the whole hot set with documents nobody asked for yet; its
        // records are read back from storage when they are wanted. (Records
        // it took from the cache left it then: the cache never holds a
        // stale version.) Measured: caching every record of 1,000-record
        // batches cost the batched write path 17% (BENCHMARKS.md).
        if work.slots.len() > CACHE_MAX_PER_OPERATION {
            self.drop_behind(work);
            return;
        }
        for (id, slot) in work.slots {
            if slot.meta.is_some() {
                self.cache.put(id, slot.rec);
            }
        }
    }

    /// Frees a large local operation's working set (an import's batch) on
    /// another thread, so the caller's next batch does not wait for it. A
    /// large remote batch's documents are freed by `finish_remote`, which
    /// leaves `settle` none: see there why. One such thread at a time: the
    /// next large operation first waits for the last one's.
    fn drop_behind(&mut self, work: Work) {
        if let Some(h) = self.dropping.take()
            && let Err(e) = h.join()
        {
            std::panic::resume_unwind(e);
        }
        // Should the thread not start, the work is freed here, with it.
        self.dropping = std::thread::Builder::new()
            .name("entente-free".into())
            .spawn(move || drop(work))
            .ok();
    }

    /// Re-reads the feed counter after a failed batch (the counter advanced
    /// in memory but the batch did not land).
    pub fn reload_seq(&mut self) -> Result<()> {
        self.seq = match self.kv.get(Cf::Meta, META_SEQ)? {
            Some(b) => u64::from_be_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("feed seq".into()))?,
            ),
            None => 0,
        };
        Ok(())
    }
}

/// On open: a leftover note names the remote batch the process died in. The
/// first time, that may be a `kill -9` or a power cut as well as a poison
/// input, so the batch's change hashes are only remembered as suspect and
/// the batch is fetched and applied again. If the process dies again in a
/// batch holding suspect changes, those records' changes go to quarantine
/// (refused from now on, by hash). The note is removed in the same write.
fn recover_apply_note(kv: &dyn Kv, now_ms: i64) -> Result<()> {
    let Some(b) = kv.get(Cf::Meta, META_APPLYING)? else {
        return Ok(());
    };
    let mut ops = vec![(Cf::Meta, META_APPLYING.to_vec(), None)];
    match serde_json::from_slice::<ApplyNote>(&b) {
        Ok(note) => {
            let suspects: BTreeSet<String> = kv
                .get(Cf::Meta, META_SUSPECT)?
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let again: Vec<&(String, Vec<String>)> = note
                .records
                .iter()
                .filter(|(_, hashes)| hashes.iter().any(|h| suspects.contains(h)))
                .collect();
            let peer = note.peer.as_deref().unwrap_or("unknown");
            if again.is_empty() {
                let all: BTreeSet<&String> =
                    note.records.iter().flat_map(|(_, h)| h.iter()).collect();
                tracing::warn!(
                    peer,
                    records = note.records.len(),
                    "the process died applying a remote batch; it is retried, and quarantined if the process dies in it again"
                );
                ops.push((Cf::Meta, META_SUSPECT.to_vec(), Some(json(&all))));
            } else {
                let tag = format!("crash:{}", &change_bytes_hash(&b)[..16]);
                tracing::warn!(
                    peer,
                    records = again.len(),
                    "the process died twice applying the same remote changes; quarantined them, they are refused from now on"
                );
                for (record, hashes) in again {
                    let entry = QuarantineEntry {
                        record: record.clone(),
                        reason: "the process died applying these changes, twice".into(),
                        peer: note.peer.clone(),
                        changes: hashes.clone(),
                        at_ms: Some(now_ms),
                    };
                    ops.push((
                        Cf::Quarantine,
                        key2(record.as_bytes(), tag.as_bytes()),
                        Some(json(&entry)),
                    ));
                }
                ops.push((Cf::Meta, META_SUSPECT.to_vec(), None));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "unreadable remote batch note dropped");
        }
    }
    kv.write(ops)
}

fn ref_key(target: &str, referrer: &RecordId, field: &str) -> Vec<u8> {
    let mut k = key2(target.as_bytes(), referrer.as_str().as_bytes());
    k.push(SEP);
    k.extend_from_slice(field.as_bytes());
    k
}

/// Parses one change from a peer: size cap, uncompressed change chunk only,
/// checksum verified (Automerge's `Change::from_bytes` does not), all under a
/// panic guard.
pub fn parse_change(bytes: Vec<u8>) -> std::result::Result<Change, String> {
    if bytes.len() > MAX_CHANGE_BYTES {
        return Err(format!("change of {} bytes exceeds the cap", bytes.len()));
    }
    // Chunk layout: magic (4), checksum (4), type (1); type 1 is a change.
    if bytes.len() < 9 || bytes[..4] != [0x85, 0x6f, 0x4a, 0x83] || bytes[8] != 1 {
        return Err("not an uncompressed Automerge change".into());
    }
    let checksum: [u8; 4] = bytes[4..8].try_into().expect("4 bytes");
    let parsed = catch_unwind(AssertUnwindSafe(|| Change::from_bytes(bytes)))
        .map_err(|_| "automerge panicked parsing a change".to_string())?
        .map_err(|e| format!("bad change: {e}"))?;
    if parsed.hash().0[..4] != checksum {
        return Err("change checksum does not match its contents".into());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn par_each_hands_over_every_result_once_in_item_order() {
        for threads in [1, 2, 4] {
            for n in [0, 5, 31, 32, 100, 1000] {
                let calls = AtomicUsize::new(0);
                let mut taken = Vec::new();
                let done: std::result::Result<(), ()> = par_each(
                    threads,
                    (0..n).collect(),
                    |i: usize| {
                        calls.fetch_add(1, Ordering::Relaxed);
                        // Uneven work, so results finish out of order.
                        if i.is_multiple_of(7) {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        i * 3
                    },
                    |r| {
                        taken.push(r);
                        Ok(())
                    },
                );
                assert_eq!(done, Ok(()));
                assert_eq!(taken, (0..n).map(|i| i * 3).collect::<Vec<_>>());
                assert_eq!(
                    calls.load(Ordering::Relaxed),
                    n,
                    "{threads} threads, {n} items"
                );
            }
        }
        let mapped = par_map(3, (0..500).collect(), |i: u32| i + 1);
        assert_eq!(mapped, (1..=500).collect::<Vec<_>>());
    }

    #[test]
    fn par_each_stops_at_the_first_error_of_take() {
        let n = 1000;
        let calls = AtomicUsize::new(0);
        let mut taken = 0;
        let done = par_each(
            2,
            (0..n).collect(),
            |i: usize| {
                calls.fetch_add(1, Ordering::Relaxed);
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                i
            },
            |r| {
                taken += 1;
                if r == 0 { Err("refused") } else { Ok(()) }
            },
        );
        assert_eq!(done, Err("refused"));
        assert_eq!(taken, 1, "nothing is taken after an error");
        // Item 0 is done at once; the others take 20 ms each, so only the
        // few started before the error ran, not the 999 left (half of them
        // would take a second thread five seconds: a margin for a loaded
        // machine).
        let ran = calls.load(Ordering::Relaxed);
        assert!(ran < n / 2, "{ran} items ran after the first result failed");
    }

    #[test]
    #[should_panic(expected = "a bug in an item")]
    fn a_panic_in_an_item_propagates_with_its_message() {
        let _ = par_each(
            2,
            (0..200).collect(),
            |i: usize| {
                if i == 150 {
                    panic!("a bug in an item");
                }
                i
            },
            |_| -> std::result::Result<(), ()> { Ok(()) },
        );
    }

    fn meta() -> RecordMeta {
        RecordMeta {
            collection: "contacts".into(),
            seq: 42,
            deleted: true,
            merged_into: Some(RecordId::parse("00000000-0000-4000-8000-000000000007").unwrap()),
            heads: vec![hex_lower(&[7; 32])],
            snap_len: 512,
            next_chunk: 3,
            chunks: 2,
            chunk_bytes: 300,
            unique: vec![("email".into(), "ann@example.org".into())],
            refs: vec![("contact_id".into(), "x".into())],
        }
    }

    #[test]
    fn record_meta_is_binary_and_the_json_of_earlier_versions_still_reads() {
        let m = meta();
        let b = m.encode();
        assert_eq!(b[0], META_BINARY);
        assert_eq!(RecordMeta::decode(&b).unwrap(), m);
        // As earlier versions wrote it: JSON, `merged_into` left out when
        // absent.
        assert_eq!(RecordMeta::decode(&json(&m)).unwrap(), m);
        let mut old = serde_json::to_value(RecordMeta {
            merged_into: None,
            ..meta()
        })
        .unwrap();
        old.as_object_mut().unwrap().remove("merged_into");
        let old = serde_json::to_vec(&old).unwrap();
        assert_eq!(old[0], b'{');
        assert_eq!(RecordMeta::decode(&old).unwrap().merged_into, None);
        // Damage is an error, not a panic.
        for bad in [
            &b[..b.len() / 2],
            &[META_BINARY][..],
            b"{\"collection\":",
            &[9, 9, 9][..],
        ] {
            assert!(
                matches!(RecordMeta::decode(bad), Err(Error::Corrupt(_))),
                "{bad:?}"
            );
        }
    }

    /// A document with a linear history and a concurrent branch merged in,
    /// saved as `finish` does it: a chunk after each step, with its base.
    fn chunked_history() -> (Automerge, Vec<Vec<u8>>, Vec<Vec<ChangeHash>>) {
        use automerge::transaction::Transactable;
        let mut doc = Automerge::new().with_actor(automerge::ActorId::from([1u8; 16]));
        let mut chunks = Vec::new();
        let mut bases = Vec::new();
        for step in 0..6u8 {
            let base = doc.get_heads();
            if step == 3 {
                // Two changes of another site, concurrent with this one's.
                let mut other = doc.fork().with_actor(automerge::ActorId::from([2u8; 16]));
                for k in 0..2 {
                    let mut tx = other.transaction();
                    tx.put(ROOT, format!("o{k}"), i64::from(k)).unwrap();
                    tx.commit();
                }
                let mut tx = doc.transaction();
                tx.put(ROOT, "mine", "x").unwrap();
                tx.commit();
                doc.merge(&mut other).unwrap();
            } else {
                let mut tx = doc.transaction();
                tx.put(ROOT, format!("k{step}"), i64::from(step)).unwrap();
                tx.commit();
            }
            chunks.push(encode_chunk(&base, &doc.save_after(&base)));
            bases.push(base);
        }
        (doc, chunks, bases)
    }

    fn hashes(changes: &[Vec<u8>]) -> BTreeSet<ChangeHash> {
        changes
            .iter()
            .map(|b| Change::from_bytes(b.clone()).unwrap().hash())
            .collect()
    }

    #[test]
    fn a_peer_at_a_chunks_base_is_served_exactly_what_it_lacks_from_the_chunks() {
        let (doc, chunks, bases) = chunked_history();
        for (k, base) in bases.iter().enumerate() {
            let mut have = base.clone();
            have.reverse(); // the order a peer lists its heads in is not ours
            let served = changes_after_base(&chunks, &have)
                .unwrap_or_else(|| panic!("chunk {k} starts at its base"));
            let want: BTreeSet<ChangeHash> =
                doc.get_changes(base).iter().map(|c| c.hash()).collect();
            assert_eq!(hashes(&served), want, "from chunk {k}");
            assert_eq!(served.len(), want.len(), "from chunk {k}: no change twice");
        }
        // Heads that start no chunk: the document must answer.
        assert!(changes_after_base(&chunks, &doc.get_heads()).is_none());
        let mut foreign = bases[2].clone();
        foreign.push(ChangeHash([9; 32]));
        assert!(changes_after_base(&chunks, &foreign).is_none());
        // A chunk stored without its base (as before bases were kept) serves
        // nothing from itself, but a later chunk still does.
        let mut old = chunks.clone();
        old[1] = decode_chunk(&chunks[1]).unwrap().1.to_vec();
        assert!(changes_after_base(&old, &bases[1]).is_none());
        assert_eq!(
            hashes(&changes_after_base(&old, &bases[4]).unwrap()),
            doc.get_changes(&bases[4])
                .iter()
                .map(|c| c.hash())
                .collect()
        );
    }

    #[test]
    fn chunks_with_and_without_their_base_load_into_the_same_document() {
        let (doc, chunks, _) = chunked_history();
        let m = RecordMeta {
            heads: heads_to_hex(&doc.get_heads()),
            ..meta()
        };
        let id = RecordId::parse("00000000-0000-4000-8000-000000000007").unwrap();
        let node = NodeId([3; 16]);
        let with = load_stored(node, &id, &m, &[], &chunks).unwrap();
        let raw: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| decode_chunk(c).unwrap().1.to_vec())
            .collect();
        let without = load_stored(node, &id, &m, &[], &raw).unwrap();
        assert_eq!(with.heads(), doc.get_heads());
        assert_eq!(without.heads(), doc.get_heads());
    }

    #[test]
    fn damaged_chunks_are_errors_or_unsplittable_never_panics() {
        let (_, chunks, bases) = chunked_history();
        let c = &chunks[2];
        for cut in 0..c.len() {
            let part = &c[..cut];
            if let Ok((_, changes)) = decode_chunk(part) {
                let _ = split_changes(changes);
            }
        }
        assert!(decode_chunk(&[CHUNK_WITH_BASE, 2, 7]).is_err());
        // A document chunk is not split into changes.
        let mut doc = Automerge::new();
        {
            use automerge::transaction::Transactable;
            let mut tx = doc.transaction();
            tx.put(ROOT, "a", 1).unwrap();
            tx.commit();
        }
        assert!(split_changes(&doc.save()).is_none());
        assert!(split_changes(&[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 0xff]).is_none());
        let mut bad = chunks.clone();
        let n = bad[3].len();
        bad[3].truncate(n - 1);
        assert!(changes_after_base(&bad, &bases[3]).is_none());
    }
}
