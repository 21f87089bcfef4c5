//! The decision layer: Route and Verify on domain types. It owns the defaults, candidate
//! scoring, the floor / utility choice, the Verify threshold, ship / escalate and the
//! escalation target (`decide`), over the text pipeline, the heads and the catalog. Entry
//! points (`server`, later HTTP and Envoy ext_proc) only convert their wire format and map
//! [`ServiceError`] to their status codes.
#![forbid(unsafe_code)]

pub mod decide;
mod error;
mod types;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

pub use error::ServiceError;
pub use types::{RouteInput, RouteOutcome, RouteQuery, Timings, VerifyOutcome, VerifyQuery};

use crate::batch::Priority;
use crate::config::{Config, PolicyConfig};
use crate::metrics as m;
use crate::model::heads::AnswerInput;
use crate::model::{Heads, TruncSide};
use crate::pipeline::{EncodedInput, Input, TextPipeline};
use crate::policy::{self, Catalog};

/// One per process: the pipeline plus the heads and catalog that turn embeddings into
/// decisions, and whether warm-up has run.
pub struct Service {
    cfg: Config,
    pub pipeline: TextPipeline,
    pub heads: Arc<Heads>,
    pub catalog: Catalog,
    ready: AtomicBool,
}

impl Service {
    /// Loads the heads named in `cfg` and starts the pipeline (not ready until [`Self::warm_up`]).
    pub fn start(cfg: &Config) -> Result<Service> {
        let heads = Heads::load(&cfg.heads)?;
        Self::start_with_heads(cfg, heads)
    }

