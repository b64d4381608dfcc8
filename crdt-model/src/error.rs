//! The one error enum of `entente-model`.

use thiserror::Error;

/// Everything that can go wrong in the domain layer. Each variant has a stable
/// machine-readable [`ModelError::code`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// The schema TOML could not be parsed or is inconsistent.
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    /// A write names a collection the schema does not declare.
    #[error("unknown collection `{0}`")]
    UnknownCollection(String),
    /// A write names a field the collection does not declare.
    #[error("collection `{collection}` has no field `{field}`")]
    UnknownField {
        /// The collection written to.
        collection: String,
        /// The undeclared field.
        field: String,
    },
    /// A value does not have the declared type of its field.
    #[error("field `{field}` expects {expected}: {detail}")]
    WrongType {
        /// The field written.
        field: String,
        /// The declared type, in words.
        expected: String,
        /// What was wrong with the value given.
        detail: String,
    },
    /// A required field is missing on create or is being unset.
    #[error("field `{0}` is required")]
    MissingRequired(String),
    /// A record id is not a UUID or ULID string.
    #[error("invalid record id `{0}`: expected a UUID or ULID")]
    InvalidId(String),
    /// Heads given as a base version are not valid change hashes or are not
    /// known to the record.
    #[error("invalid heads: {0}")]
    InvalidHeads(String),
    /// The record is deleted; restore it before editing.
    #[error("record `{0}` is deleted")]
    Deleted(String),
    /// The record is not deleted (restore of a live record).
    #[error("record `{0}` is not deleted")]
    NotDeleted(String),
    /// The Automerge document does not have the shape of an Entente record.
    #[error("not an Entente record: {0}")]
    NotARecord(String),
    /// Automerge refused an operation.
    #[error("automerge: {0}")]
    Automerge(String),
    /// A resolution does not fit the collision it is meant to settle.
    #[error("invalid resolution: {0}")]
    InvalidResolution(String),
}

impl ModelError {
    /// The stable code an API answers with.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::InvalidSchema(_) => "INVALID_SCHEMA",
            ModelError::UnknownCollection(_) => "UNKNOWN_COLLECTION",
            ModelError::UnknownField { .. } => "UNKNOWN_FIELD",
            ModelError::WrongType { .. } => "WRONG_TYPE",
            ModelError::MissingRequired(_) => "MISSING_REQUIRED_FIELD",
            ModelError::InvalidId(_) => "INVALID_ID",
            ModelError::InvalidHeads(_) => "INVALID_HEADS",
            ModelError::Deleted(_) => "RECORD_DELETED",
            ModelError::NotDeleted(_) => "RECORD_NOT_DELETED",
            ModelError::NotARecord(_) => "NOT_A_RECORD",
            ModelError::Automerge(_) => "AUTOMERGE_ERROR",
            ModelError::InvalidResolution(_) => "INVALID_RESOLUTION",
        }
    }
}

impl From<automerge::AutomergeError> for ModelError {
    fn from(e: automerge::AutomergeError) -> Self {
        ModelError::Automerge(e.to_string())
    }
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
