//! Records: create, get, partial update (optionally based on older heads),
//! delete, restore, list, history, raw Automerge bytes.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use entente_model::RecordId;
use serde::Deserialize;
use serde_json::{Map, Value as Json_, json};

use super::{ApiError, ApiState, record_id};
use crate::store::{RecordView, WriteResult};

/// Records per listed page unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page.
pub const MAX_PAGE: usize = 1000;

/// Body of `POST /collections/{collection}/records`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Id to give the record (UUID or ULID); minted when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Field values.
    #[serde(default)]
    pub fields: Map<String, Json_>,
    /// Write through a duplicate.
    #[serde(default)]
    pub force: bool,
}

/// Body of `PATCH /records/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// Fields to set (`null` unsets).
    pub fields: Map<String, Json_>,
    /// Heads the client read: the edit is applied as of that version.
    #[serde(default)]
    pub base: Option<Vec<String>>,
    /// Write through a duplicate.
    #[serde(default)]
    pub force: bool,
}

/// Body of `POST /records/{id}/restore` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// Fields to set while restoring.
    #[serde(default)]
    pub fields: Map<String, Json_>,
    /// Write through a duplicate.
    #[serde(default)]
    pub force: bool,
}

/// The JSON answer to a write.
pub fn write_json(w: &WriteResult) -> Json_ {
    json!({
        "record": w.record,
        "change": w.change,
        "concurrent": w.concurrent,
    })
}

fn finish_write(state: &ApiState, w: &WriteResult) {
    if w.change.is_some() {
        state.wrote(&w.record.id, &w.record.heads, w.record.seq);
    }
}

/// `POST /collections/{collection}/records`
pub async fn create(
    State(state): State<ApiState>,
    Path(collection): Path<String>,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let id = body.id.as_deref().map(record_id).transpose()?;
    let w = state
        .with_store(move |s| Ok(s.create(&collection, id, &body.fields, body.force)?))
        .await?;
    finish_write(&state, &w);
    Ok((StatusCode::CREATED, Json(write_json(&w))).into_response())
}

/// `GET /records/{id}`
pub async fn get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<RecordView>, ApiError> {
    let id = record_id(&id)?;
    let view = state
        .with_store(move |s| {
            s.get(&id)?
                .ok_or_else(|| crate::Error::NotFound(id.to_string()).into())
        })
        .await?;
    Ok(Json(view))
}

/// `PATCH /records/{id}`: the answer lists under `concurrent` each touched
/// field someone else changed since `base` (base, existing and new value).
pub async fn update(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<UpdateBody>, JsonRejection>,
) -> Result<Json<Json_>, ApiError> {
    let id = record_id(&id)?;
    let Json(body) = body?;
    let w = state
        .with_store(move |s| Ok(s.update(&id, &body.fields, body.base.as_deref(), body.force)?))
        .await?;
    finish_write(&state, &w);
    Ok(Json(write_json(&w)))
}

/// `DELETE /records/{id}`
pub async fn delete(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let id = record_id(&id)?;
    let w = state.with_store(move |s| Ok(s.delete(&id)?)).await?;
    finish_write(&state, &w);
    Ok(Json(write_json(&w)))
}

/// `POST /records/{id}/restore` (body optional)
pub async fn restore(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Json_>, ApiError> {
    let id = record_id(&id)?;
    let body: RestoreBody = if body.iter().all(u8::is_ascii_whitespace) {
        RestoreBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            if e.is_data() {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "INVALID_BODY",
                    e.to_string(),
                )
            } else {
                ApiError::bad_request("MALFORMED_JSON", e.to_string())
            }
        })?
    };
    let w = state
        .with_store(move |s| Ok(s.restore(&id, &body.fields, body.force)?))
        .await?;
    finish_write(&state, &w);
    Ok(Json(write_json(&w)))
}

/// `GET /records/{id}/history`
pub async fn history(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    let id = record_id(&id)?;
    let h = state.with_store(move |s| Ok(s.history(&id)?)).await?;
    Ok(Json(json!({ "history": h })))
}

/// `GET /records/{id}/raw`: the saved Automerge document.
pub async fn raw(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = record_id(&id)?;
    let bytes = state.with_store(move |s| Ok(s.raw_document(&id)?)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Does a record's field equal the filter text?
pub fn field_matches(fields: &Map<String, Json_>, field: &str, want: &str) -> bool {
    match fields.get(field) {
        Some(Json_::String(s)) => s == want,
        Some(Json_::Null) | None => false,
        Some(v) => *v == serde_json::from_str::<Json_>(want).unwrap_or(Json_::Null),
    }
}

/// `GET /collections/{collection}/records?after=ID&limit=N&deleted=true&FIELD=VALUE…`
pub async fn list(
    State(state): State<ApiState>,
    Path(collection): Path<String>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<Json_>, ApiError> {
    let Query(mut q) = query?;
    let limit = match q.remove("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("BAD_QUERY", format!("limit must be 1..={MAX_PAGE}"))
            })?,
        None => DEFAULT_PAGE,
    };
    let include_deleted = match q.remove("deleted").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(o) => {
            return Err(ApiError::bad_request(
                "BAD_QUERY",
                format!("deleted must be true or false, not `{o}`"),
            ));
        }
    };
    let mut after: Option<RecordId> = q.remove("after").as_deref().map(record_id).transpose()?;
    let filters: Vec<(String, String)> = q.into_iter().collect();
    {
        let collection = collection.clone();
        let names: Vec<String> = filters.iter().map(|(f, _)| f.clone()).collect();
        state
            .with_store(move |s| {
                s.schema().collection(&collection)?;
                for f in &names {
                    s.schema().field(&collection, f)?;
                }
                Ok(())
            })
            .await?;
    }
    let mut out: Vec<RecordView> = Vec::new();
    let mut next = None;
    // Page through the collection until `limit` matches (one lock per page).
    loop {
        let (c, a, f) = (collection.clone(), after.clone(), filters.clone());
        let page = state
            .with_store(move |s| {
                let page = s.list(&c, a.as_ref(), MAX_PAGE, include_deleted)?;
                let records = page
                    .records
                    .into_iter()
                    .filter(|r| f.iter().all(|(k, v)| field_matches(&r.fields, k, v)))
                    .collect::<Vec<_>>();
                Ok((records, page.next))
            })
            .await?;
        let (records, page_next) = page;
        for r in records {
            if out.len() == limit {
                next = out.last().map(|r: &RecordView| r.id.clone());
                break;
            }
            out.push(r);
        }
        if next.is_some() || page_next.is_none() {
            break;
        }
        if out.len() == limit {
            // The page ended exactly at the limit; more may follow.
            next = out.last().map(|r| r.id.clone());
            break;
        }
        after = page_next;
    }
    Ok(Json(json!({ "records": out, "next": next })))
}
