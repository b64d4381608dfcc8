//! `put`, `get`, `rm`, `restore`, `ls`, `history`.

use clap::Args;
use serde_json::{Value as Json, json};

use super::{assignments, cell, query, short, table, time};
use crate::client::{CliError, CliResult, Client, enc, exit, print_json};

/// `put COLLECTION [ID] FIELD=VALUE…`
#[derive(Debug, Args)]
pub struct Put {
    /// Collection.
    pub collection: String,
    /// An optional record id, then FIELD=VALUE (or FIELD:=JSON) assignments.
    #[arg(required = true, num_args = 1..)]
    pub args: Vec<String>,
    /// Heads the edit is based on (comma-separated, as `get` shows them): the
    /// edit is applied as of that version and fields changed since are listed.
    #[arg(long, value_delimiter = ',')]
    pub base: Vec<String>,
    /// Write through a duplicate (the node records it as a resolved
    /// duplicate).
    #[arg(long)]
    pub force: bool,
}

/// `ls COLLECTION [FIELD=VALUE…]`
#[derive(Debug, Args)]
pub struct Ls {
    /// Collection.
    pub collection: String,
    /// Only records whose field equals the value.
    pub filters: Vec<String>,
    /// Include deleted records.
    #[arg(long)]
    pub deleted: bool,
    /// Records per page.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Start after this record id (the `next` cursor of a page).
    #[arg(long)]
    pub after: Option<String>,
    /// Follow the cursor to the end.
    #[arg(long)]
    pub all: bool,
}

/// Prints a record (`RecordView` JSON) as a table.
pub fn print_record(r: &Json) {
    let mut rows = vec![
        vec!["id".into(), cell(&r["id"])],
        vec!["collection".into(), cell(&r["collection"])],
        vec![
            "deleted".into(),
            if r["deleted"].as_bool() == Some(true) {
                "yes".into()
            } else {
                "no".into()
            },
        ],
    ];
    if let Some(m) = r["merged_into"].as_str() {
        rows.push(vec!["merged into".into(), m.into()]);
    }
    if let Some(m) = r["requested_id"].as_str() {
        rows.push(vec!["asked for".into(), format!("{m} (merged away)")]);
    }
    let heads: Vec<String> = r["heads"]
        .as_array()
        .map(|a| a.iter().map(cell).collect())
        .unwrap_or_default();
    rows.push(vec!["heads".into(), heads.join(",")]);
    rows.push(vec![
        "created".into(),
        format!(
            "{} by {}",
            time(r["created_at"].as_i64().unwrap_or(0)),
            short(&r["created_by"])
        ),
    ]);
    rows.push(vec![
        "updated".into(),
        format!(
            "{} by {}",
            time(r["updated_at"].as_i64().unwrap_or(0)),
            short(&r["updated_by"])
        ),
    ]);
    if let Some(c) = r["open_collisions"].as_array()
        && !c.is_empty()
    {
        let ids: Vec<String> = c.iter().map(cell).collect();
        rows.push(vec!["collisions".into(), ids.join(", ")]);
    }
    if let Some(f) = r["fields"].as_object() {
        for (k, v) in f {
            rows.push(vec![format!("  {k}"), cell(v)]);
        }
    }
    table(&["", ""], &rows);
}

/// Prints the answer to a write: the record and any concurrent changes.
fn print_write(w: &Json, json: bool) {
    if json {
        return print_json(w);
    }
    print_record(&w["record"]);
    if let Some(c) = w["concurrent"].as_array()
        && !c.is_empty()
    {
        println!();
        println!("changed concurrently since the base version (merged):");
        let rows: Vec<Vec<String>> = c
            .iter()
            .map(|f| {
                vec![
                    cell(&f["field"]),
                    cell(&f["base_value"]),
                    cell(&f["existing_value"]),
                    cell(&f["new_value"]),
                ]
            })
            .collect();
        table(&["FIELD", "BASE", "EXISTING", "NEW"], &rows);
    }
}

