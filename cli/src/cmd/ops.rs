//! `status` and `peers`.

use clap::Subcommand;
use serde_json::{Value as Json, json};

use super::{cell, table};
use crate::client::{CliError, CliResult, Client, enc, print_json};

#[derive(Debug, Subcommand)]
pub enum PeerAction {
    /// Dial and remember a peer address.
    Add {
        /// Multiaddr, e.g. `/ip4/127.0.0.1/tcp/7071/p2p/<peer id>`.
        addr: String,
    },
    /// Forget a peer.
    Remove {
        /// Peer id.
        id: String,
    },
    /// Refuse a peer from now on.
    Block {
        /// Peer id.
        id: String,
    },
    /// Lift a block.
    Unblock {
        /// Peer id.
        id: String,
    },
}

/// `status`
pub fn status(client: &Client, json: bool) -> CliResult {
    let s = client.get("/status")?;
    if json {
        print_json(&s);
        return Ok(());
    }
    let mut rows = Vec::new();
    for k in [
        "node_id",
        "networked",
        "peers",
        "connected_peers",
        "feed_seq",
        "records",
        "live_records",
        "open_collisions",
        "resolved_collisions",
        "pending_changes",
        "quarantined",
    ] {
        rows.push(vec![k.replace('_', " "), cell(&s[k])]);
    }
    if let Some(m) = s["open_collisions_by_kind"].as_object() {
        for (k, v) in m {
            rows.push(vec![format!("  {k}"), cell(v)]);
        }
    }
    table(&["", ""], &rows);
    Ok(())
}

fn print_peers(v: &Json) {
    let yes_no = |b: &Json| {
        if b.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
        .to_string()
    };
    let rows: Vec<Vec<String>> = v["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let addrs: Vec<String> = p["addrs"]
                        .as_array()
                        .map(|a| a.iter().map(cell).collect())
                        .unwrap_or_default();
                    let last_sync = match p["last_sync_ms_ago"].as_u64() {
                        Some(ms) => format!("{:.1} s ago", ms as f64 / 1000.0),
                        None => String::new(),
                    };
                    vec![
                        cell(&p["id"]),
                        yes_no(&p["connected"]),
                        yes_no(&p["syncing"]),
                        yes_no(&p["blocked"]),
                        cell(&p["lag"]),
                        last_sync,
                        addrs.join(" "),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "PEER",
            "CONNECTED",
            "SYNCING",
            "BLOCKED",
            "LAG",
            "LAST SYNC",
            "ADDRESSES",
        ],
        &rows,
    );
}

/// `peers [add|remove|block|unblock]`
pub fn peers(client: &Client, action: Option<PeerAction>, json: bool) -> CliResult {
    let out = match action {
        None => {
            let v = client.get("/peers")?;
            if json {
                print_json(&v);
            } else {
                print_peers(&v);
            }
            return Ok(());
        }
        Some(PeerAction::Add { addr }) => {
            client.json("POST", "/peers", Some(&json!({ "addr": addr })))?
        }
        Some(PeerAction::Remove { id }) => {
            client.json("DELETE", &format!("/peers/{}", enc(&id)), None)?
        }
        Some(PeerAction::Block { id }) => {
            client.json("POST", &format!("/peers/{}/block", enc(&id)), None)?
        }
        Some(PeerAction::Unblock { id }) => {
            client.json("POST", &format!("/peers/{}/unblock", enc(&id)), None)?
        }
    };
    if json {
        print_json(&out);
    } else {
        println!("ok");
    }
    Ok(())
}

/// `verify --peer ID`: compare and repair. Exit 0 when the run completed
/// (whether or not records differed: they were repaired), 1 when it broke
/// off or a record could not be repaired (refused by the store).
pub fn verify(client: &Client, peer: &str, json: bool) -> CliResult {
    let r = client.json("POST", &format!("/peers/{}/verify", enc(peer)), None)?;
    if json {
        print_json(&r);
    } else {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "verify with {peer}: {} of this node's {} records differed; {} repaired here, {} offered to the peer",
            n("differing"),
            n("local_records"),
            n("repaired"),
            n("records_offered"),
        );
        println!(
            "{} rounds, {} ranges compared, {} messages sent / {} received, {} bytes sent / {} received",
            n("rounds"),
            n("ranges_compared"),
            n("messages_sent"),
            n("messages_received"),
            n("bytes_sent"),
            n("bytes_received"),
        );
        let repaired: Vec<&str> = r["records_repaired"]
            .as_array()
            .map(|a| a.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        let rows: Vec<Vec<String>> = r["records_differing"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|id| {
                        let id = cell(id);
                        let here = if repaired.contains(&id.as_str()) {
                            "repaired here"
                        } else {
                            "offered to the peer"
                        };
                        vec![id, here.to_string()]
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !rows.is_empty() {
            table(&["RECORD", "OUTCOME"], &rows);
        }
        let listed = rows.len() as u64;
        if n("differing") > listed {
            println!("… and {} more", n("differing") - listed);
        }
    }
    if r["complete"].as_bool() != Some(true) {
        return Err(CliError::other(format!(
            "verify did not complete: {}",
            cell(&r["error"])
        )));
    }
    if r["records_rejected"].as_u64().unwrap_or(0) > 0 {
        return Err(CliError::other(format!(
            "{} records could not be repaired (refused by the store; see the node's log)",
            r["records_rejected"]
        )));
    }
    Ok(())
}
