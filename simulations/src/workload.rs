//! The workload generator: writes at the sites, drawn from the seed, and the
//! ledger of what they did (for the checks).
//!
//! Random operations: contact creates with e-mails from a small shared pool
//! (so duplicates happen, some refused, some forced), children (`addresses`,
//! `phones`, `notes`) referring to a contact, edits of random fields
//! (including the `flag` field `bank_account` and sometimes the e-mail),
//! deletes, restores, and resolutions of open collisions a site sees.
//!
//! *Constructed* situations are two or more writes at different sites at the
//! same virtual instant, with no event in between: whatever the network
//! does, they are concurrent, so the generator knows what they cause — an
//! edit against a delete (`update_delete`), a child created for a contact
//! deleted elsewhere (`dangling_reference`), two different bank accounts
//! (`flagged_field`), one fresh e-mail created at several sites
//! (`duplicate`). Records in a constructed situation are *reserved*: no later
//! random write or resolution touches them, so nothing can legitimately
//! undo what the checker expects — not even through the id of a record
//! merged into a reserved one, which the store redirects to its survivor.

use std::collections::BTreeSet;

use entente_model::{CollisionKind, RecordId, ResolveRequest};
use entente_node::{CollisionFilter, WriteResult};
use serde_json::{Map, Value, json};

use crate::Rng;
use crate::net::Sim;

/// What the workload did, for the checks.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Acknowledged changes: (site, record, change hash hex).
    pub acked: Vec<(usize, RecordId, String)>,
    /// Acknowledged deletes (site, record).
    pub deleted: Vec<(usize, RecordId)>,
    /// Records explicitly restored (a restore, or a resolution restoring them).
    pub restored: BTreeSet<RecordId>,
    /// Constructed: records with an edit concurrent with a delete.
    pub expect_update_delete: BTreeSet<RecordId>,
    /// Constructed: (referrer, target) with a delete of the target
    /// concurrent with the referrer's creation.
    pub expect_dangling: BTreeSet<(RecordId, RecordId)>,
    /// Constructed: records with two different concurrent bank accounts.
    pub expect_flagged: BTreeSet<RecordId>,
    /// Constructed: normalized e-mails created at several sites at once.
    pub expect_duplicate: BTreeSet<String>,
    /// Records changed since [`Ledger::changed`] was last cleared.
    pub changed: BTreeSet<RecordId>,
    /// Operations attempted.
    pub ops: u64,
    /// Operations refused by the store (a duplicate, a deleted record…).
    pub refused: u64,
    /// Resolutions made.
    pub resolutions: u64,
}

/// The generator.
#[derive(Debug)]
pub struct Workload {
    rng: Rng,
    pool: usize,
    contacts: Vec<RecordId>,
    children: Vec<(RecordId, &'static str)>,
    reserved: BTreeSet<RecordId>,
    fresh: u64,
    /// What happened.
    pub ledger: Ledger,
}

const CONTACT_FIELDS: [&str; 6] = [
    "city",
    "phone",
    "first_name",
    "last_name",
    "bank_account",
    "email",
];

impl Workload {
    /// A generator for `seed`, with an e-mail pool sized for `ops`.
    pub fn new(seed: u64, ops: usize) -> Workload {
        Workload {
            rng: Rng::new(seed ^ 0x776f_726b_6c6f_6164),
            pool: (ops / 6).max(6),
            contacts: Vec::new(),
            children: Vec::new(),
            reserved: BTreeSet::new(),
            fresh: 0,
            ledger: Ledger::default(),
        }
    }

    /// The generator's random stream.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// One random operation at `site` (which must be up).
    pub fn step(&mut self, sim: &mut Sim, site: usize) {
        let k = self.rng.below(100);
        match k {
            0..=24 => self.create_pool_contact(sim, site),
            25..=39 => self.create_child(sim, site),
            40..=64 => self.edit_contact(sim, site),
            65..=71 => self.edit_child(sim, site),
            72..=83 => self.delete(sim, site),
            84..=88 => self.restore(sim, site),
            _ => self.resolve(sim, site),
        }
    }

