//! The decision layer: Route and Verify on domain types. It owns the defaults, candidate
//! scoring, the floor / utility choice, the Verify threshold, ship / escalate and the
//! escalation target (`decide`), over the text pipeline, the heads and the catalog. Entry
//! points (`server`, later HTTP and Envoy ext_proc) only convert their wire format and map
//! [`ServiceError`] to their status codes.
#![forbid(unsafe_code)]

pub mod auth;
pub mod decide;
mod decider;
mod error;
mod feedback;
mod learn;
mod reload;
mod types;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use decider::Decider;
pub use error::ServiceError;
pub use types::{
    FeedbackQuery, PeerAnswer, RouteInput, RouteOutcome, RouteQuery, Timings, VerifyOutcome,
    VerifyQuery, MAX_MESSAGES,
};

use crate::base::clip;
use crate::batch::Priority;
use crate::config::{Config, Overrides};
use crate::metrics as m;
use crate::model::heads::AnswerInput;
use crate::model::tokenize::kept_nothing;
use crate::model::{Heads, TruncSide};
use crate::pipeline::{EncodedInput, FastEncoded, Input, TextPipeline};
use crate::policy;

/// Peer answers one Verify may compare (each is a whole answer text to scan).
pub const MAX_PEERS: usize = 8;
/// Candidates one Route or Verify may name (the catalog is far smaller; beyond this a list is
/// a mistake or an attack, and each entry is a lookup).
pub const MAX_CANDIDATES: usize = 64;
/// Bytes of one model name (the model, a candidate, a peer's model).
pub const MAX_MODEL_BYTES: usize = 256;
/// Bytes of a request id: ids are remembered for Feedback (two copies each, up to
/// `feedback.remember_requests` of them) and echoed in replies.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// One per process: the pipeline, and the decider (heads, overlays, catalog, policy) that
/// turns embeddings into decisions, swapped whole on reload; and whether warm-up has run.
pub struct Service {
    /// The configuration the process started with (what a reload may not change).
    cfg: Config,
    pub pipeline: TextPipeline,
    decider: RwLock<Arc<Decider>>,
    ready: AtomicBool,
    /// Where a reload reads the configuration from (file, environment, flags).
    reload_from: Mutex<Option<Overrides>>,
    /// Serialises reloads (a SIGHUP and an RPC at once) and feedback re-fits.
    reloading: Mutex<()>,
    /// Outcomes and their journal (bounded; see `feedback` in the config).
    feedback: Mutex<feedback::FeedbackStore>,
    /// Recent Routes' prompts by request id (bounded), under a lock of their own: Route takes
    /// it, and must not wait on the journal's writes.
    requests: Mutex<feedback::RequestMemory>,
    /// API tokens every edge asks for (`[auth]`); `None` = open.
    pub tokens: Option<Arc<auth::Tokens>>,
}

impl Service {
    /// Loads the heads and overlays named in `cfg` and starts the pipeline (not ready until
    /// [`Self::warm_up`]).
    pub fn start(cfg: &Config) -> Result<Service> {
        let pipeline = TextPipeline::start(cfg)?;
        let decider = Decider::load(cfg, pipeline.dim())?;
        Self::assemble(cfg, pipeline, decider)
    }

    pub fn start_with_heads(cfg: &Config, heads: Heads) -> Result<Service> {
        let pipeline = TextPipeline::start(cfg)?;
        let decider = Decider::with_heads(cfg, heads, pipeline.dim())?;
        Self::assemble(cfg, pipeline, decider)
    }

