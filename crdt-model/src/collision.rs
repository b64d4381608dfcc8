//! Collisions: what no merge rule can settle, derived as pure functions of
//! record state, and the plans that settle them.
//!
//! Every function here reads document state and history only (never patches,
//! never arrival order), so every replica holding the same changes finds the
//! same collisions with the same ids:
//!
//! - **update_delete**: the visible tombstone values (`_deleted`) are mapped to
//!   the changes that wrote them; `get_changes(tombstones)` lists exactly the
//!   changes outside their causal past; any of those that writes a user field
//!   (or restores, or keeps the record as the survivor of a merge) is an
//!   update no effective deleter had seen.
//! - **flagged_field**: a field with policy `flag` shows two or more different
//!   concurrent values.
//! - **duplicate**: two or more live records of a collection hold one
//!   normalized value of a unique key (the store's index finds the holders).
//! - **dangling_reference**: a live record refers to a record that is deleted
//!   (and not merged into a survivor). A local write refuses such a reference,
//!   so one can only arise from a delete concurrent with the reference.
//!
//! A resolution is written into every record it involves as an entry under
//! `_resolutions[collision id]`, in the same change as its effect. A collision
//! whose id has an entry is `resolved`. When two sites settle one collision
//! concurrently, both changes merge like any edits, and the entry shown is the
//! greatest by (time, node, token) — the same everywhere. If the two
//! resolutions contradict each other (opposite survivors of a merge, a restore
//! against a confirm-delete with edits), the contradiction is itself a new
//! update-vs-delete collision with a new id: nothing is silently lost.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ChangeHash, ROOT, ReadDoc, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{ModelError, Result};
use crate::ids::{CollisionId, NodeId, RecordId, hex_lower};
use crate::record::{Edit, KEY_DELETED, KEY_RESTORED, Record};
use crate::schema::{MergePolicy, Schema, UniqueKey};
use crate::value::FieldValue;

/// The four kinds of collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollisionKind {
    /// Live records share a unique value.
    Duplicate,
    /// A record was deleted while it was concurrently changed.
    UpdateDelete,
    /// A live record refers to a concurrently deleted record.
    DanglingReference,
    /// Concurrent different values of a field with policy `flag`.
    FlaggedField,
}

impl CollisionKind {
    /// The kind's name as used in ids, the API and the CLI.
    pub fn as_str(&self) -> &'static str {
        match self {
            CollisionKind::Duplicate => "duplicate",
            CollisionKind::UpdateDelete => "update_delete",
            CollisionKind::DanglingReference => "dangling_reference",
            CollisionKind::FlaggedField => "flagged_field",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Option<CollisionKind> {
        Some(match s {
            "duplicate" => CollisionKind::Duplicate,
            "update_delete" => CollisionKind::UpdateDelete,
            "dangling_reference" => CollisionKind::DanglingReference,
            "flagged_field" => CollisionKind::FlaggedField,
            _ => return None,
        })
    }
}

/// One competing value: what, written by which node, when, in which change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideValue {
    /// The value (`null` for an unset).
    pub value: Json,
    /// The node that wrote it.
    pub node: Option<NodeId>,
    /// The wall-clock time recorded with it (ms).
    pub at_ms: i64,
    /// The change (hex hash).
    pub change: String,
}

/// One side of a collision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// The record this side is about.
    pub record: RecordId,
    /// What this side did: `holder`, `deleted`, `updated`, `referrer`,
    /// `target`, `value`.
    pub role: String,
    /// The node that made this side.
    pub node: Option<NodeId>,
    /// The wall-clock time it recorded (ms).
    pub at_ms: i64,
    /// The record's fields as this side shows them (for side by side).
    pub fields: BTreeMap<String, Json>,
    /// The values this side competes with, field by field.
    pub values: BTreeMap<String, SideValue>,
}

/// Who settled a collision, when, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// The resolving node.
    pub by: NodeId,
    /// When (ms).
    pub at_ms: i64,
    /// The action taken (`restore`, `confirm_delete`, `merge`, `set`,
    /// `delete`, `force`).
    pub action: String,
    /// The choices made.
    pub detail: Json,
    /// Makes every entry distinct.
    pub token: String,
}

/// Open or resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a person.
    Open,
    /// Settled.
    Resolved(Resolution),
}