    /// One random operation at `site` that writes only contacts (a node
    /// replicating only contacts: its writes to other collections would
    /// stay local, see the README's "Partial replication").
    pub fn step_contacts(&mut self, sim: &mut Sim, site: usize) {
        let k = self.rng.below(100);
        let contact = match k {
            0..=29 => None,
            _ => self.pick_contact(sim, site),
        };
        match (k, contact) {
            (30..=79, Some(id)) => self.edit_contact_field(sim, site, &id),
            (80..=91, Some(id)) => {
                self.delete_id(sim, site, &id);
            }
            (92.., Some(_)) => self.restore(sim, site),
            _ => self.create_pool_contact(sim, site),
        }
    }

    /// Creates a contact with an e-mail from the pool, forced a third of the
    /// time.
    fn create_pool_contact(&mut self, sim: &mut Sim, site: usize) {
        let email = self.pool_email();
        let force = self.rng.below(3) == 0;
        self.create_contact(sim, site, &email, force);
    }

    fn pool_email(&mut self) -> String {
        let n = self.rng.below(self.pool);
        match self.rng.below(4) {
            0 => format!(" User{n}@Example.org"),
            1 => format!("USER{n}@EXAMPLE.ORG "),
            _ => format!("user{n}@example.org"),
        }
    }

    /// An unreserved contact for a random write at `site`.
    fn pick_contact(&mut self, sim: &mut Sim, site: usize) -> Option<RecordId> {
        let id = pick(&mut self.rng, &self.contacts, &self.reserved)?;
        (!self.aliases_reserved(sim, site, &id)).then_some(id)
    }

    /// An unreserved child for a random write at `site`.
    fn pick_child(&mut self, sim: &mut Sim, site: usize) -> Option<(RecordId, &'static str)> {
        for _ in 0..4 {
            if self.children.is_empty() {
                return None;
            }
            let c = self.children[self.rng.below(self.children.len())].clone();
            if !self.reserved.contains(&c.0) {
                return (!self.aliases_reserved(sim, site, &c.0)).then_some(c);
            }
        }
        None
    }

    /// Whether `site` answers `id` by a *reserved* survivor: `id` was merged
    /// into a reserved record there, so the store would redirect a write to
    /// `id` onto the reserved one (seed 68 of `random`: an edit of a
    /// merged-away contact set the survivor's bank account after both
    /// constructed ones, legitimately superseding the expected
    /// `flagged_field`). Such ids are as reserved as their survivor.
    fn aliases_reserved(&self, sim: &mut Sim, site: usize, id: &RecordId) -> bool {
        let Some(store) = sim.store(site) else {
            return false;
        };
        match store.get(id) {
            Ok(Some(view)) => view.id != *id && self.reserved.contains(&view.id),
            _ => false,
        }
    }

    /// Creates a contact with `email` at `site`; its id when acknowledged.
    pub fn create_contact(
        &mut self,
        sim: &mut Sim,
        site: usize,
        email: &str,
        force: bool,
    ) -> Option<RecordId> {
        let mut f = Map::new();
        f.insert("email".into(), json!(email));
        f.insert("city".into(), json!(format!("c{}", self.rng.below(50))));
        if self.rng.below(4) == 0 {
            f.insert(
                "bank_account".into(),
                json!(format!("CH{}", self.rng.below(1000))),
            );
        }
        sim.set_clock(site);
        let r = sim.store(site)?.create("contacts", None, &f, force);
        let id = self.commit(sim, site, format_args!("create {email:?} force={force}"), r)?;
        self.contacts.push(id.clone());
        Some(id)
    }

