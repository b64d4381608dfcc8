//! A record: one Automerge document holding a map of typed fields plus
//! reserved keys for identity, tombstone, merge alias and resolutions.
//!
//! Reserved root keys (user fields can never start with `_`):
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `_id`, `_collection` | string | written once, in the creating change |
//! | `_deleted` | string token | the record is deleted while any value is visible |
//! | `_restored` | string token | written by a restore; counts as an update |
//! | `_merged_into` | string id | the survivor a merged-away record points at |
//! | `_resolutions` | map | collision id → JSON resolution entry |
//!
//! Tokens are new on every write, because Automerge drops a `put` of the value
//! a key already shows, and a delete or restore must always be causally visible.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, Automerge, ChangeHash, ObjId, ObjType, PatchLog, ROOT, ReadDoc, ScalarValue, Value,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{ModelError, Result};
use crate::ids::{NodeId, RecordId, hex_lower};
use crate::schema::Schema;
use crate::value::FieldValue;

/// Reserved key: record id.
pub const KEY_ID: &str = "_id";
/// Reserved key: collection.
pub const KEY_COLLECTION: &str = "_collection";
/// Reserved key: tombstone token.
pub const KEY_DELETED: &str = "_deleted";
/// Reserved key: restore token.
pub const KEY_RESTORED: &str = "_restored";
/// Reserved key: survivor of a merge.
pub const KEY_MERGED_INTO: &str = "_merged_into";
/// Reserved key: resolution entries.
pub const KEY_RESOLUTIONS: &str = "_resolutions";

/// Who writes, when, and why: everything a commit needs that the model may
/// not make up itself.
#[derive(Debug, Clone)]
pub struct CommitCtx {
    /// The writing node (its actor id).
    pub node: NodeId,
    /// Wall-clock time in ms since the epoch, recorded in the change.
    pub time_ms: i64,
    /// What kind of write this is (`create`, `update`, `delete`, `restore`,
    /// `resolve`, `force`), kept as the change message.
    pub op: &'static str,
}

impl CommitCtx {
    fn options(&self) -> CommitOptions {
        CommitOptions::default()
            .with_time(self.time_ms)
            .with_message(self.op.to_string())
    }
}

/// A partial update: fields to set and fields to unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edit {
    /// Fields to set.
    pub set: BTreeMap<String, FieldValue>,
    /// Fields to remove.
    pub unset: BTreeSet<String>,
}

impl Edit {
    /// Validates JSON input (`{"field": value | null}`) against the schema;
    /// `null` unsets.
    pub fn from_json(
        schema: &Schema,
        collection: &str,
        fields: &serde_json::Map<String, Json>,
    ) -> Result<Edit> {
        let mut edit = Edit::default();
        for (name, v) in fields {
            let def = schema.field(collection, name)?;
            if v.is_null() {
                edit.unset.insert(name.clone());
            } else {
                edit.set
                    .insert(name.clone(), FieldValue::from_json(name, &def.ty, v)?);
            }
        }
        Ok(edit)
    }

    /// True when nothing is set or unset.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.unset.is_empty()
    }
}

/// A field that another writer changed after the version an edit was based
/// on: the value at the base, the value the record showed before this edit
/// (`existing`), and the value this edit wrote (`new`; `None` = unset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcurrentField {
    /// The field.
    pub field: String,
    /// The value at the base version.
    pub base_value: Option<Json>,
    /// The value just before this edit was merged.
    pub existing_value: Option<Json>,
    /// The value this edit wrote.
    pub new_value: Option<Json>,
}

/// What an update did.
#[derive(Debug, Clone, Default)]
pub struct UpdateOutcome {
    /// The change made, or `None` when the edit changed nothing.
    pub change: Option<ChangeHash>,
    /// Fields changed concurrently since the base version.
    pub concurrent: Vec<ConcurrentField>,
}

