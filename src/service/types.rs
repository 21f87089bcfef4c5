//! Route and Verify on domain types: what every entry point (gRPC today; HTTP and Envoy
//! ext_proc later) converts its wire format to and from.
#![forbid(unsafe_code)]
use std::time::{Duration, Instant};

use crate::batch::Priority;
use crate::model::TruncSide;
use crate::policy::PolicyRequest;

use super::decide::Scored;

/// What Route reads: a prompt, or chat turns.
#[derive(Debug, Clone)]
pub enum RouteInput {
    Prompt(String),
    /// (role, content) turns in order.
    Messages(Vec<(String, String)>),
}

/// Chat turns one request may carry. The encoder reads a conversation's head and tail
/// anyway; the bound keeps a body of empty turns (a few bytes each on the wire) from
/// multiplying into memory as it is converted.
pub const MAX_MESSAGES: usize = 4096;

impl RouteInput {
    /// The text the encoder reads. Role-tagged turns: head+tail truncation then keeps the
    /// system prompt and the latest user turn, the parts that decide difficulty.
    pub fn text(&self) -> String {
        match self {
            RouteInput::Prompt(p) => p.clone(),
            RouteInput::Messages(ms) => {
                let mut out = String::new();
                for (i, (role, content)) in ms.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    out.push_str(role);
                    out.push_str(": ");
                    out.push_str(content);
                }
                out
            }
        }
    }

    /// [`Self::text`], taking the prompt without a copy.
    pub fn into_text(self) -> String {
        match self {
            RouteInput::Prompt(p) => p,
            m => m.text(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteQuery {
    pub request_id: String,
    pub input: Option<RouteInput>,
    /// Empty: the catalog's default set.
    pub candidates: Vec<String>,
    pub policy: Option<PolicyRequest>,
    pub priority: Priority,
    pub truncation: TruncSide,
    pub expected_output_tokens: Option<u32>,
    pub deadline: Option<Instant>,
}

/// Where one request's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub tokenize: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone)]
pub struct RouteOutcome {
    pub request_id: String,
    pub model: String,
    pub expected_cost_usd: f64,
    pub expected_saving_usd: f64,
    pub margin: f64,
    pub verify_recommended: bool,
    pub truncated: bool,
    pub input_tokens: u32,
    pub revision: String,
    pub reason: &'static str,
    /// Every candidate, cheapest first.
    pub candidates: Vec<Scored>,
    pub timings: Timings,
    /// Decided by the static student alone (Route's fast path), without the encoder.
    pub fast_path: bool,
}

#[derive(Debug, Clone)]
pub struct VerifyQuery {
    pub request_id: String,
    pub prompt: String,
    pub answer: String,
    /// The model that wrote the answer.
    pub model: String,
    /// Where to escalate among (empty: the catalog's default set).
    pub candidates: Vec<String>,
    pub policy: Option<PolicyRequest>,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    /// Other models' answers to the same prompt (earlier tiers of a cascade, a probe call),
    /// compared by final answer (`decide::ships_with_peers`).
    pub peers: Vec<PeerAnswer>,
    /// The bar an answer a peer agrees with must reach (None: peers change nothing).
    pub peer_threshold: Option<f64>,
    /// Output tokens the escalation's cost estimates assume (as Route's; None: per model).
    pub expected_output_tokens: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct PeerAnswer {
    pub model: String,
    pub answer: String,
}

/// An outcome a gateway observed, for learning while serving.
#[derive(Debug, Clone)]
pub struct FeedbackQuery {
    /// An earlier Route's request id (its prompt is remembered), or empty.
    pub request_id: String,
    /// The prompt, when not given by request id.
    pub prompt: Option<String>,
    pub model: String,
    pub score: f64,
    pub answer: Option<String>,
}

#[derive(Debug, Clone)]
pub struct VerifyOutcome {
    pub request_id: String,
    pub p_pass: f64,
    pub ship: bool,
    /// Where to escalate (`decide::escalation_target`); None when shipping or nowhere is
    /// better.
    pub escalate_to: Option<String>,
    pub threshold: f64,
    pub truncated: bool,
    pub input_tokens: u32,
    pub revision: String,
    pub timings: Timings,
    /// Peers whose final answer could be compared with this one's, and how many agree.
    pub peers_compared: u32,
    pub peers_agreeing: u32,
}