    fn create_child_of(
        &mut self,
        sim: &mut Sim,
        site: usize,
        contact: &RecordId,
    ) -> Option<RecordId> {
        let (coll, extra) = match self.rng.below(3) {
            0 => ("addresses", ("city", format!("a{}", self.rng.below(50)))),
            1 => ("phones", ("number", format!("+41 {}", self.rng.below(8)))),
            _ => ("notes", ("subject", format!("s{}", self.rng.below(50)))),
        };
        let mut f = Map::new();
        f.insert("contact_id".into(), json!(contact.as_str()));
        f.insert(extra.0.into(), json!(extra.1));
        let force = self.rng.below(4) == 0;
        sim.set_clock(site);
        let r = sim.store(site)?.create(coll, None, &f, force);
        let id = self.commit(sim, site, format_args!("create {coll} of {contact}"), r)?;
        self.children.push((id.clone(), coll));
        Some(id)
    }

    fn create_child(&mut self, sim: &mut Sim, site: usize) {
        match self.pick_contact(sim, site) {
            Some(c) => {
                self.create_child_of(sim, site, &c);
            }
            None => {
                let email = self.pool_email();
                self.create_contact(sim, site, &email, false);
            }
        }
    }

    fn edit_contact(&mut self, sim: &mut Sim, site: usize) {
        let Some(id) = self.pick_contact(sim, site) else {
            return self.create_child(sim, site);
        };
        self.edit_contact_field(sim, site, &id);
    }

    /// Sets a random field of contact `id` at `site` (an e-mail from the
    /// pool, forced half the time).
    fn edit_contact_field(&mut self, sim: &mut Sim, site: usize, id: &RecordId) {
        let field = CONTACT_FIELDS[self.rng.below(CONTACT_FIELDS.len())];
        let (value, force) = if field == "email" {
            (self.pool_email(), self.rng.below(2) == 0)
        } else {
            (format!("v{}", self.rng.below(1000)), false)
        };
        self.update(sim, site, id, field, &value, force);
    }

    fn update(
        &mut self,
        sim: &mut Sim,
        site: usize,
        id: &RecordId,
        field: &str,
        value: &str,
        force: bool,
    ) -> bool {
        let mut f = Map::new();
        f.insert(field.into(), json!(value));
        sim.set_clock(site);
        let Some(store) = sim.store(site) else {
            return false;
        };
        let r = store.update(id, &f, None, force);
        self.commit(sim, site, format_args!("edit {id} {field}"), r)
            .is_some()
    }

    fn edit_child(&mut self, sim: &mut Sim, site: usize) {
        let Some((id, coll)) = self.pick_child(sim, site) else {
            return self.create_child(sim, site);
        };
        let field = match coll {
            "addresses" => "city",
            "phones" => "kind",
            _ => "subject",
        };
        let value = format!("w{}", self.rng.below(1000));
        self.update(sim, site, &id, field, &value, false);
    }

    fn delete(&mut self, sim: &mut Sim, site: usize) {
        let id = if self.rng.below(3) == 0 {
            self.pick_child(sim, site).map(|c| c.0)
        } else {
            self.pick_contact(sim, site)
        };
        if let Some(id) = id {
            self.delete_id(sim, site, &id);
        }
    }

    fn delete_id(&mut self, sim: &mut Sim, site: usize, id: &RecordId) -> bool {
        sim.set_clock(site);
        let Some(store) = sim.store(site) else {
            return false;
        };
        let r = store.delete(id);
        let ok = self
            .commit(sim, site, format_args!("delete {id}"), r)
            .is_some();
        if ok {
            self.ledger.deleted.push((site, id.clone()));
        }
        ok
    }

    fn restore(&mut self, sim: &mut Sim, site: usize) {
        let Some(id) = self.pick_contact(sim, site) else {
            return;
        };
        let force = self.rng.below(2) == 0;
        sim.set_clock(site);
        let Some(store) = sim.store(site) else {
            return;
        };
        let r = store.restore(&id, &Map::new(), force);
        if self
            .commit(sim, site, format_args!("restore {id}"), r)
            .is_some()
        {
            self.ledger.restored.insert(id);
        }
    }

