//! Import and export of JSON lines.
//!
//! Import (`POST /import`, body: one record per line, streamed) reads the body
//! in batches of [`IMPORT_BATCH`] lines. Each line is
//! `{"collection": C, "id"?: ID, "fields": {…}, "force"?: bool}` — an exported
//! line works as is (its other keys are ignored). A batch is created with one
//! atomic `create_many`; when the store refuses it, the batch is split in
//! halves until the refused lines stand alone, and those are applied one by
//! one: a line whose id exists updates that record, a line without id whose
//! unique value is already held updates the holder (so importing a file
//! twice changes nothing the second time), anything else is reported with its
//! line number and code. Bad lines never drop good ones.
//!
//! Export (`GET /export?collection=C&deleted=true`) streams the records as
//! JSON lines, one page per lock.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use entente_model::RecordId;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json_, json};

use super::{ApiError, ApiState};
use crate::error::Error;
use crate::store::{NewRecord, Store};

/// Lines created per atomic batch.
pub const IMPORT_BATCH: usize = 1000;
/// Longest line accepted (bytes).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most line errors listed in an import report (all are counted).
pub const MAX_REPORTED_ERRORS: usize = 1000;
/// Records per exported page.
const EXPORT_PAGE: usize = 1000;

/// One refused line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineError {
    /// Line number (1-based).
    pub line: u64,
    /// Stable code.
    pub code: String,
    /// For people.
    pub message: String,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImportReport {
    /// Non-blank lines read.
    pub lines: u64,
    /// Records created.
    pub created: u64,
    /// Existing records (matched by id or unique value) changed.
    pub updated: u64,
    /// Existing records matched and already equal.
    pub unchanged: u64,
    /// Lines refused.
    pub failed: u64,
    /// The first refused lines.
    pub errors: Vec<LineError>,
}

impl ImportReport {
    fn fail(&mut self, line: u64, code: &str, message: String) {
        self.failed += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(LineError {
                line,
                code: code.to_string(),
                message,
            });
        }
    }
}

/// A parsed line.
#[derive(Debug, Clone)]
struct Line {
    no: u64,
    item: NewRecord,
}

/// Parses one line; `Err` is (code, message).
fn parse_line(text: &[u8]) -> Result<NewRecord, (String, String)> {
    let bad = |code: &str, m: String| (code.to_string(), m);
    let v: Json_ =
        serde_json::from_slice(text).map_err(|e| bad("MALFORMED_JSON", e.to_string()))?;
    let Json_::Object(mut m) = v else {
        return Err(bad("INVALID_LINE", "a line must be a JSON object".into()));
    };
    let collection = match m.remove("collection") {
        Some(Json_::String(c)) => c,
        _ => {
            return Err(bad(
                "INVALID_LINE",
                "`collection` (a string) is required".into(),
            ));
        }
    };
    let id = match m.remove("id") {
        None | Some(Json_::Null) => None,
        Some(Json_::String(s)) => {
            Some(RecordId::parse(&s).map_err(|e| bad(e.code(), e.to_string()))?)
        }
        Some(_) => return Err(bad("INVALID_LINE", "`id` must be a string".into())),
    };
    let fields = match m.remove("fields") {
        Some(Json_::Object(f)) => f,
        _ => {
            return Err(bad(
                "INVALID_LINE",
                "`fields` (an object) is required".into(),
            ));
        }
    };
    let force = match m.remove("force") {
        None => false,
        Some(Json_::Bool(b)) => b,
        Some(_) => return Err(bad("INVALID_LINE", "`force` must be a boolean".into())),
    };
    if m.get("deleted") == Some(&Json_::Bool(true)) {
        return Err(bad(
            "DELETED_LINE",
            "import creates and updates live records; a deleted record is not imported".into(),
        ));
    }
    Ok(NewRecord {
        collection,
        id,
        fields,
        force,
    })
}

/// Writes made by a batch: (id, heads, seq) to tell the node about.
type Written = Vec<(RecordId, Vec<String>, u64)>;

