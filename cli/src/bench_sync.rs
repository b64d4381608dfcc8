//! `entente bench sync`: catch-up through the sync engine over an in-process
//! channel, beside the raw limit measured in the same run on the same data.
//!
//! Two RocksDB stores in a temporary dir: A is filled with N contacts, B is
//! empty (fsynced batches, as a node runs). Two [`SyncEngine`]s exchange
//! encoded frames through an in-order queue; nothing else runs. Figures:
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

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
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

/// Two engines and their stores joined by an in-order frame queue.
struct Link {
    stores: [Store; 2],
    engines: [SyncEngine<usize>; 2],
    wire: VecDeque<(usize, Vec<u8>)>,
    bytes: u64,
    frames: u64,
    /// Feed entries carried by pull responses, to each side.
    pull_entries: [u64; 2],
}

impl Link {
    fn send(&mut self, from: usize, outs: Vec<Output<usize>>) -> Result<()> {
        for o in outs {
            match o {
                Output::Send { msg, .. } | Output::Broadcast { msg } => {
                    let frame = msg.encode()?;
                    self.bytes += frame.len() as u64;
                    self.frames += 1;
                    self.wire.push_back((1 - from, frame));
                }
                Output::Disconnect { reason, .. } => bail!("node {from} disconnected: {reason}"),
            }
        }
        Ok(())
    }

    fn connect(&mut self) -> Result<()> {
        for i in 0..2 {
            let o = self.engines[i].peer_connected(1 - i);
            self.send(i, o)?;
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        for i in 0..2 {
            self.engines[i].peer_disconnected(&(1 - i));
        }
    }

    /// Delivers frames until none is left or `stop` holds.
    fn run(&mut self, stop: &mut dyn FnMut(&Link) -> bool) -> Result<()> {
        while let Some((to, frame)) = self.wire.pop_front() {
            if let Ok(Message::PullResponse { entries, .. }) = Message::decode(&frame) {
                self.pull_entries[to] += entries.len() as u64;
            }
            let o = self.engines[to].handle_message(&(1 - to), &frame, &mut self.stores[to]);
            self.send(to, o)?;
            if stop(self) {
                break;
            }
        }
        Ok(())
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
    let mut link = Link {
        stores: [a, b],
        engines,
        wire: VecDeque::new(),
        bytes: 0,
        frames: 0,
        pull_entries: [0, 0],
    };

    // 1. Catch-up.
    let t = Instant::now();
    link.connect()?;
    let target = records as u64;
    link.run(&mut |l| l.stores[1].feed_seq() >= target)?;
    let catch_up = t.elapsed();
    if link.stores[1].feed_seq() < target {
        bail!(
            "catch-up stopped at {} of {records}",
            link.stores[1].feed_seq()
        );
    }
    let (bytes, frames) = (link.bytes, link.frames);
    let b_stats = link.engines[1].stats();
    // The echo: A's anti-entropy pull of B's feed, which now lists every
    // record (A's first pull found it empty).
    let t = Instant::now();
    link.run(&mut |_| false)?;
    let o = link.engines[0].tick(u64::MAX / 2);
    link.send(0, o)?;
    link.run(&mut |_| false)?;
    let echo = t.elapsed();
    let echo_entries = link.pull_entries[0];
    let echo_bytes = link.bytes - bytes;

    // 2. Ten records behind, in a store of N.
    link.disconnect();
    link.wire.clear();
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
    let (pulled_before, bytes_before) = (link.pull_entries[1], link.bytes);
    let t = Instant::now();
    link.connect()?;
    link.run(&mut |_| false)?;
    let behind = t.elapsed();
    let d = delta(before, link.engines[1].stats());
    let pulled = link.pull_entries[1] - pulled_before;
    let behind_bytes = link.bytes - bytes_before;
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
    link.wire.clear();
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
    link.run(&mut |l| l.stores[1].feed_seq() >= target)?;
    let all_behind = t.elapsed();
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
        "| B's bulk pages / records received whole | {} / {} |",
        b_stats.bulk_pulls, b_stats.records_bulk
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
