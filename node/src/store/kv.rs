//! The key-value layer under the store: column families, ordered scans and
//! atomic, durable batches. RocksDB is the real implementation; the in-memory
//! one serves fast tests and the simulator's throwaway nodes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The column families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Node metadata: node id, schema fingerprint, feed sequence.
    Meta,
    /// Record id → record metadata (collection, feed seq, index entries held).
    Records,
    /// Record id → the record's first stored form (its changes) or, once
    /// compacted, a saved Automerge document.
    Snapshots,
    /// Record id + chunk number → appended changes, after the heads they
    /// were appended to (see `encode_chunk` in the store).
    Chunks,
    /// collection, key, normalized value, record id → (): live holders.
    Unique,
    /// target id, referrer id, field → (): who points at a record.
    Refs,
    /// Feed sequence → record id (one entry per record: its latest).
    Feed,
    /// collection, record id → (): listing by collection.
    ByCollection,
    /// Record id + change hash → change bytes waiting for dependencies.
    Pending,
    /// Collision id → collision (JSON).
    Collisions,
    /// Record id + collision id → (): collisions by record.
    CollisionIndex,
    /// Subject (what a collision is about) → the collision id standing for it.
    Subjects,
    /// Peer id → replication checkpoint.
    Checkpoints,
    /// Quarantined inputs: key → report (JSON).
    Quarantine,
}

impl Cf {
    /// Every column family.
    pub const ALL: [Cf; 14] = [
        Cf::Meta,
        Cf::Records,
        Cf::Snapshots,
        Cf::Chunks,
        Cf::Unique,
        Cf::Refs,
        Cf::Feed,
        Cf::ByCollection,
        Cf::Pending,
        Cf::Collisions,
        Cf::CollisionIndex,
        Cf::Subjects,
        Cf::Checkpoints,
        Cf::Quarantine,
    ];

    /// How many separators (`0` bytes) end the prefix this family is
    /// scanned by, if it is only ever scanned by one kind of prefix: the
    /// record id for the per-record families, (collection, key, value hash)
    /// for the unique-value index. RocksDB keeps a bloom filter of these
    /// prefixes, in the memtable and in every table file, so a scan for a
    /// prefix no key has skips them instead of seeking into each.
    pub fn prefix_separators(&self) -> Option<usize> {
        match self {
            Cf::Chunks | Cf::Refs | Cf::Pending | Cf::CollisionIndex => Some(1),
            Cf::Unique => Some(3),
            _ => None,
        }
    }

    /// The RocksDB name.
    pub fn name(&self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Records => "records",
            Cf::Snapshots => "snapshots",
            Cf::Chunks => "chunks",
            Cf::Unique => "unique",
            Cf::Refs => "refs",
            Cf::Feed => "feed",
            Cf::ByCollection => "by_collection",
            Cf::Pending => "pending",
            Cf::Collisions => "collisions",
            Cf::CollisionIndex => "collision_index",
            Cf::Subjects => "subjects",
            Cf::Checkpoints => "checkpoints",
            Cf::Quarantine => "quarantine",
        }
    }
}

/// One write of a batch: put (`Some`) or delete (`None`).
pub type BatchOp = (Cf, Vec<u8>, Option<Vec<u8>>);

/// A scan visitor: gets key and value, returns `false` to stop.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> bool;

/// The storage engine contract.
pub trait Kv: Send + Sync {
    /// One value.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Visits, in key order, the keys that start with `prefix` and are
    /// `>= start`, until `visit` returns false.
    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], visit: Visit<'_>) -> Result<()>;
    /// The keys starting with each of `prefixes`, in key order for each:
    /// what [`Kv::scan`] visits for them one by one. An engine that can
    /// seek one cursor to every prefix in turn does so (opening a RocksDB
    /// iterator costs more than the seek itself).
    fn keys_with_prefixes(&self, cf: Cf, prefixes: &[&[u8]]) -> Result<Vec<Vec<Vec<u8>>>> {
        prefixes
            .iter()
            .map(|p| {
                let mut keys = Vec::new();
                self.scan(cf, p, p, &mut |k, _| {
                    keys.push(k.to_vec());
                    true
                })?;
                Ok(keys)
            })
            .collect()
    }
    /// Applies every op or none, durably (in the WAL) before it returns.
    fn write(&self, batch: Vec<BatchOp>) -> Result<()>;
    /// [`Kv::write`] without waiting for the disk: once it returns the batch
    /// outlives the process (the operating system holds it) but perhaps not
    /// a power cut, until a later write that waits for the disk makes it
    /// durable with itself (the log is written in order).
    fn write_unsynced(&self, batch: Vec<BatchOp>) -> Result<()> {
        self.write(batch)
    }
}

