//! Typed errors, each mapped to one gRPC code.
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum TgError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("deadline exceeded before the request was computed")]
    DeadlineExceeded,
    #[error("not ready: {0}")]
    Unavailable(String),
    #[error("request cancelled by the client")]
    Cancelled,
    #[error("backend failure: {0}")]
    Backend(String),
    #[error("{0}")]
    Internal(String),
}

impl TgError {
    pub fn code(&self) -> Code {
        match self {
            TgError::InvalidArgument(_) => Code::InvalidArgument,
            TgError::Overloaded(_) => Code::ResourceExhausted,
            TgError::DeadlineExceeded => Code::DeadlineExceeded,
            TgError::Unavailable(_) => Code::Unavailable,
            TgError::Cancelled => Code::Cancelled,
            TgError::Backend(_) | TgError::Internal(_) => Code::Internal,
        }
    }
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TgError::InvalidArgument(_) => "invalid_argument",
            TgError::Overloaded(_) => "queue_full",
            TgError::DeadlineExceeded => "deadline",
            TgError::Unavailable(_) => "unavailable",
            TgError::Cancelled => "cancelled",
            TgError::Backend(_) => "backend",
            TgError::Internal(_) => "internal",
        }
    }
}

impl From<TgError> for Status {
    fn from(e: TgError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