/// A collision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collision {
    /// Deterministic id.
    pub id: CollisionId,
    /// The kind.
    pub kind: CollisionKind,
    /// The collection of the records involved.
    pub collection: String,
    /// The records involved, sorted.
    pub records: Vec<RecordId>,
    /// The field or unique key it is about (`None` for update_delete).
    pub field: Option<String>,
    /// For duplicates: the normalized shared value.
    pub value: Option<String>,
    /// The sides.
    pub sides: Vec<Side>,
    /// Open or resolved.
    pub status: Status,
}

impl Collision {
    /// True while open.
    pub fn is_open(&self) -> bool {
        matches!(self.status, Status::Open)
    }
}

/// A resolution entry as stored in `_resolutions[collision id]`: the
/// collision as it was seen, and how it was settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolutionEntry {
    /// The collision (status open, as seen when settled).
    pub collision: Collision,
    /// How it was settled.
    pub resolution: Resolution,
}

impl ResolutionEntry {
    /// Parses an entry; `None` for text that is not one (a foreign writer).
    pub fn parse(s: &str) -> Option<ResolutionEntry> {
        serde_json::from_str(s).ok()
    }

    /// The JSON text stored in documents.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("entry serializes")
    }

    fn rank(&self) -> (i64, NodeId, &str) {
        (
            self.resolution.at_ms,
            self.resolution.by,
            &self.resolution.token,
        )
    }

    /// Of concurrent entries for one collision, the one every replica shows.
    pub fn winner(entries: impl IntoIterator<Item = ResolutionEntry>) -> Option<ResolutionEntry> {
        entries.into_iter().max_by(|a, b| a.rank().cmp(&b.rank()))
    }
}

fn hashes_hex(h: &[ChangeHash]) -> Vec<u8> {
    let mut v: Vec<_> = h.to_vec();
    v.sort();
    v.dedup();
    v.iter().flat_map(|h| h.0).collect()
}

fn record_id(r: &Record) -> RecordId {
    r.id()
        .unwrap_or_else(|| RecordId::parse("00000000-0000-0000-0000-000000000000").expect("valid"))
}

fn side_value(r: &Record, value: Json, hash: &ChangeHash) -> SideValue {
    let (node, at_ms) = r.change_origin(hash);
    SideValue {
        value,
        node,
        at_ms,
        change: hex_lower(&hash.0),
    }
}

/// The changes that wrote the visible tombstone values, sorted.
pub fn tombstone_changes(r: &Record) -> Vec<ChangeHash> {
    let mut v: Vec<ChangeHash> = r.with_root(KEY_DELETED, |vals| {
        vals.iter()
            .filter_map(|(_, id)| r.doc().hash_for_opid(id))
            .collect()
    });
    v.sort();
    v.dedup();
    v
}

/// The key under which an update-vs-delete side lists a merge that kept the
/// record as its survivor (the value is the settled collision's id).
pub const KEY_MERGE_SURVIVOR: &str = "_merge_survivor";

/// True when `text` is a resolution entry of a merge into `id`.
fn merge_keeps(text: &str, id: &RecordId) -> bool {
    ResolutionEntry::parse(text).is_some_and(|e| {
        e.resolution.action == "merge"
            && e.resolution.detail.get("merge_into").and_then(Json::as_str) == Some(id.as_str())
    })
}

