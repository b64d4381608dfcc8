//! The invariants, checked from outside once the faults stopped and the
//! network healed. Each returns what is wrong, or nothing.
//!
//! 1. **Convergence**: every node holds the same records (deleted flag,
//!    heads, field values) and the same collisions (each one's full JSON:
//!    kind, records, sides, status). A node replicating only some
//!    collections holds exactly node 0's records of them (see
//!    [`convergence`]).
//! 2. **No acknowledged write lost**: every change a store acknowledged
//!    (local writes, and the heads a resolution left) is in every node's
//!    document of that record (on a partial node, of its collections).
//! 3. **Exactly the collisions the workload caused** (the oracle). It reads
//!    records (field values with their concurrent alternatives, the
//!    tombstone flag, history) but never the store's detection code:
//!    - *duplicate*: it groups the live records of each collection by the
//!      normalized value of every unique field and group (e-mail: trimmed and
//!      lower-cased; others trimmed; a record whose field has concurrent
//!      values claims them all). Every group of two or more holders must be
//!      flagged by a duplicate collision (open or resolved: a forced write is
//!      a resolved one) naming exactly those records; every *open* duplicate
//!      must be such a group.
//!    - *dangling_reference*: every live record whose reference field names a
//!      deleted record that was not merged into a survivor must be flagged
//!      (open or resolved); every open one must be such a situation.
//!    - *flagged_field*: every live record whose `flag`-policy field shows two
//!      or more different concurrent values must be flagged (open or
//!      resolved); every open one must be such a record and field.
//!    - *update_delete*: whether an edit was concurrent with a tombstone is a
//!      question of causal history the oracle does not recompute; it checks
//!      that every open one is about a record whose history holds a delete,
//!      and that every edit-vs-delete the generator *constructed* (two writes
//!      at one virtual instant) is flagged. Random edits racing random deletes
//!      are covered by convergence and invariant 5, not by this oracle.
//!    - every situation the generator constructed (update-vs-delete,
//!      dangling, two bank accounts, one e-mail at several sites) is flagged
//!      — the dangling one and the bank accounts only if the target is still
//!      deleted (unmerged) or the record still live at the end: a merge,
//!      restore or delete made elsewhere *before* the two writes, and still
//!      in flight then, may legitimately undo the situation.
//! 4. **Catch-up proportional to divergence**: frames and bytes delivered
//!    after the heal are bounded by a fixed cost per linked pair and per
//!    anti-entropy round, plus a cost per record changed during the faults
//!    ([`CatchUpBound`]).
//! 5. **No deleted record silently comes back**: a record deleted by an
//!    acknowledged delete is, at the end, deleted, or was explicitly restored
//!    (a restore or a resolution), or has an open `update_delete` collision.

use std::collections::{BTreeMap, BTreeSet};

use entente_model::automerge::ChangeHash;
use entente_model::{Collision, CollisionKind, MergePolicy, Record, RecordId};
use entente_node::{CollisionFilter, Store};

use crate::net::{Sim, Traffic};
use crate::workload::Ledger;

/// The catch-up bound (invariant 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpBound {
    /// Frames allowed per linked pair per anti-entropy round (and per
    /// reconnect).
    pub messages_per_round: u64,
    /// Frames allowed per changed record per node.
    pub messages_per_record: u64,
    /// Bytes allowed per linked pair per round.
    pub bytes_per_round: u64,
    /// Bytes allowed per changed record per node.
    pub bytes_per_record: u64,
}

impl Default for CatchUpBound {
    fn default() -> Self {
        CatchUpBound {
            messages_per_round: 8,
            messages_per_record: 12,
            bytes_per_round: 1_000,
            bytes_per_record: 12_000,
        }
    }
}

/// The state one node shows: records (id → deleted, heads, fields) and
/// collisions (id → JSON).
pub type State = (BTreeMap<RecordId, String>, BTreeMap<String, String>);

/// A store's records and collisions, for comparison.
pub fn state(store: &mut Store) -> entente_node::Result<State> {
    let mut records = BTreeMap::new();
    for e in store.changes_since(0, usize::MAX)? {
        let schema = store.schema().clone();
        let line = store.read_record(&e.id, |rec| {
            let fields = serde_json::to_string(&rec.fields_json(&schema)).expect("json");
            let heads = entente_model::record::heads_to_hex(&rec.heads()).join(",");
            format!("deleted={} heads={heads} fields={fields}", rec.is_deleted())
        })?;
        if let Some(line) = line {
            records.insert(e.id, line);
        }
    }
    let collisions = store
        .collisions(&CollisionFilter {
            include_resolved: true,
            ..Default::default()
        })?
        .into_iter()
        .map(|c| (c.id.to_string(), serde_json::to_string(&c).expect("json")))
        .collect();
    Ok((records, collisions))
}

