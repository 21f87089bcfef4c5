//! Overlays: what calibration on a user's own labelled traffic learned (`tiergate calibrate`),
//! kept apart from the trained heads and applied on top of them at start. Per model: its
//! ability on the router's scale and how many rows taught it; the population prior after the
//! traffic's shift; the verifier when it was re-fitted; Verify's per-floor thresholds when
//! re-learned. An overlay names the heads revision it
//! was fitted against and is refused on any other, or with shapes that do not fit.
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::heads::{Ability, Heads, ModelInfo, VerifierHead};
use super::memory::Memory;

pub const OVERLAY_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayModel {
    pub ability: Ability,
    /// Labelled rows of this model the ability was fitted on.
    pub rows: usize,
    /// Usual answer length on this traffic (byte-proxy tokens), for the verifier.
    pub mean_output_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    pub format: u32,
    /// `Heads::revision` the overlay was fitted against.
    pub heads_revision: String,
    /// The router's population prior after the traffic's shift (models without rows).
    pub prior: Ability,
    pub models: BTreeMap<String, OverlayModel>,
    /// The verifier re-fitted on this traffic's answers; None keeps the trained one.
    #[serde(default)]
    pub verifier: Option<VerifierHead>,
    /// Labelled answers the verifier saw.
    #[serde(default)]
    pub verifier_rows: usize,
    /// The labelled prompts, kept when they correct the router per prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// Verify's per-floor thresholds: re-learned on this traffic's held-out answers, or the
    /// trained table again beside a re-fitted verifier that could not re-learn them; None
    /// leaves the table as it stands (the trained one, or an earlier overlay's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_thresholds: Option<Vec<(f64, f64)>>,
}

impl Overlay {
    pub fn load(path: &Path) -> Result<Overlay> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading overlay {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("parsing overlay {}", path.display()))
    }

    /// An overlay from the text of an overlay file (checked against heads by [`Self::apply`]).
    pub fn from_json(text: &str) -> Result<Overlay> {
        Ok(serde_json::from_str(text)?)
    }

    /// Writes atomically (a temporary file renamed over the target): a crash mid-write
    /// leaves the old overlay, never half of a new one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self)?;
        let tmp = path.with_extension("json.part");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Every check `apply` relies on, before anything is changed.
    pub fn validate(&self, heads: &Heads) -> Result<()> {
        if self.format != OVERLAY_FORMAT {
            bail!("format {} (expected {OVERLAY_FORMAT})", self.format);
        }
        if self.heads_revision != heads.revision {
            bail!(
                "heads_revision {:?}: fitted against other heads than {:?} (re-run tiergate calibrate)",
                self.heads_revision,
                heads.revision
            );
        }
        let k = heads.router.k;
        let check = |what: &str, a: &Ability| -> Result<()> {
            if a.u.len() != k {
                bail!("{what}: ability has {} skills, the router {k}", a.u.len());
            }
            if !a.b.is_finite() || a.u.iter().any(|x| !x.is_finite()) {
                bail!("{what}: ability is not finite");
            }
            Ok(())
        };
        check("prior", &self.prior)?;
        for (m, o) in &self.models {
            if m.trim().is_empty() {
                bail!("models: an empty model name");
            }
            check(&format!("models[{m}]"), &o.ability)?;
            if o.rows == 0 {
                bail!("models[{m}]: rows = 0");
            }
        }
        if let Some(v) = &self.verifier {
            v.validate(super::heads::verify_dim(heads.dim))?;
        }
        if let Some(m) = &self.memory {
            m.validate(heads.dim)?;
        }
        if let Some(t) = &self.verify_thresholds {
            super::heads::check_thresholds(t)?;
        }
        Ok(())
    }

    /// Validates, then applies: all or nothing.
    pub fn apply(&self, heads: &mut Heads) -> Result<()> {
        self.validate(heads)?;
        heads.router.prior = self.prior.clone();
        for (m, o) in &self.models {
            heads.router.models.insert(m.clone(), o.ability.clone());
            let info = heads.models.entry(m.clone()).or_insert(ModelInfo {
                in_usd_per_mtok: 0.0,
                out_usd_per_mtok: 0.0,
                mean_output_tokens: o.mean_output_tokens.max(1),
                train_rows: 0,
                pass_fail: None,
            });
            info.mean_output_tokens = o.mean_output_tokens.max(1);
            heads.calibrated.insert(m.clone(), o.rows);
        }
        if let Some(v) = &self.verifier {
            heads.verifier = v.clone();
        }
        if let Some(m) = &self.memory {
            heads.memory = Some(m.clone());
        }
        if let Some(t) = &self.verify_thresholds {
            heads.set_verify_thresholds(t.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A re-fitted verifier with a non-finite scalar (JSON's 1e39 reads as an f32 infinity)
    /// is refused: it would make every Verify p NaN.
    #[test]
    fn a_non_finite_verifier_is_refused() -> Result<()> {
        let heads = Heads::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/heads.json"
        )))?;
        let text = serde_json::json!({
            "format": OVERLAY_FORMAT,
            "heads_revision": heads.revision,
            "prior": { "u": vec![0.0; heads.router.k], "b": 0.0 },
            "models": {},
            "verifier": heads.verifier,
        })
        .to_string();
        Overlay::from_json(&text)?.validate(&heads)?;
        let mut v: serde_json::Value = serde_json::from_str(&text)?;
        v["verifier"]["platt_a"] = 1e39.into();
        let o = Overlay::from_json(&v.to_string())?;
        assert!(o.verifier.as_ref().is_some_and(|v| v.platt_a.is_infinite()));
        let e = o.validate(&heads).err().map(|e| format!("{e:#}"));
        assert!(e.as_deref().is_some_and(|e| e.contains("finite")), "{e:?}");
        Ok(())
    }
}