/// Update vs delete on one record (see the module docs).
pub fn detect_update_delete(schema: &Schema, r: &Record) -> Option<Collision> {
    let tombs = tombstone_changes(r);
    if tombs.is_empty() {
        return None;
    }
    let collection = r.collection()?;
    let id = r.id()?;
    // Field -> (latest concurrent value by (time, hash)), from changes the
    // deleters had not seen.
    let mut updated: BTreeMap<String, (i64, String, SideValue)> = BTreeMap::new();
    for c in r.doc().get_changes(&tombs) {
        let hash = c.hash();
        let ex = c.decode();
        for op in &ex.operations {
            let automerge::legacy::Key::Map(k) = &op.key else {
                continue;
            };
            let (k, value) = if op.obj != automerge::legacy::ObjectId::Root {
                // A merge that kept this record as its survivor (an entry
                // under `_resolutions`) is an update too: without it, two
                // opposite merges, or a merge into a record deleted at the
                // same time, would remove every holder unseen.
                match &op.action {
                    automerge::legacy::OpType::Put(automerge::ScalarValue::Str(text))
                        if merge_keeps(text, &id) =>
                    {
                        (KEY_MERGE_SURVIVOR, Json::String(k.to_string()))
                    }
                    _ => continue,
                }
            } else {
                let k = k.as_str();
                if k.starts_with('_') && k != KEY_RESTORED {
                    continue;
                }
                let value = match &op.action {
                    automerge::legacy::OpType::Put(s) => match schema.field(&collection, k) {
                        Ok(def) => FieldValue::from_scalar(&def.ty, s).to_json(),
                        Err(_) => Json::String(s.to_string()),
                    },
                    _ => Json::Null,
                };
                (k, value)
            };
            // The change is at hand: its actor and time name the side
            // without a metadata lookup per op.
            let sv = SideValue {
                value,
                node: NodeId::from_actor(c.actor_id()),
                at_ms: c.timestamp(),
                change: hex_lower(&hash.0),
            };
            let rank = (sv.at_ms, sv.change.clone());
            match updated.get(k) {
                Some((t, h, _)) if (*t, h.clone()) >= rank => {}
                _ => {
                    updated.insert(k.to_string(), (rank.0, rank.1, sv));
                }
            }
        }
    }
    if updated.is_empty() {
        return None;
    }
    let cid = CollisionId::derive(&[
        b"update_delete",
        id.as_str().as_bytes(),
        &hashes_hex(&tombs),
    ]);
    let fields: BTreeMap<String, Json> = r.fields_json(schema).into_iter().collect();
    let (del_node, del_at) = r.change_origin(&tombs[0]);
    let latest = updated
        .values()
        .max_by_key(|(t, h, _)| (*t, h.clone()))
        .map(|(_, _, v)| v.clone());
    let mut del_fields = fields.clone();
    for k in updated.keys() {
        if let Some(v) = r.doc().get_at(ROOT, k.as_str(), &tombs).ok().flatten() {
            if let (Value::Scalar(s), Ok(def)) = (&v.0, schema.field(&collection, k)) {
                del_fields.insert(
                    k.clone(),
                    FieldValue::from_scalar(&def.ty, s.as_ref()).to_json(),
                );
            }
        } else {
            del_fields.remove(k);
        }
    }
    let sides = vec![
        Side {
            record: id.clone(),
            role: "deleted".into(),
            node: del_node,
            at_ms: del_at,
            fields: del_fields,
            values: BTreeMap::new(),
        },
        Side {
            record: id.clone(),
            role: "updated".into(),
            node: latest.as_ref().and_then(|v| v.node),
            at_ms: latest.as_ref().map(|v| v.at_ms).unwrap_or(0),
            fields,
            values: updated.into_iter().map(|(k, (_, _, v))| (k, v)).collect(),
        },
    ];
    Some(Collision {
        id: cid,
        kind: CollisionKind::UpdateDelete,
        collection,
        records: vec![id],
        field: None,
        value: None,
        sides,
        status: Status::Open,
    })
}

/// Concurrent different values of `flag` fields on a live record.
pub fn detect_flagged(schema: &Schema, r: &Record) -> Vec<Collision> {
    let Some(collection) = r.collection() else {
        return Vec::new();
    };
    let Ok(def) = schema.collection(&collection) else {
        return Vec::new();
    };
    def.fields
        .iter()
        .filter(|(_, f)| f.policy == MergePolicy::Flag)
        .filter_map(|(name, _)| detect_flagged_field(schema, r, name))
        .collect()
}

