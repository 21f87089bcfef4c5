//! proto ↔ domain: the wire types of tiergate.proto to the decision layer's and back.
#![forbid(unsafe_code)]
use std::time::{Duration, Instant};

use crate::batch::Priority;
use crate::model::TruncSide;
use crate::policy::PolicyRequest;
use crate::proto;
use crate::service::{
    FeedbackQuery, PeerAnswer, RouteInput, RouteOutcome, RouteQuery, Service, ServiceError,
    Timings, VerifyOutcome, VerifyQuery, MAX_MESSAGES,
};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn truncation(t: i32) -> Result<TruncSide, ServiceError> {
    match proto::Truncation::try_from(t) {
        Ok(proto::Truncation::Unspecified | proto::Truncation::HeadTail) => Ok(TruncSide::HeadTail),
        Ok(proto::Truncation::Head) => Ok(TruncSide::Head),
        Ok(proto::Truncation::Tail) => Ok(TruncSide::Tail),
        Err(_) => Err(ServiceError::InvalidArgument(format!(
            "unknown truncation value {t}"
        ))),
    }
}

fn priority(p: i32) -> Result<Priority, ServiceError> {
    match proto::Priority::try_from(p) {
        Ok(proto::Priority::High) => Ok(Priority::High),
        Ok(proto::Priority::Low) => Ok(Priority::Low),
        Ok(_) => Ok(Priority::Normal),
        Err(_) => Err(ServiceError::InvalidArgument(format!(
            "unknown priority value {p}"
        ))),
    }
}

fn policy(p: Option<proto::Policy>) -> Option<PolicyRequest> {
    p.map(|p| PolicyRequest {
        quality_floor: p.quality_floor,
        max_cost_usd: p.max_cost_usd,
        cost_weight: p.cost_weight,
        relative_floor: p.relative_floor,
    })
}

fn timings(t: Timings) -> proto::Timings {
    proto::Timings {
        tokenize_ms: ms(t.tokenize),
        queue_ms: ms(t.queue),
        inference_ms: ms(t.inference),
        total_ms: ms(t.total),
    }
}

/// A conversation as Route and Verify both read it, at most [`MAX_MESSAGES`] turns, at least
/// one with content: turns without any would render as role tags alone ("user: "), text
/// enough to pass the emptiness check and be decided on nothing. (The HTTP front and ext_proc
/// keep routing chats whose parts hold no text, such as images alone, on the role tags: a
/// gateway must not refuse what its upstream can answer.)
fn messages(ms: proto::Messages) -> Result<RouteInput, ServiceError> {
    if ms.messages.len() > MAX_MESSAGES {
        return Err(ServiceError::InvalidArgument(format!(
            "{} messages; at most {MAX_MESSAGES}",
            ms.messages.len()
        )));
    }
    if ms.messages.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ServiceError::InvalidArgument(
            "messages are empty: no turn has content".into(),
        ));
    }
    Ok(RouteInput::Messages(
        ms.messages
            .into_iter()
            .map(|m| (m.role, m.content))
            .collect(),
    ))
}

pub fn route_query(
    r: proto::RouteRequest,
    deadline: Option<Instant>,
) -> Result<RouteQuery, ServiceError> {
    let input = match r.input {
        Some(proto::route_request::Input::Prompt(p)) => Some(RouteInput::Prompt(p)),
        Some(proto::route_request::Input::Messages(ms)) => Some(messages(ms)?),
        None => None,
    };
    Ok(RouteQuery {
        truncation: truncation(r.truncation)?,
        priority: priority(r.priority)?,
        request_id: r.request_id,
        input,
        candidates: r.candidates,
        policy: policy(r.policy),
        expected_output_tokens: r.expected_output_tokens,
        deadline,
    })
}

pub fn route_reply(o: RouteOutcome) -> proto::RouteReply {
    proto::RouteReply {
        request_id: o.request_id,
        model: o.model,
        expected_cost_usd: o.expected_cost_usd,
        expected_saving_usd: o.expected_saving_usd,
        margin: o.margin,
        verify_recommended: o.verify_recommended,
        truncated: o.truncated,
        input_tokens: o.input_tokens,
        revision: o.revision,
        reason: o.reason.to_string(),
        candidates: o
            .candidates
            .into_iter()
            .map(|s| proto::CandidateScore {
                model: s.model,
                p_pass: s.p_pass,
                expected_cost_usd: s.cost,
                params: s.params,
            })
            .collect(),
        timings: Some(timings(o.timings)),
        fast_path: o.fast_path,
    }
}

