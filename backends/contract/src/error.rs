//! Typed errors every backend returns. The suite matches on the variant, never on message text.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Capability;

/// What kind of thing a [`CellError::NotFound`] could not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Cell,
    Snapshot,
    /// The workload's program (`run.argv[0]`) does not exist or is not executable in the cell's root.
    Program,
    Image,
    /// The workload's working directory (`run.workingDirectory`) is not a directory in the cell's
    /// root. Create fails with it before the workload starts, and must not make the directory.
    WorkingDirectory,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Cell => "cell",
            ResourceKind::Snapshot => "snapshot",
            ResourceKind::Program => "program",
            ResourceKind::Image => "image",
            ResourceKind::WorkingDirectory => "working directory",
        })
    }
}

/// Whether retrying the same call may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retry {
    Retryable,
    NotRetryable,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum CellError {
    /// Admission refused the document. `field` is a dotted path such as `spec.run.argv[1]`.
    #[error("invalid spec: {field}: {reason}")]
    InvalidSpec { field: String, reason: String },

    #[error("{kind} not found: {id}")]
    NotFound { kind: ResourceKind, id: String },

    /// A live cell (or snapshot) already uses this id.
    #[error("already exists: {id}")]
    AlreadyExists { id: String },

    /// The backend does not offer this capability (see [`crate::Capabilities`]).
    #[error("unsupported capability: {capability}")]
    Unsupported { capability: Capability },

    /// The backend cannot run on this host (its preflight said why).
    #[error("backend unavailable: {reason}")]
    Unavailable { reason: String },

    /// `run.timeoutMs` (or another bound) passed; the workload was killed.
    #[error("deadline exceeded after {after_ms} ms")]
    DeadlineExceeded { after_ms: u64 },

    /// The operation is not valid in the cell's current state (e.g. exec into a paused cell).
    #[error("invalid state for {operation}: {state}")]
    InvalidState { operation: String, state: String },

    #[error("backend failure ({retry:?}): {reason}")]
    BackendFailure { reason: String, retry: Retry },
}

impl CellError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CellError::InvalidSpec {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn cell_not_found(id: impl Into<String>) -> Self {
        CellError::NotFound {
            kind: ResourceKind::Cell,
            id: id.into(),
        }
    }

    pub fn failure(reason: impl Into<String>) -> Self {
        CellError::BackendFailure {
            reason: reason.into(),
            retry: Retry::Unknown,
        }
    }

    /// A short stable name of the variant, for reports and protocol messages.
    pub fn kind(&self) -> &'static str {
        match self {
            CellError::InvalidSpec { .. } => "invalid_spec",
            CellError::NotFound { .. } => "not_found",
            CellError::AlreadyExists { .. } => "already_exists",
            CellError::Unsupported { .. } => "unsupported",
            CellError::Unavailable { .. } => "unavailable",
            CellError::DeadlineExceeded { .. } => "deadline_exceeded",
            CellError::InvalidState { .. } => "invalid_state",
            CellError::BackendFailure { .. } => "backend_failure",
        }
    }
}

impl From<std::io::Error> for CellError {
    fn from(e: std::io::Error) -> Self {
        CellError::failure(e.to_string())
    }
}