    pub fn start_with_heads(cfg: &Config, heads: Heads) -> Result<Service> {
        let catalog = Catalog::build(cfg, &heads)?;
        let pipeline = TextPipeline::start(cfg)?;
        if pipeline.dim() != heads.dim {
            anyhow::bail!(
                "heads have dim {} but the encoder has {}",
                heads.dim,
                pipeline.dim()
            );
        }
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
        if pipeline.model_revision != heads.encoder_revision {
            tracing::warn!(
                encoder = %pipeline.model_revision,
                heads = %heads.encoder_revision,
                "heads were fitted on another encoder revision"
            );
        }
        Ok(Service {
            cfg: cfg.clone(),
            pipeline,
            heads: Arc::new(heads),
            catalog,
            ready: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn policy_cfg(&self) -> &PolicyConfig {
        &self.cfg.policy
    }

    /// Encoder and heads revisions: what decided a reply.
    pub fn revision(&self) -> String {
        format!("{}+{}", self.pipeline.model_revision, self.heads.revision)
    }

    /// Route's default floor (what Info reports).
    pub fn default_floor(&self) -> f64 {
        decide::default_floor(self.policy_cfg(), &self.heads)
    }

    /// Verify's default threshold (what Info reports).
    pub fn default_threshold(&self) -> f64 {
        decide::default_threshold(self.policy_cfg(), &self.heads)
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

    fn check_text(&self, what: &str, text: &str, allow_empty: bool) -> Result<(), ServiceError> {
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

    /// The cheapest candidate likely to pass for one prompt, with every candidate's p_pass.
    pub async fn route(&self, q: RouteQuery) -> Result<RouteOutcome, ServiceError> {
        let t0 = Instant::now();
        self.check_ready()?;
        let text = q
            .input
            .ok_or_else(|| ServiceError::InvalidArgument("prompt or messages is required".into()))?
            .into_text();
        self.check_text("prompt", &text, false)?;
        let pol = policy::effective(q.policy.as_ref(), self.policy_cfg(), self.default_floor())?;
        let cands = self.catalog.resolve(&q.candidates)?;
        if let Some(0) = q.expected_output_tokens {
            return Err(ServiceError::InvalidArgument(
                "expected_output_tokens must be > 0".into(),
            ));
        }
        let prompt_tokens = policy::proxy_tokens(text.len());
        let e = self
            .pipeline
            .encode(
                "route",
                Input::Single(text, q.truncation),
                q.priority,
                q.deadline,
            )
            .await?;
        let scored = decide::score_candidates(
            &self.heads,
            &e.embedding,
            &cands,
            prompt_tokens,
            q.expected_output_tokens,
        );
        let d = decide::decide_route(scored, &pol, self.policy_cfg().verify_band)?;
        let chosen = &d.candidates[d.chosen];
        metrics::counter!(m::DECISIONS, "model" => chosen.model.clone(), "reason" => d.reason)
            .increment(1);
        Ok(RouteOutcome {
            request_id: q.request_id,
            model: chosen.model.clone(),
            expected_cost_usd: chosen.cost,
            expected_saving_usd: d.expected_saving,
            margin: d.margin,
            verify_recommended: d.verify_recommended,
            truncated: e.truncated,
            input_tokens: e.enc_len as u32,
            revision: self.revision(),
            reason: d.reason,
            candidates: d.candidates,
            timings: Timings {
                tokenize: e.tokenize,
                queue: e.queue,
                inference: e.inference,
                total: t0.elapsed(),
            },
        })
    }

    /// Ship the answer, or escalate to the next model up in price order.
    pub async fn verify(&self, q: VerifyQuery) -> Result<VerifyOutcome, ServiceError> {
        let t0 = Instant::now();
        self.check_ready()?;
        self.check_text("prompt", &q.prompt, false)?;
        self.check_text("answer", &q.answer, true)?;
        let pol = policy::effective(q.policy.as_ref(), self.policy_cfg(), self.default_floor())?;
        let model = self.catalog.get(&q.model).ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "unknown model {:?}: not in the catalog and no trained head (see Info)",
                q.model
            ))
        })?;
        let cands = self.catalog.resolve(&q.candidates)?;
        let threshold = decide::verify_threshold(&pol, self.policy_cfg(), &self.heads);
        let prompt_tokens = policy::proxy_tokens(q.prompt.len());
        let escalate_to =
            decide::escalation_target(model, &cands, prompt_tokens).map(|m| m.name.clone());
        let (p, truncated, input_tokens, timings) = if q.answer.trim().is_empty() {
            // Nothing to ship: no need to ask the encoder.
            (0.0, false, 0, Timings::default())
        } else {
            // Prompt and answer are encoded separately (the verifier reads both embeddings
            // and the pair's text), as two jobs in the same batcher.
            let limit = self.cfg.batch.max_answer_tokens;
            let (pe, ae) = tokio::join!(
                self.pipeline.encode(
                    "verify",
                    Input::Single(q.prompt.clone(), TruncSide::HeadTail),
                    q.priority,
                    q.deadline
                ),
                self.pipeline.encode(
                    "verify",
                    Input::Answer(q.answer.clone(), limit),
                    q.priority,
                    q.deadline
                ),
            );
            let (pe, ae) = (pe?, ae?);
            (
                self.verify_p(&model.head, &q.prompt, &q.answer, &pe, &ae),
                pe.truncated || ae.truncated,
                (pe.enc_len + ae.enc_len) as u32,
                Timings {
                    tokenize: pe.tokenize.max(ae.tokenize),
                    queue: pe.queue.max(ae.queue),
                    inference: pe.inference.max(ae.inference),
                    total: Duration::ZERO,
                },
            )
        };
        let ship = decide::ships(p, threshold);
        metrics::counter!(m::VERIFY_DECISIONS, "decision" => if ship { "ship" } else { "escalate" })
            .increment(1);
        if !ship {
            metrics::counter!(m::ESCALATIONS, "from" => q.model.clone()).increment(1);
        }
        Ok(VerifyOutcome {
            request_id: q.request_id,
            p_pass: p,
            ship,
            escalate_to: if ship { None } else { escalate_to },
            threshold,
            truncated,
            input_tokens,
            revision: self.revision(),
            timings: Timings {
                total: t0.elapsed(),
                ..timings
            },
        })
    }

    fn verify_p(
        &self,
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
        self.heads.verify_p(head, &pe.embedding, &input)
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
