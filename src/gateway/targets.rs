//! What the gateway's requests read from the catalog and config: the models it can call,
//! their prices, and the named policies of `auto:<name>`.
#![forbid(unsafe_code)]
use super::status::GatewayError;
use crate::config::{CatalogEntryConfig, ConsensusConfig, GatewayConfig, StreamMode, VerifyMode};
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

/// What a stream asked of `auto` (`name` None) or a named policy gets: the policy's `stream`,
/// else `gateway.stream`. A consensus always reads whole answers: [`StreamMode::Cascade`].
/// An unknown policy is `Pass` here; the request is refused where it is planned.
pub fn stream_mode(g: &GatewayConfig, name: Option<&str>) -> StreamMode {
    match name.and_then(|n| g.policies.get(n)) {
        Some(p) if p.consensus.is_some() => StreamMode::Cascade,
        Some(p) => p.stream.unwrap_or(g.stream),
        None if name.is_some() => StreamMode::Pass,
        None => g.stream,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayPolicy;

    /// A policy's own `stream` wins, else `gateway.stream`; a consensus always reads whole
    /// answers (config validation refuses one set to `pass`); an unknown policy streams
    /// through (its request is refused when planned).
    #[test]
    fn a_stream_gets_the_policys_mode_else_the_gateways() {
        let mut g = GatewayConfig::default();
        let named = |stream| GatewayPolicy {
            stream,
            ..Default::default()
        };
        g.policies
            .insert("own".into(), named(Some(StreamMode::Pass)));
        g.policies.insert("inherit".into(), named(None));
        let vote = GatewayPolicy {
            consensus: Some(ConsensusConfig {
                models: vec!["a".into(), "b".into()],
                agree: 2,
            }),
            ..named(None)
        };
        g.policies.insert("vote".into(), vote);
        for gw in [StreamMode::Pass, StreamMode::Cascade] {
            g.stream = gw;
            assert_eq!(stream_mode(&g, None), gw);
            assert_eq!(stream_mode(&g, Some("inherit")), gw);
            assert_eq!(stream_mode(&g, Some("own")), StreamMode::Pass);
            assert_eq!(stream_mode(&g, Some("vote")), StreamMode::Cascade);
            assert_eq!(stream_mode(&g, Some("nope")), StreamMode::Pass);
        }
    }
}
