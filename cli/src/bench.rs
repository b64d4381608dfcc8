//! `entente bench …`: figures, not pass/fail. Each benchmark prints the
//! node's rate beside the raw limit measured in the same run on the same data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;
use entente_model::automerge::transaction::{CommitOptions, Transactable};
use entente_model::automerge::{Automerge, ROOT};
use entente_model::collision::{detect_flagged, detect_update_delete, unique_values};
use entente_model::{NodeId, RecordId, Schema};
use entente_node::store::kv::{Cf, Kv, RocksKv};
use entente_node::{NewRecord, Store, StoreOptions, SystemClock};
use serde_json::{Map, Value as Json, json};

#[derive(Debug, Subcommand)]
pub enum Which {
    /// Store write and read rates beside the raw Automerge and RocksDB limits.
    Store {
        /// Contacts to create in batches.
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        /// Contacts per batch.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Single (one batch each, fsynced) creates to time.
        #[arg(long, default_value_t = 2_000)]
        singles: usize,
        /// Point reads to time.
        #[arg(long, default_value_t = 20_000)]
        reads: usize,
        /// Data dir (default: a new temporary dir, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Collision-detection cost per applied change on a record with a long
    /// history, in a large collection.
    Collisions {
        /// Contacts in the collection.
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        /// Changes of history on the measured record.
        #[arg(long, default_value_t = 1_000)]
        history: usize,
        /// Data dir (default: a new temporary dir, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Catch-up of a new node from a full one: two real nodes over loopback.
    Net {
        /// Contacts on the full node.
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        /// Contacts per batch when filling it.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// B catches up by feed pages and fetches instead of the bulk full
        /// sync (`sync.bulk_full_sync = false`).
        #[arg(long)]
        no_bulk: bool,
    },
    /// Catch-up through the sync engine over an in-process channel, beside
    /// the raw limit (`Automerge::load` of the same documents); and a peer
    /// 10 records behind in a store of N.
    Sync {
        /// Contacts on the full node.
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        /// Contacts per batch when filling it.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Catch up by feed pages and fetches instead of the bulk full sync
        /// an empty node uses by default (to compare the two).
        #[arg(long)]
        no_bulk: bool,
    },
    /// The HTTP API on loopback: single creates with 1 and with N concurrent
    /// clients, an import of JSON lines, a read of the changes feed.
    Api(crate::bench_api::ApiBench),
    /// Replication latency between two real nodes over loopback: the time
    /// from a write at A until it is readable at B, under a steady load.
    Latency(crate::bench_latency::LatencyBench),
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Store {
            records,
            batch,
            singles,
            reads,
            dir,
        } => store(records, batch.max(1), singles, reads, dir),
        Which::Collisions {
            records,
            history,
            dir,
        } => collisions(records, history, dir),
        Which::Net {
            records,
            batch,
            no_bulk,
        } => crate::bench_net::run(records, batch.max(1), !no_bulk),
        Which::Sync {
            records,
            batch,
            no_bulk,
        } => crate::bench_sync::run(records.max(1), batch.max(1), !no_bulk),
        Which::Api(a) => crate::bench_api::run(a),
        Which::Latency(l) => crate::bench_latency::run(l),
    }
}

/// A 12-field contact, unique in e-mail, member key and user name.
pub fn contact(i: usize) -> Map<String, Json> {
    let v = json!({
        "first_name": format!("First{i}"),
        "last_name": format!("Last{}", i % 997),
        "email": format!("person{i}@example.org"),
        "member_key": format!("MK-{i:08}"),
        "user_name": format!("user{i}"),
        "phone": format!("+41 44 {:03} {:02} {:02}", i % 1000, i % 100, (i / 7) % 100),
        "street": format!("{} Main Street", i % 400),
        "city": "Zurich",
        "postal_code": format!("{}", 8000 + i % 100),
        "country": "CH",
        "birth_date": format!("19{:02}-0{}-1{}", 50 + i % 50, 1 + i % 9, i % 10),
        "notes": "Met at the spring fair; prefers e-mail.",
    });
    v.as_object().expect("object").clone()
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(crate) fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

pub(crate) struct Dir {
    pub(crate) path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub(crate) fn data_dir(dir: Option<PathBuf>, what: &str) -> Result<Dir> {
    Ok(match dir {
        Some(p) => {
            std::fs::create_dir_all(&p)?;
            Dir {
                path: p,
                _tmp: None,
            }
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix(&format!("entente-bench-{what}-"))
                .tempdir()?;
            Dir {
                path: t.path().to_path_buf(),
                _tmp: Some(t),
            }
        }
    })
}

fn open(path: &Path, node: u8) -> Result<Store> {
    Store::open(
        path,
        Arc::new(Schema::default_crm()),
        NodeId([node; 16]),
        Arc::new(SystemClock),
        StoreOptions::default(),
    )
    .with_context(|| format!("opening {}", path.display()))
}

fn progress(what: &str, done: usize, total: usize, started: Instant) {
    if total >= 10 && done.is_multiple_of((total / 10).max(1)) {
        eprintln!(
            "  {what}: {done}/{total} ({:.0}/s, rss {} MiB)",
            rate(done, started.elapsed()),
            rss_kib().0 / 1024
        );
    }
}

fn store(
    records: usize,
    batch: usize,
    singles: usize,
    reads: usize,
    dir: Option<PathBuf>,
) -> Result<()> {
    let dir = data_dir(dir, "store")?;
    println!(
        "entente bench store: {records} contacts in batches of {batch}, {singles} single creates, {reads} point reads"
    );
    println!("data dir: {}", dir.path.display());

    // Raw limit 1: Automerge create + save of the same contacts, nothing else.
    let sample = records.min(50_000);
    let actor = NodeId([9; 16]).actor();
    let t = Instant::now();
    let mut saved = Vec::with_capacity(sample);
    for i in 0..sample {
        let mut doc = Automerge::new().with_actor(actor.clone());
        let fields = contact(i);
        doc.transact_with(
            |_| CommitOptions::default().with_time(0),
            |tx| -> Result<(), entente_model::automerge::AutomergeError> {
                tx.put(ROOT, "_id", format!("{i}"))?;
                tx.put(ROOT, "_collection", "contacts")?;
                for (k, v) in &fields {
                    tx.put(ROOT, k.as_str(), v.as_str().unwrap_or_default())?;
                }
                Ok(())
            },
        )
        .map_err(|e| anyhow::anyhow!("{:?}", e.error))?;
        saved.push(doc.save());
    }
    let am_rate = rate(sample, t.elapsed());
    let avg_bytes = saved.iter().map(Vec::len).sum::<usize>() / sample.max(1);

    // Raw limit 2: RocksDB puts of those bytes, in fsynced batches.
    let raw_dir = dir.path.join("raw-rocksdb");
    let kv = RocksKv::open(&raw_dir, true)?;
    let t = Instant::now();
    for (n, chunk) in saved.chunks(batch).enumerate() {
        let ops = chunk
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    Cf::Snapshots,
                    format!("{n}-{i}").into_bytes(),
                    Some(b.clone()),
                )
            })
            .collect();
        kv.write(ops)?;
    }
    let rocks_rate = rate(sample, t.elapsed());
    drop(kv);
    let raw_limit = 1.0 / (1.0 / am_rate + 1.0 / rocks_rate);

