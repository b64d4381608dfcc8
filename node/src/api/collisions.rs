//! Collisions: list, show side by side, resolve.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use entente_model::{Collision, CollisionId, CollisionKind, ResolveRequest};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::{ApiError, ApiState, record_id};
use crate::store::CollisionFilter;

/// Query of `GET /collisions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `open` (default), `resolved` or `all`.
    pub status: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this collection.
    pub collection: Option<String>,
    /// Only those involving this record.
    pub record: Option<String>,
}

fn collision_id(s: &str) -> Result<CollisionId, ApiError> {
    CollisionId::parse(s).map_err(|e| ApiError::bad_request("INVALID_ID", e.to_string()))
}

/// The side-by-side view: for each field any side shows, each side's value,
/// which node wrote it and when (when the side competes on that field), and
/// whether the sides differ.
pub fn side_by_side(c: &Collision) -> Json_ {
    let mut names = BTreeSet::new();
    for s in &c.sides {
        names.extend(s.fields.keys().cloned());
        names.extend(s.values.keys().cloned());
    }
    let rows: Vec<Json_> = names
        .into_iter()
        .map(|f| {
            let cells: Vec<Json_> = c
                .sides
                .iter()
                .map(|s| match s.values.get(&f) {
                    Some(v) => json!({ "value": v.value, "node": v.node, "at_ms": v.at_ms }),
                    None => json!({
                        "value": s.fields.get(&f).cloned().unwrap_or(Json_::Null),
                        "node": Json_::Null,
                        "at_ms": Json_::Null,
                    }),
                })
                .collect();
            let differs = cells.windows(2).any(|w| w[0]["value"] != w[1]["value"]);
            json!({ "field": f, "sides": cells, "differs": differs })
        })
        .collect();
    Json_::Array(rows)
}

fn collision_json(c: &Collision) -> Json_ {
    let mut v = serde_json::to_value(c).unwrap_or(Json_::Null);
    if let Json_::Object(m) = &mut v {
        m.insert("table".into(), side_by_side(c));
    }
    v
}

/// `GET /collisions?status=open|resolved|all&kind=K&collection=C&record=ID`
pub async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(q) = query?;
    let (include_resolved, only_resolved) = match q.status.as_deref() {
        None | Some("open") => (false, false),
        Some("resolved") => (true, true),
        Some("all") => (true, false),
        Some(o) => {
            return Err(ApiError::bad_request(
                "BAD_QUERY",
                format!("status must be open, resolved or all, not `{o}`"),
            ));
        }
    };
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(CollisionKind::parse(k).ok_or_else(|| {
            ApiError::bad_request(
                "BAD_QUERY",
                format!(
                    "kind must be duplicate, update_delete, dangling_reference or flagged_field, not `{k}`"
                ),
            )
        })?),
    };
    let filter = CollisionFilter {
        include_resolved,
        kind,
        collection: q.collection,
        record: q.record.as_deref().map(record_id).transpose()?,
    };
    let list = state
        .with_store(move |s| Ok(s.collisions(&filter)?))
        .await?;
    let list: Vec<Json_> = list
        .iter()
        .filter(|c| !only_resolved || !c.is_open())
        .map(|c| serde_json::to_value(c).unwrap_or(Json_::Null))
        .collect();
    Ok(Json(json!({ "collisions": list })))
}

/// `GET /collisions/{id}`: the collision plus its side-by-side `table`.
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let cid = collision_id(&id)?;
    let c = state
        .with_store(move |s| {
            s.collision(&cid)?
                .ok_or_else(|| crate::Error::CollisionNotFound(cid.to_string()).into())
        })
        .await?;
    Ok(Json(collision_json(&c)))
}

/// `POST /collisions/{id}/resolve` with an `entente_model::ResolveRequest`:
/// answers the collision as resolved and the records it changed.
pub async fn resolve(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<ResolveRequest>, JsonRejection>,
) -> Result<Json<Json_>, ApiError> {
    let cid = collision_id(&id)?;
    let Json(req) = body?;
    let (c, records) = state
        .with_store(move |s| {
            let c = s.resolve(&cid, &req)?;
            let mut records = Vec::new();
            for r in &c.records {
                if let Some(v) = s.get(r)? {
                    records.push(v);
                }
            }
            Ok((c, records))
        })
        .await?;
    let mut max_seq = 0;
    for r in &records {
        if r.requested_id.is_none() {
            state.hooks.local_change(&r.id, &r.heads);
        }
        max_seq = max_seq.max(r.seq);
    }
    state.feed_changed(max_seq);
    Ok(Json(
        json!({ "collision": collision_json(&c), "records": records }),
    ))
}
