//! What decides, as one value: the heads with their overlays, the catalog and the policy
//! defaults. Built whole from a config and swapped whole on reload, so a request reads one
//! consistent state from start to end.
#![forbid(unsafe_code)]
use anyhow::{Context, Result};
use sha2::Digest;

use super::decide;
use crate::config::{Config, PolicyConfig};
use crate::model::ability::ability_for_accuracy;
use crate::model::benchmarks::Benchmarks;
use crate::model::heads::ModelInfo;
use crate::model::{Heads, Overlay};
use crate::policy::Catalog;

pub struct Decider {
    /// The configuration this state was built from (reloads and re-fits rebuild from it).
    pub cfg: Config,
    pub heads: Heads,
    pub catalog: Catalog,
    pub policy: PolicyConfig,
    /// A short hash of the overlays applied, if any.
    pub overlay_revision: Option<String>,
}

impl Decider {
    /// Heads (file named by `cfg.heads`), its overlays in order, and the catalog: every file
    /// checked before anything is used; an error names the file or key.
    pub fn load(cfg: &Config, encoder_dim: usize) -> Result<Decider> {
        let heads = Heads::load(&cfg.heads)?;
        Self::with_heads(cfg, heads, encoder_dim)
    }

    pub fn with_heads(cfg: &Config, mut heads: Heads, encoder_dim: usize) -> Result<Decider> {
        if encoder_dim != heads.dim {
            anyhow::bail!(
                "heads {} have dim {} but the encoder has {encoder_dim}",
                cfg.heads.display(),
                heads.dim
            );
        }
        let mut digest = sha2::Sha256::new();
        for path in &cfg.overlays {
            let o = Overlay::load(path)?;
            o.apply(&mut heads)
                .with_context(|| format!("overlay {}", path.display()))?;
            digest.update(serde_json::to_vec(&o)?);
        }
        // The feedback overlay last: what serving learned on top of what was configured.
        let fb = &cfg.feedback.overlay;
        if cfg.feedback.enabled() && fb.exists() {
            let o = Overlay::load(fb)?;
            o.apply(&mut heads)
                .with_context(|| format!("feedback overlay {}", fb.display()))?;
            digest.update(serde_json::to_vec(&o)?);
        }
        let overlay_revision =
            (!heads.calibrated.is_empty() || !cfg.overlays.is_empty()).then(|| {
                let d = digest.finalize();
                d[..6].iter().map(|b| format!("{b:02x}")).collect()
            });
        place_priors(cfg, &mut heads)?;
        let catalog = Catalog::build(cfg, &heads)?;
        Ok(Decider {
            cfg: cfg.clone(),
            heads,
            catalog,
            policy: cfg.policy.clone(),
            overlay_revision,
        })
    }

    /// Heads and overlay revisions (the encoder's is prepended by the service).
    pub fn revision(&self) -> String {
        match &self.overlay_revision {
            Some(o) => format!("{}+{o}", self.heads.revision),
            None => self.heads.revision.clone(),
        }
    }

    pub fn default_floor(&self) -> f64 {
        decide::default_floor(&self.policy, &self.heads)
    }

    pub fn default_threshold(&self) -> f64 {
        decide::default_threshold(&self.policy, &self.heads)
    }

    /// Route's default relative floor, when the default is relative: what a request that
    /// asks for nothing gets (the one rule, `policy::effective`).
    pub fn default_relative_floor(&self) -> Option<f64> {
        crate::policy::default_relative_floor(&self.policy)
    }
}

/// Catalog models with a published accuracy (and no calibrated parameters) get the ability
/// that accuracy means on the router's scale.
fn place_priors(cfg: &Config, heads: &mut Heads) -> Result<()> {
    let wanted: Vec<_> = cfg
        .catalog
        .iter()
        .filter(|e| e.prior.is_some() && !heads.calibrated.contains_key(&e.model))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let b = Benchmarks::load(&cfg.benchmarks, &heads.revision, heads.router.k)?;
    for e in wanted {
        let Some(p) = &e.prior else { continue };
        let f = b.benchmarks.get(&p.benchmark).with_context(|| {
            format!(
                "catalog[{}].prior.benchmark = {:?}: not in {} (has {:?})",
                e.model,
                p.benchmark,
                cfg.benchmarks.display(),
                b.benchmarks.keys().collect::<Vec<_>>()
            )
        })?;
        let a = ability_for_accuracy(&heads.router.prior, &f.s, &f.z, p.accuracy)
            .with_context(|| format!("catalog[{}].prior", e.model))?;
        heads.router.models.insert(e.model.clone(), a);
        heads.models.insert(
            e.model.clone(),
            ModelInfo {
                in_usd_per_mtok: e.in_usd_per_mtok,
                out_usd_per_mtok: e.out_usd_per_mtok,
                mean_output_tokens: e
                    .expected_output_tokens
                    .unwrap_or(cfg.policy.default_output_tokens)
                    .max(1),
                train_rows: 0,
                pass_fail: None,
            },
        );
        heads.priors.insert(
            e.model.clone(),
            format!("prior:{}@{}", p.benchmark, p.accuracy),
        );
    }
    Ok(())
}