/// `put`
pub fn put(client: &Client, p: Put, json: bool) -> CliResult {
    let (id, items) = match p.args.first() {
        Some(a) if !a.contains('=') => (Some(a.clone()), &p.args[1..]),
        _ => (None, &p.args[..]),
    };
    let fields = assignments(client, &p.collection, items)?;
    let base = (!p.base.is_empty()).then_some(p.base.clone());
    let existing = match &id {
        Some(id) => match client.get(&format!("/records/{}", enc(id))) {
            Ok(r) => Some(r),
            Err(e) if e.exit == exit::NOT_FOUND => None,
            Err(e) => return Err(e),
        },
        None => None,
    };
    let w = match existing {
        Some(r) => {
            if r["collection"].as_str() != Some(p.collection.as_str()) {
                return Err(CliError::input(format!(
                    "record {} is in `{}`, not `{}`",
                    id.unwrap_or_default(),
                    cell(&r["collection"]),
                    p.collection
                )));
            }
            let mut body = json!({ "fields": fields, "force": p.force });
            if let Some(b) = base {
                body["base"] = json!(b);
            }
            client.json(
                "PATCH",
                &format!("/records/{}", enc(id.as_deref().unwrap_or(""))),
                Some(&body),
            )?
        }
        None => {
            if base.is_some() {
                return Err(CliError::input("--base needs an existing record id"));
            }
            let mut body = json!({ "fields": fields, "force": p.force });
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            client.json(
                "POST",
                &format!("/collections/{}/records", enc(&p.collection)),
                Some(&body),
            )?
        }
    };
    print_write(&w, json);
    Ok(())
}

/// `get`
pub fn get(client: &Client, id: &str, json: bool) -> CliResult {
    let r = client.get(&format!("/records/{}", enc(id)))?;
    if json {
        print_json(&r);
    } else {
        print_record(&r);
    }
    Ok(())
}

/// `rm`
pub fn rm(client: &Client, id: &str, json: bool) -> CliResult {
    let w = client.json("DELETE", &format!("/records/{}", enc(id)), None)?;
    print_write(&w, json);
    Ok(())
}

/// `restore`
pub fn restore(client: &Client, id: &str, force: bool, json: bool) -> CliResult {
    let w = client.json(
        "POST",
        &format!("/records/{}/restore", enc(id)),
        Some(&json!({ "force": force })),
    )?;
    print_write(&w, json);
    Ok(())
}

/// `ls`
pub fn ls(client: &Client, l: Ls, json: bool) -> CliResult {
    let mut pairs: Vec<(&str, String)> = vec![("limit", l.limit.to_string())];
    if l.deleted {
        pairs.push(("deleted", "true".into()));
    }
    for f in &l.filters {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| CliError::input(format!("filter `{f}` is not FIELD=VALUE")))?;
        pairs.push((k, v.to_string()));
    }
    let mut after = l.after.clone();
    let mut records: Vec<Json> = Vec::new();
    let mut next;
    loop {
        let mut p = pairs.clone();
        if let Some(a) = &after {
            p.push(("after", a.clone()));
        }
        let page = client.get(&format!(
            "/collections/{}/records{}",
            enc(&l.collection),
            query(&p)
        ))?;
        records.extend(page["records"].as_array().cloned().unwrap_or_default());
        next = page["next"].as_str().map(str::to_string);
        if !l.all || next.is_none() {
            break;
        }
        after = next.clone();
    }
    if json {
        print_json(&json!({ "records": records, "next": next }));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let fields = r["fields"]
                .as_object()
                .map(|f| {
                    f.iter()
                        .map(|(k, v)| format!("{k}={}", cell(v)))
                        .collect::<Vec<_>>()
                        .join("  ")
                })
                .unwrap_or_default();
            vec![
                cell(&r["id"]),
                if r["deleted"].as_bool() == Some(true) {
                    "deleted".into()
                } else {
                    String::new()
                },
                fields,
            ]
        })
        .collect();
    table(&["ID", "", "FIELDS"], &rows);
    if let Some(n) = next {
        eprintln!("more: --after {n}");
    }
    Ok(())
}

/// `history`
pub fn history(client: &Client, id: &str, json: bool) -> CliResult {
    let h = client.get(&format!("/records/{}/history", enc(id)))?;
    if json {
        print_json(&h);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = h["history"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let mut what: Vec<String> = e["fields"]
                        .as_object()
                        .map(|f| f.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect())
                        .unwrap_or_default();
                    if e["deleted"].as_bool() == Some(true) {
                        what.insert(0, "(deleted)".into());
                    }
                    if e["restored"].as_bool() == Some(true) {
                        what.insert(0, "(restored)".into());
                    }
                    vec![
                        time(e["time_ms"].as_i64().unwrap_or(0)),
                        short(&e["node"]),
                        cell(&e["op"]),
                        short(&e["change"]),
                        what.join("  "),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["WHEN", "NODE", "OP", "CHANGE", "WROTE"], &rows);
    Ok(())
}