/// [`detect_flagged`] for one field: concurrent different values of `name`
/// on a live record, when it is a `flag` field.
pub fn detect_flagged_field(schema: &Schema, r: &Record, name: &str) -> Option<Collision> {
    let collection = r.collection()?;
    if schema.field(&collection, name).ok()?.policy != MergePolicy::Flag {
        return None;
    }
    // Cheap first: one value (the usual case) holds no collision.
    if r.values_of(schema, &collection, name).len() < 2 || r.is_deleted() {
        return None;
    }
    let id = r.id()?;
    let vals = r.field_values(schema, name);
    let distinct: BTreeSet<&FieldValue> = vals.iter().map(|(v, _)| v).collect();
    if distinct.len() < 2 {
        return None;
    }
    let hashes: Vec<ChangeHash> = vals.iter().map(|(_, h)| *h).collect();
    let cid = CollisionId::derive(&[
        b"flagged_field",
        id.as_str().as_bytes(),
        name.as_bytes(),
        &hashes_hex(&hashes),
    ]);
    let fields: BTreeMap<String, Json> = r.fields_json(schema).into_iter().collect();
    let mut sides: Vec<Side> = vals
        .iter()
        .map(|(v, h)| {
            let sv = side_value(r, v.to_json(), h);
            let mut f = fields.clone();
            f.insert(name.to_string(), v.to_json());
            Side {
                record: id.clone(),
                role: "value".into(),
                node: sv.node,
                at_ms: sv.at_ms,
                fields: f,
                values: BTreeMap::from([(name.to_string(), sv)]),
            }
        })
        .collect();
    sides.sort_by(|a, b| (a.at_ms, &a.values[name].change).cmp(&(b.at_ms, &b.values[name].change)));
    Some(Collision {
        id: cid,
        kind: CollisionKind::FlaggedField,
        collection,
        records: vec![id],
        field: Some(name.to_string()),
        value: None,
        sides,
        status: Status::Open,
    })
}

/// The normalized values a live record claims for a unique key: every
/// concurrent value of a single field; for a group, the combinations of its
/// fields' values (capped at 16), only when every field has a value.
pub fn unique_values(schema: &Schema, r: &Record, key: &UniqueKey) -> BTreeSet<String> {
    if r.is_deleted() {
        return BTreeSet::new();
    }
    let Some(collection) = r.collection() else {
        return BTreeSet::new();
    };
    claims(key, |f| {
        r.values_of(schema, &collection, f)
            .iter()
            .map(|v| schema.normalize(&collection, f, v))
            .collect()
    })
}

/// What [`unique_values`] gives for a record just created (one change, not
/// deleted) with `fields`, computed from those values instead of read back
/// from its document.
pub fn unique_values_of_new(
    schema: &Schema,
    collection: &str,
    fields: &BTreeMap<String, FieldValue>,
    key: &UniqueKey,
) -> BTreeSet<String> {
    claims(key, |f| {
        fields
            .get(f)
            .map(|v| schema.normalize(collection, f, v))
            .into_iter()
            .collect()
    })
}

/// The claims of a key, given the normalized values of each of its fields
/// (empty normalized values do not count).
fn claims(
    key: &UniqueKey,
    mut values_of: impl FnMut(&str) -> BTreeSet<String>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
    for f in &key.fields {
        let vals: BTreeSet<String> = values_of(f).into_iter().filter(|s| !s.is_empty()).collect();
        if vals.is_empty() {
            return out;
        }
        let mut next = Vec::new();
        for c in &combos {
            for v in &vals {
                if next.len() < 16 {
                    let mut c = c.clone();
                    c.push(v.clone());
                    next.push(c);
                }
            }
        }
        combos = next;
    }
    for c in combos {
        out.insert(c.join("\u{1f}"));
    }
    out
}

/// The id a duplicate collision over these holders has. `writes` are the
/// changes that gave the holders their claims (see [`detect_duplicate`]), so
/// the same records clashing again on the same value through new writes
/// after a resolution is a new collision, not the settled one.
pub fn duplicate_id(
    collection: &str,
    key: &str,
    value: &str,
    holders: &BTreeSet<RecordId>,
    writes: &[ChangeHash],
) -> CollisionId {
    let ids: Vec<u8> = holders
        .iter()
        .flat_map(|h| {
            let mut b = h.as_str().as_bytes().to_vec();
            b.push(0);
            b
        })
        .collect();
    CollisionId::derive(&[
        b"duplicate",
        collection.as_bytes(),
        key.as_bytes(),
        value.as_bytes(),
        &ids,
        &hashes_hex(writes),
    ])
}

