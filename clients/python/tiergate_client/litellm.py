"""tiergate as a LiteLLM Router routing strategy: among the deployments of the requested
model group, the one whose catalog model tiergate picks for the messages.

    router = litellm.Router(model_list=[
        {"model_name": "auto", "litellm_params": {"model": "gemini/gemini-2.5-flash"},
         "model_info": {"tiergate_model": "gemini-2.5-flash"}},
        {"model_name": "auto", "litellm_params": {"model": "anthropic/claude-opus-4-8"},
         "model_info": {"tiergate_model": "claude-opus-4.8"}},
    ])
    TiergateRouting(router, Client("127.0.0.1:50051", timeout=0.5)).install()

Each deployment names its catalog model in `model_info.tiergate_model`; deployments without
it are never picked while one with it is there. Route's candidates are the group's catalog
models, so the pick is always one of them. When tiergate cannot answer (down, overloaded,
past the timeout, a prompt it refuses) or the request has no chat messages, the group's
default deployment serves: the one mapped to `default_model`, else the group's first; a
warning is logged and nothing is raised, so routing fails open. The decision is written to
the request's `metadata["tiergate"]` (model, p_pass, expected cost, or the error), which
LiteLLM passes to its callbacks and logs.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import litellm
from litellm.types.router import CustomRoutingStrategyBase

from .client import Client, Policy
from .errors import TiergateError

log = logging.getLogger("tiergate_client.litellm")

MODEL_INFO_KEY = "tiergate_model"


def _turn(m: object) -> dict[str, str] | None:
    """A chat message as (role, text): a mapping, or a message object (LiteLLM's Message, a
    pydantic model: a reply appended to the conversation) read by attribute."""
    if isinstance(m, Mapping):
        role, content = m.get("role"), m.get("content")
    elif hasattr(m, "role") or hasattr(m, "content"):
        role, content = getattr(m, "role", None), getattr(m, "content", None)
    else:
        return None
    return {"role": str(role or "user"), "content": _text(content)}


def _text(content: object) -> str:
    """OpenAI message content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