    // The node's batched write path.
    let mut store = open(&dir.path.join("node"), 1)?;
    let t = Instant::now();
    let mut ids = Vec::with_capacity(records);
    let mut i = 0;
    while i < records {
        let n = batch.min(records - i);
        let items = (i..i + n)
            .map(|k| NewRecord {
                collection: "contacts".into(),
                id: None,
                fields: contact(k),
                force: false,
            })
            .collect();
        for r in store.create_many(items)? {
            ids.push(r.record.id);
        }
        i += n;
        progress("batched creates", i, records, t);
    }
    let batched = rate(records, t.elapsed());
    let (rss_after_batched, _) = rss_kib();

    // Single creates, each its own fsynced batch.
    let t = Instant::now();
    for k in 0..singles {
        store.create("contacts", None, &contact(records + k), false)?;
    }
    let single = rate(singles, t.elapsed());

    // Point reads of random existing records (most are not cached).
    store.clear_cache();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let t = Instant::now();
    for _ in 0..reads {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id: &RecordId = &ids[(x % ids.len().max(1) as u64) as usize];
        store.get(id)?.context("record vanished")?;
    }
    let read_rate = rate(reads, t.elapsed());
    let (rss, hwm) = rss_kib();
    let stats = store.stats()?;

    println!();
    println!("| measure | result |");
    println!("|---|---|");
    println!(
        "| raw: Automerge create+save of a 12-field contact | {am_rate:.0}/s ({avg_bytes} B saved) |"
    );
    println!(
        "| raw: RocksDB fsynced puts of those bytes, batches of {batch} | {rocks_rate:.0}/s |"
    );
    println!("| raw limit (both, one after the other) | {raw_limit:.0}/s |");
    println!(
        "| node: batched creates ({batch} per atomic batch) | {batched:.0}/s = {:.2}x slower than raw |",
        raw_limit / batched
    );
    println!("| node: single creates (each fsynced) | {single:.0}/s |");
    println!("| node: point reads (cache cleared first) | {read_rate:.0}/s |");
    println!("| records stored | {} |", stats.records);
    println!(
        "| RSS after batched creates / at end / peak | {} / {} / {} MiB |",
        rss_after_batched / 1024,
        rss / 1024,
        hwm / 1024
    );
    Ok(())
}