/// One entry of a record's history: a change, who made it, when, and what it
/// wrote to which field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The change hash (hex).
    pub change: String,
    /// The node that made it.
    pub node: Option<NodeId>,
    /// The wall-clock time it recorded (ms).
    pub time_ms: i64,
    /// The kind of write.
    pub op: Option<String>,
    /// Field → value written (`null` for an unset).
    pub fields: BTreeMap<String, Json>,
    /// The change set the tombstone.
    pub deleted: bool,
    /// The change restored the record.
    pub restored: bool,
}

/// A record held as an Automerge document.
///
/// The document is boxed: an `Automerge` is 3.5 KB inline, and the store
/// moves records through maps, result vectors and its cache by value (a
/// catch-up's working set of 1,000 records shifted their bytes on every
/// insert into its `BTreeMap`).
#[derive(Debug, Clone)]
pub struct Record {
    doc: Box<Automerge>,
    root: RootMemo,
}

/// Every value of a root key (with the op that set it) as the document shows
/// it now.
type RootValues = Vec<(Value<'static>, ObjId)>;

/// The root map as the document shows it now, read on first use. Automerge
/// seeks a map key afresh on every read, and one write reads the same few
/// keys (`_collection`, `_deleted`, the unique and reference fields) a dozen
/// times over: those seeks were 13% of a catch-up's profile and 18% of the
/// simulator's (BENCHMARKS.md). Emptied by every change to the document.
/// Kept as a vector sorted by key: a root holds a dozen or so keys, and
/// building a `BTreeMap` of them (a node and a key copy per insert) was a
/// fifth of reading the root in a catch-up's profile.
#[derive(Debug, Clone, Default)]
struct RootMemo(RefCell<Option<Vec<(String, RootValues)>>>);

/// Hex of change hashes.
pub fn heads_to_hex(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| hex_lower(&h.0)).collect()
}

/// Parses hex change hashes.
pub fn heads_from_hex(heads: &[String]) -> Result<Vec<ChangeHash>> {
    heads
        .iter()
        .map(|h| {
            h.parse::<ChangeHash>()
                .map_err(|_| ModelError::InvalidHeads(format!("`{h}` is not a change hash")))
        })
        .collect()
}

