//! `changes [--since N] [--follow]`.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use clap::Args;
use serde_json::Value as Json;

use super::{cell, table};
use crate::client::{CliError, CliResult, Client};

/// Seconds each long poll of `--follow` waits on the node.
const FOLLOW_WAIT_S: u64 = 30;

/// `changes`
#[derive(Debug, Args)]
pub struct Changes {
    /// Records changed after this feed sequence.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Entries per request.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Keep waiting for new changes (long poll) and print them as they come.
    #[arg(long)]
    pub follow: bool,
}

fn fetch(client: &Client, since: u64, limit: usize, wait: u64) -> CliResult<Vec<Json>> {
    let resp = client.get_stream(
        &format!("/changes?since={since}&limit={limit}&wait={wait}"),
        Some(Duration::from_secs(wait + 30)),
    )?;
    let mut out = Vec::new();
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| CliError::other(format!("reading the feed: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| CliError::other(format!("a feed line is not JSON ({e}): {line}")))?,
        );
    }
    Ok(out)
}

fn print(entries: &[Json], json: bool, header: bool) {
    if json {
        let mut o = std::io::stdout().lock();
        for e in entries {
            let _ = writeln!(o, "{e}");
        }
        return;
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let fields = e["fields"]
                .as_object()
                .map(|f| {
                    f.iter()
                        .map(|(k, v)| format!("{k}={}", cell(v)))
                        .collect::<Vec<_>>()
                        .join("  ")
                })
                .unwrap_or_default();
            vec![
                cell(&e["seq"]),
                cell(&e["collection"]),
                cell(&e["id"]),
                if e["deleted"].as_bool() == Some(true) {
                    "deleted".into()
                } else {
                    String::new()
                },
                fields,
            ]
        })
        .collect();
    if header {
        table(&["SEQ", "COLLECTION", "ID", "", "FIELDS"], &rows);
    } else {
        for r in rows {
            println!("{}", r.join("  "));
        }
    }
}

/// Runs `changes`: everything since `--since` (page after page), then with
/// `--follow` long polls for more until interrupted.
pub fn run(client: &Client, c: Changes, json: bool) -> CliResult {
    let mut since = c.since;
    let mut first = true;
    loop {
        let wait = if c.follow { FOLLOW_WAIT_S } else { 0 };
        let entries = fetch(client, since, c.limit.max(1), wait)?;
        if let Some(last) = entries.last().and_then(|e| e["seq"].as_u64()) {
            since = last;
        }
        if !entries.is_empty() || (first && !c.follow) {
            print(&entries, json, first);
            first = false;
        }
        if entries.is_empty() && !c.follow {
            return Ok(());
        }
        let _ = std::io::stdout().flush();
    }
}