    fn assemble(cfg: &Config, pipeline: TextPipeline, decider: Decider) -> Result<Service> {
        warn_on_mismatch(cfg, &pipeline, &decider.heads);
        let tokens = auth::Tokens::load(&cfg.auth)?.map(Arc::new);
        if let Some(t) = &tokens {
            tracing::info!(
                tokens = t.len(),
                "authentication on: bearer tokens required"
            );
        }
        let mut store = feedback::FeedbackStore::default();
        if cfg.feedback.enabled() {
            let journal = feedback_journal(&cfg.feedback.overlay);
            let n = store
                .open_journal(&journal, cfg.feedback.max_rows_per_model)
                .with_context(|| format!("feedback journal {}", journal.display()))?;
            if n > 0 {
                tracing::info!(outcomes = n, journal = %journal.display(), "feedback read back");
            }
            // What the feedback overlay was fitted on is not new.
            if let Ok(o) = crate::model::Overlay::load(&cfg.feedback.overlay) {
                for (m, om) in &o.models {
                    store.settle(m, om.rows);
                }
            }
        }
        Ok(Service {
            cfg: cfg.clone(),
            pipeline,
            decider: RwLock::new(Arc::new(decider)),
            ready: AtomicBool::new(false),
            reload_from: Mutex::new(None),
            reloading: Mutex::new(()),
            feedback: Mutex::new(store),
            requests: Mutex::new(feedback::RequestMemory::default()),
            tokens,
        })
    }

    /// Where [`Self::reload`] reads the configuration again.
    pub fn set_reload_source(&self, o: Overrides) {
        *self.reload_from.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
    }

    /// The current decider: a request holds this one snapshot from start to end.
    pub fn decider(&self) -> Arc<Decider> {
        self.decider
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn revision_of(&self, d: &Decider) -> String {
        format!("{}+{}", self.pipeline.model_revision, d.revision())
    }

    /// Encoder, heads and overlay revisions: what decides now.
    pub fn revision(&self) -> String {
        self.revision_of(&self.decider())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Refuses work until warm-up has run a batch through the model.
    pub fn check_ready(&self) -> Result<(), ServiceError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(ServiceError::NotReady("warming up".into()))
        }
    }