class TiergateRouting(CustomRoutingStrategyBase):
    """Picks a deployment of `router` with tiergate's Route (see the module's docstring)."""

    def __init__(
        self,
        router: Any,
        client: Client,
        *,
        policy: Policy | None = None,
        default_model: str | None = None,
    ):
        self.router = router
        self.client = client
        self.policy = policy
        self.default_model = default_model

    def install(self) -> "TiergateRouting":
        """Makes this the router's routing strategy (LiteLLM's register_plugin, or
        set_custom_routing_strategy on versions without it)."""
        register = getattr(self.router, "register_plugin", None)
        if register is None:
            register = self.router.set_custom_routing_strategy
        register(self)
        return self

    def _deployments(self, group: str) -> list[dict[str, Any]]:
        registry = getattr(self.router, "registry", None)
        if callable(registry):
            return [dict(d) for d in registry().deployments(group)]
        return list(self.router.get_model_list(model_name=group) or [])

    @staticmethod
    def _catalog_name(d: Mapping[str, Any]) -> str | None:
        name = (d.get("model_info") or {}).get(MODEL_INFO_KEY)
        return name if isinstance(name, str) and name else None

    def _default(self, deployments: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        for d in deployments:
            if self.default_model is not None and self._catalog_name(d) == self.default_model:
                return d
        return deployments[0] if deployments else None

    def _cooling(self) -> set[str]:
        """Ids of the deployments LiteLLM has put in cooldown (failing: rate-limited, down).
        LiteLLM's own strategies skip them; so does this one, or its retries would pick the
        failing deployment again. Empty where this LiteLLM has no such helper."""
        try:
            from litellm.router_utils.cooldown_handlers import _get_cooldown_deployments
            return set(_get_cooldown_deployments(self.router, None) or ())
        except Exception as e:  # an older or newer LiteLLM: route without cooldowns
            log.debug("no LiteLLM cooldowns (%s)", e)
            return set()

    async def _acooling(self) -> set[str]:
        """_cooling() for the async path (a Redis-backed cooldown store is awaited, not
        blocked on)."""
        try:
            from litellm.router_utils.cooldown_handlers import _async_get_cooldown_deployments
            return set(await _async_get_cooldown_deployments(self.router, None) or ())
        except Exception as e:
            log.debug("no LiteLLM cooldowns (%s)", e)
            return set()

    def _warm(self, group: str, cooling: set[str]) -> list[dict[str, Any]]:
        """The group's deployments, those in cooldown left out while any other is there."""
        deployments = self._deployments(group)
        warm = [d for d in deployments if (d.get("model_info") or {}).get("id") not in cooling]
        return warm or deployments

    def _plan(self, group: str, mapped: Sequence[dict[str, Any]],
              messages: Sequence[Any] | None):
        """Route's turns and candidates among the deployments mapped to the catalog;
        LookupError when there is nothing to ask tiergate."""
        if not mapped:
            raise LookupError(f"no deployment of {group!r} has model_info.{MODEL_INFO_KEY}")
        if not messages:
            raise LookupError("the request has no chat messages")
        turns = [t for m in messages if (t := _turn(m)) is not None]
        candidates = sorted({n for d in mapped if (n := self._catalog_name(d))})
        return turns, candidates

    def _settle(self, group: str, deployments: Sequence[dict[str, Any]],
                mapped: Sequence[dict[str, Any]], outcome: Any,
                request_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        """The deployment for Route's reply, or the default one for an error (fail-open); the
        decision goes to the request's metadata."""
        decision: dict[str, Any]
        chosen = None
        if not isinstance(outcome, Exception):
            chosen = next((d for d in mapped if self._catalog_name(d) == outcome.model), None)
            if chosen is None:  # not a candidate: only a server that ignores candidates
                outcome = LookupError(
                    f"tiergate picked {outcome.model!r}, not a deployment of {group!r}")
        if isinstance(outcome, Exception):
            chosen = self._default(mapped or deployments)
            code = outcome.code.name if isinstance(outcome, TiergateError) else "NO_ROUTE"
            log.warning("tiergate could not route %r (%s); using its default deployment",
                        group, outcome)
            decision = {"error": code, "fallback": chosen and self._catalog_name(chosen)}
        else:
            r = outcome
            p = next((c.p_pass for c in r.candidates if c.model == r.model), None)
            decision = {"model": r.model, "p_pass": p, "expected_cost_usd": r.expected_cost_usd,
                        "expected_saving_usd": r.expected_saving_usd,
                        "verify_recommended": r.verify_recommended}
        if request_kwargs is not None:
            meta = request_kwargs.get("metadata")
            if isinstance(meta, dict):
                meta["tiergate"] = decision
        return chosen

    def _pick(self, group: str, messages: Sequence[Any] | None,
              request_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        deployments = self._warm(group, self._cooling())
        mapped = [d for d in deployments if self._catalog_name(d)]
        try:
            turns, candidates = self._plan(group, mapped, messages)
            outcome: Any = self.client.route(messages=turns, candidates=candidates,
                                             policy=self.policy)
        except (TiergateError, LookupError) as e:
            outcome = e
        return self._settle(group, deployments, mapped, outcome, request_kwargs)

    async def _apick(self, group: str, messages: Sequence[Any] | None,
                     request_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        # The Route call waits on gRPC's threads, not the event loop's executor (which
        # LiteLLM also uses): its timeout holds under load.
        deployments = self._warm(group, await self._acooling())
        mapped = [d for d in deployments if self._catalog_name(d)]
        try:
            turns, candidates = self._plan(group, mapped, messages)
            outcome: Any = await self.client.aroute(messages=turns, candidates=candidates,
                                                    policy=self.policy)
        except (TiergateError, LookupError) as e:
            outcome = e
        return self._settle(group, deployments, mapped, outcome, request_kwargs)

    def _named(self, model: str, specific_deployment: bool | None) -> dict[str, Any] | None:
        """A request that names one deployment (`specific_deployment`) is not tiergate's to
        route: that deployment, found as LiteLLM finds it."""
        if not specific_deployment:
            return None
        for d in self.router.get_model_list() or []:
            if model in (d.get("litellm_params", {}).get("model"), d.get("model_name"),
                         (d.get("model_info") or {}).get("id")):
                return dict(d)
        return None

    def _deployment(self, model: str, messages: Any, specific_deployment: bool | None,
                    request_kwargs: Any) -> Any:
        named = self._named(model, specific_deployment)
        if named is not None:
            return named
        return self._check(model, self._pick(model, messages, request_kwargs))

    async def _adeployment(self, model: str, messages: Any, specific_deployment: bool | None,
                           request_kwargs: Any) -> Any:
        named = self._named(model, specific_deployment)
        if named is not None:
            return named
        return self._check(model, await self._apick(model, messages, request_kwargs))

    @staticmethod
    def _check(model: str, chosen: dict[str, Any] | None) -> dict[str, Any]:
        if chosen is None:
            # No deployment in the group: the error LiteLLM raises for it, not a TypeError on
            # None.
            raise litellm.BadRequestError(
                message=f"no deployment of model group {model!r} in the router's model_list",
                model=model, llm_provider="")
        return chosen

    def get_available_deployment(self, model: str, messages: list[dict[str, str]] | None = None,
                                 input: str | list[object] | None = None,
                                 specific_deployment: bool | None = False,
                                 request_kwargs: dict[str, object] | None = None) -> Any:
        return self._deployment(model, messages, specific_deployment, request_kwargs)

    async def async_get_available_deployment(self, model: str,
                                             messages: list[dict[str, str]] | None = None,
                                             input: str | list[object] | None = None,
                                             specific_deployment: bool | None = False,
                                             request_kwargs: dict[str, object] | None = None) -> Any:
        return await self._adeployment(model, messages, specific_deployment, request_kwargs)
