//! `entente bench sync`: catch-up through the sync engine over an in-process
//! channel, beside the raw limit measured in the same run on the same data.
//!
//! Two RocksDB stores in a temporary dir: A is filled with N contacts, B is
//! empty (fsynced batches, as a node runs). Two [`SyncEngine`]s, each on its
//! own thread as two nodes would be, exchange encoded frames through
//! in-order queues; nothing else runs. Figures:
//!
//! 1. **Catch-up**: time until B holds all N records (by the bulk full sync
//!    an empty node uses, or with `--no-bulk` by feed pages and fetches),
//!    records/s, bytes on the wire per record (encoded frames both ways);
//!    the raw limit is
//!    `Automerge::load` of each record's saved document (A's stored
//!    documents saved to bytes beforehand), the cheapest way to bring the
//!    same documents into memory, no storage. Then the echo: A pulling B's
//!    feed once (every record is in it, none is fetched).
//! 2. **Ten behind**: 10 records changed at A, the engines reconnect; B
//!    resumes from its checkpoint. Printed: feed entries B read in pull
//!    responses, pulls, fetches, records fetched, time — work for 10
//!    records, not a scan of N.
//! 3. **All behind**: every record changed at A while B was away, B's
//!    document cache emptied (as after a restart, or a store larger than
//!    the cache): B catches up by feed pages and fetches of records it
//!    holds, loading each from storage. Printed: records/s.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use entente_model::automerge::Automerge;
use entente_model::{NodeId, RecordId, Schema};
use entente_node::sync::{Message, Output, SyncConfig, SyncEngine, SyncStats};
use entente_node::{NewRecord, Store, StoreOptions, SystemClock};
use serde_json::json;

use crate::bench::{contact, rate};

/// Most records whose documents are loaded for the raw limit.
const RAW_SAMPLE: usize = 100_000;

fn open(path: &Path, node: u8, sync: bool) -> Result<Store> {
    Store::open(
        path,
        Arc::new(Schema::default_crm()),
        NodeId([node; 16]),
        Arc::new(SystemClock),
        StoreOptions {
            sync,
            ..StoreOptions::default()
        },
    )
    .with_context(|| format!("opening {}", path.display()))
}

/// The frames between the two sides: a queue to each, and what crossed.
struct Wire {
    /// `to[i]` delivers to side `i`, in order.
    to: [Sender<Vec<u8>>; 2],
    bytes: AtomicU64,
    frames: AtomicU64,
    /// Feed entries carried by pull responses, to each side.
    pull_entries: [AtomicU64; 2],
    /// Frames sent and not yet handled to the end (their outputs sent and
    /// the receiver's parked work run): zero means nothing more can happen.
    in_flight: AtomicU64,
}