fn apply_one(s: &mut Store, line: &Line, report: &mut ImportReport, written: &mut Written) {
    let it = &line.item;
    let matched = match s.create(&it.collection, it.id.clone(), &it.fields, it.force) {
        Ok(w) => {
            report.created += 1;
            written.push((w.record.id, w.record.heads, w.record.seq));
            return;
        }
        Err(Error::AlreadyExists(id)) => id,
        Err(Error::Duplicate { existing, .. }) if it.id.is_none() => existing,
        Err(e) => return report.fail(line.no, &e.code(), e.to_string()),
    };
    // The line names an existing record (by id or unique value): update it.
    let collection = match s.get(&matched) {
        Ok(Some(v)) => v.collection,
        Ok(None) => return report.fail(line.no, "NOT_FOUND", format!("no record {matched}")),
        Err(e) => return report.fail(line.no, &e.code(), e.to_string()),
    };
    if collection != it.collection {
        return report.fail(
            line.no,
            "COLLECTION_MISMATCH",
            format!(
                "record {matched} is in `{collection}`, the line says `{}`",
                it.collection
            ),
        );
    }
    match s.update(&matched, &it.fields, None, it.force) {
        Ok(w) if w.change.is_some() => {
            report.updated += 1;
            written.push((w.record.id, w.record.heads, w.record.seq));
        }
        Ok(_) => report.unchanged += 1,
        Err(e) => report.fail(line.no, &e.code(), e.to_string()),
    }
}

/// Creates `lines` in one batch, or splits it until the refused lines stand
/// alone.
fn apply_batch(s: &mut Store, lines: &[Line], report: &mut ImportReport, written: &mut Written) {
    if lines.is_empty() {
        return;
    }
    if lines.len() == 1 {
        return apply_one(s, &lines[0], report, written);
    }
    let items: Vec<NewRecord> = lines.iter().map(|l| l.item.clone()).collect();
    match s.create_many(items) {
        Ok(ws) => {
            report.created += ws.len() as u64;
            written.extend(
                ws.into_iter()
                    .map(|w| (w.record.id, w.record.heads, w.record.seq)),
            );
        }
        Err(_) => {
            let (a, b) = lines.split_at(lines.len() / 2);
            apply_batch(s, a, report, written);
            apply_batch(s, b, report, written);
        }
    }
}

/// Validates what can be checked without the store (schema and types), so
/// that only store-level refusals make a batch split.
fn prevalidate(s: &Store, line: &Line) -> Result<(), (String, String)> {
    entente_model::Edit::from_json(s.schema(), &line.item.collection, &line.item.fields)
        .map(|_| ())
        .map_err(|e| (e.code().to_string(), e.to_string()))
}

async fn run_batch(
    state: &ApiState,
    batch: Vec<Line>,
    report: ImportReport,
) -> Result<ImportReport, ApiError> {
    let (report, written) = state
        .with_store(move |s| {
            let mut report = report;
            let mut ok = Vec::with_capacity(batch.len());
            for l in batch {
                match prevalidate(s, &l) {
                    Ok(()) => ok.push(l),
                    Err((code, m)) => report.fail(l.no, &code, m),
                }
            }
            let mut written = Vec::new();
            apply_batch(s, &ok, &mut report, &mut written);
            Ok((report, written))
        })
        .await?;
    let mut max_seq = 0;
    for (id, heads, seq) in &written {
        state.hooks.local_change(id, heads);
        max_seq = max_seq.max(*seq);
    }
    state.feed_changed(max_seq);
    Ok(report)
}

