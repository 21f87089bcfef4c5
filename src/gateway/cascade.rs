//! The whole cascade for one chat completion: Route over the catalog models that have an
//! upstream, call the chosen one, Verify its answer when the policy asks, and escalate to the
//! next model up (after a rejected answer or a failed upstream), at most
//! `gateway.max_escalations` times, all before the request's deadline. A named policy with a
//! `consensus` asks its cheap models together instead and ships what they agree on (a stream
//! asked of it gets the shipped answer as server-sent events).
#![forbid(unsafe_code)]
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;

use super::chat::{self, Ask};
use super::status::GatewayError;
use super::targets::{callable, entry, policy, prices, route_query};
use super::upstream::{UpstreamError, Upstreams};
use crate::batch::Priority;
use crate::config::{ConsensusConfig, UpstreamConfig, VerifyMode};
use crate::policy::{proxy_tokens, PolicyRequest};
use crate::service::{
    decide, Decider, RouteInput, RouteOutcome, Service, ServiceError, VerifyQuery,
};

pub struct Front {
    pub svc: Arc<Service>,
    pub upstreams: Upstreams,
}

/// What one request shipped, and what it cost.
pub struct Shipped {
    pub reply: Value,
    pub model: String,
    pub cost_usd: f64,
    /// Against the most expensive candidate answering with the same token counts; negative
    /// when escalations cost more than that.
    pub saved_usd: f64,
    pub escalations: u32,
}

/// A stream's upstream response, not yet read, and who answers it.
pub struct Streaming {
    pub resp: reqwest::Response,
    pub model: String,
    pub expected_cost_usd: f64,
    pub escalations: u32,
}

/// The decision to carry out: which models, in price order, starting where.
struct Plan {
    d: Arc<Decider>,
    order: Vec<String>,
    start: String,
    route: Option<RouteOutcome>,
    /// Whether the gateway chose (`auto`): then what it saved against the top is reported.
    priced: bool,
    policy: Option<PolicyRequest>,
    verify: bool,
    prompt: String,
    /// The named policy's consensus: cheap models asked together before anything else.
    consensus: Option<ConsensusConfig>,
}

impl Plan {
    fn upstream(&self, model: &str) -> Result<&UpstreamConfig, GatewayError> {
        entry(&self.d, model)
            .and_then(|e| e.upstream.as_ref())
            .ok_or_else(|| GatewayError::UnknownModel(format!("{model} has no upstream")))
    }

    /// The next model up in price order, while escalations are left.
    fn next(&self, model: &str, hops: u32) -> Option<String> {
        if hops >= self.d.cfg.gateway.max_escalations {
            return None;
        }
        let i = self.order.iter().position(|m| m == model)?;
        self.order.get(i + 1).cloned()
    }

    fn cost(&self, model: &str, reply: &Value) -> f64 {
        let (i, o) = prices(&self.d, model);
        chat::cost(chat::tokens(reply, self.prompt.len()), i, o)
    }
}

impl Front {
    /// Routes (for `auto`) or looks the named model up.
    async fn plan(&self, body: &Value, ask: Ask, deadline: Instant) -> Result<Plan, GatewayError> {
        let d = self.svc.decider();
        let order = callable(&d);
        let turns = chat::turns(body)?;
        let input = RouteInput::Messages(turns);
        let prompt = input.clone().into_text();
        match ask {
            Ask::Named(m) => {
                if !order.contains(&m) {
                    return Err(GatewayError::UnknownModel(format!(
                        "model {} is not a catalog model with an upstream; use {:?} or one of {order:?}",
                        crate::base::clip(&m),
                        d.cfg.gateway.auto_model
                    )));
                }
                // A model asked for by name is called as asked: no other tier.
                Ok(Plan {
                    order: vec![m.clone()],
                    start: m,
                    route: None,
                    priced: false,
                    policy: None,
                    verify: false,
                    prompt,
                    consensus: None,
                    d,
                })
            }
            Ask::Auto(name) => {
                let (pol, mode, consensus) = policy(&d.cfg.gateway, name.as_deref())?;
                let consensus = consensus.cloned();
                if consensus.is_some() {
                    // A consensus reads only the price order (its probes cheapest first, the
                    // top to escalate to): no encoder pass, so it answers when Route is busy.
                    self.svc.check_text("prompt", &prompt, false)?;
                    let cands = d.catalog.resolve(&order).map_err(ServiceError::from)?;
                    let order = decide::price_order(&cands, proxy_tokens(prompt.len()));
                    return Ok(Plan {
                        start: order.first().cloned().unwrap_or_default(),
                        order,
                        route: None,
                        priced: true,
                        policy: pol,
                        verify: false,
                        prompt,
                        consensus,
                        d,
                    });
                }
                let route = self
                    .svc
                    .route(route_query(input, order, pol, deadline))
                    .await?;
                let verify = match mode {
                    VerifyMode::Never => false,
                    VerifyMode::Borderline => route.verify_recommended,
                    VerifyMode::Always => true,
                };
                Ok(Plan {
                    order: route.candidates.iter().map(|c| c.model.clone()).collect(),
                    start: route.model.clone(),
                    route: Some(route),
                    priced: true,
                    policy: pol,
                    verify,
                    prompt,
                    consensus,
                    d,
                })
            }
        }
    }

