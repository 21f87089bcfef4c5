//! The decision layer: Route and Verify on domain types. It owns the defaults, candidate
//! scoring, the floor / utility choice, the Verify threshold, ship / escalate and the
//! escalation target (`decide`), over the text pipeline, the heads and the catalog. Entry
//! points (`server`, later HTTP and Envoy ext_proc) only convert their wire format and map
//! [`ServiceError`] to their status codes.
#![forbid(unsafe_code)]

pub mod decide;
mod decider;
mod error;
mod feedback;
mod types;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;

pub use decider::Decider;
pub use error::ServiceError;
pub use types::{
    FeedbackQuery, RouteInput, RouteOutcome, RouteQuery, Timings, VerifyOutcome, VerifyQuery,
};

use crate::batch::Priority;
use crate::config::{Config, Overrides};
use crate::metrics as m;
use crate::model::heads::AnswerInput;
use crate::model::{Heads, TruncSide};
use crate::pipeline::{EncodedInput, Input, TextPipeline};
use crate::policy;

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
    /// Outcomes and remembered request ids (bounded; see `feedback` in the config).
    feedback: Mutex<feedback::FeedbackStore>,
}

impl Service {
    /// Loads the heads and overlays named in `cfg` and starts the pipeline (not ready until
    /// [`Self::warm_up`]).
    pub fn start(cfg: &Config) -> Result<Service> {
        let pipeline = TextPipeline::start(cfg)?;
        let decider = Decider::load(cfg, pipeline.dim())?;
        Ok(Self::assemble(cfg, pipeline, decider))
    }

    pub fn start_with_heads(cfg: &Config, heads: Heads) -> Result<Service> {
        let pipeline = TextPipeline::start(cfg)?;
        let decider = Decider::with_heads(cfg, heads, pipeline.dim())?;
        Ok(Self::assemble(cfg, pipeline, decider))
    }

