//! Operations: health, status, peers (through the node's hooks), metrics in
//! Prometheus text format.

use std::fmt::Write as _;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::{ApiError, ApiState, HookError, PeerInfo};

/// `GET /health` (never needs the token).
pub async fn health() -> Json<Json_> {
    Json(json!({ "ok": true }))
}

async fn hook<T, F>(state: &ApiState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn super::NodeHooks) -> Result<T, HookError> + Send + 'static,
{
    let hooks = state.hooks.clone();
    tokio::task::spawn_blocking(move || f(hooks.as_ref()))
        .await
        .map_err(|e| ApiError::internal(format!("hook task failed: {e}")))?
        .map_err(ApiError::from)
}

/// `GET /status`
pub async fn status(State(state): State<ApiState>) -> Result<Json<Json_>, ApiError> {
    let (node, stats) = state.with_store(|s| Ok((s.node_id(), s.stats()?))).await?;
    let (peers, net) = hook(&state, |h| Ok((h.peers(), h.metrics()))).await?;
    let networked = state.hooks.networked();
    let open: u64 = stats.open_collisions.values().sum();
    Ok(Json(json!({
        "node_id": node,
        "networked": networked,
        "peers": peers.len(),
        "connected_peers": peers.iter().filter(|p| p.connected).count(),
        "feed_seq": stats.feed_seq,
        "records": stats.records,
        "live_records": stats.live_records,
        "open_collisions": open,
        "open_collisions_by_kind": stats.open_collisions,
        "resolved_collisions": stats.resolved_collisions,
        "pending_changes": stats.pending_changes,
        "quarantined": stats.quarantined,
        "records_rejected": net.records_rejected,
        "records_ignored": net.records_ignored,
    })))
}

/// `GET /quarantine`: every quarantined input (record, reason, peer,
/// refused change hashes, time).
pub async fn quarantine(State(state): State<ApiState>) -> Result<Json<Json_>, ApiError> {
    let entries = state.with_store(|s| Ok(s.quarantine()?)).await?;
    Ok(Json(json!({ "quarantine": entries })))
}

/// `DELETE /quarantine/{record}`: releases the record's quarantine entries
/// (its refused changes are accepted again). `404 NOT_QUARANTINED` when it
/// has none.
pub async fn release_quarantine(
    State(state): State<ApiState>,
    Path(record): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let id = super::record_id(&record)?;
    let rid = id.clone();
    let released = state
        .with_store(move |s| Ok(s.release_quarantine(&rid)?))
        .await?;
    if released == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_QUARANTINED",
            format!("{id} has no quarantine entry"),
        ));
    }
    Ok(Json(json!({ "record": id, "released": released })))
}

/// `GET /peers`
pub async fn peers(State(state): State<ApiState>) -> Result<Json<Json_>, ApiError> {
    let peers = hook(&state, |h| Ok(h.peers())).await?;
    Ok(Json(json!({ "peers": peers })))
}

/// Body of `POST /peers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddPeer {
    /// A multiaddr (`/ip4/127.0.0.1/tcp/7071/p2p/…`).
    pub addr: String,
}

/// `POST /peers`
pub async fn add_peer(
    State(state): State<ApiState>,
    body: Result<Json<AddPeer>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let p: PeerInfo = hook(&state, move |h| h.add_peer(&body.addr)).await?;
    Ok((StatusCode::CREATED, Json(json!({ "peer": p }))).into_response())
}

/// `DELETE /peers/{id}`
pub async fn remove_peer(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    hook(&state, move |h| h.remove_peer(&id)).await?;
    Ok(Json(json!({ "ok": true })))
}

/// `POST /peers/{id}/block`
pub async fn block(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    hook(&state, move |h| h.block(&id)).await?;
    Ok(Json(json!({ "ok": true })))
}

/// `POST /peers/{id}/unblock`
pub async fn unblock(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    hook(&state, move |h| h.unblock(&id)).await?;
    Ok(Json(json!({ "ok": true })))
}

/// `POST /peers/{id}/verify`: compare and repair with a connected peer;
/// the answer is the run's report with `peer` added.
pub async fn verify(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let peer = id.clone();
    let report = hook(&state, move |h| h.verify(&id)).await?;
    let mut v = serde_json::to_value(&report)
        .map_err(|e| ApiError::internal(format!("verify report: {e}")))?;
    if let Some(m) = v.as_object_mut() {
        m.insert("peer".into(), Json_::String(peer));
    }
    Ok(Json(v))
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `GET /metrics` (Prometheus text format 0.0.4)
pub async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let stats = state.with_store(|s| Ok(s.stats()?)).await?;
    let (peers, net) = hook(&state, |h| Ok((h.peers(), h.metrics()))).await?;
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, lines: Vec<(String, u64)>| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    gauge(
        "entente_records",
        "Records held, deleted included.",
        "gauge",
        vec![(String::new(), stats.records)],
    );
    gauge(
        "entente_live_records",
        "Records held that are not deleted.",
        "gauge",
        vec![(String::new(), stats.live_records)],
    );
    gauge(
        "entente_feed_seq",
        "Latest sequence of the changes feed.",
        "gauge",
        vec![(String::new(), stats.feed_seq)],
    );
    let kinds = [
        "duplicate",
        "update_delete",
        "dangling_reference",
        "flagged_field",
    ];
    gauge(
        "entente_open_collisions",
        "Open collisions by kind.",
        "gauge",
        kinds
            .iter()
            .map(|k| {
                (
                    format!("{{kind=\"{k}\"}}"),
                    stats.open_collisions.get(*k).copied().unwrap_or(0),
                )
            })
            .collect(),
    );
    gauge(
        "entente_resolved_collisions",
        "Resolved collisions.",
        "gauge",
        vec![(String::new(), stats.resolved_collisions)],
    );
    gauge(
        "entente_pending_changes",
        "Remote changes waiting for their dependencies.",
        "gauge",
        vec![(String::new(), stats.pending_changes)],
    );
    gauge(
        "entente_peers",
        "Known peers.",
        "gauge",
        vec![(String::new(), peers.len() as u64)],
    );
    gauge(
        "entente_peer_sync_lag",
        "Feed entries of a peer not yet pulled.",
        "gauge",
        peers
            .iter()
            .filter_map(|p| p.lag.map(|l| (format!("{{peer=\"{}\"}}", label(&p.id)), l)))
            .collect(),
    );
    gauge(
        "entente_applied_changes_total",
        "Remote changes applied.",
        "counter",
        vec![(String::new(), net.applied_changes)],
    );
    gauge(
        "entente_bytes_in_total",
        "Bytes received from peers.",
        "counter",
        vec![(String::new(), net.bytes_in)],
    );
    gauge(
        "entente_bytes_out_total",
        "Bytes sent to peers.",
        "counter",
        vec![(String::new(), net.bytes_out)],
    );
    gauge(
        "entente_records_rejected_total",
        "Records from peers the store refused (quarantined).",
        "counter",
        vec![(String::new(), net.records_rejected)],
    );
    gauge(
        "entente_records_ignored_total",
        "Records of collections not replicated here that peers sent anyway (dropped).",
        "counter",
        vec![(String::new(), net.records_ignored)],
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], o).into_response())
}

/// `GET /schema`: the running schema (fingerprint and collections), so
/// clients can type `FIELD=VALUE` text.
pub async fn schema(State(state): State<ApiState>) -> Result<Json<Json_>, ApiError> {
    let v = state
        .with_store(|s| {
            Ok(json!({
                "fingerprint": s.schema().fingerprint(),
                "collections": s.schema().collections(),
            }))
        })
        .await?;
    Ok(Json(v))
}
