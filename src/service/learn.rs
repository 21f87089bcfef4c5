//! Learning while serving: the Feedback RPC's side of the service (keep an outcome) and the
//! re-fit pass that turns outcomes into parameters, persisted to the feedback overlay and
//! swapped in whole.
#![forbid(unsafe_code)]
use std::sync::Arc;

use super::feedback;
use super::{Decider, FeedbackQuery, Service, ServiceError};
use crate::base::clip;
use crate::batch::Priority;
use crate::metrics as m;
use crate::model::TruncSide;
use crate::pipeline::Input;
use crate::policy;

impl Service {
    pub(super) fn store(&self) -> std::sync::MutexGuard<'_, feedback::FeedbackStore> {
        self.feedback.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn requests(&self) -> std::sync::MutexGuard<'_, feedback::RequestMemory> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps one observed outcome for the next re-fit. The prompt comes from the request or
    /// from the Route it names; the model must be a catalog model.
    pub async fn feedback(&self, q: FeedbackQuery) -> Result<(), ServiceError> {
        // Every refusal is counted, whichever check (or the encoder) refused it.
        let r = self.feedback_inner(q).await;
        let result = if r.is_ok() { "accepted" } else { "rejected" };
        metrics::counter!(m::FEEDBACK, "result" => result).increment(1);
        r
    }

    async fn feedback_inner(&self, q: FeedbackQuery) -> Result<(), ServiceError> {
        self.check_ready()?;
        let d = self.decider();
        let fc = &d.cfg.feedback;
        if !fc.enabled() {
            return Err(ServiceError::Disabled(
                "feedback is disabled: set feedback.overlay in the configuration".into(),
            ));
        }
        if !(q.score.is_finite() && (0.0..=1.0).contains(&q.score)) {
            return Err(ServiceError::InvalidArgument(format!(
                "score = {} must be in [0, 1]",
                q.score
            )));
        }
        Self::check_request_id(&q.request_id)?;
        if d.catalog.get(&q.model).is_none() {
            return Err(ServiceError::InvalidArgument(format!(
                "unknown model {}: feedback is for catalog models (see Info)",
                clip(&q.model)
            )));
        }
        let prompt = match (q.prompt, q.request_id.is_empty()) {
            (Some(p), _) if !p.trim().is_empty() => p,
            (_, false) => match self.requests().prompt_of(&q.request_id) {
                Some(p) => p,
                None => {
                    return Err(ServiceError::InvalidArgument(format!(
                    "unknown request_id {} (not a recent Route of this server); send the prompt",
                    clip(&q.request_id)
                )))
                }
            },
            _ => {
                return Err(ServiceError::InvalidArgument(
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
        let kept = self.store().push(
            &q.model,
            feedback::Outcome {
                s,
                z,
                y: q.score as f32,
                tokens,
            },
            fc.max_rows_per_model,
        );
        if let Err(e) = kept {
            return Err(ServiceError::Storage(format!(
                "feedback journal of {}: {e}",
                fc.overlay.display()
            )));
        }
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
                memory: None,
                verify_thresholds: None,
            },
        };
        // Copy what is due under the lock and fit outside it: Feedback takes the same lock,
        // and a fit over thousands of outcomes must not stall it.
        let due: Vec<(String, Vec<feedback::Outcome>, Option<u32>)> = {
            let mut st = self.store();
            st.models
                .iter_mut()
                .filter(|(_, m)| m.fresh >= fc.min_rows)
                .map(|(name, mo)| {
                    mo.fresh = 0;
                    (
                        name.clone(),
                        mo.rows.iter().cloned().collect(),
                        mo.mean_answer_tokens(),
                    )
                })
                .collect()
        };
        let mut updated = Vec::new();
        for (name, rows, mean_tokens) in due {
            let Some(model) = d.catalog.get(&name) else {
                continue;
            };
            let start = d.heads.router.ability(&model.head).clone();
            // Borrowed or prior parameters are a weak start; a model's own, a strong one.
            let own = d.heads.router.models.contains_key(&name);
            match feedback::checked_refit(&rows, &start, if own { 20.0 } else { 2.0 }) {
                Ok(Some(a)) => {
                    overlay.models.insert(
                        name.clone(),
                        crate::model::overlay::OverlayModel {
                            ability: a,
                            rows: rows.len(),
                            mean_output_tokens: mean_tokens.unwrap_or(model.expected_output_tokens),
                        },
                    );
                    updated.push(name);
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
        if updated.is_empty() {
            return Ok(0);
        }
        overlay.validate(&d.heads).map_err(fail)?;
        // A write that fails is the server's storage, not the request's precondition.
        overlay.save(&fc.overlay).map_err(|e| {
            ServiceError::Storage(format!("feedback overlay {}: {e:#}", fc.overlay.display()))
        })?;
        // The journal shrinks back to what memory holds (bounded like it; between re-fits,
        // and where they are rejected, `push` bounds it).
        if let Err(e) = self.store().compact() {
            tracing::warn!(error = %e, "feedback journal not compacted; it keeps every outcome");
        }
        let next = Decider::load(&d.cfg, self.pipeline.dim()).map_err(fail)?;
        *self.decider.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        metrics::counter!(m::REFITS, "result" => "applied").increment(updated.len() as u64);
        tracing::info!(models = ?updated, "feedback re-fit applied");
        Ok(updated.len())
    }
}