/// A duplicate over live `holders` (two or more) of `value` for `key`. Its
/// id covers the changes that wrote the claimed values and the visible
/// restores of the holders: a holder that claims the value again by a new
/// write or by being restored makes a new collision.
pub fn detect_duplicate(
    schema: &Schema,
    collection: &str,
    key: &UniqueKey,
    value: &str,
    holders: &[&Record],
) -> Option<Collision> {
    let ids: BTreeSet<RecordId> = holders.iter().filter_map(|r| r.id()).collect();
    if ids.len() < 2 {
        return None;
    }
    let mut writes: Vec<ChangeHash> = Vec::new();
    for r in holders {
        for f in &key.fields {
            writes.extend(
                r.field_values(schema, f)
                    .into_iter()
                    .filter(|(v, _)| {
                        key.fields.len() > 1 || schema.normalize(collection, f, v) == value
                    })
                    .map(|(_, h)| h),
            );
        }
        r.with_root(KEY_RESTORED, |vals| {
            writes.extend(vals.iter().filter_map(|(_, op)| r.doc().hash_for_opid(op)))
        });
    }
    let cid = duplicate_id(collection, &key.name, value, &ids, &writes);
    let mut sides: Vec<Side> = holders
        .iter()
        .map(|r| {
            let mut values = BTreeMap::new();
            let mut node = None;
            let mut at_ms = 0;
            for f in &key.fields {
                if let Some((v, h)) = r.field_values(schema, f).into_iter().rev().find(|(v, _)| {
                    key.fields.len() > 1 || schema.normalize(collection, f, v) == value
                }) {
                    let sv = side_value(r, v.to_json(), &h);
                    if sv.at_ms >= at_ms {
                        node = sv.node;
                        at_ms = sv.at_ms;
                    }
                    values.insert(f.clone(), sv);
                }
            }
            Side {
                record: record_id(r),
                role: "holder".into(),
                node,
                at_ms,
                fields: r.fields_json(schema).into_iter().collect(),
                values,
            }
        })
        .collect();
    sides.sort_by(|a, b| a.record.cmp(&b.record));
    Some(Collision {
        id: cid,
        kind: CollisionKind::Duplicate,
        collection: collection.to_string(),
        records: ids.into_iter().collect(),
        field: Some(key.name.clone()),
        value: Some(value.replace('\u{1f}', " + ")),
        sides,
        status: Status::Open,
    })
}

/// A live `referrer` whose `field` points at a deleted, not merged `target`.
pub fn detect_dangling(
    schema: &Schema,
    referrer: &Record,
    field: &str,
    target: &Record,
) -> Option<Collision> {
    if referrer.is_deleted() || !target.is_deleted() || target.merged_into().is_some() {
        return None;
    }
    let (rid, tid) = (referrer.id()?, target.id()?);
    let collection = referrer.collection()?;
    let (value, hash) = referrer.field_values(schema, field).pop()?;
    if value.to_text() != tid.as_str() {
        return None;
    }
    let tombs = tombstone_changes(target);
    let cid = CollisionId::derive(&[
        b"dangling_reference",
        rid.as_str().as_bytes(),
        field.as_bytes(),
        tid.as_str().as_bytes(),
        &hashes_hex(&tombs),
    ]);
    let ref_side = side_value(referrer, value.to_json(), &hash);
    let (del_node, del_at) = tombs
        .first()
        .map(|h| target.change_origin(h))
        .unwrap_or((None, 0));
    let mut records = vec![rid.clone(), tid.clone()];
    records.sort();
    Some(Collision {
        id: cid,
        kind: CollisionKind::DanglingReference,
        collection,
        records,
        field: Some(field.to_string()),
        value: None,
        sides: vec![
            Side {
                record: rid,
                role: "referrer".into(),
                node: ref_side.node,
                at_ms: ref_side.at_ms,
                fields: referrer.fields_json(schema).into_iter().collect(),
                values: BTreeMap::from([(field.to_string(), ref_side)]),
            },
            Side {
                record: tid,
                role: "target".into(),
                node: del_node,
                at_ms: del_at,
                fields: target.fields_json(schema).into_iter().collect(),
                values: BTreeMap::new(),
            },
        ],
        status: Status::Open,
    })
}

/// What a person asks for to settle a collision (the CLI's flags).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolveRequest {
    /// Restore the deleted record (update_delete, dangling_reference).
    pub restore: bool,
    /// Confirm the delete (update_delete).
    pub confirm_delete: bool,
    /// Merge every other holder into this survivor (duplicate).
    pub merge_into: Option<RecordId>,
    /// Field → record whose value the survivor or restored record keeps.
    pub keep: BTreeMap<String, RecordId>,
    /// Field → value to write (JSON), on `on` or the natural record.
    pub set: serde_json::Map<String, Json>,
    /// Which record `set` applies to when several are involved.
    pub on: Option<RecordId>,
    /// Delete this record (duplicate, dangling_reference).
    pub delete: Option<RecordId>,
}