    /// Marks the service ready (after [`Self::warm_up`], or in tests that skip it).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub(crate) fn check_text(
        &self,
        what: &str,
        text: &str,
        allow_empty: bool,
    ) -> Result<(), ServiceError> {
        if !allow_empty && text.trim().is_empty() {
            return Err(ServiceError::InvalidArgument(format!("{what} is empty")));
        }
        let limit = self.cfg.batch.max_input_bytes;
        if text.len() > limit {
            return Err(ServiceError::InvalidArgument(format!(
                "{what} is {} bytes; the limit is {limit} (max_input_bytes)",
                text.len(),
            )));
        }
        Ok(())
    }

    /// A request id within [`MAX_REQUEST_ID_BYTES`].
    fn check_request_id(id: &str) -> Result<(), ServiceError> {
        if id.len() > MAX_REQUEST_ID_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "request_id {} is over {MAX_REQUEST_ID_BYTES} bytes",
                clip(id)
            )));
        }
        Ok(())
    }

    /// Output tokens a request assumes for its cost estimates: none given, or > 0.
    fn check_output_tokens(tokens: Option<u32>) -> Result<(), ServiceError> {
        if tokens == Some(0) {
            return Err(ServiceError::InvalidArgument(
                "expected_output_tokens must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// Bounds on the model names of a request, checked before any lookup.
    fn check_models<'a>(
        models: impl IntoIterator<Item = &'a String>,
        candidates: &'a [String],
    ) -> Result<(), ServiceError> {
        if candidates.len() > MAX_CANDIDATES {
            return Err(ServiceError::InvalidArgument(format!(
                "{} candidates; at most {MAX_CANDIDATES}",
                candidates.len()
            )));
        }
        match models
            .into_iter()
            .chain(candidates)
            .find(|m| m.len() > MAX_MODEL_BYTES)
        {
            Some(m) => Err(ServiceError::InvalidArgument(format!(
                "model name {} is over {MAX_MODEL_BYTES} bytes",
                clip(m)
            ))),
            None => Ok(()),
        }
    }

    /// The cheapest candidate likely to pass for one prompt, with every candidate's p_pass.
    pub async fn route(&self, q: RouteQuery) -> Result<RouteOutcome, ServiceError> {
        let t0 = Instant::now();
        self.check_ready()?;
        let text = q
            .input
            .ok_or_else(|| ServiceError::InvalidArgument("prompt or messages is required".into()))?
            .into_text();
        self.check_text("prompt", &text, false)?;
        Self::check_request_id(&q.request_id)?;
        Self::check_models([], &q.candidates)?;
        let d = self.decider();
        let pol = policy::effective(q.policy.as_ref(), &d.policy, d.default_floor())?;
        let cands = d.catalog.resolve(&q.candidates)?;
        Self::check_output_tokens(q.expected_output_tokens)?;
        // Remembered for Feedback only once the request has been decided (a refused one
        // would be stored, or replace the prompt of an earlier Route with the same id).
        let remember = (d.cfg.feedback.enabled() && !q.request_id.is_empty()).then(|| text.clone());
        let prompt_tokens = policy::proxy_tokens(text.len());
        let decide = |emb: &[f32]| {
            let scored = decide::score_candidates(
                &d.heads,
                emb,
                &cands,
                prompt_tokens,
                q.expected_output_tokens,
            );
            decide::decide_route(scored, &pol, d.policy.verify_band)
        };
        // Only where its bound holds: relative mode (floor and utility Routes always use the
        // encoder), no memory of labelled prompts (its neighbours are encoder embeddings,
        // which the student's are not), and a sound backend (a faulty one answers
        // UNAVAILABLE, as health says, not a student-only subset of Routes).
        let fast = d.policy.fast_path_stability.filter(|_| {
            self.pipeline.has_student()
                && pol.relative_floor.is_some()
                && d.heads.memory.is_none()
                && self.pipeline.batcher.health().is_ok()
        });
        // The embedding, and the student's decision when it decides alone.
        let (e, alone) = match fast {
            None => {
                let input = Input::Single(text, q.truncation);
                let e = self
                    .pipeline
                    .encode("route", input, q.priority, q.deadline)
                    .await?;
                (e, None)
            }
            Some(bar) => match self
                .pipeline
                .encode_fast("route", text, q.truncation, q.deadline)
                .await?
            {
                FastEncoded::Cached(e) => (e, None),
                FastEncoded::Student(s) => {
                    let dec = decide(&s.embedding)?;
                    if dec.stability >= bar {
                        metrics::counter!(m::FAST_PATH, "result" => "alone").increment(1);
                        let e = EncodedInput {
                            enc_len: s.enc_len,
                            truncated: s.truncated,
                            embedding: Vec::new(),
                            tokenize: s.tokenize,
                            queue: Duration::ZERO,
                            inference: Duration::ZERO,
                        };
                        (e, Some(dec))
                    } else {
                        metrics::counter!(m::FAST_PATH, "result" => "deferred").increment(1);
                        let e = self
                            .pipeline
                            .encode_deferred(s, q.priority, q.deadline)
                            .await?;
                        (e, None)
                    }
                }
            },
        };
        let fast_path = alone.is_some();
        let dec = match alone {
            Some(dec) => dec,
            None => decide(&e.embedding)?,
        };
        if let Some(prompt) = remember {
            self.requests().remember(
                &q.request_id,
                prompt,
                d.cfg.feedback.remember_requests,
                d.cfg.feedback.remember_bytes,
            );
        }
        let revision = self.revision_of(&d);
        let d = dec;
        let chosen = &d.candidates[d.chosen];
        metrics::counter!(m::DECISIONS, "model" => chosen.model.clone(), "reason" => d.reason)
            .increment(1);
        // Here, not at an edge, so every entry point's Routes (gRPC, the HTTP front, Envoy's
        // ext_proc) are counted.
        m::add_usd(m::EXPECTED_COST, &chosen.model, chosen.cost);
        m::add_usd(m::EXPECTED_SAVING, &chosen.model, d.expected_saving);
        metrics::histogram!(m::ROUTE_P_PASS, "model" => chosen.model.clone()).record(chosen.p_pass);
        Ok(RouteOutcome {
            request_id: q.request_id,
            model: chosen.model.clone(),
            expected_cost_usd: chosen.cost,
            expected_saving_usd: d.expected_saving,
            margin: d.margin,
            verify_recommended: d.verify_recommended,
            truncated: e.truncated,
            input_tokens: e.enc_len as u32,
            revision,
            reason: d.reason,
            candidates: d.candidates,
            timings: Timings {
                tokenize: e.tokenize,
                queue: e.queue,
                inference: e.inference,
                total: t0.elapsed(),
            },
            fast_path,
        })
    }

    /// Ship the answer, or escalate to the pricier candidate Route rates most likely to pass.
    pub async fn verify(&self, q: VerifyQuery) -> Result<VerifyOutcome, ServiceError> {
        let t0 = Instant::now();
        self.check_ready()?;
        self.check_text("prompt", &q.prompt, false)?;
        self.check_text("answer", &q.answer, true)?;
        Self::check_request_id(&q.request_id)?;
        if q.peers.len() > MAX_PEERS {
            return Err(ServiceError::InvalidArgument(format!(
                "{} peer answers; at most {MAX_PEERS}",
                q.peers.len()
            )));
        }
        Self::check_output_tokens(q.expected_output_tokens)?;
        if let Some(t) = q.peer_threshold.filter(|t| !(0.0..=1.0).contains(t)) {
            return Err(ServiceError::InvalidArgument(format!(
                "peer_threshold {t} outside [0, 1]"
            )));
        }
        for pa in &q.peers {
            self.check_text("peer answer", &pa.answer, true)?;
        }
        Self::check_models(
            std::iter::once(&q.model).chain(q.peers.iter().map(|p| &p.model)),
            &q.candidates,
        )?;
        let d = self.decider();
        let pol = policy::effective(q.policy.as_ref(), &d.policy, d.default_floor())?;
        let model = d.catalog.get(&q.model).ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "unknown model {}: not in the catalog and no trained head (see Info)",
                clip(&q.model)
            ))
        })?;
        let cands = d.catalog.resolve(&q.candidates)?;
        let threshold = decide::verify_threshold(&pol, &d.policy, &d.heads);
        let prompt_tokens = policy::proxy_tokens(q.prompt.len());
        // The prompt is encoded even for an empty answer: where to escalate reads Route's p.
        // Prompt and answer are encoded separately (the verifier reads both embeddings and
        // the pair's text), as two jobs in the same batcher.
        let encode_prompt = self.pipeline.encode(
            "verify",
            Input::Single(q.prompt.clone(), TruncSide::HeadTail),
            q.priority,
            q.deadline,
        );
        let (pe, ae) = if crate::model::answer::says_nothing(&q.answer) {
            // Nothing to ship: p is 0 without reading it.
            (encode_prompt.await?, None)
        } else {
            let limit = self.cfg.batch.max_answer_tokens;
            let encode_answer = self.pipeline.encode(
                "verify",
                Input::Answer(q.answer.clone(), limit),
                q.priority,
                q.deadline,
            );
            let (pe, ae) = tokio::join!(encode_prompt, encode_answer);
            // An answer of characters the tokenizer drops (zero-width, control) is as empty
            // as a blank one.
            (pe?, Some(ae?).filter(|a| !kept_nothing(a.enc_len)))
        };
        let p = ae.as_ref().map_or(0.0, |ae| {
            verify_p(&d.heads, &model.head, &q.prompt, &q.answer, &pe, ae)
        });
        let truncated = pe.truncated || ae.as_ref().is_some_and(|a| a.truncated);
        let input_tokens = (pe.enc_len + ae.as_ref().map_or(0, |a| a.enc_len)) as u32;
        let at =
            |f: fn(&EncodedInput) -> Duration| ae.as_ref().map_or(f(&pe), |a| f(&pe).max(f(a)));
        let timings = Timings {
            tokenize: at(|e| e.tokenize),
            queue: at(|e| e.queue),
            inference: at(|e| e.inference),
            total: Duration::ZERO,
        };
        // Final answers are read only when there are peers to compare them with.
        let (peers_compared, peers_agreeing) = if q.peers.is_empty() {
            (0, 0)
        } else {
            let key = |a: &str| crate::model::answer::final_answer(&q.prompt, a);
            let peer_keys: Vec<Option<String>> = q.peers.iter().map(|pa| key(&pa.answer)).collect();
            decide::peer_agreement(key(&q.answer).as_deref(), &peer_keys)
        };
        // An empty answer never ships, even at a threshold of 0.
        let ship = ae.is_some()
            && decide::ships_with_peers(p, threshold, peers_agreeing, q.peer_threshold);
        let escalate_to = if ship {
            None
        } else {
            let mut ladder = cands.clone();
            if !ladder.iter().any(|c| c.name == model.name) {
                ladder.push(model);
            }
            let scored = decide::score_candidates(
                &d.heads,
                &pe.embedding,
                &ladder,
                prompt_tokens,
                q.expected_output_tokens,
            );
            decide::escalation_target(scored, &model.name, p, pol.max_cost_usd)
        };
        // `kept`: turned down with nowhere Route rates better; a cascade ships it.
        let decision = match (ship, &escalate_to) {
            (true, _) => "ship",
            (false, Some(_)) => "escalate",
            (false, None) => "kept",
        };
        metrics::counter!(m::VERIFY_DECISIONS, "decision" => decision).increment(1);
        if escalate_to.is_some() {
            metrics::counter!(m::ESCALATIONS, "from" => q.model.clone()).increment(1);
        }
        Ok(VerifyOutcome {
            request_id: q.request_id,
            p_pass: p,
            ship,
            escalate_to,
            threshold,
            truncated,
            input_tokens,
            revision: self.revision_of(&d),
            timings: Timings {
                total: t0.elapsed(),
                ..timings
            },
            peers_compared,
            peers_agreeing,
        })
    }

    /// Runs a few inputs through the whole pipeline so the first client does not pay for
    /// lazy initialisation. The caller marks the service ready once the batcher is sound.
    pub async fn warm_up(&self) -> Result<Duration, ServiceError> {
        let t0 = Instant::now();
        for text in [
            "warm up the encoder",
            "a second, slightly longer warm-up sentence for the encoder",
        ] {
            self.pipeline
                .encode(
                    "warmup",
                    Input::Single(text.into(), TruncSide::HeadTail),
                    Priority::High,
                    None,
                )
                .await?;
        }
        self.pipeline
            .encode(
                "warmup",
                Input::Answer("2 + 2 = 4".into(), 128),
                Priority::High,
                None,
            )
            .await?;
        Ok(t0.elapsed())
    }
}

