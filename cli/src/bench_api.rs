//! `entente bench api`: the HTTP API served in this process on loopback and
//! driven by blocking clients, as a real client would use it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use entente_model::{NodeId, Schema};
use entente_node::api::{self, ApiConfig, ApiState, StandaloneHooks};
use entente_node::{Store, StoreOptions, SystemClock};
use serde_json::json;

use crate::bench::{contact, data_dir, rate};

/// `bench api`
#[derive(Debug, Args)]
pub struct ApiBench {
    /// Single-record creates (POST, one fsynced write each) per client setting.
    #[arg(long, default_value_t = 2_000)]
    creates: usize,
    /// Concurrent clients for the second create run.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Contacts imported as JSON lines (then read back through the feed).
    #[arg(long, default_value_t = 100_000)]
    import: usize,
    /// Data dir (default: a new temporary dir, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn post_create(agent: &ureq::Agent, base: &str, i: usize) -> Result<()> {
    let body = json!({ "fields": contact(i) }).to_string();
    agent
        .post(&format!("{base}/collections/contacts/records"))
        .set("Content-Type", "application/json")
        .send_string(&body)
        .with_context(|| format!("create {i}"))?;
    Ok(())
}

/// Runs the API benchmark.
pub fn run(a: ApiBench) -> Result<()> {
    let dir = data_dir(a.dir, "api")?;
    let store = Store::open(
        &dir.path,
        Arc::new(Schema::default_crm()),
        NodeId([1; 16]),
        Arc::new(SystemClock),
        StoreOptions::default(),
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let state = ApiState::new(
        store,
        Arc::new(StandaloneHooks),
        ApiConfig::for_addr(addr, None, false).map_err(anyhow::Error::msg)?,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(api::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let base = format!("http://{addr}");
    println!(
        "entente bench api: {} single creates with 1 and with {} clients, import of {} contacts, feed read",
        a.creates, a.clients, a.import
    );
    println!("data dir: {}, API on {base}", dir.path.display());

    // 1. Single creates, one client.
    let agent = ureq::AgentBuilder::new().build();
    let t = Instant::now();
    for i in 0..a.creates {
        post_create(&agent, &base, i)?;
    }
    let one = rate(a.creates, t.elapsed());
    println!("creates, 1 client:          {one:>9.0} records/s");

    // 2. Single creates, N concurrent clients (each its own connection).
    let clients = a.clients.max(1);
    let per = a.creates / clients;
    let t = Instant::now();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let base = base.clone();
                s.spawn(move || {
                    let agent = ureq::AgentBuilder::new().build();
                    for k in 0..per {
                        post_create(&agent, &base, 1_000_000 + c * per + k)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    let many = rate(per * clients, t.elapsed());
    println!("creates, {clients} clients:         {many:>9.0} records/s");

    // 3. Import of JSON lines.
    let mut body = Vec::with_capacity(a.import * 400);
    for i in 0..a.import {
        serde_json::to_writer(
            &mut body,
            &json!({ "collection": "contacts", "fields": contact(10_000_000 + i) }),
        )?;
        body.push(b'\n');
    }
    let mb = body.len() as f64 / 1048576.0;
    let t = Instant::now();
    let resp = agent
        .post(&format!("{base}/import"))
        .set("Content-Type", "application/x-ndjson")
        .send_bytes(&body)
        .context("import")?;
    let report: serde_json::Value = serde_json::from_str(&resp.into_string()?)?;
    let d = t.elapsed();
    if report["created"].as_u64() != Some(a.import as u64) {
        bail!("import did not create every record: {report}");
    }
    println!(
        "import ({mb:.1} MiB):       {:>9.0} records/s ({:.1} s)",
        rate(a.import, d),
        d.as_secs_f64()
    );

    // 4. The changes feed, read from the start in pages of 10,000.
    let t = Instant::now();
    let mut since = 0u64;
    let mut entries = 0usize;
    loop {
        let resp = agent
            .get(&format!("{base}/changes?since={since}&limit=10000"))
            .call()
            .context("feed")?;
        let mut n = 0;
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            since = v["seq"].as_u64().unwrap_or(since);
            n += 1;
        }
        if n == 0 {
            break;
        }
        entries += n;
    }
    let d = t.elapsed();
    println!(
        "feed read:                  {:>9.0} entries/s ({entries} entries in {:.1} s)",
        rate(entries, d),
        d.as_secs_f64()
    );
    let _ = stop.send(());
    rt.block_on(server)??;
    Ok(())
}
