//! The decision layer's error: everything an entry point can be told, with the layer below's
//! error kept whole so the edge can tell bad input from a fault. No wire types here.
#![forbid(unsafe_code)]
use crate::pipeline::EncodeError;
use crate::policy::PolicyError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// The request is wrong (empty or oversize input, unknown model, bad policy value).
    #[error("{0}")]
    InvalidArgument(String),
    /// Warming up: retry shortly or elsewhere.
    #[error("not ready: {0}")]
    NotReady(String),
    /// Writing what must survive a restart failed; the request was not accepted.
    #[error("storage: {0}")]
    Storage(String),
    /// The feature is switched off in the configuration.
    #[error("{0}")]
    Disabled(String),
    /// A reload was refused (a bad file, a setting only a restart changes); the previous
    /// state keeps serving.
    #[error("reload refused: {0}")]
    Reload(String),
    /// Tokenizing or embedding failed (admission, deadline, backend: see the inner error).
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl From<PolicyError> for ServiceError {
    fn from(e: PolicyError) -> Self {
        ServiceError::InvalidArgument(e.0)
    }
}