    fn assemble(cfg: &Config, pipeline: TextPipeline, decider: Decider) -> Service {
        warn_on_mismatch(cfg, &pipeline, &decider.heads);
        Service {
            cfg: cfg.clone(),
            pipeline,
            decider: RwLock::new(Arc::new(decider)),
            ready: AtomicBool::new(false),
            reload_from: Mutex::new(None),
            reloading: Mutex::new(()),
            feedback: Mutex::new(Default::default()),
        }
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

    /// Reads the configuration, heads, overlays and catalog again and swaps them in whole;
    /// on any error (a bad file, a setting only a restart can change) the old state keeps
    /// serving and the error names the file or key. Requests in flight finish on the state
    /// they started with. Returns the new revision.
    pub fn reload(&self) -> Result<String, ServiceError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let fail = |e: anyhow::Error| {
            metrics::counter!(m::RELOADS, "result" => "rejected").increment(1);
            ServiceError::Reload(format!("{e:#}"))
        };
        let o = self
            .reload_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                fail(anyhow::anyhow!(
                    "this process has no configuration source to reload"
                ))
            })?;
        let cfg = Config::load(&o).map_err(fail)?;
        restart_only(&self.cfg, &cfg).map_err(fail)?;
        let d = Decider::load(&cfg, self.pipeline.dim()).map_err(fail)?;
        warn_on_mismatch(&cfg, &self.pipeline, &d.heads);
        let d = Arc::new(d);
        *self.decider.write().unwrap_or_else(|e| e.into_inner()) = d.clone();
        metrics::counter!(m::RELOADS, "result" => "applied").increment(1);
        let rev = self.revision_of(&d);
        tracing::info!(revision = %rev, "reloaded heads, overlays and catalog");
        Ok(rev)
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
        let d = self.decider();
        if d.cfg.feedback.enabled() && !q.request_id.is_empty() {
            self.store()
                .remember(&q.request_id, &text, d.cfg.feedback.remember_requests);
        }
        let pol = policy::effective(q.policy.as_ref(), &d.policy, d.default_floor())?;
        let cands = d.catalog.resolve(&q.candidates)?;
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
            &d.heads,
            &e.embedding,
            &cands,
            prompt_tokens,
            q.expected_output_tokens,
        );
        let revision = self.revision_of(&d);
        let d = decide::decide_route(scored, &pol, d.policy.verify_band)?;
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
            revision,
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
        let d = self.decider();
        let pol = policy::effective(q.policy.as_ref(), &d.policy, d.default_floor())?;
        let model = d.catalog.get(&q.model).ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "unknown model {:?}: not in the catalog and no trained head (see Info)",
                q.model
            ))
        })?;
        let cands = d.catalog.resolve(&q.candidates)?;
        let threshold = decide::verify_threshold(&pol, &d.policy, &d.heads);
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
                verify_p(&d.heads, &model.head, &q.prompt, &q.answer, &pe, &ae),
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
            revision: self.revision_of(&d),
            timings: Timings {
                total: t0.elapsed(),
                ..timings
            },
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, feedback::FeedbackStore> {
        self.feedback.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps one observed outcome for the next re-fit. The prompt comes from the request or
    /// from the Route it names; the model must be a catalog model.
    pub async fn feedback(&self, q: FeedbackQuery) -> Result<(), ServiceError> {
        self.check_ready()?;
        let d = self.decider();
        let fc = &d.cfg.feedback;
        let reject = |e: ServiceError| {
            metrics::counter!(m::FEEDBACK, "result" => "rejected").increment(1);
            Err(e)
        };
        if !fc.enabled() {
            return reject(ServiceError::Disabled(
                "feedback is disabled: set feedback.overlay in the configuration".into(),
            ));
        }
        if !(q.score.is_finite() && (0.0..=1.0).contains(&q.score)) {
            return reject(ServiceError::InvalidArgument(format!(
                "score = {} must be in [0, 1]",
                q.score
            )));
        }
        if d.catalog.get(&q.model).is_none() {
            return reject(ServiceError::InvalidArgument(format!(
                "unknown model {:?}: feedback is for catalog models (see Info)",
                q.model
            )));
        }
        let prompt = match (q.prompt, q.request_id.is_empty()) {
            (Some(p), _) if !p.trim().is_empty() => p,
            (_, false) => match self.store().prompt_of(&q.request_id) {
                Some(p) => p,
                None => {
                    return reject(ServiceError::InvalidArgument(format!(
                    "unknown request_id {:?} (not a recent Route of this server); send the prompt",
                    q.request_id
                )))
                }
            },
            _ => {
                return reject(ServiceError::InvalidArgument(
                    "prompt or request_id is required".into(),
                ))
            }
        };
        if let Some(a) = &q.answer {
            self.check_text("answer", a, true)?;
        }
        self.check_text("prompt", &prompt, false)?;
        let e = self
            .pipeline
            .encode(
                "feedback",
                Input::Single(prompt, TruncSide::HeadTail),
                Priority::Low,
                None,
            )
            .await?;
        let (s, z) = d.heads.router.prompt_features(&e.embedding);
        let tokens = q.answer.as_ref().map(|a| policy::proxy_tokens(a.len()));
        self.store().push(
            &q.model,
            feedback::Outcome {
                s,
                z,
                y: q.score as f32,
            },
            tokens,
            fc.max_rows_per_model,
        );
        metrics::counter!(m::FEEDBACK, "result" => "accepted").increment(1);
        Ok(())
    }

    /// One re-fit pass (blocking; run it off the async runtime): every model with at least
    /// `feedback.min_rows` new outcomes is re-fitted from its current parameters; checked
    /// re-fits are persisted atomically to the feedback overlay and swapped in whole.
    /// Returns how many models were updated.
    pub fn refit_feedback(&self) -> Result<usize, ServiceError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let d = self.decider();
        let fc = d.cfg.feedback.clone();
        if !fc.enabled() {
            return Ok(0);
        }
        let fail = |e: anyhow::Error| ServiceError::Reload(format!("feedback re-fit: {e:#}"));
        let mut overlay = match crate::model::Overlay::load(&fc.overlay) {
            Ok(o) if o.heads_revision == d.heads.revision => o,
            _ => crate::model::Overlay {
                format: crate::model::overlay::OVERLAY_FORMAT,
                heads_revision: d.heads.revision.clone(),
                prior: d.heads.router.prior.clone(),
                models: Default::default(),
                verifier: None,
                verifier_rows: 0,
            },
        };
        let mut updated = Vec::new();
        {
            let mut st = self.store();
            for (name, mo) in st.models.iter_mut().filter(|(_, m)| m.fresh >= fc.min_rows) {
                let Some(model) = d.catalog.get(name) else {
                    continue;
                };
                let start = d.heads.router.ability(&model.head).clone();
                // Borrowed or prior parameters are a weak start; a model's own, a strong one.
                let own = d.heads.router.models.contains_key(name);
                let rows: Vec<feedback::Outcome> = mo
                    .rows
                    .iter()
                    .map(|o| feedback::Outcome {
                        s: o.s,
                        z: o.z.clone(),
                        y: o.y,
                    })
                    .collect();
                mo.fresh = 0;
                match feedback::checked_refit(&rows, &start, if own { 20.0 } else { 2.0 }) {
                    Ok(Some(a)) => {
                        let mean = mo
                            .answer_tokens
                            .checked_div(mo.answers)
                            .map_or(model.expected_output_tokens, |t| t.max(1) as u32);
                        overlay.models.insert(
                            name.clone(),
                            crate::model::overlay::OverlayModel {
                                ability: a,
                                rows: rows.len(),
                                mean_output_tokens: mean,
                            },
                        );
                        updated.push(name.clone());
                    }
                    Ok(None) => {
                        metrics::counter!(m::REFITS, "result" => "rejected").increment(1);
                        tracing::warn!(model = %name, "feedback re-fit did worse on held-out outcomes; not applied");
                    }
                    Err(e) => {
                        metrics::counter!(m::REFITS, "result" => "failed").increment(1);
                        tracing::warn!(model = %name, error = %format!("{e:#}"), "feedback re-fit failed");
                    }
                }
            }
        }
        if updated.is_empty() {
            return Ok(0);
        }
        overlay.validate(&d.heads).map_err(fail)?;
        overlay.save(&fc.overlay).map_err(fail)?;
        let next = Decider::load(&d.cfg, self.pipeline.dim()).map_err(fail)?;
        *self.decider.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        metrics::counter!(m::REFITS, "result" => "applied").increment(updated.len() as u64);
        tracing::info!(models = ?updated, "feedback re-fit applied");
        Ok(updated.len())
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

/// Settings only a restart can change: the encoder, its backend and the batcher's limits.
fn restart_only(old: &Config, new: &Config) -> anyhow::Result<()> {
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    for (key, ok) in [
        ("listen", old.listen == new.listen),
        ("metrics_listen", old.metrics_listen == new.metrics_listen),
        ("model_dir", old.model_dir == new.model_dir),
        ("backend", old.backend == new.backend),
        ("precision", old.precision == new.precision),
        ("batch", same(&old.batch, &new.batch)),
        ("threads", same(&old.threads, &new.threads)),
    ] {
        if !ok {
            anyhow::bail!("{key} changed: it takes a restart; nothing was reloaded");
        }
    }
    Ok(())
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
    if pipeline.model_revision != heads.encoder_revision {
        tracing::warn!(
            encoder = %pipeline.model_revision,
            heads = %heads.encoder_revision,
            "heads were fitted on another encoder revision"
        );
    }
}
