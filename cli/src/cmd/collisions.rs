//! `collisions`, `collisions show ID`, `collisions resolve ID …`.

use clap::{Args, Subcommand};
use serde_json::{Map, Value as Json, json};

use super::{assignments, cell, query, short, table, time};
use crate::client::{CliError, CliResult, Client, enc, print_json};

/// `collisions [--all] [--kind K] [show ID | resolve ID …]`
#[derive(Debug, Args)]
pub struct Collisions {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Include resolved collisions.
    #[arg(long)]
    pub all: bool,
    /// Only this kind: duplicate, update_delete, dangling_reference,
    /// flagged_field.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only this collection.
    #[arg(long)]
    pub collection: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Show a collision side by side (differing fields marked `*`).
    Show {
        /// Collision id.
        id: String,
    },
    /// Settle a collision.
    Resolve(Resolve),
}

/// `collisions resolve ID …`
#[derive(Debug, Args)]
pub struct Resolve {
    /// Collision id.
    pub id: String,
    /// Restore the deleted record (update_delete, dangling_reference).
    #[arg(long)]
    pub restore: bool,
    /// Confirm the delete (update_delete).
    #[arg(long)]
    pub confirm_delete: bool,
    /// Merge the other duplicates into this survivor.
    #[arg(long, value_name = "SURVIVOR_ID")]
    pub merge_into: Option<String>,
    /// Keep this field's value from that record (repeatable).
    #[arg(long, value_name = "FIELD=RECORD_ID")]
    pub keep: Vec<String>,
    /// Write this value (repeatable; FIELD:=JSON for raw JSON).
    #[arg(long, value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
    /// The record `--set` applies to.
    #[arg(long, value_name = "RECORD_ID")]
    pub on: Option<String>,
    /// Delete this record (duplicate, dangling_reference).
    #[arg(long, value_name = "RECORD_ID")]
    pub delete: Option<String>,
}

/// Runs `collisions`.
pub fn run(client: &Client, c: Collisions, json: bool) -> CliResult {
    match c.action {
        None => list(client, &c, json),
        Some(Action::Show { id }) => show(client, &id, json),
        Some(Action::Resolve(r)) => resolve(client, r, json),
    }
}

fn list(client: &Client, c: &Collisions, json: bool) -> CliResult {
    let mut pairs = vec![("status", if c.all { "all" } else { "open" }.to_string())];
    if let Some(k) = &c.kind {
        pairs.push(("kind", k.clone()));
    }
    if let Some(col) = &c.collection {
        pairs.push(("collection", col.clone()));
    }
    let v = client.get(&format!("/collisions{}", query(&pairs)))?;
    if json {
        print_json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["collisions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let recs: Vec<String> = c["records"]
                        .as_array()
                        .map(|r| r.iter().map(cell).collect())
                        .unwrap_or_default();
                    let what = match (c["field"].as_str(), c["value"].as_str()) {
                        (Some(f), Some(v)) => format!("{f}={v}"),
                        (Some(f), None) => f.to_string(),
                        _ => String::new(),
                    };
                    vec![
                        cell(&c["id"]),
                        cell(&c["kind"]),
                        cell(&c["status"]["state"]),
                        cell(&c["collection"]),
                        what,
                        recs.join(" "),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["ID", "KIND", "STATUS", "COLLECTION", "ON", "RECORDS"],
        &rows,
    );
    Ok(())
}

/// Prints the side-by-side table of a collision (the API's `table`).
pub fn print_side_by_side(c: &Json) {
    println!(
        "{} {} in {} — {}",
        cell(&c["kind"]),
        cell(&c["id"]),
        cell(&c["collection"]),
        cell(&c["status"]["state"])
    );
    let sides = c["sides"].as_array().cloned().unwrap_or_default();
    for (i, s) in sides.iter().enumerate() {
        println!(
            "  side {}: record {} ({}) by {} at {}",
            i + 1,
            cell(&s["record"]),
            cell(&s["role"]),
            short(&s["node"]),
            time(s["at_ms"].as_i64().unwrap_or(0))
        );
    }
    println!();
    let mut header: Vec<String> = vec![String::new(), "FIELD".into()];
    for i in 0..sides.len() {
        header.push(format!("SIDE {}", i + 1));
    }
    let rows: Vec<Vec<String>> = c["table"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|row| {
                    let mut r = vec![
                        if row["differs"].as_bool() == Some(true) {
                            "*".into()
                        } else {
                            String::new()
                        },
                        cell(&row["field"]),
                    ];
                    for s in row["sides"].as_array().cloned().unwrap_or_default() {
                        let mut text = cell(&s["value"]);
                        if !s["node"].is_null() {
                            text.push_str(&format!(
                                " ({} {})",
                                short(&s["node"]),
                                time(s["at_ms"].as_i64().unwrap_or(0))
                            ));
                        }
                        r.push(text);
                    }
                    r
                })
                .collect()
        })
        .unwrap_or_default();
    let h: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&h, &rows);
    if let Some(res) = c["status"].as_object()
        && res.get("state").and_then(Json::as_str) == Some("resolved")
    {
        println!();
        println!(
            "resolved: {} by {} at {}",
            cell(&c["status"]["action"]),
            short(&c["status"]["by"]),
            time(c["status"]["at_ms"].as_i64().unwrap_or(0))
        );
    }
}

fn show(client: &Client, id: &str, json: bool) -> CliResult {
    let c = client.get(&format!("/collisions/{}", enc(id)))?;
    if json {
        print_json(&c);
    } else {
        print_side_by_side(&c);
    }
    Ok(())
}

fn resolve(client: &Client, r: Resolve, json: bool) -> CliResult {
    let mut keep = Map::new();
    for k in &r.keep {
        let (f, id) = k
            .split_once('=')
            .ok_or_else(|| CliError::input(format!("--keep `{k}` is not FIELD=RECORD_ID")))?;
        keep.insert(f.to_string(), json!(id));
    }
    let mut body = json!({
        "restore": r.restore,
        "confirm_delete": r.confirm_delete,
        "keep": keep,
    });
    if !r.set.is_empty() {
        let c = client.get(&format!("/collisions/{}", enc(&r.id)))?;
        let collection = c["collection"].as_str().unwrap_or_default().to_string();
        body["set"] = Json::Object(assignments(client, &collection, &r.set)?);
    }
    for (key, v) in [
        ("merge_into", &r.merge_into),
        ("on", &r.on),
        ("delete", &r.delete),
    ] {
        if let Some(v) = v {
            body[key] = json!(v);
        }
    }
    let out = client.json(
        "POST",
        &format!("/collisions/{}/resolve", enc(&r.id)),
        Some(&body),
    )?;
    if json {
        print_json(&out);
    } else {
        print_side_by_side(&out["collision"]);
    }
    Ok(())
}