/// `POST /import` (`Content-Type: application/x-ndjson`; `application/jsonl`
/// and `text/plain` are taken too — never a form type, so a browser page of
/// another origin cannot post one)
pub async fn import(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<ImportReport>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if ![
        "application/x-ndjson",
        "application/jsonl",
        "application/json-lines",
    ]
    .contains(&mime.as_str())
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "expected `Content-Type: application/x-ndjson`",
        ));
    }
    let mut stream = body.into_data_stream();
    let mut report = ImportReport::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut line_no: u64 = 0;
    let mut skipping = false; // inside a line longer than the cap
    let mut batch: Vec<Line> = Vec::with_capacity(IMPORT_BATCH);
    let mut eof = false;
    while !eof {
        match stream.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => {
                return Err(ApiError::bad_request(
                    "BODY_READ_FAILED",
                    format!("reading the body failed: {e}"),
                ));
            }
            None => {
                eof = true;
                if !buf.is_empty() {
                    buf.push(b'\n');
                }
            }
        }
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            let text = &buf[start..start + pos];
            start += pos + 1;
            line_no += 1;
            if skipping {
                skipping = false;
                continue;
            }
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            report.lines += 1;
            if text.len() > MAX_LINE_BYTES {
                report.fail(
                    line_no,
                    "LINE_TOO_LONG",
                    format!("longer than {MAX_LINE_BYTES} bytes"),
                );
                continue;
            }
            match parse_line(text) {
                Ok(item) => batch.push(Line { no: line_no, item }),
                Err((code, m)) => report.fail(line_no, &code, m),
            }
        }
        buf.drain(..start);
        if buf.len() > MAX_LINE_BYTES && !skipping {
            // The current line is too long: report it and drop it up to its end.
            report.lines += 1;
            report.fail(
                line_no + 1,
                "LINE_TOO_LONG",
                format!("longer than {MAX_LINE_BYTES} bytes"),
            );
            skipping = true;
            buf.clear();
        } else if skipping {
            buf.clear();
        }
        if batch.len() >= IMPORT_BATCH || (eof && !batch.is_empty()) {
            let b = std::mem::take(&mut batch);
            report = run_batch(&state, b, report).await?;
        }
    }
    // Parse errors are found while reading, the others per batch: list by line.
    report.errors.sort_by_key(|e| e.line);
    Ok(axum::Json(report))
}

/// Query of `GET /export`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// Only this collection (default: all).
    pub collection: Option<String>,
    /// Include deleted records.
    #[serde(default)]
    pub deleted: bool,
}

/// The exported line of a record.
pub fn export_line(r: &crate::store::RecordView) -> Json_ {
    json!({
        "id": r.id,
        "collection": r.collection,
        "fields": r.fields,
        "deleted": r.deleted,
        "heads": r.heads,
    })
}

/// `GET /export`
pub async fn export(
    State(state): State<ApiState>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let collections: Vec<String> = {
        let wanted = q.collection.clone();
        state
            .with_store(move |s| match wanted {
                Some(c) => {
                    s.schema().collection(&c)?;
                    Ok(vec![c])
                }
                None => Ok(s.schema().collections().keys().cloned().collect()),
            })
            .await?
    };
    let include_deleted = q.deleted;
    let start = (state, collections, 0usize, None::<RecordId>, false);
    let stream =
        futures_util::stream::unfold(start, move |(state, cols, i, after, done)| async move {
            if done || i >= cols.len() {
                return None;
            }
            let (c, a) = (cols[i].clone(), after.clone());
            let page = state
                .with_store(move |s| {
                    let page = s.list(&c, a.as_ref(), EXPORT_PAGE, include_deleted)?;
                    let mut out = Vec::new();
                    for r in &page.records {
                        serde_json::to_writer(&mut out, &export_line(r))
                            .map_err(|e| ApiError::internal(e.to_string()))?;
                        out.push(b'\n');
                    }
                    Ok((out, page.next))
                })
                .await;
            match page {
                Ok((bytes, Some(next))) => Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(bytes)),
                    (state, cols, i, Some(next), false),
                )),
                Ok((bytes, None)) => {
                    Some((Ok(Bytes::from(bytes)), (state, cols, i + 1, None, false)))
                }
                // Cut the stream: the client sees a truncated answer, not a
                // silently short one.
                Err(e) => Some((
                    Err(std::io::Error::other(e.message)),
                    (state, cols, i, None, true),
                )),
            }
        });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}
