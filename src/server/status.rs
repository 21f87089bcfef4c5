//! The one place where errors become gRPC status codes (and metric labels). HTTP and
//! ext_proc entry points map the same `ServiceError` in their own file beside this one.
#![forbid(unsafe_code)]
use tonic::{Code, Status};

use crate::batch::BatchError;
use crate::pipeline::EncodeError;
use crate::service::ServiceError;

/// gRPC code and metric label of an error.
pub fn classify(e: &ServiceError) -> (Code, &'static str) {
    match e {
        ServiceError::InvalidArgument(_) => (Code::InvalidArgument, "invalid_argument"),
        ServiceError::NotReady(_) => (Code::Unavailable, "unavailable"),
        ServiceError::Reload(_) => (Code::FailedPrecondition, "reload_refused"),
        ServiceError::Disabled(_) => (Code::FailedPrecondition, "disabled"),
        ServiceError::Storage(_) => (Code::Internal, "storage"),
        ServiceError::Encode(EncodeError::Batch(b)) => match b {
            BatchError::InvalidInput(_) => (Code::InvalidArgument, "invalid_argument"),
            BatchError::Overloaded(_) => (Code::ResourceExhausted, "queue_full"),
            BatchError::DeadlineExceeded => (Code::DeadlineExceeded, "deadline"),
            BatchError::Unavailable(_) => (Code::Unavailable, "unavailable"),
            BatchError::Backend(_) => (Code::Internal, "backend"),
            BatchError::Internal(_) => (Code::Internal, "internal"),
        },
        ServiceError::Encode(EncodeError::Tokenize(_) | EncodeError::WorkerStopped) => {
            (Code::Internal, "internal")
        }
    }
}

pub fn to_status(e: &ServiceError) -> Status {
    Status::new(classify(e).0, e.to_string())
}

/// The code's name as the `code` label of `tiergate_requests_total`.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Unavailable => "UNAVAILABLE",
        Code::Cancelled => "CANCELLED",
        _ => "INTERNAL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_and_faults_map_apart() {
        let batch = |b| ServiceError::Encode(EncodeError::Batch(b));
        let code = |e: ServiceError| classify(&e).0;
        assert_eq!(
            code(batch(BatchError::InvalidInput("x".into()))),
            Code::InvalidArgument
        );
        assert_eq!(code(batch(BatchError::Backend("x".into()))), Code::Internal);
        assert_eq!(
            code(batch(BatchError::Overloaded("x".into()))),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(batch(BatchError::DeadlineExceeded)),
            Code::DeadlineExceeded
        );
        assert_eq!(
            code(batch(BatchError::Unavailable("x".into()))),
            Code::Unavailable
        );
        assert_eq!(code(ServiceError::NotReady("x".into())), Code::Unavailable);
        assert_eq!(
            code(ServiceError::InvalidArgument("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            to_status(&batch(BatchError::Overloaded("q".into()))).message(),
            "overloaded: q"
        );
    }
}