/// One record's part of a resolution.
#[derive(Debug, Clone, PartialEq)]
pub enum PlannedWrite {
    /// Set fields.
    Update(Edit),
    /// Tombstone, optionally as merged into a survivor.
    Delete {
        /// The survivor.
        merged_into: Option<RecordId>,
    },
    /// Restore with these fields.
    Restore(Edit),
    /// Only the resolution entry.
    Annotate,
}

/// A resolution worked out: per record, its write; plus the entry written to
/// every involved record.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Writes, by record.
    pub writes: BTreeMap<RecordId, PlannedWrite>,
    /// The entry stored under `_resolutions[id]` in each of them.
    pub entry: ResolutionEntry,
}

fn field_of(
    schema: &Schema,
    collection: &str,
    name: &str,
    from: &RecordId,
    records: &BTreeMap<RecordId, &Record>,
) -> Result<Option<FieldValue>> {
    schema.field(collection, name)?;
    let r = records.get(from).ok_or_else(|| {
        ModelError::InvalidResolution(format!("record {from} is not part of this collision"))
    })?;
    Ok(r.fields(schema).remove(name))
}

/// Works out how to settle `c` as asked. `records` holds every record the
/// collision involves. The request is checked against the kind; a request
/// that does not fit is refused and nothing is written.
pub fn plan_resolution(
    schema: &Schema,
    c: &Collision,
    req: &ResolveRequest,
    records: &BTreeMap<RecordId, &Record>,
    by: NodeId,
    at_ms: i64,
    token: String,
) -> Result<Plan> {
    let bad = |m: &str| Err(ModelError::InvalidResolution(m.to_string()));
    if !c.is_open() {
        return bad("the collision is already resolved");
    }
    let set_edit =
        |schema: &Schema| -> Result<Edit> { Edit::from_json(schema, &c.collection, &req.set) };
    let mut writes: BTreeMap<RecordId, PlannedWrite> = c
        .records
        .iter()
        .map(|r| (r.clone(), PlannedWrite::Annotate))
        .collect();
    let action;
    match c.kind {
        CollisionKind::UpdateDelete => {
            let rid = &c.records[0];
            if req.restore == req.confirm_delete || req.merge_into.is_some() || req.delete.is_some()
            {
                return bad("update_delete takes exactly one of --restore or --confirm-delete");
            }
            if req.restore {
                let mut edit = set_edit(schema)?;
                for (f, from) in &req.keep {
                    if from != rid {
                        return bad("--keep must name the record of this collision");
                    }
                    if let Some(v) = field_of(schema, &c.collection, f, from, records)? {
                        edit.set.insert(f.clone(), v);
                    }
                }
                writes.insert(rid.clone(), PlannedWrite::Restore(edit));
                action = "restore";
            } else {
                if !req.set.is_empty() || !req.keep.is_empty() {
                    return bad("--confirm-delete takes no field choices");
                }
                writes.insert(rid.clone(), PlannedWrite::Delete { merged_into: None });
                action = "confirm_delete";
            }
        }
        CollisionKind::Duplicate => {
            if let Some(s) = &req.merge_into {
                if !c.records.contains(s) {
                    return bad("the survivor must be one of the duplicates");
                }
                if req.delete.is_some() || req.restore || req.confirm_delete {
                    return bad(
                        "--merge-into cannot be combined with --delete, --restore or --confirm-delete",
                    );
                }
                let mut edit = set_edit(schema)?;
                for (f, from) in &req.keep {
                    match field_of(schema, &c.collection, f, from, records)? {
                        Some(v) => {
                            edit.set.insert(f.clone(), v);
                        }
                        None => {
                            edit.unset.insert(f.clone());
                        }
                    }
                }
                // The merged-away records stop claiming the value; the
                // survivor keeps (or takes) the chosen fields.
                for r in &c.records {
                    if r != s {
                        writes.insert(
                            r.clone(),
                            PlannedWrite::Delete {
                                merged_into: Some(s.clone()),
                            },
                        );
                    }
                }
                writes.insert(s.clone(), PlannedWrite::Update(edit));
                action = "merge";
            } else if let Some(d) = &req.delete {
                if !c.records.contains(d) {
                    return bad("--delete must name one of the duplicates");
                }
                writes.insert(d.clone(), PlannedWrite::Delete { merged_into: None });
                action = "delete";
            } else if !req.set.is_empty() {
                let Some(on) = &req.on else {
                    return bad(
                        "--set on a duplicate needs --on RECORD_ID (the record whose value changes)",
                    );
                };
                if !c.records.contains(on) {
                    return bad("--on must name one of the duplicates");
                }
                writes.insert(on.clone(), PlannedWrite::Update(set_edit(schema)?));
                action = "set";
            } else {
                return bad("a duplicate takes --merge-into, --delete, or --set with --on");
            }
        }
        CollisionKind::DanglingReference => {
            let referrer = &c.sides[0].record;
            let target = &c.sides[1].record;
            if req.restore {
                writes.insert(target.clone(), PlannedWrite::Restore(Edit::default()));
                action = "restore";
            } else if let Some(d) = &req.delete {
                if d != referrer {
                    return bad("--delete must name the referring record");
                }
                writes.insert(referrer.clone(), PlannedWrite::Delete { merged_into: None });
                action = "delete";
            } else if !req.set.is_empty() {
                writes.insert(referrer.clone(), PlannedWrite::Update(set_edit(schema)?));
                action = "set";
            } else {
                return bad(
                    "a dangling reference takes --restore, --set FIELD=NEW_TARGET or --delete REFERRER",
                );
            }
        }
        CollisionKind::FlaggedField => {
            let rid = &c.records[0];
            let field = c.field.clone().unwrap_or_default();
            let edit = set_edit(schema)?;
            if edit.set.len() != 1 || !edit.set.contains_key(&field) || !edit.unset.is_empty() {
                return bad(&format!("a flagged field takes --set {field}=VALUE"));
            }
            writes.insert(rid.clone(), PlannedWrite::Update(edit));
            action = "set";
        }
    }
    let detail = serde_json::to_value(req).expect("request serializes");
    Ok(Plan {
        writes,
        entry: ResolutionEntry {
            collision: c.clone(),
            resolution: Resolution {
                by,
                at_ms,
                action: action.to_string(),
                detail,
                token,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::CommitCtx;

    #[test]
    fn the_claims_of_a_new_record_equal_those_read_from_its_document() {
        let schema = Schema::default_crm();
        let ctx = CommitCtx {
            node: NodeId([1; 16]),
            time_ms: 0,
            op: "create",
        };
        let contact = RecordId::parse("00000000-0000-4000-8000-000000000001").unwrap();
        let cases: Vec<(&str, serde_json::Value)> = vec![
            (
                "contacts",
                serde_json::json!({"email": "  Ann@Example.ORG ", "member_key": " K-1 ", "user_name": "ann"}),
            ),
            (
                "contacts",
                serde_json::json!({"email": "", "user_name": "   "}),
            ),
            (
                "contacts",
                serde_json::json!({"first_name": "no unique field"}),
            ),
            (
                "phones",
                serde_json::json!({"contact_id": contact.as_str(), "number": " +41 1 "}),
            ),
        ];
        let mut claimed = Vec::new();
        for (i, (collection, fields)) in cases.into_iter().enumerate() {
            let edit = Edit::from_json(&schema, collection, fields.as_object().unwrap()).unwrap();
            let id = RecordId::parse(&format!("00000000-0000-4000-8000-00000000010{i}")).unwrap();
            let r = Record::create(&schema, collection, &id, &edit.set, &ctx).unwrap();
            for key in schema.unique_keys(collection) {
                assert_eq!(
                    unique_values_of_new(&schema, collection, &edit.set, &key),
                    unique_values(&schema, &r, &key),
                    "{collection} {}",
                    key.name
                );
                claimed.extend(unique_values_of_new(&schema, collection, &edit.set, &key));
            }
        }
        // Normalized (trimmed; e-mail case-insensitive), empty values claim
        // nothing, a group claims the combination.
        assert!(
            claimed.contains(&"ann@example.org".to_string()),
            "{claimed:?}"
        );
        assert!(claimed.contains(&"K-1".to_string()), "{claimed:?}");
        assert!(
            claimed.contains(&format!("{}\u{1f}+41 1", contact.as_str())),
            "{claimed:?}"
        );
        assert_eq!(claimed.len(), 4, "{claimed:?}");
    }
}
