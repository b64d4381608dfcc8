//! `import FILE` and `export [--collection C]`, with a progress line on a
//! terminal.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use super::{cell, query, table};
use crate::client::{CliError, CliResult, Client, exit, print_json};

/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// `import FILE`
#[derive(Debug, Args)]
pub struct Import {
    /// JSON-lines file (`-` for stdin): one `{"collection", "id"?, "fields",
    /// "force"?}` per line; exported lines work as they are.
    pub file: PathBuf,
}

/// `export`
#[derive(Debug, Args)]
pub struct Export {
    /// Only this collection (default: all).
    #[arg(long)]
    pub collection: Option<String>,
    /// Include deleted records.
    #[arg(long)]
    pub deleted: bool,
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// A progress line on stderr, drawn only when stderr is a terminal.
struct Progress {
    on: bool,
    last: Instant,
    started: Instant,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress {
            on: std::io::stderr().is_terminal(),
            last: now,
            started: now,
        }
    }

    fn show(&mut self, text: impl FnOnce() -> String, force: bool) {
        if !self.on || (!force && self.last.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        eprint!("\r\x1b[2K{} ({secs:.1} s)", text());
        if force {
            eprintln!();
        }
    }
}

/// Counts the bytes read, for the progress line.
struct Counting<R> {
    inner: R,
    read: u64,
    total: Option<u64>,
    progress: Progress,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let (read, total) = (self.read, self.total);
        self.progress.show(
            || match total {
                Some(t) if t > 0 => format!(
                    "import: {:.1} of {:.1} MiB sent ({}%)",
                    read as f64 / 1048576.0,
                    t as f64 / 1048576.0,
                    read * 100 / t
                ),
                _ => format!("import: {:.1} MiB sent", read as f64 / 1048576.0),
            },
            false,
        );
        Ok(n)
    }
}

/// Runs `import`. Exits with the bad-input code when any line was refused
/// (the good ones are in).
pub fn import(client: &Client, i: Import, json: bool) -> CliResult {
    let (reader, total): (Box<dyn Read + Send>, Option<u64>) = if i.file.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = File::open(&i.file)
            .map_err(|e| CliError::input(format!("{}: {e}", i.file.display())))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let mut counting = Counting {
        inner: reader,
        read: 0,
        total,
        progress: Progress::new(),
    };
    counting.progress.show(|| "import: starting".into(), false);
    let report = client.post_lines("/import", &mut counting)?;
    let sent = counting.read;
    counting
        .progress
        .show(|| format!("import: {sent} bytes sent, done"), true);
    if json {
        print_json(&report);
    } else {
        println!(
            "{} lines: {} created, {} updated, {} unchanged, {} refused",
            cell(&report["lines"]),
            cell(&report["created"]),
            cell(&report["updated"]),
            cell(&report["unchanged"]),
            cell(&report["failed"]),
        );
        let rows: Vec<Vec<String>> = report["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| vec![cell(&e["line"]), cell(&e["code"]), cell(&e["message"])])
                    .collect()
            })
            .unwrap_or_default();
        if !rows.is_empty() {
            table(&["LINE", "CODE", "MESSAGE"], &rows);
        }
    }
    if report["failed"].as_u64().unwrap_or(0) > 0 {
        return Err(CliError {
            exit: exit::BAD_INPUT,
            code: Some("IMPORT_LINES_REFUSED".into()),
            message: format!("{} lines were refused", cell(&report["failed"])),
            body: None,
        });
    }
    Ok(())
}

/// Runs `export`.
pub fn export(client: &Client, e: Export) -> CliResult {
    let mut pairs = Vec::new();
    if let Some(c) = &e.collection {
        pairs.push(("collection", c.clone()));
    }
    if e.deleted {
        pairs.push(("deleted", "true".to_string()));
    }
    let resp = client.get_stream(&format!("/export{}", query(&pairs)), None)?;
    let mut out: Box<dyn Write> = match &e.output {
        Some(p) => {
            Box::new(std::io::BufWriter::new(File::create(p).map_err(|err| {
                CliError::input(format!("{}: {err}", p.display()))
            })?))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut progress = Progress::new();
    let mut n: u64 = 0;
    let write_err = |err: std::io::Error| CliError::other(format!("writing: {err}"));
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|err| CliError::other(format!("export cut short: {err}")))?;
        out.write_all(line.as_bytes()).map_err(write_err)?;
        out.write_all(b"\n").map_err(write_err)?;
        n += 1;
        progress.show(|| format!("export: {n} records"), false);
    }
    out.flush().map_err(write_err)?;
    progress.show(|| format!("export: {n} records, done"), true);
    Ok(())
}
