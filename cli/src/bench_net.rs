//! `entente bench net`: catch-up of a new node from a full one over loopback.
//!
//! Node A is a real `entente serve` child process whose data dir was filled
//! beforehand through the library; node B runs in this process, dials A and
//! is timed until its feed holds every record. Figures: records/s, payload
//! bytes on the wire per record (replication frames and gossip as handed to
//! libp2p; Noise and Yamux framing not counted), peak RSS of each process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use entente_node::config::{Config, DataDir};
use entente_node::runtime;
use entente_node::{NewRecord, StoreOptions};

use crate::bench::contact;

/// Peak RSS (VmHWM, KiB) of a process.
fn peak_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn run(records: usize, batch: usize, bulk: bool) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("entente-bench-net-")
        .tempdir()?;
    let (a, b) = (
        DataDir::new(tmp.path().join("a")),
        DataDir::new(tmp.path().join("b")),
    );
    a.init()?;
    let b_peer = b.init()?.peer_id;

    let fill = Instant::now();
    {
        let (mut store, _) = runtime::open_store(
            &a,
            &Config::default(),
            StoreOptions {
                sync: false,
                ..StoreOptions::default()
            },
        )?;
        for start in (0..records).step_by(batch) {
            let items = (start..(start + batch).min(records))
                .map(|i| NewRecord {
                    collection: "contacts".into(),
                    id: None,
                    fields: contact(i),
                    force: false,
                })
                .collect();
            store.create_many(items)?;
        }
    }
    eprintln!("filled A with {records} contacts in {:?}", fill.elapsed());

    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--data-dir"])
        .arg(a.root())
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
            "--allow",
        ])
        .arg(b_peer.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting node A")?;
    let a_pid = child.id().to_string();
    let mut lines = BufReader::new(child.stdout.take().context("A's stdout")?).lines();
    let a_addr = loop {
        match lines.next() {
            Some(line) => {
                let line = line?;
                if let Some(addr) = line.strip_prefix("listening ") {
                    break addr.to_string();
                }
            }
            None => bail!("node A exited before listening"),
        }
    };

    // Forget the fill's memory peak: B's figure is the catch-up's own.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut config = Config {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            peers: vec![a_addr.parse()?],
            ..Config::default()
        };
        config.sync.pull_interval_ms = 500;
        config.sync.bulk_full_sync = bulk;
        let started = Instant::now();
        let node = runtime::start(&b, config).await?;
        let h = node.handle.clone();
        let deadline = started + Duration::from_secs(1800);
        let status = loop {
            let s = h.status().await?;
            if s.feed_seq >= records as u64 {
                break s;
            }
            if Instant::now() > deadline {
                bail!("catch-up did not finish: {} of {records}", s.feed_seq);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let elapsed = started.elapsed();
        let a_rss = peak_rss_kib(&a_pid);
        let b_rss = peak_rss_kib("self");
        node.stop().await?;
        Ok((elapsed, status, a_rss, b_rss))
    });
    let _ = Command::new("kill").arg("-TERM").arg(&a_pid).status();
    let _ = child.wait();
    let (elapsed, status, a_rss, b_rss) = result?;
    let wire = status.bytes_received + status.bytes_sent;
    println!("| figure | value |");
    println!("|---|---|");
    println!("| records caught up | {records} |");
    println!("| catch-up time | {:.2} s |", elapsed.as_secs_f64());
    println!(
        "| catch-up rate | {:.0} records/s |",
        records as f64 / elapsed.as_secs_f64()
    );
    println!(
        "| payload bytes on the wire per record | {:.0} (received {}, sent {}) |",
        wire as f64 / records as f64,
        status.bytes_received,
        status.bytes_sent
    );
    println!(
        "| B's bulk pages (applied while A read the next) / records received whole / pulls / fetches (applied while A read the next) | {} ({}) / {} / {} / {} ({}) |",
        status.bulk_pulls,
        status.bulk_pages_overlapped,
        status.records_bulk,
        status.pulls,
        status.fetches,
        status.fetches_overlapped
    );
    println!("| peak RSS, A (serving) | {} MiB |", a_rss / 1024);
    println!("| peak RSS, B (catching up) | {} MiB |", b_rss / 1024);
    Ok(())
}
