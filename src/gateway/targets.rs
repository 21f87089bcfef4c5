//! What the gateway's requests read from the catalog and config: the models it can call,
//! their prices, and the named policies of `auto:<name>`.
#![forbid(unsafe_code)]
use super::status::GatewayError;
use crate::config::{CatalogEntryConfig, ConsensusConfig, GatewayConfig, VerifyMode};
use crate::policy::PolicyRequest;
use crate::service::Decider;

pub fn entry<'a>(d: &'a Decider, model: &str) -> Option<&'a CatalogEntryConfig> {
    d.cfg.catalog.iter().find(|e| e.model == model)
}

pub fn prices(d: &Decider, model: &str) -> (f64, f64) {
    d.catalog
        .get(model)
        .map_or((0.0, 0.0), |m| (m.in_usd_per_mtok, m.out_usd_per_mtok))
}

/// Catalog models the gateway can call, in catalog order.
pub fn callable(d: &Decider) -> Vec<String> {
    d.cfg
        .catalog
        .iter()
        .filter(|e| e.upstream.is_some())
        .map(|e| e.model.clone())
        .collect()
}

/// A named policy's Route fields, verify mode and consensus.
pub fn policy<'a>(
    g: &'a GatewayConfig,
    name: Option<&str>,
) -> Result<
    (
        Option<PolicyRequest>,
        VerifyMode,
        Option<&'a ConsensusConfig>,
    ),
    GatewayError,
> {
    let Some(name) = name else {
        return Ok((None, g.verify, None));
    };
    let p = g.policies.get(name).ok_or_else(|| {
        GatewayError::UnknownModel(format!(
            "no policy {}: {}:<name> takes one of {:?} (gateway.policies)",
            crate::base::clip(name),
            g.auto_model,
            g.policies.keys().collect::<Vec<_>>()
        ))
    })?;
    let req = PolicyRequest {
        quality_floor: p.quality_floor,
        max_cost_usd: p.max_cost_usd,
        cost_weight: p.cost_weight,
        relative_floor: p.relative_floor,
    };
    Ok((
        Some(req),
        p.verify.unwrap_or(g.verify),
        p.consensus.as_ref(),
    ))
}

/// The Route the gateway asks for a conversation: among `candidates`, under `policy`, at normal
/// priority with the server's truncation, by `deadline` (the front's and ext_proc's alike).
pub fn route_query(
    input: crate::service::RouteInput,
    candidates: Vec<String>,
    policy: Option<PolicyRequest>,
    deadline: std::time::Instant,
) -> crate::service::RouteQuery {
    crate::service::RouteQuery {
        request_id: String::new(),
        input: Some(input),
        candidates,
        policy,
        priority: crate::batch::Priority::Normal,
        truncation: crate::model::TruncSide::HeadTail,
        expected_output_tokens: None,
        deadline: Some(deadline),
    }
}