    /// Settles one open collision `site` sees (none involving a reserved
    /// record).
    fn resolve(&mut self, sim: &mut Sim, site: usize) {
        let Some(store) = sim.store(site) else {
            return;
        };
        let open = match store.collisions(&CollisionFilter::default()) {
            Ok(c) => c,
            Err(e) => {
                self.ledger.refused += 1;
                sim.log(format_args!("write {site} collisions refused {}", e.code()));
                return;
            }
        };
        let open: Vec<_> = open
            .into_iter()
            .filter(|c| c.records.iter().all(|r| !self.reserved.contains(r)))
            .collect();
        if open.is_empty() {
            return self.edit_contact(sim, site);
        }
        let c = open[self.rng.below(open.len())].clone();
        let choice = self.rng.below(3);
        let role = |role: &str| {
            c.sides
                .iter()
                .find(|s| s.role == role)
                .map(|s| s.record.clone())
        };
        let mut restored = Vec::new();
        let mut req = ResolveRequest::default();
        match c.kind {
            CollisionKind::UpdateDelete => {
                if choice == 0 {
                    req.confirm_delete = true;
                } else {
                    req.restore = true;
                    restored.extend(c.records.iter().cloned());
                }
            }
            CollisionKind::Duplicate => match choice {
                0 => req.merge_into = c.records.first().cloned(),
                1 => {
                    self.fresh += 1;
                    req.on = c.records.last().cloned();
                    let key = c.field.clone().unwrap_or_default();
                    let value = if key == "email" {
                        format!("fresh{}-{site}@example.org", self.fresh)
                    } else if key == "contact_number" {
                        req.set
                            .insert("number".into(), json!(format!("+1 {}", self.fresh)));
                        String::new()
                    } else {
                        format!("fresh{}-{site}", self.fresh)
                    };
                    if !value.is_empty() {
                        req.set.insert(key, json!(value));
                    }
                }
                _ => req.delete = c.records.last().cloned(),
            },
            CollisionKind::DanglingReference => {
                if choice == 0 {
                    req.delete = role("referrer");
                } else {
                    req.restore = true;
                    restored.extend(role("target"));
                }
            }
            CollisionKind::FlaggedField => {
                self.fresh += 1;
                let field = c.field.clone().unwrap_or_default();
                req.set
                    .insert(field, Value::String(format!("R{}", self.fresh)));
            }
        }
        sim.set_clock(site);
        self.ledger.ops += 1;
        let Some(store) = sim.store(site) else {
            return;
        };
        let result = store.resolve(&c.id, &req);
        match result {
            Ok(done) => {
                self.ledger.resolutions += 1;
                sim.log(format_args!(
                    "write {site} resolve {} {} ok",
                    c.id,
                    c.kind.as_str()
                ));
                let mut heads = Vec::new();
                for id in &done.records {
                    if let Some(store) = sim.store(site) {
                        for h in store.heads(id).unwrap_or_default() {
                            heads.push((id.clone(), h.to_string()));
                        }
                    }
                }
                for (id, h) in heads {
                    self.ledger.changed.insert(id.clone());
                    self.ledger.acked.push((site, id, h));
                }
                self.ledger.restored.extend(restored);
                sim.local_changes(site, &done.records);
            }
            Err(e) => {
                self.ledger.refused += 1;
                sim.log(format_args!(
                    "write {site} resolve {} refused {}",
                    c.id,
                    e.code()
                ));
            }
        }
    }