/// (1) Every running node shows node 0's state. A node replicating only some
/// collections (node 0 replicates all) shows exactly node 0's records of
/// those collections, every collision of node 0 whose records are all of
/// them, and no collision node 0 does not show identically.
pub fn convergence(sim: &mut Sim) -> Result<(), String> {
    let n = sim.len();
    let mut reference: Option<(State, BTreeMap<RecordId, String>)> = None;
    for i in 0..n {
        let partial = sim.is_partial(i);
        let Some(store) = sim.store(i) else {
            return Err(format!("node {i} is down after the heal"));
        };
        let s = state(store).map_err(|e| format!("node {i}: {e}"))?;
        let Some((r, collection_of)) = &reference else {
            if partial {
                return Err("node 0 must replicate every collection".into());
            }
            let mut collection_of = BTreeMap::new();
            for id in s.0.keys() {
                if let Some(c) = store.collection_of(id).map_err(|e| e.to_string())? {
                    collection_of.insert(id.clone(), c);
                }
            }
            reference = Some((s, collection_of));
            continue;
        };
        let keeps = |id: &RecordId| collection_of.get(id).is_some_and(|c| sim.keeps(i, c));
        let expected: BTreeMap<RecordId, String> =
            r.0.iter()
                .filter(|(id, _)| keeps(id))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        if s.0 != expected {
            let first = expected
                .iter()
                .find(|(k, v)| s.0.get(*k) != Some(*v))
                .map(|(k, _)| k.to_string())
                .or_else(|| {
                    s.0.keys()
                        .find(|k| !expected.contains_key(*k))
                        .map(|k| k.to_string())
                })
                .unwrap_or_default();
            return Err(format!(
                "not converged: node {i} differs from node 0 in records ({} vs {}; first: {first})",
                s.0.len(),
                expected.len()
            ));
        }
        if !partial {
            if s.1 != r.1 {
                return Err(format!(
                    "not converged: node {i} differs from node 0 in collisions ({} vs {})",
                    s.1.len(),
                    r.1.len()
                ));
            }
            continue;
        }
        if let Some(id) =
            s.1.iter()
                .find(|(k, v)| r.1.get(*k) != Some(*v))
                .map(|(k, _)| k)
        {
            return Err(format!(
                "not converged: node {i} (partial) shows collision {id} unlike node 0"
            ));
        }
        let mut wanted = Vec::new();
        for (id, json) in &r.1 {
            let c: Collision = serde_json::from_str(json).map_err(|e| e.to_string())?;
            if c.records.iter().all(&keeps) && !s.1.contains_key(id) {
                wanted.push(id.clone());
            }
        }
        if let Some(id) = wanted.first() {
            return Err(format!(
                "not converged: node {i} (partial) lacks collision {id} of its collections"
            ));
        }
    }
    Ok(())
}

/// (2) Every acknowledged change is in every node's history (on a node
/// replicating only some collections, of the records of those).
pub fn acknowledged(sim: &mut Sim, ledger: &Ledger) -> Result<(), String> {
    let mut by_record: BTreeMap<&RecordId, Vec<(usize, &String)>> = BTreeMap::new();
    for (site, id, hex) in &ledger.acked {
        by_record.entry(id).or_default().push((*site, hex));
    }
    // Node 0 replicates every collection; another node only its own.
    let mut collection_of = BTreeMap::new();
    let store = sim.store(0).ok_or("node 0 is down")?;
    for id in by_record.keys() {
        if let Some(c) = store.collection_of(id).map_err(|e| e.to_string())? {
            collection_of.insert(*id, c);
        }
    }
    for node in 0..sim.len() {
        let kept: BTreeSet<&RecordId> = by_record
            .keys()
            .filter(|id| {
                !sim.is_partial(node) || collection_of.get(*id).is_some_and(|c| sim.keeps(node, c))
            })
            .copied()
            .collect();
        let store = sim.store(node).ok_or("a node is down")?;
        for (id, changes) in by_record.iter().filter(|(id, _)| kept.contains(*id)) {
            let lost = store
                .read_record(id, |rec| -> Result<Option<String>, String> {
                    for (site, hex) in changes {
                        let hash: ChangeHash = hex
                            .parse()
                            .map_err(|_| format!("acknowledged change `{hex}` is not a hash"))?;
                        if rec.doc().get_change_meta_by_hash(&hash).is_none() {
                            return Ok(Some(format!(
                                "acknowledged change {hex} of {id} (site {site}) lost at node {node}"
                            )));
                        }
                    }
                    Ok(None)
                })
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "record {id} written at site {} is missing at node {node}",
                        changes[0].0
                    )
                })??;
            if let Some(lost) = lost {
                return Err(lost);
            }
        }
    }
    Ok(())
}

