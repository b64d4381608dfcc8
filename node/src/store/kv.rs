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
    /// Record id → compacted Automerge snapshot.
    Snapshots,
    /// Record id + chunk number → appended incremental change chunk.
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
    /// Applies every op or none, durably (in the WAL) before it returns.
    fn write(&self, batch: Vec<BatchOp>) -> Result<()>;
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

impl RocksKv {
    /// Opens (or creates) the database. With `sync`, every batch is fsynced
    /// before `write` returns; without it, it is in the OS page cache only
    /// (survives a process crash, not a power loss).
    pub fn open(path: &Path, sync: bool) -> Result<RocksKv> {
        let mut opts = rocksdb::Options::default();
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
                o.set_block_based_table_factory(&t);
                o.set_write_buffer_size(16 << 20);
                if matches!(cf, Cf::Snapshots | Cf::Chunks) {
                    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
                }
                rocksdb::ColumnFamilyDescriptor::new(cf.name(), o)
            })
            .collect();
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(RocksKv { db, sync })
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
        let it = self.db.iterator_cf(
            self.cf(cf)?,
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

    fn write(&self, batch: Vec<BatchOp>) -> Result<()> {
        let mut wb = rocksdb::WriteBatch::default();
        for (cf, k, v) in batch {
            let h = self.cf(cf)?;
            match v {
                Some(v) => wb.put_cf(h, k, v),
                None => wb.delete_cf(h, k),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(self.sync);
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
    fn write(&self, batch: Vec<BatchOp>) -> Result<()> {
        (**self).write(batch)
    }
}