/// RocksDB, one column family per [`Cf`].
pub struct RocksKv {
    db: rocksdb::DB,
    sync: bool,
}

impl std::fmt::Debug for RocksKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksKv")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Memory RocksDB may use for its block cache (bytes).
pub const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// Write buffer (memtable) per column family, by default.
pub const MEMTABLE_BYTES: usize = 16 << 20;

/// The length of `key`'s prefix ending with its `n`-th separator, if it has
/// that many.
pub fn prefix_len(key: &[u8], n: usize) -> Option<usize> {
    let mut seen = 0;
    for (i, b) in key.iter().enumerate() {
        if *b == 0 {
            seen += 1;
            if seen == n {
                return Some(i + 1);
            }
        }
    }
    None
}

/// A RocksDB prefix extractor: name, transform, in-domain test.
type Extractor = (&'static str, fn(&[u8]) -> &[u8], fn(&[u8]) -> bool);

// RocksDB's prefix extractors are plain function pointers, one per shape.
fn prefix_1(key: &[u8]) -> &[u8] {
    &key[..prefix_len(key, 1).unwrap_or(key.len())]
}
fn in_domain_1(key: &[u8]) -> bool {
    prefix_len(key, 1).is_some()
}
fn prefix_3(key: &[u8]) -> &[u8] {
    &key[..prefix_len(key, 3).unwrap_or(key.len())]
}
fn in_domain_3(key: &[u8]) -> bool {
    prefix_len(key, 3).is_some()
}

/// The smallest key greater than every key starting with `prefix`, if any.
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Whether `prefix` is exactly a prefix of `cf`'s extractor (its keys up to
/// their `n`-th separator), so a seek to it may use the bloom filters.
fn whole_prefix(cf: Cf, prefix: &[u8]) -> bool {
    cf.prefix_separators()
        .is_some_and(|n| prefix_len(prefix, n) == Some(prefix.len()))
}

/// Sets how an iterator seeks: within the seek key's prefix, using its
/// bloom filters, when every seek is by a whole prefix; any other scan must
/// see every key in order.
fn seek_by(ro: &mut rocksdb::ReadOptions, whole_prefix: bool) {
    if whole_prefix {
        ro.set_prefix_same_as_start(true);
    } else {
        ro.set_total_order_seek(true);
    }
}

impl RocksKv {
    /// Opens (or creates) the database. With `sync`, every batch is fsynced
    /// before `write` returns; without it, it is in the OS page cache only
    /// (survives a process crash, not a power loss).
    pub fn open(path: &Path, sync: bool) -> Result<RocksKv> {
        RocksKv::open_with(path, sync, MEMTABLE_BYTES)
    }

    /// [`RocksKv::open`] with `memtable_bytes` of write buffer per column
    /// family (the memtable's arena and prefix bloom filter are sized from
    /// it and allocated on every open).
    pub fn open_with(path: &Path, sync: bool, memtable_bytes: usize) -> Result<RocksKv> {
        // What the write-ahead log holds at open stays in the memtables
        // (the log is kept until they are flushed) instead of being written
        // out as new table files first: a restart costs less. (The crate
        // has no setter for it.)
        let mut opts = rocksdb::Options::default()
            .get_options_from_string("avoid_flush_during_recovery=true")?;
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let cfs: Vec<rocksdb::ColumnFamilyDescriptor> = Cf::ALL
            .iter()
            .map(|cf| {
                let mut o = rocksdb::Options::default();
                let mut t = rocksdb::BlockBasedOptions::default();
                t.set_block_cache(&cache);
                t.set_bloom_filter(10.0, false);
                if let Some(n) = cf.prefix_separators() {
                    let (name, f, d): Extractor = match n {
                        1 => ("entente.sep1", prefix_1, in_domain_1),
                        _ => ("entente.sep3", prefix_3, in_domain_3),
                    };
                    o.set_prefix_extractor(rocksdb::SliceTransform::create(name, f, Some(d)));
                    o.set_memtable_prefix_bloom_ratio(0.05);
                    // The unique index is only ever scanned, never read by key.
                    t.set_whole_key_filtering(*cf != Cf::Unique);
                }
                o.set_block_based_table_factory(&t);
                o.set_write_buffer_size(memtable_bytes);
                if matches!(cf, Cf::Snapshots | Cf::Chunks) {
                    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
                }
                rocksdb::ColumnFamilyDescriptor::new(cf.name(), o)
            })
            .collect();
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(RocksKv { db, sync })
    }

    /// Writes every memtable out to table files (tests use it to read
    /// through table files rather than the memtable).
    pub fn flush(&self) -> Result<()> {
        for cf in Cf::ALL {
            self.db.flush_cf(self.cf(cf)?)?;
        }
        Ok(())
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| Error::Corrupt(format!("column family {} missing", cf.name())))
    }
}

