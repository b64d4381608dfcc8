//! The one error enum of `entente-node`.

use entente_model::{ModelError, RecordId};
use thiserror::Error;

/// Everything the node can refuse or fail at. [`Error::code`] is the stable
/// code the API and CLI show.
#[derive(Debug, Error)]
pub enum Error {
    /// The input broke a schema or record rule.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A write would give a live record a unique value another live record
    /// holds; `force` overrides.
    #[error("{field} `{value}` is already held by record {existing}")]
    Duplicate {
        /// `DUPLICATE_<KEY>`.
        code: String,
        /// The unique key.
        field: String,
        /// The normalized value.
        value: String,
        /// The live record that holds it.
        existing: RecordId,
    },
    /// A reference names a record that does not exist or is deleted.
    #[error("field `{field}` refers to {target}, which {why}")]
    BadReference {
        /// The reference field.
        field: String,
        /// The id it names.
        target: String,
        /// `does not exist` or `is deleted`.
        why: &'static str,
    },
    /// No record with this id.
    #[error("no record {0}")]
    NotFound(String),
    /// No collision with this id.
    #[error("no collision {0}")]
    CollisionNotFound(String),
    /// A record with this id exists already.
    #[error("record {0} exists already")]
    AlreadyExists(RecordId),
    /// The data dir was made with another schema.
    #[error("the data dir was made with schema {stored}, this node runs schema {given}")]
    SchemaMismatch {
        /// Fingerprint kept in the data dir.
        stored: String,
        /// Fingerprint of the running schema.
        given: String,
    },
    /// Stored bytes could not be read back.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// RocksDB failed.
    #[error("storage: {0}")]
    Storage(String),
    /// Bytes from a peer were refused (bad encoding, too large, bad checksum,
    /// a panic inside Automerge); the record stays as it was.
    #[error("rejected remote change for {record}: {reason}")]
    RejectedChange {
        /// The record the change was for.
        record: String,
        /// Why.
        reason: String,
    },
    /// A peer broke the replication protocol (bad bytes, a cap exceeded, a
    /// message out of turn); its session is closed.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The node's configuration or data dir is unusable.
    #[error("config: {0}")]
    Config(String),
    /// The network layer failed (listen, dial, the event loop stopped).
    #[error("network: {0}")]
    Network(String),
    /// The peer has no replication session (not connected, or its
    /// handshake has not finished).
    #[error("peer not ready: {0}")]
    PeerNotReady(String),
    /// A compare-and-repair run with this peer is already going on.
    #[error("{0}")]
    VerifyInProgress(String),
    /// Compare-and-repair cannot run in this session (one side replicates
    /// only some collections: whole-store fingerprints would differ on
    /// records that are not meant to be shared).
    #[error("{0}")]
    VerifyUnsupported(String),
    /// A file-system error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The stable code.
    pub fn code(&self) -> String {
        match self {
            Error::Model(e) => e.code().to_string(),
            Error::Duplicate { code, .. } => code.clone(),
            Error::BadReference { .. } => "BAD_REFERENCE".into(),
            Error::NotFound(_) => "NOT_FOUND".into(),
            Error::CollisionNotFound(_) => "COLLISION_NOT_FOUND".into(),
            Error::AlreadyExists(_) => "ALREADY_EXISTS".into(),
            Error::SchemaMismatch { .. } => "SCHEMA_MISMATCH".into(),
            Error::Corrupt(_) => "CORRUPT_STORE".into(),
            Error::Storage(_) => "STORAGE_ERROR".into(),
            Error::RejectedChange { .. } => "REJECTED_CHANGE".into(),
            Error::Protocol(_) => "PROTOCOL_ERROR".into(),
            Error::Config(_) => "CONFIG_ERROR".into(),
            Error::Network(_) => "NETWORK_ERROR".into(),
            Error::PeerNotReady(_) => "PEER_NOT_READY".into(),
            Error::VerifyInProgress(_) => "VERIFY_IN_PROGRESS".into(),
            Error::VerifyUnsupported(_) => "VERIFY_UNSUPPORTED".into(),
            Error::Io(_) => "IO_ERROR".into(),
        }
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
