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

/// How long a shed client should wait before retrying (gRPC's `grpc-retry-pushback-ms`):
/// long enough for a full queue or tokenizer backlog to drain a batch or two.
pub const RETRY_PUSHBACK_MS: u64 = 250;

/// Bytes of an error message on the wire: the messages quote client text only clipped, this
/// bounds whatever else a message carries, so trailers stay far below header limits.
const MAX_MESSAGE_BYTES: usize = 512;

/// The error's message, at most [`MAX_MESSAGE_BYTES`] (cut at a character boundary).
pub fn message(e: &ServiceError) -> String {
    let mut m = e.to_string();
    if m.len() > MAX_MESSAGE_BYTES {
        let end = crate::base::prefix(&m, MAX_MESSAGE_BYTES - '…'.len_utf8()).len();
        m.truncate(end);
        m.push('…');
    }
    m
}

pub fn to_status(e: &ServiceError) -> Status {
    let code = classify(e).0;
    let mut s = Status::new(code, message(e));
    if code == Code::ResourceExhausted {
        // Shed before work: tells gRPC retry policies (and our clients) when to come back.
        s.metadata_mut().insert(
            "grpc-retry-pushback-ms",
            tonic::metadata::MetadataValue::from(RETRY_PUSHBACK_MS),
        );
    }
    s
}

/// The code's name as the `code` label of `tiergate_requests_total`. Every code is named:
/// before, the ones not listed were counted (and logged at warn) as INTERNAL, so a refused
/// Feedback or reload (FAILED_PRECONDITION) looked like a server fault.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
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

    /// Each of the 17 codes has its own label, spelled as gRPC's status codes doc does.
    #[test]
    fn every_code_has_its_own_name() {
        let names: std::collections::BTreeSet<_> =
            (0..17).map(|i| code_name(Code::from_i32(i))).collect();
        assert_eq!(names.len(), 17, "{names:?}");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        let refused = classify(&ServiceError::Disabled("feedback is off".into())).0;
        assert_eq!(code_name(refused), "FAILED_PRECONDITION");
    }

    #[test]
    fn shed_replies_carry_pushback_and_messages_are_bounded() {
        let shed = to_status(&ServiceError::Encode(EncodeError::Batch(
            BatchError::Overloaded("q".into()),
        )));
        let pushback = shed.metadata().get("grpc-retry-pushback-ms");
        assert_eq!(pushback.and_then(|v| v.to_str().ok()), Some("250"));
        let bad = to_status(&ServiceError::InvalidArgument("ü".repeat(100_000)));
        assert!(bad.metadata().get("grpc-retry-pushback-ms").is_none());
        assert!(
            bad.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            bad.message().len()
        );
        assert!(bad.message().ends_with('…'));
    }
}