impl Kv for RocksKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], visit: Visit<'_>) -> Result<()> {
        let from = if start > prefix { start } else { prefix };
        let mut ro = rocksdb::ReadOptions::default();
        if let Some(end) = successor(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        seek_by(&mut ro, whole_prefix(cf, prefix));
        let it = self.db.iterator_cf_opt(
            self.cf(cf)?,
            ro,
            rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(prefix) || !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn keys_with_prefixes(&self, cf: Cf, prefixes: &[&[u8]]) -> Result<Vec<Vec<Vec<u8>>>> {
        // One iterator for every prefix, using the bloom filters when every
        // prefix may. No upper bound: each prefix's run of keys ends at the
        // first key without it.
        let mut ro = rocksdb::ReadOptions::default();
        seek_by(&mut ro, prefixes.iter().all(|p| whole_prefix(cf, p)));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf)?, ro);
        let mut out = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let mut keys = Vec::new();
            it.seek(prefix);
            while let Some(k) = it.key() {
                if !k.starts_with(prefix) {
                    break;
                }
                keys.push(k.to_vec());
                it.next();
            }
            it.status()?;
            out.push(keys);
        }
        Ok(out)
    }

    fn write(&self, batch: Vec<BatchOp>) -> Result<()> {
        self.write_with(batch, self.sync)
    }

    fn write_unsynced(&self, batch: Vec<BatchOp>) -> Result<()> {
        self.write_with(batch, false)
    }
}

