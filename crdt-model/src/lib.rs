//! # entente-model
//!
//! Entente's pure domain logic. Nothing here touches storage, the network, a
//! clock or a random generator: every input — the writing node, the commit
//! time, ids — is passed in, so the same inputs give the same documents and
//! the same collisions on every replica.
//!
//! How the pieces fit:
//!
//! 1. A [`Schema`] (TOML, or the built-in CRM schema) declares collections,
//!    typed fields, unique fields and groups with their normalization,
//!    references and per-field merge policy; its fingerprint is what nodes
//!    compare before they sync.
//! 2. A [`Record`] is one Automerge document: user fields at the root plus
//!    reserved `_` keys for identity, the tombstone, the merge alias and
//!    resolution entries. Edits are validated before anything is written; an
//!    edit based on older heads is made as of that version and merged, and
//!    reports the fields changed concurrently since.
//! 3. [`collision`] derives the four kinds of collision from document state
//!    and history alone, gives each a deterministic id, and plans the changes
//!    that settle one.
//!
//! The node (`entente-node`) persists records, keeps the indexes that find
//! duplicate holders and referrers, and calls these functions for every
//! record an applied batch touches.

pub mod collision;
pub mod error;
pub mod ids;
pub mod record;
pub mod schema;
pub mod value;

pub use collision::{Collision, CollisionKind, ResolveRequest, Status};
pub use error::{ModelError, Result};
pub use ids::{CollisionId, NodeId, RecordId};
pub use record::{CommitCtx, ConcurrentField, Edit, HistoryEntry, Record, UpdateOutcome};
pub use schema::{FieldType, MergePolicy, Schema, UniqueKey};
pub use value::FieldValue;

pub use automerge;
