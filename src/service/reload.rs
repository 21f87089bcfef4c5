//! Reload: the configuration, heads, overlays and catalog read again and swapped in whole,
//! or refused with the old state still serving.
#![forbid(unsafe_code)]
use std::sync::Arc;

use super::{warn_on_mismatch, Decider, Service, ServiceError};
use crate::config::Config;
use crate::metrics as m;

impl Service {
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
}

/// Settings only a restart can change: the encoder, its backend, the batcher's limits, the
/// listeners, and what is set up once at start (TLS, tokens, health, drain, feedback's store).
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
        ("log_format", old.log_format == new.log_format),
        (
            "max_connection_age_s",
            old.max_connection_age_s == new.max_connection_age_s,
        ),
        (
            "max_connections",
            old.max_connections == new.max_connections,
        ),
        // The gateway's listeners, concurrency and connection limits and head timeout are set
        // up at start; its policies, upstreams, timeouts and body limit are read per request
        // and do reload.
        (
            "gateway.http_listen",
            old.gateway.http_listen == new.gateway.http_listen,
        ),
        (
            "gateway.ext_proc",
            old.gateway.ext_proc == new.gateway.ext_proc,
        ),
        (
            "gateway.max_concurrent",
            old.gateway.max_concurrent == new.gateway.max_concurrent,
        ),
        (
            "gateway.max_connections",
            old.gateway.max_connections == new.gateway.max_connections,
        ),
        (
            "gateway.head_timeout_s",
            old.gateway.head_timeout_s == new.gateway.head_timeout_s,
        ),
        // Read once at start: the certificate paths (their files do rotate), the tokens, the
        // watchdog and probes, the drain's timing, and feedback's journal and re-fit task
        // (a reload that turned feedback on would accept outcomes with no journal behind them).
        ("tls", same(&old.tls, &new.tls)),
        ("auth", same(&old.auth, &new.auth)),
        ("health", same(&old.health, &new.health)),
        ("drain", same(&old.drain, &new.drain)),
        (
            "feedback.overlay",
            old.feedback.overlay == new.feedback.overlay,
        ),
        (
            "feedback.refit_interval_s",
            old.feedback.refit_interval_s == new.feedback.refit_interval_s,
        ),
        (
            "feedback.max_rows_per_model",
            old.feedback.max_rows_per_model == new.feedback.max_rows_per_model,
        ),
    ] {
        if !ok {
            anyhow::bail!("{key} changed: it takes a restart; nothing was reloaded");
        }
    }
    Ok(())
}