impl RocksKv {
    fn write_with(&self, batch: Vec<BatchOp>, sync: bool) -> Result<()> {
        // Sized up front: a batch of a thousand records is megabytes, and
        // growing it as it fills copies it over and over. Per op: a tag, the
        // family and two lengths (varints of up to 5 bytes), key, value.
        let bytes = 12
            + batch
                .iter()
                .map(|(_, k, v)| 16 + k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        let mut wb = rocksdb::WriteBatch::with_capacity_bytes(bytes);
        for (cf, k, v) in batch {
            let h = self.cf(cf)?;
            match v {
                Some(v) => wb.put_cf(h, k, v),
                None => wb.delete_cf(h, k),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }
}

/// One column family in memory.
type Table = BTreeMap<Vec<u8>, Vec<u8>>;

/// Ordered maps in memory. `fail_writes` lets tests make the next write fail.
#[derive(Debug, Default)]
pub struct MemKv {
    maps: Mutex<BTreeMap<Cf, Table>>,
    fail_next_write: Mutex<bool>,
}

impl MemKv {
    /// An empty store.
    pub fn new() -> MemKv {
        MemKv::default()
    }

    /// Makes the next `write` fail without applying anything (tests).
    pub fn fail_next_write(&self) {
        *self.fail_next_write.lock().expect("lock") = true;
    }
}

impl Kv for MemKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .maps
            .lock()
            .expect("lock")
            .get(&cf)
            .and_then(|m| m.get(key).cloned()))
    }

    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], visit: Visit<'_>) -> Result<()> {
        let from = if start > prefix { start } else { prefix }.to_vec();
        let maps = self.maps.lock().expect("lock");
        if let Some(m) = maps.get(&cf) {
            for (k, v) in m.range(from..) {
                if !k.starts_with(prefix) || !visit(k, v) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn keys_with_prefixes(&self, cf: Cf, prefixes: &[&[u8]]) -> Result<Vec<Vec<Vec<u8>>>> {
        let maps = self.maps.lock().expect("lock");
        let Some(m) = maps.get(&cf) else {
            return Ok(vec![Vec::new(); prefixes.len()]);
        };
        Ok(prefixes
            .iter()
            .map(|p| {
                m.range::<[u8], _>((std::ops::Bound::Included(*p), std::ops::Bound::Unbounded))
                    .map(|(k, _)| k)
                    .take_while(|k| k.starts_with(p))
                    .cloned()
                    .collect()
            })
            .collect())
    }

    fn write(&self, batch: Vec<BatchOp>) -> Result<()> {
        let mut fail = self.fail_next_write.lock().expect("lock");
        if *fail {
            *fail = false;
            return Err(Error::Storage("injected write failure".into()));
        }
        let mut maps = self.maps.lock().expect("lock");
        for (cf, k, v) in batch {
            let m = maps.entry(cf).or_default();
            match v {
                Some(v) => {
                    m.insert(k, v);
                }
                None => {
                    m.remove(&k);
                }
            }
        }
        Ok(())
    }
}

impl<T: Kv> Kv for std::sync::Arc<T> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        (**self).get(cf, key)
    }
    fn scan(&self, cf: Cf, prefix: &[u8], start: &[u8], visit: Visit<'_>) -> Result<()> {
        (**self).scan(cf, prefix, start, visit)
    }
    fn keys_with_prefixes(&self, cf: Cf, prefixes: &[&[u8]]) -> Result<Vec<Vec<Vec<u8>>>> {
        (**self).keys_with_prefixes(cf, prefixes)
    }
    fn write(&self, batch: Vec<BatchOp>) -> Result<()> {
        (**self).write(batch)
    }
    fn write_unsynced(&self, batch: Vec<BatchOp>) -> Result<()> {
        (**self).write_unsynced(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(kv: &dyn Kv, cf: Cf, prefix: &[u8], start: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        kv.scan(cf, prefix, start, &mut |k, _| {
            out.push(k.to_vec());
            true
        })
        .expect("scan");
        out
    }

    /// Scans of families with a prefix extractor give what an ordered map
    /// gives, for whole prefixes, shorter prefixes and none, from the
    /// memtable, from table files and from both.
    #[test]
    fn prefix_scans_match_an_ordered_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rocks = RocksKv::open(dir.path(), false).expect("open");
        let mem = MemKv::new();
        let batch = |round: u8| -> Vec<BatchOp> {
            let mut b = Vec::new();
            for holder in [b"r1".as_slice(), b"r2", b"r10"] {
                for value in [b"v".as_slice(), b"v\xff", b"w"] {
                    let mut k = b"contacts\0email\0".to_vec();
                    k.extend_from_slice(value);
                    k.push(0);
                    k.extend_from_slice(holder);
                    k.push(round);
                    b.push((Cf::Unique, k, Some(Vec::new())));
                }
                let mut c = holder.to_vec();
                c.push(0);
                c.extend_from_slice(&[0, 0, 0, round]);
                b.push((Cf::Chunks, c, Some(vec![round])));
            }
            b.push((Cf::Chunks, b"r1".to_vec(), Some(Vec::new())));
            b
        };
        for kv in [&rocks as &dyn Kv, &mem] {
            kv.write(batch(1)).expect("write");
        }
        rocks.flush().expect("flush");
        for kv in [&rocks as &dyn Kv, &mem] {
            kv.write(batch(2)).expect("write");
        }
        let cases: [(Cf, &[u8], &[u8]); 9] = [
            (Cf::Unique, b"contacts\0email\0v\0", b"contacts\0email\0v\0"),
            (Cf::Unique, b"contacts\0email\0v\xff\0", b""),
            (Cf::Unique, b"contacts\0email\0x\0", b""),
            (Cf::Unique, b"contacts\0email\0", b""),
            (Cf::Unique, b"contacts\0", b"contacts\0email\0w"),
            (Cf::Unique, b"", b""),
            (Cf::Chunks, b"r1\0", b"r1\0"),
            (Cf::Chunks, b"r1", b""),
            (Cf::Chunks, b"r1\0", b"r1\0\0\0\0\x02"),
        ];
        for (cf, prefix, start) in cases {
            let want = keys(&mem, cf, prefix, start);
            assert_eq!(
                keys(&rocks, cf, prefix, start),
                want,
                "{cf:?} {prefix:?} from {start:?}"
            );
        }
        assert_eq!(
            keys(&mem, Cf::Unique, b"contacts\0email\0v\0", b"").len(),
            6
        );
        assert_eq!(keys(&mem, Cf::Unique, b"", b"").len(), 18);

        // Many prefixes through one cursor: each gets what its own scan
        // gets, whether all are whole prefixes of the family (bloom filters
        // used), some are not (total order), or none has a key; in any
        // order, repeated, and after a prefix whose keys run to the end.
        let groups: [(Cf, &[&[u8]]); 5] = [
            (
                Cf::Unique,
                &[
                    b"contacts\0email\0w\0",
                    b"contacts\0email\0v\0",
                    b"contacts\0email\0x\0",
                    b"contacts\0email\0v\xff\0",
                    b"contacts\0email\0v\0",
                ],
            ),
            (
                Cf::Unique,
                &[
                    b"contacts\0email\0v\0",
                    b"contacts\0",
                    b"contacts\0email\0w\0",
                ],
            ),
            (Cf::Unique, &[b"zz\0a\0b\0", b"", b"a\0b\0c\0"]),
            (Cf::Chunks, &[b"r2\0", b"r1\0", b"r10\0", b"r3\0", b"r1"]),
            (Cf::Chunks, &[]),
        ];
        for (cf, prefixes) in groups {
            let want: Vec<_> = prefixes.iter().map(|p| keys(&mem, cf, p, p)).collect();
            assert!(want.iter().any(|k| !k.is_empty()) || prefixes.is_empty());
            for kv in [&rocks as &dyn Kv, &mem] {
                assert_eq!(
                    kv.keys_with_prefixes(cf, prefixes).expect("keys"),
                    want,
                    "{cf:?} {prefixes:?}"
                );
            }
        }
    }

    /// A data dir written before the prefix filters existed: its table
    /// files have no prefix bloom filter, and scans must still find their
    /// keys (RocksDB skips a filter built for another extractor).
    #[test]
    fn table_files_written_without_prefix_filters_are_still_scanned() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut opts = rocksdb::Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let db = rocksdb::DB::open_cf(&opts, dir.path(), Cf::ALL.iter().map(|c| c.name()))
                .expect("open without extractors");
            for cf in [Cf::Unique, Cf::Chunks] {
                let h = db.cf_handle(cf.name()).expect("cf");
                let key: &[u8] = match cf {
                    Cf::Unique => b"contacts\0email\0v\0r1",
                    _ => b"r1\0\0\0\0\x01",
                };
                db.put_cf(h, key, b"").expect("put");
                db.flush_cf(h).expect("flush");
            }
        }
        let rocks = RocksKv::open(dir.path(), false).expect("reopen with extractors");
        let unique = b"contacts\0email\0v\0";
        assert_eq!(
            keys(&rocks, Cf::Unique, unique, unique),
            vec![b"contacts\0email\0v\0r1".to_vec()]
        );
        let other = b"contacts\0email\0w\0";
        assert!(keys(&rocks, Cf::Unique, other, other).is_empty());
        assert_eq!(keys(&rocks, Cf::Chunks, b"r1\0", b"r1\0").len(), 1);
        // New writes beside the old files are found too.
        rocks
            .write(vec![(
                Cf::Unique,
                b"contacts\0email\0v\0r2".to_vec(),
                Some(Vec::new()),
            )])
            .expect("write");
        assert_eq!(keys(&rocks, Cf::Unique, unique, unique).len(), 2);
    }

    #[test]
    fn successor_bounds_every_key_with_the_prefix() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff\xff"), None);
        assert_eq!(successor(b""), None);
        assert_eq!(prefix_len(b"a\0b\0c\0d", 3), Some(6));
        assert_eq!(prefix_len(b"a\0b", 3), None);
    }
}
