//! The whole cascade for one chat completion: Route over the catalog models that have an
//! upstream, call the chosen one, Verify its answer when the policy asks, and escalate: after
//! a rejected answer to where Verify says (the pricier model Route rates most likely to pass;
//! none, and the answer ships; an empty one, or one the provider cut at a token limit the
//! request did not set, to the likeliest pricier model, or up the prices when Verify cannot
//! run), after a failed upstream to the next model up in price within the policy's
//! `max_cost_usd`; at most
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
use super::targets::{callable, entry, policy, prices, route_query, stream_mode};
use super::upstream::{UpstreamError, Upstreams};
use crate::batch::Priority;
use crate::config::{ConsensusConfig, StreamMode, UpstreamConfig, VerifyMode};
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
    /// A consensus policy's outcome (`agreed`, `escalated`, `fallback`); None otherwise.
    pub consensus: Option<&'static str>,
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
    policy: Option<PolicyRequest>,
    verify: bool,
    /// An empty answer is verified (and so escalated) even where `verify` is off, unless the
    /// policy's Verify mode is `never` or the model was named.
    verify_empty: bool,
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

    /// The next model up in price order, while escalations are left and it fits the policy's
    /// `max_cost_usd` at Route's expected cost (as Route's pick and Verify's target do).
    fn next(&self, model: &str, hops: u32) -> Option<String> {
        if hops >= self.d.cfg.gateway.max_escalations {
            return None;
        }
        let i = self.order.iter().position(|m| m == model)?;
        let next = self.order.get(i + 1)?;
        let max = self.policy.as_ref().and_then(|p| p.max_cost_usd);
        let cost = |m: &str| {
            let r = self.route.as_ref()?;
            r.candidates.iter().find(|c| c.model == m).map(|c| c.cost)
        };
        match (max, cost(next)) {
            (Some(max), Some(c)) if c > max => None,
            _ => Some(next.clone()),
        }
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
        let prompt = input.text();
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
                    policy: None,
                    verify: false,
                    verify_empty: false,
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
                        policy: pol,
                        verify: false,
                        verify_empty: false,
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
                    policy: pol,
                    verify,
                    verify_empty: mode != VerifyMode::Never,
                    prompt,
                    consensus,
                    d,
                })
            }
        }
    }

    /// Whether a stream asked as `ask` runs the whole cascade (a consensus, or `stream =
    /// "cascade"`): answers are read whole and the shipped one is sent as events
    /// (`chat::as_sse`). A model named directly always streams through.
    pub fn streams_whole(&self, ask: &Ask) -> bool {
        let d = self.svc.decider();
        matches!(ask, Ask::Auto(name)
            if stream_mode(&d.cfg.gateway, name.as_deref()) == StreamMode::Cascade)
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
        let mut cut_seen = false;
        loop {
            match self.call(&plan, &at, &body, deadline).await? {
                Ok(reply) => {
                    spent += plan.cost(&at, &reply);
                    // An answer cut short counts as empty once per request: when a pricier
                    // tier's is cut too, the request wants more than the providers' limits
                    // give, and going on would pay for another cut answer. That one is
                    // verified as it reads.
                    let cut = chat::cut_short(&body, &reply);
                    let treat_cut = cut && !cut_seen;
                    cut_seen |= cut;
                    // Earlier tiers' answers are not sent as Verify peers: agreement moves a
                    // decision only with a peer_threshold, which did not pay on dev
                    // (models/EVAL.md), and past 8 peers or a long answer Verify would refuse.
                    let to = self
                        .escalate(&plan, &at, &reply, treat_cut, hops, deadline)
                        .await;
                    if let Some(to) = to {
                        rejected = Some((std::mem::replace(&mut at, to), reply));
                        hops += 1;
                        continue;
                    }
                    return Ok(ship(&plan, at, reply, spent, hops));
                }
                Err(e) => {
                    if let Some(billed) = e.billed() {
                        spent += plan.cost(&at, billed);
                    }
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
    /// is taken as soon as the answers in settle it (`decide::consensus_settled`): an agreement
    /// ships at once, and a consensus that can no longer form calls the top while the probes
    /// still out run on, as the fallback should the top fail. A probe still out when an answer
    /// ships is cancelled and not in the cost (a provider may still bill it).
    async fn consensus(
        &self,
        plan: &Plan,
        c: &ConsensusConfig,
        body: &Value,
        deadline: Instant,
    ) -> Result<Shipped, GatewayError> {
        // Cheapest first, as Route prices the candidates for this prompt.
        let mut probes = c.models.clone();
        let rank = |m: &String| plan.order.iter().position(|o| o == m).unwrap_or(usize::MAX);
        probes.sort_by_key(rank);
        // Where no consensus goes: the most expensive candidate, unless escalation is off.
        let top = (plan.d.cfg.gateway.max_escalations > 0)
            .then(|| plan.order.last().cloned())
            .flatten();
        let top_probe = top
            .as_ref()
            .and_then(|t| probes.iter().position(|m| m == t));
        let mut calls: FuturesUnordered<_> = probes
            .iter()
            .enumerate()
            .map(|(i, m)| async move { (i, self.call(plan, m, body, deadline).await) })
            .collect();
        let mut v = Votes::new(probes.len());
        // A plan error (a probe without an upstream, which config validation rules out) ends
        // the request; it is still counted below.
        let mut broken: Option<GatewayError> = None;
        let settled = loop {
            let settled = v.settled(c.agree);
            let now = match settled {
                decide::Settled::Ship(_) => true,
                // Early only with somewhere to go: a top outside the probes (called while the
                // rest run on) unless a probe refused the request itself with no answer in
                // yet (then every probe may, and its error goes back without calling the top),
                // or a top probe that answered.
                decide::Settled::Escalate => match top_probe {
                    None => {
                        top.is_some()
                            && (v.replies.iter().any(Option::is_some)
                                || v.errors.iter().all(UpstreamError::retryable))
                    }
                    Some(t) => v.replies[t].is_some(),
                },
                decide::Settled::Wait => false,
            };
            if now {
                break settled;
            }
            match calls.next().await {
                Some((i, r)) => {
                    if let Err(e) = v.record_or_fail(plan, &probes[i], i, r) {
                        broken = Some(e);
                        break settled;
                    }
                }
                None => break settled,
            }
        };
        let result = match broken {
            Some(e) => Err(e),
            None => {
                self.consensus_decided(
                    plan, &probes, settled, top, &mut v, &mut calls, body, deadline,
                )
                .await
            }
        };
        for (what, n) in [
            ("answered", v.replies_came),
            ("failed", v.failed),
            ("cancelled", calls.len()),
        ] {
            metrics::counter!(crate::metrics::GATEWAY_CONSENSUS_PROBES, "result" => what)
                .increment(n as u64);
        }
        let outcome = match &result {
            Ok((_, o)) => *o,
            Err(_) => "failed",
        };
        metrics::counter!(crate::metrics::GATEWAY_CONSENSUS, "outcome" => outcome).increment(1);
        result.map(|(shipped, outcome)| Shipped {
            consensus: Some(outcome),
            ..shipped
        })
    }

    /// What a consensus ships once `settled` (see [`Self::consensus`]), with its outcome label;
    /// `calls` are the probes still out.
    #[allow(clippy::too_many_arguments)]
    async fn consensus_decided<F>(
        &self,
        plan: &Plan,
        probes: &[String],
        settled: decide::Settled,
        top: Option<String>,
        v: &mut Votes,
        calls: &mut FuturesUnordered<F>,
        body: &Value,
        deadline: Instant,
    ) -> Result<(Shipped, &'static str), GatewayError>
    where
        F: std::future::Future<
            Output = (usize, Result<Result<Value, UpstreamError>, GatewayError>),
        >,
    {
        if let decide::Settled::Ship(i) = settled {
            if let Some(reply) = v.replies[i].take() {
                return Ok((ship(plan, probes[i].clone(), reply, v.spent, 0), "agreed"));
            }
        }
        // No answer, and an upstream refused the request itself (a 4xx other than 429): every
        // tier would; its error goes back as the upstream wrote it, as in the cascade.
        if calls.is_empty() && v.replies.iter().all(Option::is_none) {
            if let Some(e) = v.take_refusal() {
                return Err(e.into());
            }
        }
        let mut hops = 0;
        if let Some(top) = top {
            match probes.iter().position(|m| *m == top) {
                Some(i) => {
                    if let Some(reply) = v.replies[i].take() {
                        return Ok((ship(plan, top, reply, v.spent, 0), "escalated"));
                    }
                }
                None => {
                    hops = 1;
                    // The probes still out run on beside the top: the fallback if it fails.
                    let top_call = self.call(plan, &top, body, deadline);
                    tokio::pin!(top_call);
                    let r = loop {
                        tokio::select! {
                            r = &mut top_call => break r?,
                            Some((i, r)) = calls.next() => v.record_or_fail(plan, &probes[i], i, r)?,
                        }
                    };
                    match r {
                        Ok(reply) => {
                            v.spent += plan.cost(&top, &reply);
                            return Ok((ship(plan, top.clone(), reply, v.spent, 1), "escalated"));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, model = %top, "consensus escalation failed");
                            v.errors.push(e);
                        }
                    }
                }
            }
        }
        // The cheapest probe answer with text in it and not cut short (else the cheapest at
        // all), once every probe has had its say; else the last error.
        while let Some((i, r)) = calls.next().await {
            v.record_or_fail(plan, &probes[i], i, r)?;
        }
        // A tool call (nothing to verify) counts as text.
        let has_text = |r: &Value| {
            chat::verifiable(r)
                .is_none_or(|a| !crate::model::answer::says_nothing(a) && !chat::cut_short(body, r))
        };
        let pick = v
            .replies
            .iter()
            .position(|r| r.as_ref().is_some_and(has_text))
            .or_else(|| v.replies.iter().position(Option::is_some));
        match pick.and_then(|i| v.replies[i].take().map(|r| (probes[i].clone(), r))) {
            Some((m, reply)) => Ok((ship(plan, m, reply, v.spent, hops), "fallback")),
            // The request's own fault first (a probe that answered after the top was called
            // may have refused it), else the last error.
            None => Err(match v.take_refusal().or_else(|| v.errors.pop()) {
                Some(e) => e.into(),
                None => GatewayError::UnknownModel("no candidate to escalate to".into()),
            }),
        }
    }

    /// Where to escalate this answer, if the plan verifies and the verifier turns it down.
    /// A verifier that cannot answer (overloaded, past the deadline) ships what is there.
    async fn escalate(
        &self,
        plan: &Plan,
        at: &str,
        reply: &Value,
        cut: bool,
        hops: u32,
        deadline: Instant,
    ) -> Option<String> {
        if Instant::now() >= deadline {
            return None;
        }
        let answer = chat::verifiable(reply)?;
        // An answer the provider cut short (`cut`) counts as empty: Verify is asked with
        // nothing in it (p 0), so it goes to the likeliest pricier model, and ships only when
        // nothing pricier is left or every later tier fails.
        let answer = if cut { "" } else { answer };
        let empty = crate::model::answer::says_nothing(answer);
        // Route asks for Verify only where it could send the answer somewhere better; an
        // empty answer goes on from any pick.
        if !(plan.verify || (plan.verify_empty && empty)) {
            return None;
        }
        // Nothing pricier, or no escalations left: nothing to ask Verify.
        let next = plan.next(at, hops)?;
        if cut {
            tracing::debug!(model = %at, "answer cut at the provider's token limit; treated as empty");
        }
        let v = self
            .svc
            .verify(VerifyQuery {
                request_id: String::new(),
                prompt: plan.prompt.clone(),
                answer: answer.to_string(),
                model: at.to_string(),
                candidates: plan.order.clone(),
                policy: plan.policy,
                priority: Priority::Normal,
                deadline: Some(deadline),
                peers: Vec::new(),
                peer_threshold: None,
                expected_output_tokens: None,
            })
            .await;
        match v {
            // Turned down with nowhere Route rates better: the answer ships.
            Ok(v) if !v.ship => v.escalate_to,
            Ok(_) => None,
            // Verify could not run on an empty answer: up the prices rather than ship nothing.
            Err(e) if empty => {
                tracing::warn!(error = %e, next = %next, "verify failed on an empty answer; escalating up the prices");
                Some(next)
            }
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
                    // Route's expected cost; a model named directly, priced from the catalog
                    // the same way.
                    let expected = plan
                        .route
                        .as_ref()
                        .and_then(|r| r.candidates.iter().find(|c| c.model == at).map(|c| c.cost))
                        .or_else(|| {
                            let tokens = crate::policy::proxy_tokens(plan.prompt.len());
                            let d = self.svc.decider();
                            d.catalog.get(&at).map(|m| m.expected_cost(tokens, None))
                        });
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

/// The probe answers of a consensus so far.
struct Votes {
    replies: Vec<Option<Value>>,
    /// Each probe's final answer: None while it is out, Some(None) for no answer.
    keys: Vec<Option<Option<String>>>,
    errors: Vec<UpstreamError>,
    spent: f64,
    replies_came: usize,
    failed: usize,
}

impl Votes {
    fn new(n: usize) -> Votes {
        Votes {
            replies: vec![None; n],
            keys: vec![None; n],
            errors: Vec::new(),
            spent: 0.0,
            replies_came: 0,
            failed: 0,
        }
    }

    fn settled(&self, agree: usize) -> decide::Settled {
        let view: Vec<Option<Option<&str>>> = self
            .keys
            .iter()
            .map(|k| k.as_ref().map(Option::as_deref))
            .collect();
        decide::consensus_settled(&view, agree)
    }

    /// An upstream's refusal of the request itself (a 4xx other than 429), taken out of the
    /// errors: every tier would refuse it too, so it goes back as the upstream wrote it.
    fn take_refusal(&mut self) -> Option<UpstreamError> {
        let k = self.errors.iter().position(|e| !e.retryable())?;
        Some(self.errors.swap_remove(k))
    }

    /// [`Self::record`] a probe's call, or count it failed and hand back the plan's error.
    fn record_or_fail(
        &mut self,
        plan: &Plan,
        model: &str,
        i: usize,
        r: Result<Result<Value, UpstreamError>, GatewayError>,
    ) -> Result<(), GatewayError> {
        match r {
            Ok(r) => {
                self.record(plan, model, i, r);
                Ok(())
            }
            Err(e) => {
                self.failed += 1;
                Err(e)
            }
        }
    }

    fn record(&mut self, plan: &Plan, model: &str, i: usize, r: Result<Value, UpstreamError>) {
        match r {
            Ok(reply) => {
                self.spent += plan.cost(model, &reply);
                let key = chat::answer(&reply)
                    .and_then(|a| crate::model::answer::final_answer(&plan.prompt, a));
                self.keys[i] = Some(key);
                self.replies[i] = Some(reply);
                self.replies_came += 1;
            }
            Err(e) => {
                if let Some(billed) = e.billed() {
                    self.spent += plan.cost(model, billed);
                }
                tracing::warn!(error = %e, model = %model, "consensus probe failed");
                self.keys[i] = Some(None);
                self.errors.push(e);
                self.failed += 1;
            }
        }
    }
}

fn retry(e: &UpstreamError, deadline: Instant) -> bool {
    e.retryable() && Instant::now() < deadline
}

fn ship(plan: &Plan, model: String, reply: Value, spent: f64, hops: u32) -> Shipped {
    // What the most expensive candidate would have cost for the same tokens (a named model's
    // plan holds that model alone, so it saved exactly 0).
    let saved = plan
        .order
        .last()
        .map_or(0.0, |top| plan.cost(top, &reply) - spent);
    Shipped {
        reply: chat::finish(reply, &model, spent),
        model,
        cost_usd: spent,
        saved_usd: saved,
        escalations: hops,
        consensus: None,
    }
}
