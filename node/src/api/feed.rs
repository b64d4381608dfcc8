//! The changes feed: `GET /changes?since=N&limit=M&wait=S` answers JSON
//! lines, one per record changed after sequence `N` (each record once, at its
//! latest sequence), oldest first. With `wait`, an empty answer is held until
//! something changes or `wait` seconds pass (long poll).

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiState};

/// Entries per answer unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 1000;
/// Most entries per answer.
pub const MAX_LIMIT: usize = 10_000;
/// Longest long poll (seconds).
pub const MAX_WAIT_S: u64 = 60;

/// Query of `GET /changes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    /// Entries after this sequence (default 0: from the start).
    #[serde(default)]
    pub since: u64,
    /// Most entries (1..=10000, default 1000).
    pub limit: Option<usize>,
    /// Seconds to wait for a change when there is none yet (0..=60).
    #[serde(default)]
    pub wait: u64,
}

/// The answer header naming the sequence to pass as the next `since`.
pub const NEXT_HEADER: &str = "x-entente-next-since";

/// `GET /changes`
pub async fn changes(
    State(state): State<ApiState>,
    query: Result<Query<FeedQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "BAD_QUERY",
            format!("limit must be 1..={MAX_LIMIT}"),
        ));
    }
    if q.wait > MAX_WAIT_S {
        return Err(ApiError::bad_request(
            "BAD_QUERY",
            format!("wait must be 0..={MAX_WAIT_S} seconds"),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait);
    let mut rx = state.subscribe_feed();
    let since = q.since;
    let (lines, next) = loop {
        rx.borrow_and_update();
        let (lines, next) = state
            .with_store(move |s| {
                let entries = s.changes_since(since, limit)?;
                let mut out = String::new();
                let mut next = since;
                let schema = s.schema().clone();
                for e in entries {
                    let fields = s
                        .read_record(&e.id, |r| r.fields_json(&schema))?
                        .unwrap_or_default();
                    next = e.seq;
                    out.push_str(
                        &json!({
                            "seq": e.seq,
                            "collection": e.collection,
                            "id": e.id,
                            "deleted": e.deleted,
                            "fields": fields,
                            "heads": e.heads,
                        })
                        .to_string(),
                    );
                    out.push('\n');
                }
                Ok((out, next))
            })
            .await?;
        if !lines.is_empty() || tokio::time::Instant::now() >= deadline {
            break (lines, next);
        }
        // Nothing yet: wait for a write (or the deadline), then look again.
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            break (lines, next);
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::HeaderName::from_static(NEXT_HEADER),
                next.to_string(),
            ),
        ],
        lines,
    )
        .into_response())
}