fn str_of(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn token(doc: &Automerge, ctx: &CommitCtx) -> String {
    let mut h = blake3::Hasher::new();
    for head in doc.get_heads() {
        h.update(&head.0);
    }
    h.update(&ctx.node.0);
    h.update(&ctx.time_ms.to_le_bytes());
    h.update(ctx.op.as_bytes());
    format!("{}:{}", ctx.node, hex_lower(&h.finalize().as_bytes()[..8]))
}

impl Record {
    /// Wraps a document (loaded from storage or built from remote changes).
    pub fn from_doc(doc: Automerge) -> Record {
        Record::from_boxed(Box::new(doc))
    }

    /// Wraps a document already on the heap (an `Automerge` is 3.5 KB:
    /// a caller that builds one in a box spares the copies of moving it).
    pub fn from_boxed(doc: Box<Automerge>) -> Record {
        Record {
            doc,
            root: RootMemo::default(),
        }
    }

    /// Creates a record: validates the fields (unknown field, wrong type,
    /// missing required field) and writes nothing on error.
    pub fn create(
        schema: &Schema,
        collection: &str,
        id: &RecordId,
        fields: &BTreeMap<String, FieldValue>,
        ctx: &CommitCtx,
    ) -> Result<Record> {
        let def = schema.collection(collection)?;
        for name in fields.keys() {
            schema.field(collection, name)?;
        }
        for (name, f) in &def.fields {
            if f.required && !fields.contains_key(name) {
                return Err(ModelError::MissingRequired(name.clone()));
            }
        }
        let mut doc = Automerge::new().with_actor(ctx.node.actor());
        doc.transact_with(
            |_| ctx.options(),
            |tx| -> std::result::Result<(), automerge::AutomergeError> {
                tx.put(ROOT, KEY_ID, id.as_str())?;
                tx.put(ROOT, KEY_COLLECTION, collection)?;
                tx.put_object(ROOT, KEY_RESOLUTIONS, ObjType::Map)?;
                for (k, v) in fields {
                    tx.put(ROOT, k.as_str(), v.to_scalar())?;
                }
                Ok(())
            },
        )
        .map_err(|f| ModelError::from(f.error))?;
        Ok(Record::from_doc(doc))
    }

    /// The document.
    pub fn doc(&self) -> &Automerge {
        &self.doc
    }

    /// The document, for applying changes (the node guards this).
    pub fn doc_mut(&mut self) -> &mut Automerge {
        self.root = RootMemo::default();
        &mut self.doc
    }

    /// Runs `f` on every value of a root key (ordered by op id: the last one
    /// is the value Automerge shows), read once per version of the document.
    pub fn with_root<T>(&self, key: &str, f: impl FnOnce(&[(Value<'static>, ObjId)]) -> T) -> T {
        if self.root.0.borrow().is_none() {
            *self.root.0.borrow_mut() = Some(self.read_root());
        }
        let memo = self.root.0.borrow();
        let vals = memo.as_ref().and_then(|m| {
            m.binary_search_by(|(k, _)| k.as_str().cmp(key))
                .ok()
                .map(|i| m[i].1.as_slice())
        });
        f(vals.unwrap_or_default())
    }

    /// Every root key with its values, in one pass over the root map (a key
    /// with concurrent values is read again for all of them).
    fn read_root(&self) -> Vec<(String, RootValues)> {
        let mut out = Vec::with_capacity(16);
        for item in self.doc.map_range(ROOT, ..) {
            let vals = if item.conflict {
                self.doc
                    .get_all(ROOT, item.key.as_ref())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(v, op)| (v.into_owned(), op))
                    .collect()
            } else {
                vec![(item.value.clone().into_value(), item.id())]
            };
            out.push((item.key.into_owned(), vals));
        }
        // Automerge iterates a map in key order; sorted here all the same,
        // since the lookup relies on it.
        if !out.is_sorted_by(|a, b| a.0 < b.0) {
            out.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out
    }

    /// The string a root key shows, if it shows one.
    fn root_str(&self, key: &str) -> Option<String> {
        self.with_root(key, |vals| vals.last().and_then(|(v, _)| str_of(v)))
    }

    /// Sets the actor this replica writes with.
    pub fn set_writer(&mut self, node: NodeId) {
        self.doc.set_actor(node.actor());
    }

    /// The record id, once the creating change is present.
    pub fn id(&self) -> Option<RecordId> {
        RecordId::parse(&self.root_str(KEY_ID)?).ok()
    }

    /// The collection, once the creating change is present.
    pub fn collection(&self) -> Option<String> {
        self.root_str(KEY_COLLECTION)
    }

    /// The current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// True while a tombstone is visible.
    pub fn is_deleted(&self) -> bool {
        self.with_root(KEY_DELETED, |vals| !vals.is_empty())
    }

    /// The survivor this record was merged into.
    pub fn merged_into(&self) -> Option<RecordId> {
        if !self.is_deleted() {
            return None;
        }
        RecordId::parse(&self.root_str(KEY_MERGED_INTO)?).ok()
    }

    /// The current value of every declared field (Automerge's winner where
    /// values are concurrent).
    pub fn fields(&self, schema: &Schema) -> BTreeMap<String, FieldValue> {
        let Some(collection) = self.collection() else {
            return BTreeMap::new();
        };
        let Ok(def) = schema.collection(&collection) else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for (name, f) in &def.fields {
            if let Some(v) = self.with_root(name, |vals| match vals.last() {
                Some((Value::Scalar(s), _)) => Some(FieldValue::from_scalar(&f.ty, s.as_ref())),
                _ => None,
            }) {
                out.insert(name.clone(), v);
            }
        }
        out
    }

    /// The fields as a JSON object.
    pub fn fields_json(&self, schema: &Schema) -> serde_json::Map<String, Json> {
        self.fields(schema)
            .into_iter()
            .map(|(k, v)| (k, v.to_json()))
            .collect()
    }

    /// Every concurrent value of a field with the change that wrote it,
    /// ordered by op id (the last one is the winner).
    pub fn field_values(&self, schema: &Schema, field: &str) -> Vec<(FieldValue, ChangeHash)> {
        let Some(collection) = self.collection() else {
            return Vec::new();
        };
        self.scalars(schema, &collection, field)
            .into_iter()
            .filter_map(|(v, op)| Some((v, self.doc.hash_for_opid(&op)?)))
            .collect()
    }

    /// Every value `field` has now, without the changes that wrote them
    /// (cheaper than [`Record::field_values`]), for a record of `collection`.
    pub fn values_of(&self, schema: &Schema, collection: &str, field: &str) -> Vec<FieldValue> {
        self.scalars(schema, collection, field)
            .into_iter()
            .map(|(v, _)| v)
            .collect()
    }

    /// The scalar values of a declared field with the ops that set them.
    fn scalars(&self, schema: &Schema, collection: &str, field: &str) -> Vec<(FieldValue, ObjId)> {
        let Ok(def) = schema.field(collection, field) else {
            return Vec::new();
        };
        self.with_root(field, |vals| {
            vals.iter()
                .filter_map(|(v, op)| match v {
                    Value::Scalar(s) => {
                        Some((FieldValue::from_scalar(&def.ty, s.as_ref()), op.clone()))
                    }
                    _ => None,
                })
                .collect()
        })
    }

    /// The node and time of a change in this document.
    pub fn change_origin(&self, hash: &ChangeHash) -> (Option<NodeId>, i64) {
        match self.doc.get_change_meta_by_hash(hash) {
            Some(m) => (NodeId::from_actor(&m.actor), m.timestamp),
            None => (None, 0),
        }
    }

    /// Resolution entries: collision id → every concurrent entry (JSON text).
    pub fn resolutions(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        let Some(obj) = self.with_root(KEY_RESOLUTIONS, |vals| match vals.last() {
            Some((Value::Object(ObjType::Map), obj)) => Some(obj.clone()),
            _ => None,
        }) else {
            return out;
        };
        for key in self.doc.keys(&obj) {
            let vals: Vec<String> = self
                .doc
                .get_all(&obj, key.as_str())
                .unwrap_or_default()
                .iter()
                .filter_map(|(v, _)| str_of(v))
                .collect();
            out.insert(key, vals);
        }
        out
    }

    fn check_heads(&self, base: &[ChangeHash]) -> Result<()> {
        if base.is_empty() {
            return Err(ModelError::InvalidHeads("empty".into()));
        }
        for h in base {
            if self.doc.get_change_meta_by_hash(h).is_none() {
                return Err(ModelError::InvalidHeads(format!(
                    "{} is not a version of this record",
                    hex_lower(&h.0)
                )));
            }
        }
        Ok(())
    }

    /// Updates fields. With `base`, the edit is made as of that version and
    /// merged: fields it does not touch keep every later change, and the
    /// outcome lists the touched fields that changed since the base.
    /// `resolutions` are written in the same change.
    pub fn update(
        &mut self,
        schema: &Schema,
        edit: &Edit,
        base: Option<&[ChangeHash]>,
        resolutions: &[(String, String)],
        ctx: &CommitCtx,
    ) -> Result<UpdateOutcome> {
        let collection = self
            .collection()
            .ok_or_else(|| ModelError::NotARecord("no `_collection`".into()))?;
        let id = self.id().map(|i| i.to_string()).unwrap_or_default();
        for name in edit.set.keys().chain(edit.unset.iter()) {
            schema.field(&collection, name)?;
        }
        for name in &edit.unset {
            if schema.field(&collection, name)?.required {
                return Err(ModelError::MissingRequired(name.clone()));
            }
        }
        let mut concurrent = Vec::new();
        match base {
            Some(base) => {
                self.check_heads(base)?;
                let was_deleted = !self.doc.get_all_at(ROOT, KEY_DELETED, base)?.is_empty();
                if was_deleted {
                    return Err(ModelError::Deleted(id));
                }
                let current = self.heads();
                if current.as_slice() != base {
                    for name in edit.set.keys().chain(edit.unset.iter()) {
                        let before = self.doc.get_all_at(ROOT, name.as_str(), base)?;
                        let now = self.doc.get_all(ROOT, name.as_str())?;
                        let ids = |v: &Vec<(Value<'_>, automerge::ObjId)>| {
                            v.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>()
                        };
                        if ids(&before) == ids(&now) {
                            continue;
                        }
                        let ty = &schema.field(&collection, name)?.ty;
                        let json = |v: &Vec<(Value<'_>, automerge::ObjId)>| match v.last() {
                            Some((Value::Scalar(s), _)) => {
                                Some(FieldValue::from_scalar(ty, s.as_ref()).to_json())
                            }
                            _ => None,
                        };
                        let new_value = edit.set.get(name).map(|v| v.to_json());
                        let existing = json(&now);
                        if existing != new_value {
                            concurrent.push(ConcurrentField {
                                field: name.clone(),
                                base_value: json(&before),
                                existing_value: existing,
                                new_value,
                            });
                        }
                    }
                }
            }
            None => {
                if self.is_deleted() {
                    return Err(ModelError::Deleted(id));
                }
            }
        }
        let change = self.write(base, ctx, |tx, _| {
            for (k, v) in &edit.set {
                // A put over concurrent values, or of the value already
                // shown, is written as delete + put so that it always
                // settles every value it saw.
                if tx.get_all(ROOT, k.as_str())?.len() > 1 {
                    tx.delete(ROOT, k.as_str())?;
                }
                tx.put(ROOT, k.as_str(), v.to_scalar())?;
            }
            for k in &edit.unset {
                if !tx.get_all(ROOT, k.as_str())?.is_empty() {
                    tx.delete(ROOT, k.as_str())?;
                }
            }
            put_resolutions(tx, resolutions)
        })?;
        Ok(UpdateOutcome { change, concurrent })
    }

    /// Deletes the record (a tombstone inside the document). `merged_into`
    /// names the survivor when a duplicate is merged away.
    pub fn delete(
        &mut self,
        merged_into: Option<&RecordId>,
        resolutions: &[(String, String)],
        ctx: &CommitCtx,
    ) -> Result<ChangeHash> {
        let token = token(&self.doc, ctx);
        let change = self.write(None, ctx, |tx, _| {
            tx.put(ROOT, KEY_DELETED, token.as_str())?;
            if let Some(s) = merged_into {
                tx.put(ROOT, KEY_MERGED_INTO, s.as_str())?;
            }
            put_resolutions(tx, resolutions)
        })?;
        Ok(change.expect("a new token always makes a change"))
    }

    /// Restores a deleted record, optionally setting fields in the same change.
    pub fn restore(
        &mut self,
        schema: &Schema,
        edit: &Edit,
        resolutions: &[(String, String)],
        ctx: &CommitCtx,
    ) -> Result<ChangeHash> {
        let id = self.id().map(|i| i.to_string()).unwrap_or_default();
        if !self.is_deleted() {
            return Err(ModelError::NotDeleted(id));
        }
        let collection = self
            .collection()
            .ok_or_else(|| ModelError::NotARecord("no `_collection`".into()))?;
        for name in edit.set.keys().chain(edit.unset.iter()) {
            schema.field(&collection, name)?;
        }
        for name in &edit.unset {
            if schema.field(&collection, name)?.required {
                return Err(ModelError::MissingRequired(name.clone()));
            }
        }
        let token = token(&self.doc, ctx);
        let change = self.write(None, ctx, |tx, _| {
            tx.delete(ROOT, KEY_DELETED)?;
            if !tx.get_all(ROOT, KEY_MERGED_INTO)?.is_empty() {
                tx.delete(ROOT, KEY_MERGED_INTO)?;
            }
            tx.put(ROOT, KEY_RESTORED, token.as_str())?;
            for (k, v) in &edit.set {
                if tx.get_all(ROOT, k.as_str())?.len() > 1 {
                    tx.delete(ROOT, k.as_str())?;
                }
                tx.put(ROOT, k.as_str(), v.to_scalar())?;
            }
            for k in &edit.unset {
                if !tx.get_all(ROOT, k.as_str())?.is_empty() {
                    tx.delete(ROOT, k.as_str())?;
                }
            }
            put_resolutions(tx, resolutions)
        })?;
        Ok(change.expect("a new token always makes a change"))
    }

    /// Writes only resolution entries (a confirmation that changes no field).
    pub fn annotate(
        &mut self,
        resolutions: &[(String, String)],
        ctx: &CommitCtx,
    ) -> Result<Option<ChangeHash>> {
        self.write(None, ctx, |tx, _| put_resolutions(tx, resolutions))
    }

    fn write<F>(
        &mut self,
        base: Option<&[ChangeHash]>,
        ctx: &CommitCtx,
        f: F,
    ) -> Result<Option<ChangeHash>>
    where
        F: FnOnce(
            &mut automerge::transaction::Transaction<'_>,
            (),
        ) -> std::result::Result<(), automerge::AutomergeError>,
    {
        self.doc.set_actor(ctx.node.actor());
        self.root = RootMemo::default();
        let mut tx = match base {
            Some(b) => self
                .doc
                .transaction_at(PatchLog::inactive(), b)
                .map_err(|e| ModelError::Automerge(e.to_string()))?,
            None => self.doc.transaction(),
        };
        match f(&mut tx, ()) {
            Ok(()) => Ok(tx.commit_with(ctx.options()).0),
            Err(e) => {
                tx.rollback();
                Err(e.into())
            }
        }
    }

    /// Every change with the fields it wrote, oldest first (by time, then
    /// hash), values that lost an automatic merge included.
    pub fn history(&self, schema: &Schema) -> Vec<HistoryEntry> {
        let collection = self.collection().unwrap_or_default();
        let mut out: Vec<HistoryEntry> = self
            .doc
            .get_changes(&[])
            .iter()
            .map(|c| {
                let ex = c.decode();
                let mut fields = BTreeMap::new();
                let (mut deleted, mut restored) = (false, false);
                for op in &ex.operations {
                    if op.obj != automerge::legacy::ObjectId::Root {
                        continue;
                    }
                    let automerge::legacy::Key::Map(k) = &op.key else {
                        continue;
                    };
                    match k.as_str() {
                        KEY_DELETED => {
                            deleted |= matches!(op.action, automerge::legacy::OpType::Put(_))
                        }
                        KEY_RESTORED => restored = true,
                        k if k.starts_with('_') => {}
                        k => {
                            let v = match &op.action {
                                automerge::legacy::OpType::Put(s) => {
                                    match schema.field(&collection, k) {
                                        Ok(def) => FieldValue::from_scalar(&def.ty, s).to_json(),
                                        Err(_) => Json::String(s.to_string()),
                                    }
                                }
                                _ => Json::Null,
                            };
                            fields.insert(k.to_string(), v);
                        }
                    }
                }
                HistoryEntry {
                    change: hex_lower(&c.hash().0),
                    node: NodeId::from_actor(c.actor_id()),
                    time_ms: c.timestamp(),
                    op: c.message().map(str::to_string),
                    fields,
                    deleted,
                    restored,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.time_ms, &a.change).cmp(&(b.time_ms, &b.change)));
        out
    }

    /// The actor this document writes with.
    pub fn actor(&self) -> &ActorId {
        self.doc.get_actor()
    }
}

fn put_resolutions(
    tx: &mut automerge::transaction::Transaction<'_>,
    resolutions: &[(String, String)],
) -> std::result::Result<(), automerge::AutomergeError> {
    if resolutions.is_empty() {
        return Ok(());
    }
    let obj = match tx.get(ROOT, KEY_RESOLUTIONS)? {
        Some((Value::Object(ObjType::Map), id)) => id,
        _ => tx.put_object(ROOT, KEY_RESOLUTIONS, ObjType::Map)?,
    };
    for (cid, entry) in resolutions {
        tx.put(&obj, cid.as_str(), entry.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(node: u8, op: &'static str) -> CommitCtx {
        CommitCtx {
            node: NodeId([node; 16]),
            time_ms: i64::from(node),
            op,
        }
    }

    /// What the memoized reads must agree with: Automerge read directly.
    fn direct(r: &Record, key: &str) -> Vec<String> {
        r.doc()
            .get_all(ROOT, key)
            .unwrap()
            .iter()
            .map(|(v, _)| format!("{v}"))
            .collect()
    }

    fn memo(r: &Record, key: &str) -> Vec<String> {
        r.with_root(key, |vals| {
            vals.iter().map(|(v, _)| format!("{v}")).collect()
        })
    }

    #[test]
    fn memoized_root_reads_follow_every_change_to_the_document() {
        let schema = Schema::default_crm();
        let id = RecordId::parse("00000000-0000-4000-8000-000000000001").unwrap();
        let fields = |json: serde_json::Value| {
            Edit::from_json(&schema, "contacts", json.as_object().unwrap())
                .unwrap()
                .set
        };
        let mut a = Record::create(
            &schema,
            "contacts",
            &id,
            &fields(serde_json::json!({"email": "a@x.org", "first_name": "Ann"})),
            &ctx(1, "create"),
        )
        .unwrap();
        let mut b = a.clone();
        // Read (and so memoize) before every change below.
        assert_eq!(a.collection().as_deref(), Some("contacts"));
        assert_eq!(a.id(), Some(id.clone()));
        assert_eq!(memo(&a, "first_name"), direct(&a, "first_name"));
        assert_eq!(memo(&a, "phone"), Vec::<String>::new());
        let edit = |json: serde_json::Value| Edit {
            set: fields(json),
            unset: BTreeSet::new(),
        };
        a.update(
            &schema,
            &edit(serde_json::json!({"first_name": "Anna"})),
            None,
            &[],
            &ctx(1, "update"),
        )
        .unwrap();
        assert_eq!(a.fields(&schema)["first_name"].to_text(), "Anna");
        b.update(
            &schema,
            &edit(serde_json::json!({"first_name": "Anne"})),
            None,
            &[],
            &ctx(2, "update"),
        )
        .unwrap();
        // Concurrent values through the raw document: both are shown, in
        // Automerge's order, and the winner is the one Automerge shows.
        let theirs = b.doc().get_changes(&[]);
        a.doc_mut().apply_changes(theirs).unwrap();
        assert_eq!(memo(&a, "first_name").len(), 2);
        for key in ["first_name", "email", KEY_ID, KEY_COLLECTION, KEY_DELETED] {
            assert_eq!(memo(&a, key), direct(&a, key), "{key}");
        }
        let (shown, _) = a.doc().get(ROOT, "first_name").unwrap().unwrap();
        assert_eq!(
            format!(
                "{}",
                FieldValue::from_scalar(
                    &schema.field("contacts", "first_name").unwrap().ty,
                    shown.as_scalar().unwrap()
                )
                .to_json()
            ),
            format!("{}", a.fields(&schema)["first_name"].to_json())
        );
        assert_eq!(a.field_values(&schema, "first_name").len(), 2);
        // Delete, restore and annotate are seen at once.
        assert!(!a.is_deleted());
        a.delete(None, &[], &ctx(1, "delete")).unwrap();
        assert!(a.is_deleted());
        assert_eq!(memo(&a, KEY_DELETED), direct(&a, KEY_DELETED));
        a.restore(&schema, &Edit::default(), &[], &ctx(1, "restore"))
            .unwrap();
        assert!(!a.is_deleted());
        assert!(a.resolutions().is_empty());
        a.annotate(&[("c1".into(), "entry".into())], &ctx(1, "force"))
            .unwrap();
        assert_eq!(a.resolutions()["c1"], vec!["entry".to_string()]);
    }
}
