//! `entente bench latency`: the time from a write at node A until it is
//! readable at node B, under a steady load of writes at A.
//!
//! Both nodes are real (`runtime::start`: libp2p over loopback, RocksDB in
//! temporary data dirs, fsync on every write) and run in this process, on
//! one multi-threaded tokio runtime, so they share the machine's cores as
//! two processes would. A writer issues one single-record create at A every
//! `1/rate` seconds, each on its own task (a slow write does not hold back
//! the schedule). An observer at B wakes on every move of B's changes feed
//! and reads the new entries; a write's latency runs from the moment it was
//! issued at A until the moment B's feed shows it. The path measured is the
//! whole push path: A's durable write, the gossip of (id, heads), B's fetch
//! of the change, B's durable apply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use entente_model::RecordId;
use entente_node::config::{Config, DataDir};
use entente_node::runtime::{self, NodeHandle};

use crate::bench::contact;

/// `entente bench latency`.
#[derive(Debug, Args)]
pub struct LatencyBench {
    /// Writes per second at A.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of steady load measured (after a 2 s warm-up).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

/// A UUID (version 4 layout) made from a counter, so the writer knows a
/// record's id before the write returns.
fn id_for(i: u64) -> RecordId {
    RecordId::parse(&format!("00000000-0000-4000-8000-{i:012x}")).expect("a valid UUID")
}

type Pending = Arc<Mutex<HashMap<RecordId, Instant>>>;

pub fn run(args: LatencyBench) -> Result<()> {
    if args.rate == 0 || args.seconds == 0 {
        bail!("--rate and --seconds must be positive");
    }
    let tmp = tempfile::Builder::new()
        .prefix("entente-bench-latency-")
        .tempdir()?;
    let (a, b) = (
        DataDir::new(tmp.path().join("a")),
        DataDir::new(tmp.path().join("b")),
    );
    a.init()?;
    b.init()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(measure(args, a, b))
}

async fn measure(args: LatencyBench, a: DataDir, b: DataDir) -> Result<()> {
    let config = || -> Result<Config> {
        Ok(Config {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            ..Config::default()
        })
    };
    let node_a = runtime::start(&a, config()?).await?;
    let node_b = runtime::start(&b, config()?).await?;
    let (ha, hb) = (node_a.handle.clone(), node_b.handle.clone());
    let a_addr = loop {
        if let Some(addr) = ha.status().await?.listen_addrs.first() {
            break addr.parse()?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ha.add_peer(hb.peer_id(), None).await?;
    hb.add_peer(ha.peer_id(), Some(a_addr)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !hb.peers().await?.iter().any(|p| p.syncing) {
        if Instant::now() > deadline {
            bail!("the nodes did not connect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let pending: Pending = Arc::default();
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let observer = tokio::spawn(observe(hb.clone(), pending.clone(), latencies.clone()));

    let warmup = Duration::from_secs(2);
    let total = warmup + Duration::from_secs(args.seconds);
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut issued = 0u64;
    let mut measured = 0u64;
    let failures = Arc::new(Mutex::new(0u64));
    let mut writes = Vec::new();
    while start.elapsed() < total {
        tick.tick().await;
        let id = id_for(issued);
        let in_warmup = start.elapsed() < warmup;
        if !in_warmup {
            pending
                .lock()
                .expect("pending lock")
                .insert(id.clone(), Instant::now());
            measured += 1;
        }
        let fields = contact(issued as usize);
        let (ha, failures) = (ha.clone(), failures.clone());
        writes.push(tokio::spawn(async move {
            if ha
                .create("contacts", Some(id), fields, false)
                .await
                .is_err()
            {
                *failures.lock().expect("failures lock") += 1;
            }
        }));
        issued += 1;
    }
    let issuing = start.elapsed() - warmup.min(start.elapsed());
    for w in writes {
        w.await.context("a write task failed")?;
    }
    let written_by = start.elapsed();
    // Let the last writes arrive (anti-entropy repairs a lost push).
    let drain = Instant::now();
    while !pending.lock().expect("pending lock").is_empty()
        && drain.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    observer.abort();
    let missing = pending.lock().expect("pending lock").len();
    let mut lat = latencies.lock().expect("latencies lock").clone();
    lat.sort();
    let failures = *failures.lock().expect("failures lock");
    let status_a = ha.status().await?;
    node_b.stop().await?;
    node_a.stop().await?;
    if lat.is_empty() {
        bail!("no write reached B");
    }
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| load asked / achieved at A | {} writes/s / {:.0} writes/s (all {issued} writes durable after {:.1} s) |",
        args.rate,
        measured as f64 / issuing.as_secs_f64().max(1e-9),
        written_by.as_secs_f64()
    );
    println!(
        "| writes measured (after {} s warm-up) | {measured} ({} arrived, {missing} not within 30 s, {failures} failed) |",
        warmup.as_secs(),
        lat.len()
    );
    println!(
        "| write at A → readable at B | p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(pct(1.0))
    );
    println!(
        "| A sent / received | {} / {} payload bytes |",
        status_a.bytes_sent, status_a.bytes_received
    );
    Ok(())
}

/// Wakes on every move of B's feed; stamps the arrival of each pending id.
async fn observe(b: NodeHandle, pending: Pending, latencies: Arc<Mutex<Vec<Duration>>>) {
    let feed = b.feed();
    let mut rx = feed.subscribe();
    let mut since = *rx.borrow_and_update();
    loop {
        let entries = match b.changes_since(since, 10_000).await {
            Ok(e) => e,
            Err(_) => return,
        };
        let now = Instant::now();
        let more = entries.len() == 10_000;
        for e in entries {
            since = since.max(e.seq);
            if let Some(t0) = pending.lock().expect("pending lock").remove(&e.id) {
                latencies
                    .lock()
                    .expect("latencies lock")
                    .push(now.duration_since(t0));
            }
        }
        if !more && rx.changed().await.is_err() {
            return;
        }
    }
}