fn verify_p(
    heads: &Heads,
    head: &str,
    prompt: &str,
    answer: &str,
    pe: &EncodedInput,
    ae: &EncodedInput,
) -> f64 {
    let input = AnswerInput {
        text: answer,
        prompt,
        embedding: &ae.embedding,
        truncated: ae.truncated,
    };
    heads.verify_p(head, &pe.embedding, &input)
}

/// Where accepted feedback is journaled: beside the feedback overlay.
fn feedback_journal(overlay: &std::path::Path) -> std::path::PathBuf {
    let mut p = overlay.as_os_str().to_owned();
    p.push(".journal");
    p.into()
}

/// Truncation limits and encoder revision the heads were not fitted with (allowed, logged).
fn warn_on_mismatch(cfg: &Config, pipeline: &TextPipeline, heads: &Heads) {
    // Other truncation limits are allowed (shorter is faster) but shift what the heads see.
    for (key, serving, fitted) in [
        (
            "batch.max_input_tokens",
            cfg.batch.max_input_tokens,
            heads.max_input_tokens,
        ),
        (
            "batch.max_answer_tokens",
            cfg.batch.max_answer_tokens,
            heads.max_answer_tokens,
        ),
    ] {
        if serving != fitted {
            tracing::warn!(
                key,
                serving,
                fitted,
                "the heads were fitted at another truncation limit; probabilities may drift"
            );
        }
    }
    if !pipeline.fits_revision(&heads.encoder_revision) {
        tracing::warn!(
            encoder = %pipeline.model_revision,
            heads = %heads.encoder_revision,
            "heads were fitted on another encoder revision"
        );
    }
}