    /// Whether `ask` names a policy with a consensus (which reads whole answers, so a stream
    /// asked of it is answered from the shipped one: `chat::as_sse`).
    pub fn is_consensus(&self, ask: &Ask) -> bool {
        let d = self.svc.decider();
        matches!(ask, Ask::Auto(name)
            if policy(&d.cfg.gateway, name.as_deref()).is_ok_and(|(_, _, c)| c.is_some()))
    }

    /// Route, call, verify, escalate; the answer that ships and what the request cost.
    pub async fn complete(
        &self,
        body: Value,
        ask: Ask,
        deadline: Instant,
    ) -> Result<Shipped, GatewayError> {
        let plan = self.plan(&body, ask, deadline).await?;
        if let Some(c) = &plan.consensus {
            return self.consensus(&plan, c, &body, deadline).await;
        }
        let (mut at, mut hops, mut spent) = (plan.start.clone(), 0u32, 0.0);
        // The last answer the verifier turned down: shipped if every later tier fails.
        let mut rejected: Option<(String, Value)> = None;
        loop {
            match self.call(&plan, &at, &body, deadline).await? {
                Ok(reply) => {
                    spent += plan.cost(&at, &reply);
                    // Earlier tiers' answers are not sent as Verify peers: agreement moves a
                    // decision only with a peer_threshold, which did not pay on dev
                    // (models/EVAL.md), and past 8 peers or a long answer Verify would refuse.
                    let to = self.escalate(&plan, &at, &reply, hops, deadline).await;
                    if let Some(to) = to {
                        rejected = Some((std::mem::replace(&mut at, to), reply));
                        hops += 1;
                        continue;
                    }
                    return Ok(ship(&plan, at, reply, spent, hops));
                }
                Err(e) => {
                    if let Some(next) = plan.next(&at, hops).filter(|_| retry(&e, deadline)) {
                        tracing::warn!(error = %e, next = %next, "upstream failed; trying the next tier");
                        at = next;
                        hops += 1;
                        continue;
                    }
                    return match rejected {
                        Some((m, reply)) => {
                            tracing::warn!(error = %e, shipped = %m, "escalation failed; shipping the earlier answer");
                            Ok(ship(&plan, m, reply, spent, hops))
                        }
                        None => Err(e.into()),
                    };
                }
            }
        }
    }

    /// One upstream call with the request's body (`model` set to the provider's id), its reply
    /// read whole. The outer error is the plan's (no upstream for `model`), the inner one the
    /// upstream's, which the caller may retry at another tier.
    async fn call(
        &self,
        plan: &Plan,
        model: &str,
        body: &Value,
        deadline: Instant,
    ) -> Result<Result<Value, UpstreamError>, GatewayError> {
        let up = plan.upstream(model)?;
        let sent = chat::with_model(body, up.model.as_deref().unwrap_or(model));
        let max_bytes = plan.d.cfg.gateway.max_body_bytes;
        Ok(self
            .upstreams
            .complete(model, up, sent, deadline, max_bytes)
            .await)
    }