fn normalize(field: &str, v: &str) -> String {
    if field == "email" {
        v.trim().to_lowercase()
    } else {
        v.trim().to_string()
    }
}

/// (3) Exactly the collisions the workload caused (see the module docs).
pub fn oracle(store: &mut Store, ledger: &Ledger) -> Result<(), String> {
    let schema = store.schema().clone();
    let mut records: BTreeMap<RecordId, Record> = BTreeMap::new();
    for e in store
        .changes_since(0, usize::MAX)
        .map_err(|e| e.to_string())?
    {
        if let Some(r) = store.record(&e.id).map_err(|e| e.to_string())? {
            records.insert(e.id, r);
        }
    }
    let collisions = store
        .collisions(&CollisionFilter {
            include_resolved: true,
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
    // Expected situations, from the final records.
    let mut groups: BTreeMap<(String, String, Vec<String>), BTreeSet<RecordId>> = BTreeMap::new();
    let mut dangling: BTreeSet<(RecordId, String, RecordId)> = BTreeSet::new();
    let mut flagged: BTreeSet<(RecordId, String)> = BTreeSet::new();
    for (id, rec) in &records {
        if rec.is_deleted() {
            continue;
        }
        let Some(coll) = rec.collection() else {
            continue;
        };
        for key in schema.unique_keys(&coll) {
            let mut combos: Vec<Vec<String>> = vec![Vec::new()];
            for f in &key.fields {
                let vals: BTreeSet<String> = rec
                    .field_values(&schema, f)
                    .iter()
                    .map(|(v, _)| normalize(f, &v.to_text()))
                    .filter(|s| !s.is_empty())
                    .collect();
                combos = combos
                    .iter()
                    .flat_map(|c| {
                        vals.iter().map(move |v| {
                            let mut c = c.clone();
                            c.push(v.clone());
                            c
                        })
                    })
                    .collect();
            }
            for c in combos {
                groups
                    .entry((coll.clone(), key.name.clone(), c))
                    .or_default()
                    .insert(id.clone());
            }
        }
        let fields = rec.fields_json(&schema);
        for (field, _) in schema.references(&coll) {
            let Some(target) = fields.get(&field).and_then(|v| v.as_str()) else {
                continue;
            };
            let Ok(target) = RecordId::parse(target) else {
                continue;
            };
            if let Some(t) = records.get(&target)
                && t.is_deleted()
                && t.merged_into().is_none()
            {
                dangling.insert((id.clone(), field.clone(), target));
            }
        }
        let def = schema.collection(&coll).map_err(|e| e.to_string())?;
        for (name, f) in &def.fields {
            if f.policy == MergePolicy::Flag {
                let distinct: BTreeSet<String> = rec
                    .field_values(&schema, name)
                    .iter()
                    .map(|(v, _)| v.to_text())
                    .collect();
                if distinct.len() >= 2 {
                    flagged.insert((id.clone(), name.clone()));
                }
            }
        }
    }
    groups.retain(|_, holders| holders.len() >= 2);
    let of_kind = |k: CollisionKind| collisions.iter().filter(move |c| c.kind == k);
    // Duplicates.
    for ((coll, key, value), holders) in &groups {
        let holders: Vec<RecordId> = holders.iter().cloned().collect();
        let found = of_kind(CollisionKind::Duplicate).any(|c| {
            c.collection == *coll && c.field.as_deref() == Some(key) && c.records == holders
        });
        if !found {
            return Err(format!(
                "missed collision: {coll} share {key} {value:?} ({} holders) but no duplicate names them",
                holders.len()
            ));
        }
    }
    for c in of_kind(CollisionKind::Duplicate).filter(|c| c.is_open()) {
        let holds = groups.iter().any(|((coll, key, _), h)| {
            *coll == c.collection
                && c.field.as_deref() == Some(key.as_str())
                && h.iter().eq(c.records.iter())
        });
        if !holds {
            return Err(format!(
                "spurious collision: open duplicate {} on {:?} {:?} does not hold",
                c.id, c.field, c.value
            ));
        }
    }
    // Dangling references.
    let names =
        |c: &Collision, a: &RecordId, b: &RecordId| c.records.contains(a) && c.records.contains(b);
    for (referrer, field, target) in &dangling {
        let found = of_kind(CollisionKind::DanglingReference)
            .any(|c| names(c, referrer, target) && c.field.as_deref() == Some(field));
        if !found {
            return Err(format!(
                "missed collision: {referrer}.{field} names deleted {target} but no dangling_reference"
            ));
        }
    }
    for c in of_kind(CollisionKind::DanglingReference).filter(|c| c.is_open()) {
        let holds = dangling
            .iter()
            .any(|(r, f, t)| names(c, r, t) && c.field.as_deref() == Some(f.as_str()));
        if !holds {
            return Err(format!(
                "spurious collision: open dangling_reference {} does not hold",
                c.id
            ));
        }
    }
    // Flagged fields.
    for (id, field) in &flagged {
        let found = of_kind(CollisionKind::FlaggedField)
            .any(|c| c.records == [id.clone()] && c.field.as_deref() == Some(field));
        if !found {
            return Err(format!(
                "missed collision: {id}.{field} has concurrent values but no flagged_field"
            ));
        }
    }
    for c in of_kind(CollisionKind::FlaggedField).filter(|c| c.is_open()) {
        let holds = c.records.len() == 1
            && flagged.contains(&(c.records[0].clone(), c.field.clone().unwrap_or_default()));
        if !holds {
            return Err(format!(
                "spurious collision: open flagged_field {} does not hold",
                c.id
            ));
        }
    }
    // Update vs delete: open ones are about records that were deleted.
    for c in of_kind(CollisionKind::UpdateDelete).filter(|c| c.is_open()) {
        for id in &c.records {
            let deleted_once = records
                .get(id)
                .is_some_and(|r| r.history(&schema).iter().any(|h| h.deleted));
            if !deleted_once {
                return Err(format!(
                    "spurious collision: open update_delete {} on {id}, never deleted",
                    c.id
                ));
            }
        }
    }
    // What the generator constructed.
    for id in &ledger.expect_update_delete {
        if !of_kind(CollisionKind::UpdateDelete).any(|c| c.records.contains(id)) {
            return Err(format!(
                "missed collision: constructed edit-vs-delete of {id} is not flagged"
            ));
        }
    }
    for (referrer, target) in &ledger.expect_dangling {
        // A merge or restore of the target made elsewhere before the two
        // writes, still in flight then, may leave it merged away or live:
        // then there is nothing dangling.
        let dangles = records.get(referrer).is_some_and(|r| !r.is_deleted())
            && records
                .get(target)
                .is_some_and(|t| t.is_deleted() && t.merged_into().is_none());
        if dangles && !of_kind(CollisionKind::DanglingReference).any(|c| names(c, referrer, target))
        {
            return Err(format!(
                "missed collision: constructed dangling {referrer} -> {target} is not flagged"
            ));
        }
    }
    for id in &ledger.expect_flagged {
        // A delete made elsewhere before the two edits, still in flight
        // then, may tombstone the record: deleted records show no flag.
        let live = records.get(id).is_some_and(|r| !r.is_deleted());
        if live && !of_kind(CollisionKind::FlaggedField).any(|c| c.records.contains(id)) {
            return Err(format!(
                "missed collision: constructed bank accounts on {id} are not flagged"
            ));
        }
    }
    for email in &ledger.expect_duplicate {
        let found = of_kind(CollisionKind::Duplicate).any(|c| {
            c.field.as_deref() == Some("email") && c.value.as_deref() == Some(email.as_str())
        });
        if !found {
            return Err(format!(
                "missed collision: {email} created at several sites is not flagged"
            ));
        }
    }
    Ok(())
}

/// (5) No deleted record silently came back.
pub fn deletes_hold(store: &mut Store, ledger: &Ledger) -> Result<(), String> {
    let open_ud: BTreeSet<RecordId> = store
        .collisions(&CollisionFilter {
            kind: Some(CollisionKind::UpdateDelete),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?
        .into_iter()
        .flat_map(|c| c.records)
        .collect();
    for (site, id) in &ledger.deleted {
        if ledger.restored.contains(id) || open_ud.contains(id) {
            continue;
        }
        let rec = store
            .record(id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("deleted record {id} is missing"))?;
        if !rec.is_deleted() {
            return Err(format!(
                "deleted record came back: {id} (deleted at site {site}) is live, not restored, no open update_delete"
            ));
        }
    }
    Ok(())
}

/// (4) Catch-up work after the heal against the divergence.
pub fn catch_up(
    after_heal: Traffic,
    changed: usize,
    nodes: usize,
    pairs: usize,
    rounds: u64,
    bound: &CatchUpBound,
) -> Result<(), String> {
    let (messages, bytes) = after_heal.total();
    let per_rounds = pairs as u64 * (rounds + 2);
    let per_records = changed as u64 * nodes as u64;
    let max_messages =
        bound.messages_per_round * per_rounds + bound.messages_per_record * per_records;
    let max_bytes = bound.bytes_per_round * per_rounds + bound.bytes_per_record * per_records;
    if messages > max_messages || bytes > max_bytes {
        return Err(format!(
            "catch-up out of proportion: {messages} frames / {bytes} B after the heal for {changed} changed records \
             ({nodes} nodes, {pairs} pairs, {rounds} rounds; bound {max_messages} frames / {max_bytes} B)"
        ));
    }
    Ok(())
}