    /// Constructed: `a` deletes a contact both hold while `b` edits it.
    pub fn delete_vs_edit(&mut self, sim: &mut Sim, a: usize, b: usize) {
        let Some(id) = self.shared_contact(sim, a, b) else {
            return;
        };
        self.reserved.insert(id.clone());
        let value = format!("e{}", self.rng.below(1000));
        let deleted = self.delete_id(sim, a, &id);
        let edited = self.update(sim, b, &id, "city", &value, false);
        if deleted && edited {
            self.ledger.expect_update_delete.insert(id);
        }
    }

    /// Constructed: `a` deletes a contact while `b` adds a phone to it.
    pub fn dangling(&mut self, sim: &mut Sim, a: usize, b: usize) {
        let Some(id) = self.shared_contact(sim, a, b) else {
            return;
        };
        self.reserved.insert(id.clone());
        let deleted = self.delete_id(sim, a, &id);
        if let Some(child) = self.create_child_of(sim, b, &id) {
            self.reserved.insert(child.clone());
            if deleted {
                self.ledger.expect_dangling.insert((child, id));
            }
        }
    }

    /// Constructed: `a` and `b` set different bank accounts on one contact.
    pub fn flagged(&mut self, sim: &mut Sim, a: usize, b: usize) {
        let Some(id) = self.shared_contact(sim, a, b) else {
            return;
        };
        self.reserved.insert(id.clone());
        let n = self.rng.below(1000);
        let x = self.update(sim, a, &id, "bank_account", &format!("A{n}"), false);
        let y = self.update(sim, b, &id, "bank_account", &format!("B{n}"), false);
        if x && y {
            self.ledger.expect_flagged.insert(id);
        }
    }

    /// Constructed: one fresh e-mail created at every site of `sites`.
    pub fn storm(&mut self, sim: &mut Sim, sites: &[usize]) {
        self.fresh += 1;
        let base = format!("storm{}@example.org", self.fresh);
        let mut made = 0;
        for &s in sites {
            let email = match self.rng.below(3) {
                0 => base.to_uppercase(),
                1 => format!("  {base}"),
                _ => base.clone(),
            };
            let force = self.rng.below(2) == 0;
            if let Some(id) = self.create_contact(sim, s, &email, force) {
                self.reserved.insert(id);
                made += 1;
            }
        }
        if made >= 2 {
            self.ledger.expect_duplicate.insert(base);
        }
    }

    /// A live, unreserved contact present at both sites with the same heads.
    fn shared_contact(&mut self, sim: &mut Sim, a: usize, b: usize) -> Option<RecordId> {
        for _ in 0..8 {
            let id = self.pick_contact(sim, a)?;
            let ha = sim.store(a)?.get(&id).ok().flatten()?;
            if ha.deleted || ha.requested_id.is_some() {
                continue;
            }
            let hb = sim.store(b)?.heads(&id).ok()?;
            if entente_model::record::heads_to_hex(&hb) == ha.heads {
                return Some(id);
            }
        }
        None
    }

    fn commit(
        &mut self,
        sim: &mut Sim,
        site: usize,
        what: std::fmt::Arguments<'_>,
        result: entente_node::Result<WriteResult>,
    ) -> Option<RecordId> {
        self.ledger.ops += 1;
        match result {
            Ok(w) => {
                let id = w.record.id.clone();
                sim.log(format_args!("write {site} {what} ok"));
                if let Some(change) = w.change {
                    self.ledger.acked.push((site, id.clone(), change));
                    self.ledger.changed.insert(id.clone());
                    sim.local_changes(site, std::slice::from_ref(&id));
                }
                Some(id)
            }
            Err(e) => {
                self.ledger.refused += 1;
                sim.log(format_args!("write {site} {what} refused {}", e.code()));
                None
            }
        }
    }
}

fn pick(rng: &mut Rng, from: &[RecordId], reserved: &BTreeSet<RecordId>) -> Option<RecordId> {
    for _ in 0..4 {
        if from.is_empty() {
            return None;
        }
        let id = &from[rng.below(from.len())];
        if !reserved.contains(id) {
            return Some(id.clone());
        }
    }
    None
}