    /// A consensus policy: the probe models called together (every answer paid for); the
    /// cheapest of those that agree ships (`decide::consensus`), else the most expensive
    /// candidate is called and its answer ships (one escalation; none when it was a probe). A
    /// probe that fails counts as no answer; when the last call fails too, or escalation is
    /// off, the cheapest probe answer that came ships; with no answer at all, an upstream's
    /// error goes back (the request's own fault first, without calling the top). The decision
    /// is taken as soon as the answers in settle it (`decide::consensus_settled`): a probe
    /// still out then is cancelled, not waited for, and not in the cost (a provider may still
    /// bill a cancelled call).
    async fn consensus(
        &self,
        plan: &Plan,
        c: &ConsensusConfig,
        body: &Value,
        deadline: Instant,
    ) -> Result<Shipped, GatewayError> {
        // Cheapest first, as Route priced the candidates for this prompt.
        let mut probes = c.models.clone();
        let rank = |m: &String| plan.order.iter().position(|o| o == m).unwrap_or(usize::MAX);
        probes.sort_by_key(rank);
        let top_probe = plan
            .order
            .last()
            .and_then(|t| probes.iter().position(|m| m == t));
        let mut calls: FuturesUnordered<_> = probes
            .iter()
            .enumerate()
            .map(|(i, m)| async move { (i, self.call(plan, m, body, deadline).await) })
            .collect();
        let mut replies: Vec<Option<Value>> = vec![None; probes.len()];
        // Each probe's final answer: None while it is out, Some(None) for no answer.
        let mut keys: Vec<Option<Option<String>>> = vec![None; probes.len()];
        let mut errors: Vec<UpstreamError> = Vec::new();
        let mut spent = 0.0;
        loop {
            let view: Vec<Option<Option<&str>>> = keys
                .iter()
                .map(|k| k.as_ref().map(Option::as_deref))
                .collect();
            match decide::consensus_settled(&view, c.agree) {
                decide::Settled::Ship(_) => break,
                // Not while the top is a probe still out (its answer is the escalation), nor
                // after a refusal of the request itself (every probe may refuse it, and then
                // its error goes back without calling the top).
                decide::Settled::Escalate
                    if top_probe.is_none_or(|t| keys[t].is_some())
                        && errors.iter().all(UpstreamError::retryable) =>
                {
                    break
                }
                _ => {}
            }
            let Some((i, r)) = calls.next().await else {
                break;
            };
            match r? {
                Ok(reply) => {
                    spent += plan.cost(&probes[i], &reply);
                    let key = chat::answer(&reply)
                        .and_then(|a| crate::model::answer::final_answer(&plan.prompt, a));
                    keys[i] = Some(key);
                    replies[i] = Some(reply);
                }
                Err(e) => {
                    tracing::warn!(error = %e, model = %probes[i], "consensus probe failed");
                    keys[i] = Some(None);
                    errors.push(e);
                }
            }
        }
        let out = calls.len();
        drop(calls);
        let answered = replies.iter().filter(|r| r.is_some()).count();
        for (result, n) in [
            ("answered", answered),
            ("failed", errors.len()),
            ("cancelled", out),
        ] {
            metrics::counter!(crate::metrics::GATEWAY_CONSENSUS_PROBES, "result" => result)
                .increment(n as u64);
        }
        let counted = |outcome: &'static str| {
            metrics::counter!(crate::metrics::GATEWAY_CONSENSUS, "outcome" => outcome).increment(1);
        };
        // No answer, and an upstream refused the request itself (a 4xx other than 429): every
        // tier would; its error goes back as the upstream wrote it, as in the cascade.
        if replies.iter().all(Option::is_none) {
            if let Some(k) = errors.iter().position(|e| !e.retryable()) {
                counted("failed");
                return Err(errors.swap_remove(k).into());
            }
        }
        let view: Vec<Option<Option<&str>>> = keys
            .iter()
            .map(|k| k.as_ref().map(Option::as_deref))
            .collect();
        if let decide::Settled::Ship(i) = decide::consensus_settled(&view, c.agree) {
            if let Some(reply) = replies[i].take() {
                counted("agreed");
                return Ok(ship(plan, probes[i].clone(), reply, spent, 0));
            }
        }
        // No consensus: the most expensive candidate answers, unless escalation is off
        // (gateway.max_escalations = 0) or it was a probe, called already.
        let top = (plan.d.cfg.gateway.max_escalations > 0)
            .then(|| plan.order.last().cloned())
            .flatten();
        let mut hops = 0;
        if let Some(top) = top {
            match probes.iter().position(|m| *m == top) {
                Some(i) => {
                    if let Some(reply) = replies[i].take() {
                        counted("escalated");
                        return Ok(ship(plan, top, reply, spent, 0));
                    }
                }
                None => {
                    hops = 1;
                    match self.call(plan, &top, body, deadline).await {
                        Ok(Ok(reply)) => {
                            counted("escalated");
                            spent += plan.cost(&top, &reply);
                            return Ok(ship(plan, top, reply, spent, 1));
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, model = %top, "consensus escalation failed");
                            errors.push(e);
                        }
                        Err(e) => {
                            counted("failed");
                            return Err(e);
                        }
                    }
                }
            }
        }
        // The cheapest probe answer that came, else the last upstream error.
        match replies
            .iter_mut()
            .zip(&probes)
            .find_map(|(r, m)| r.take().map(|r| (m.clone(), r)))
        {
            Some((m, reply)) => {
                counted("fallback");
                Ok(ship(plan, m, reply, spent, hops))
            }
            None => {
                counted("failed");
                Err(match errors.pop() {
                    Some(e) => e.into(),
                    None => GatewayError::UnknownModel("no candidate to escalate to".into()),
                })
            }
        }
    }

    /// Where to escalate this answer, if the plan verifies and the verifier turns it down.
    /// A verifier that cannot answer (overloaded, past the deadline) ships what is there.
    async fn escalate(
        &self,
        plan: &Plan,
        at: &str,
        reply: &Value,
        hops: u32,
        deadline: Instant,
    ) -> Option<String> {
        if !plan.verify || Instant::now() >= deadline {
            return None;
        }
        let next = plan.next(at, hops)?;
        let v = self
            .svc
            .verify(VerifyQuery {
                request_id: String::new(),
                prompt: plan.prompt.clone(),
                answer: chat::answer(reply)?.to_string(),
                model: at.to_string(),
                candidates: plan.order.clone(),
                policy: plan.policy,
                priority: Priority::Normal,
                deadline: Some(deadline),
                peers: Vec::new(),
                peer_threshold: None,
            })
            .await;
        match v {
            Ok(v) if !v.ship => Some(v.escalate_to.unwrap_or(next)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "verify failed; shipping the answer unverified");
                None
            }
        }
    }

    /// Route (for `auto`) and open the chosen upstream's stream; a tier that fails before
    /// its first byte is replaced by the next one up. Streams are not verified.
    pub async fn stream(
        &self,
        body: Value,
        ask: Ask,
        deadline: Instant,
    ) -> Result<Streaming, GatewayError> {
        let plan = self.plan(&body, ask, deadline).await?;
        let (mut at, mut hops) = (plan.start.clone(), 0u32);
        loop {
            let up = plan.upstream(&at)?;
            let sent = chat::with_model(&body, up.model.as_deref().unwrap_or(&at));
            match self.upstreams.send(&at, up, sent, deadline).await {
                Ok(resp) => {
                    let expected = plan
                        .route
                        .as_ref()
                        .and_then(|r| r.candidates.iter().find(|c| c.model == at).map(|c| c.cost));
                    return Ok(Streaming {
                        resp,
                        expected_cost_usd: expected.unwrap_or(0.0),
                        model: at,
                        escalations: hops,
                    });
                }
                Err(e) => match plan.next(&at, hops).filter(|_| retry(&e, deadline)) {
                    Some(next) => {
                        tracing::warn!(error = %e, next = %next, "upstream failed; trying the next tier");
                        at = next;
                        hops += 1;
                    }
                    None => return Err(e.into()),
                },
            }
        }
    }
}

fn retry(e: &UpstreamError, deadline: Instant) -> bool {
    e.retryable() && Instant::now() < deadline
}

fn ship(plan: &Plan, model: String, reply: Value, spent: f64, hops: u32) -> Shipped {
    // What the most expensive candidate would have cost for the same tokens.
    let saved = match plan.order.last() {
        Some(top) if plan.priced => plan.cost(top, &reply) - spent,
        _ => 0.0,
    };
    Shipped {
        reply: chat::finish(reply, &model, spent),
        model,
        cost_usd: spent,
        saved_usd: saved,
        escalations: hops,
    }
}
