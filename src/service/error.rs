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
    /// Tokenizing or embedding failed (admission, deadline, backend: see the inner error).
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl From<PolicyError> for ServiceError {
    fn from(e: PolicyError) -> Self {
        ServiceError::InvalidArgument(e.0)
    }
}