impl Wire {
    fn send(&self, from: usize, outs: Vec<Output<usize>>) -> Result<()> {
        for o in outs {
            match o {
                Output::Send { msg, .. } | Output::Broadcast { msg } => {
                    if let Message::PullResponse { entries, .. } = &msg {
                        self.pull_entries[1 - from]
                            .fetch_add(entries.len() as u64, Ordering::Relaxed);
                    }
                    let frame = msg.encode()?;
                    self.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                    self.frames.fetch_add(1, Ordering::Relaxed);
                    self.in_flight.fetch_add(1, Ordering::SeqCst);
                    self.to[1 - from]
                        .send(frame)
                        .map_err(|_| anyhow::anyhow!("node {} is gone", 1 - from))?;
                }
                Output::Disconnect { reason, .. } => bail!("node {from} disconnected: {reason}"),
            }
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn pull_entries(&self, side: usize) -> u64 {
        self.pull_entries[side].load(Ordering::Relaxed)
    }
}

/// Two engines and their stores joined by in-order frame queues. Each side
/// runs on its own thread while frames are exchanged, as two nodes do: a
/// side that receives a page asks for the next one, then lands the page
/// (`run_pending`) while the other side reads it.
struct Link {
    stores: [Store; 2],
    engines: [SyncEngine<usize>; 2],
    inboxes: [Receiver<Vec<u8>>; 2],
    wire: Wire,
}

impl Link {
    fn new(stores: [Store; 2], engines: [SyncEngine<usize>; 2]) -> Link {
        let (to0, from0) = channel();
        let (to1, from1) = channel();
        Link {
            stores,
            engines,
            inboxes: [from0, from1],
            wire: Wire {
                to: [to0, to1],
                bytes: AtomicU64::new(0),
                frames: AtomicU64::new(0),
                pull_entries: [AtomicU64::new(0), AtomicU64::new(0)],
                in_flight: AtomicU64::new(0),
            },
        }
    }

    fn connect(&mut self) -> Result<()> {
        for i in 0..2 {
            let o = self.engines[i].peer_connected(1 - i);
            self.wire.send(i, o)?;
        }
        Ok(())
    }

    /// Ends the session on both sides and drops the frames in flight.
    fn disconnect(&mut self) {
        for i in 0..2 {
            self.engines[i].peer_disconnected(&(1 - i));
            while self.inboxes[i].try_recv().is_ok() {
                self.wire.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Exchanges frames, each side on its own thread, until none is left
    /// (or, with `b_seq`, until B's feed reaches it). Returns when that was.
    fn run(&mut self, b_seq: Option<u64>) -> Result<Instant> {
        let done = AtomicBool::new(false);
        let ended: Mutex<Option<Instant>> = Mutex::new(None);
        let finish = || {
            let mut e = ended.lock().unwrap_or_else(|e| e.into_inner());
            e.get_or_insert_with(Instant::now);
            done.store(true, Ordering::SeqCst);
        };
        let reached = |store: &Store| b_seq.is_some_and(|s| store.feed_seq() >= s);
        if reached(&self.stores[1]) || self.wire.in_flight.load(Ordering::SeqCst) == 0 {
            return Ok(Instant::now());
        }
        let wire = &self.wire;
        let [s0, s1] = &mut self.stores;
        let [e0, e1] = &mut self.engines;
        let [i0, i1] = &mut self.inboxes;
        let sides = [(0, s0, e0, i0), (1, s1, e1, i1)];
        let outcomes: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = sides
                .into_iter()
                .map(|(me, store, engine, inbox)| {
                    let (done, finish, reached) = (&done, &finish, &reached);
                    scope.spawn(move || -> Result<()> {
                        let result = (|| -> Result<()> {
                            while !done.load(Ordering::SeqCst) {
                                let frame = match inbox.recv_timeout(Duration::from_millis(5)) {
                                    Ok(frame) => frame,
                                    Err(RecvTimeoutError::Timeout) => continue,
                                    Err(RecvTimeoutError::Disconnected) => break,
                                };
                                let o = engine.handle_message(&(1 - me), &frame, store);
                                wire.send(me, o)?;
                                while engine.has_pending_work() {
                                    let o = engine.run_pending(store);
                                    wire.send(me, o)?;
                                }
                                let idle = wire.in_flight.fetch_sub(1, Ordering::SeqCst) == 1;
                                if idle || (me == 1 && reached(store)) {
                                    finish();
                                }
                            }
                            Ok(())
                        })();
                        if result.is_err() {
                            finish();
                        }
                        result
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        for o in outcomes {
            o?;
        }
        let ended = ended.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(ended.unwrap_or_else(Instant::now))
    }
}

fn delta(a: SyncStats, b: SyncStats) -> SyncStats {
    SyncStats {
        pulls: b.pulls - a.pulls,
        fetches: b.fetches - a.fetches,
        records_fetched: b.records_fetched - a.records_fetched,
        changes_applied: b.changes_applied - a.changes_applied,
        records_rejected: b.records_rejected - a.records_rejected,
        records_ignored: b.records_ignored - a.records_ignored,
        bulk_pulls: b.bulk_pulls - a.bulk_pulls,
        records_bulk: b.records_bulk - a.records_bulk,
        bulk_overlapped: b.bulk_overlapped - a.bulk_overlapped,
        fetches_overlapped: b.fetches_overlapped - a.fetches_overlapped,
        batches_written_behind: b.batches_written_behind - a.batches_written_behind,
    }
}

pub fn run(records: usize, batch: usize, bulk: bool) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("entente-bench-sync-")
        .tempdir()?;
    println!(
        "entente bench sync: {records} contacts, catch-up through the sync engine ({})",
        if bulk {
            "bulk full sync"
        } else {
            "feed pages and fetches"
        }
    );

    let mut a = open(&tmp.path().join("a"), 1, false)?;
    let fill = Instant::now();
    let mut ids: Vec<RecordId> = Vec::with_capacity(records);
    for start in (0..records).step_by(batch) {
        let items = (start..(start + batch).min(records))
            .map(|i| NewRecord {
                collection: "contacts".into(),
                id: None,
                fields: contact(i),
                force: false,
            })
            .collect();
        ids.extend(a.create_many(items)?.into_iter().map(|w| w.record.id));
    }
    eprintln!("filled A with {records} contacts in {:?}", fill.elapsed());

    // Raw limit: load the same documents from their saved bytes.
    let sample = records.min(RAW_SAMPLE);
    let step = (records / sample.max(1)).max(1);
    let mut saved = Vec::with_capacity(sample);
    for id in ids.iter().step_by(step).take(sample) {
        saved.push(a.raw_document(id)?);
    }
    a.clear_cache();
    let t = Instant::now();
    let mut ops = 0usize;
    for bytes in &saved {
        let doc = Automerge::load(bytes).map_err(|e| anyhow::anyhow!("load: {e}"))?;
        ops += doc.get_heads().len();
    }
    let raw = rate(saved.len(), t.elapsed());
    std::hint::black_box(ops);
    let saved_bytes = saved.iter().map(Vec::len).sum::<usize>() / saved.len().max(1);
    drop(saved);

    let b = open(&tmp.path().join("b"), 2, true)?;
    let config = SyncConfig {
        bulk_full_sync: bulk,
        ..SyncConfig::default()
    };
    let engines = [
        SyncEngine::new(&a, config.clone())?,
        SyncEngine::new(&b, config)?,
    ];
    let mut link = Link::new([a, b], engines);

    // 1. Catch-up.
    let t = Instant::now();
    link.connect()?;
    let target = records as u64;
    let catch_up = link.run(Some(target))? - t;
    if link.stores[1].feed_seq() < target {
        bail!(
            "catch-up stopped at {} of {records}",
            link.stores[1].feed_seq()
        );
    }
    let (bytes, frames) = (link.wire.bytes(), link.wire.frames.load(Ordering::Relaxed));
    let b_stats = link.engines[1].stats();
    // The echo: A's anti-entropy pull of B's feed, which now lists every
    // record (A's first pull found it empty).
    let t = Instant::now();
    link.run(None)?;
    let o = link.engines[0].tick(u64::MAX / 2);
    link.wire.send(0, o)?;
    let echo = link.run(None)? - t;
    let echo_entries = link.wire.pull_entries(0);
    let echo_bytes = link.wire.bytes() - bytes;

    // 2. Ten records behind, in a store of N.
    link.disconnect();
    let changed = 10.min(records);
    for (k, id) in ids
        .iter()
        .step_by((records / changed.max(1)).max(1))
        .take(changed)
        .enumerate()
    {
        let f = json!({ "city": format!("Basel {k}") });
        link.stores[0].update(id, f.as_object().expect("object"), None, false)?;
    }
    let before = link.engines[1].stats();
    let (pulled_before, bytes_before) = (link.wire.pull_entries(1), link.wire.bytes());
    let t = Instant::now();
    link.connect()?;
    let behind = link.run(None)? - t;
    let d = delta(before, link.engines[1].stats());
    let pulled = link.wire.pull_entries(1) - pulled_before;
    let behind_bytes = link.wire.bytes() - bytes_before;
    for id in ids
        .iter()
        .step_by((records / changed.max(1)).max(1))
        .take(changed)
    {
        if link.stores[0].heads(id)? != link.stores[1].heads(id)? {
            bail!("{id} did not arrive");
        }
    }

    // 3. Every record changed at A while B was away.
    link.disconnect();
    for (k, id) in ids.iter().enumerate() {
        let f = json!({ "city": format!("Bern {k}") });
        link.stores[0].update(id, f.as_object().expect("object"), None, false)?;
    }
    link.stores[1].clear_cache();
    let before = link.engines[1].stats();
    let seq_before = link.stores[1].feed_seq();
    let t = Instant::now();
    link.connect()?;
    let target = seq_before + records as u64;
    let all_behind = link.run(Some(target))? - t;
    let all = delta(before, link.engines[1].stats());
    if link.stores[1].feed_seq() < target {
        bail!(
            "catch-up of the changed records stopped at {} of {records}",
            link.stores[1].feed_seq() - seq_before
        );
    }
    for id in ids.iter().step_by((records / 100).max(1)) {
        if link.stores[0].heads(id)? != link.stores[1].heads(id)? {
            bail!("the change of {id} did not arrive");
        }
    }

    let rec_rate = rate(records, catch_up);
    println!("| figure | value |");
    println!("|---|---|");
    println!("| records caught up | {records} |");
    println!("| catch-up time | {:.2} s |", catch_up.as_secs_f64());
    println!("| catch-up rate | {rec_rate:.0} records/s |");
    println!(
        "| raw limit: `Automerge::load` of each saved document ({} docs, {saved_bytes} bytes avg) | {raw:.0} records/s |",
        saved_len(records)
    );
    println!("| catch-up / raw limit | {:.0}% |", 100.0 * rec_rate / raw);
    println!(
        "| bytes on the wire per record | {:.0} ({bytes} bytes in {frames} frames) |",
        bytes as f64 / records as f64
    );
    println!(
        "| B's bulk pages (landed while A read the next) / records received whole | {} ({}) / {} |",
        b_stats.bulk_pulls, b_stats.bulk_overlapped, b_stats.records_bulk
    );
    println!(
        "| B's pulls / fetches / records fetched | {} / {} / {} |",
        b_stats.pulls, b_stats.fetches, b_stats.records_fetched
    );
    println!(
        "| echo: A pulls B's feed once ({echo_entries} entries, no fetch) | {:.2} s, {echo_bytes} bytes |",
        echo.as_secs_f64()
    );
    println!("| **{changed} records behind in a store of {records}** | |");
    println!("| feed entries B read in pull responses | {pulled} |");
    println!(
        "| B's pulls / fetches / records fetched | {} / {} / {} |",
        d.pulls, d.fetches, d.records_fetched
    );
    println!(
        "| time, whole session (handshake to idle, both directions) | {:.1} ms |",
        ms(behind)
    );
    println!("| bytes on the wire | {behind_bytes} |");
    println!("| **every record changed at A, B's cache emptied** | |");
    println!(
        "| catch-up rate | {:.0} records/s ({:.2} s) |",
        rate(records, all_behind),
        all_behind.as_secs_f64()
    );
    println!(
        "| B's pulls / fetches / records fetched | {} / {} / {} |",
        all.pulls, all.fetches, all.records_fetched
    );
    Ok(())
}

fn saved_len(records: usize) -> usize {
    records.min(RAW_SAMPLE)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