pub fn verify_query(
    r: proto::VerifyRequest,
    deadline: Option<Instant>,
) -> Result<VerifyQuery, ServiceError> {
    let prompt = match r.messages {
        Some(_) if !r.prompt.is_empty() => {
            return Err(ServiceError::InvalidArgument(
                "give prompt or messages, not both".into(),
            ))
        }
        Some(ms) => messages(ms)?.into_text(),
        None => r.prompt,
    };
    Ok(VerifyQuery {
        priority: priority(r.priority)?,
        request_id: r.request_id,
        prompt,
        answer: r.answer,
        model: r.model,
        candidates: r.candidates,
        policy: policy(r.policy),
        deadline,
        peer_threshold: r.peer_threshold,
        expected_output_tokens: r.expected_output_tokens,
        peers: r
            .peers
            .into_iter()
            .map(|p| PeerAnswer {
                model: p.model,
                answer: p.answer,
            })
            .collect(),
    })
}

pub fn verify_reply(o: VerifyOutcome) -> proto::VerifyReply {
    let decision = if o.ship {
        proto::Decision::Ship
    } else {
        proto::Decision::Escalate
    };
    proto::VerifyReply {
        request_id: o.request_id,
        p_pass: o.p_pass,
        decision: decision as i32,
        escalate_to: o.escalate_to.unwrap_or_default(),
        threshold: o.threshold,
        truncated: o.truncated,
        input_tokens: o.input_tokens,
        revision: o.revision,
        timings: Some(timings(o.timings)),
        peers_compared: o.peers_compared,
        peers_agreeing: o.peers_agreeing,
    }
}

pub fn feedback_query(r: proto::FeedbackRequest) -> FeedbackQuery {
    FeedbackQuery {
        request_id: r.request_id,
        prompt: (!r.prompt.is_empty()).then_some(r.prompt),
        model: r.model,
        score: r.score,
        answer: (!r.answer.is_empty()).then_some(r.answer),
    }
}

pub fn info_reply(s: &Service) -> proto::InfoReply {
    let b = &s.config().batch;
    let d = s.decider();
    // The batcher's own limits: the GPU budget when the CUDA backend runs.
    let lim = s.pipeline.batcher.limits();
    proto::InfoReply {
        version: env!("CARGO_PKG_VERSION").to_string(),
        model_revision: s.pipeline.model_revision.clone(),
        heads_revision: d.revision(),
        backend: s.pipeline.batcher.backend_name().to_string(),
        numerics: s.pipeline.numerics.to_string(),
        limits: Some(proto::Limits {
            max_batch_tokens: lim.max_batch_tokens as u32,
            max_batch_requests: lim.max_batch_requests as u32,
            max_queue: lim.max_queue as u32,
            max_input_tokens: b.max_input_tokens as u32,
            max_input_bytes: b.max_input_bytes as u32,
        }),
        catalog: d
            .catalog
            .default_models()
            .map(|c| proto::CatalogEntry {
                model: c.name.clone(),
                in_usd_per_mtok: c.in_usd_per_mtok,
                out_usd_per_mtok: c.out_usd_per_mtok,
                head: c.head.clone(),
                expected_output_tokens: c.expected_output_tokens,
                params: c.params.clone(),
            })
            .collect(),
        default_quality_floor: d.default_floor(),
        default_verify_threshold: d.default_threshold(),
        default_relative_floor: d.default_relative_floor().unwrap_or(0.0),
    }
}

/// The deadline a client set with grpc-timeout, if any; a malformed header is ignored (no
/// deadline), as gRPC's own servers do.
pub fn deadline_of<T>(req: &tonic::Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    Instant::now().checked_add(parse_grpc_timeout(v)?)
}

/// A `grpc-timeout` value as the gRPC over HTTP/2 spec writes it: 1 to 8 ASCII digits and a
/// unit (H, M, S, m, u, n); anything else is None. Strict, because `u64::from_str` alone
/// also takes a leading `+` and any number of digits.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let num = v.get(..v.len().checked_sub(1)?)?;
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match &v[num.len()..] {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}