fn collisions(records: usize, history: usize, dir: Option<PathBuf>) -> Result<()> {
    let dir = data_dir(dir, "collisions")?;
    println!("entente bench collisions: {records} contacts, one with {history} changes of history");
    let mut store = open(&dir.path.join("node"), 1)?;
    let t = Instant::now();
    let mut i = 0;
    while i < records {
        let n = 1000.min(records - i);
        store.create_many(
            (i..i + n)
                .map(|k| NewRecord {
                    collection: "contacts".into(),
                    id: None,
                    fields: contact(k),
                    force: false,
                })
                .collect(),
        )?;
        i += n;
        progress("filling", i, records, t);
    }
    let hot = store
        .create("contacts", None, &contact(records + 1), false)?
        .record
        .id;
    for k in 0..history {
        let mut f = Map::new();
        f.insert("city".into(), json!(format!("City {k}")));
        store.update(&hot, &f, None, false)?;
    }

    // Local updates on the long-history record: the whole write path
    // (validation, index, feed, detection, one fsynced batch).
    let n = 200;
    let t = Instant::now();
    for k in 0..n {
        let mut f = Map::new();
        f.insert("phone".into(), json!(format!("+1 555 {k:04}")));
        store.update(&hot, &f, None, false)?;
    }
    let local = t.elapsed() / n;

    // Detection alone on that record, as the store runs it per applied change.
    let schema = store.schema().clone();
    let rec = store.record(&hot)?.context("hot record")?;
    let keys = schema.unique_keys("contacts");
    let m = 200;
    let t = Instant::now();
    for _ in 0..m {
        std::hint::black_box(detect_update_delete(&schema, &rec));
        std::hint::black_box(detect_flagged(&schema, &rec));
        for k in &keys {
            std::hint::black_box(unique_values(&schema, &rec, k));
        }
    }
    let detect_live = t.elapsed() / m;

    // The same record deleted, with 500 concurrent edits after the delete.
    let mut other = open(&dir.path.join("other"), 2)?;
    let changes = store.changes_for(&hot, &[])?;
    other.apply_remote(vec![(hot.clone(), changes)])?;
    store.delete(&hot)?;
    for k in 0..500.min(history) {
        let mut f = Map::new();
        f.insert("street".into(), json!(format!("{k} Side Street")));
        other.update(&hot, &f, None, false)?;
    }
    let theirs = other.changes_for(&hot, &store.heads(&hot)?)?;
    let t = Instant::now();
    let report = store.apply_remote(vec![(hot.clone(), theirs)])?;
    let remote = t.elapsed();
    let rec = store.record(&hot)?.context("hot record")?;
    let t = Instant::now();
    let mut found = None;
    for _ in 0..m {
        found = std::hint::black_box(detect_update_delete(&schema, &rec));
    }
    let detect_deleted = t.elapsed() / m;
    let history_len = rec.doc().get_changes(&[]).len();

    println!();
    println!("| measure ({records} contacts; record with {history_len} changes) | result |");
    println!("|---|---|");
    println!(
        "| local update, whole write path incl. detection and fsync | {:.3} ms |",
        ms(local)
    );
    println!(
        "| detection alone, live record (update_delete + flagged + unique values) | {:.3} ms |",
        ms(detect_live)
    );
    println!(
        "| detection alone, deleted record with 500 concurrent edits after the delete | {:.3} ms |",
        ms(detect_deleted)
    );
    println!(
        "| apply 500 remote changes in one batch (detection included) | {:.1} ms total, {:.3} ms/change |",
        ms(remote),
        ms(remote) / report.changes_applied.max(1) as f64
    );
    println!("| update_delete collision found | {} |", found.is_some());
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
