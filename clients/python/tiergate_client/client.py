"""A typed client for tiergate's gRPC API (proto/tiergate/v1/tiergate.proto) and the cascade
a gateway runs with it: Route, call the chosen model, Verify its answer, escalate."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._pb import tiergate_pb2 as pb
from ._pb import tiergate_pb2_grpc as pb_grpc
from .errors import TiergateError

# A chat turn as OpenAI-style clients write it: {"role": "user", "content": "..."}.
Message = Mapping[str, str]
VerifyMode = Literal["never", "borderline", "always"]


@dataclass(frozen=True)
class Policy:
    """Route's and Verify's policy (unset fields take the server's defaults); see the proto."""

    quality_floor: float | None = None
    max_cost_usd: float | None = None
    cost_weight: float | None = None
    relative_floor: float | None = None

    def to_pb(self) -> pb.Policy:
        p = pb.Policy()
        for name in ("quality_floor", "max_cost_usd", "cost_weight", "relative_floor"):
            v = getattr(self, name)
            if v is not None:
                setattr(p, name, v)
        return p


@dataclass(frozen=True)
class Reply:
    """What `call_model` may return instead of the bare text: the answer, and whether the
    provider cut it short, i.e. stopped at its own token limit (OpenAI's `finish_reason:
    "length"`) where the request set neither `max_tokens` nor `max_completion_tokens`. A cut
    answer counts as empty, as on the HTTP front: its head reads to the verifier much like the
    whole answer."""

    text: str
    cut_short: bool = False


def _says_nothing(text: object) -> bool:
    # As the server's: no letter or digit (blank, punctuation, emoji) is an empty answer.
    return isinstance(text, str) and not any(ch.isalnum() for ch in text)


@dataclass
class Attempt:
    """One model called in a cascade: its answer and what the verifier said (p_pass and
    decision None when the answer was not verified)."""

    model: str
    answer: str
    p_pass: float | None = None
    decision: Literal["ship", "escalate"] | None = None
    # The gRPC code's name when Verify failed on this answer (it then went on unverified).
    verify_error: str | None = None


@dataclass
class CascadeResult:
    """What answered, the cascade's estimated cost (the sum of Route's expected_cost_usd of
    every model called: catalog prices at the expected token counts, not a provider's bill),
    how many escalations it took, each attempt in order, and the Route reply."""

    model: str
    answer: str
    expected_cost_usd: float
    escalations: int
    attempts: list[Attempt] = field(default_factory=list)
    route: pb.RouteReply | None = None


def _bad(msg: str) -> TiergateError:
    return TiergateError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _messages(messages: Sequence[Message]) -> pb.Messages:
    out = pb.Messages()
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (None, None)
        if not isinstance(role, str) or not isinstance(content, str):
            raise _bad(f"messages[{i}] needs a string role and a string content")
        out.messages.add(role=role, content=content)
    return out


def _next_up(r: pb.RouteReply, model: str, policy: Policy | None) -> str | None:
    """The candidate after `model` in Route's price order, within the policy's max_cost_usd
    at Route's expected cost (the HTTP front's failover rule)."""
    names = [c.model for c in r.candidates]
    if model not in names or names.index(model) + 1 >= len(names):
        return None
    c = r.candidates[names.index(model) + 1]
    cap = policy.max_cost_usd if policy is not None else None
    return c.model if cap is None or c.expected_cost_usd <= cap else None


class Client:
    """tiergate's Router service. `addr` is host:port (plaintext, as tiergate serves);
    `timeout` (seconds) applies to every call unless a call gives its own; `metadata` is sent
    with every call (e.g. [("traceparent", ...)]). Every failed call raises TiergateError."""

    def __init__(
        self,
        addr: str,
        *,
        timeout: float | None = 5.0,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
    ):
        self._channel = channel if channel is not None else grpc.insecure_channel(addr)
        self._stub = pb_grpc.RouterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout
        self.metadata = tuple(metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None):  # type: ignore[no-untyped-def]
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self.metadata or None,
            )
        except grpc.RpcError as e:
            raise TiergateError.from_rpc(e) from None

    @staticmethod
    def _input(req: pb.RouteRequest | pb.VerifyRequest, prompt: str | None,
               messages: Sequence[Message] | None) -> None:
        if prompt is not None and messages is not None:
            raise _bad("give prompt or messages, not both")
        if messages is not None:
            req.messages.CopyFrom(_messages(messages))
        elif prompt is not None:
            req.prompt = prompt

    def route(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        candidates: Sequence[str] = (),
        policy: Policy | None = None,
        request_id: str = "",
        expected_output_tokens: int | None = None,
        timeout: float | None = None,
    ) -> pb.RouteReply:
        """Which candidate (default: the whole catalog) is the cheapest likely to pass."""
        req = self._route_request(prompt, messages, candidates, policy, request_id,
                                  expected_output_tokens)
        return self._call(self._stub.Route, req, timeout)

    async def aroute(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        candidates: Sequence[str] = (),
        policy: Policy | None = None,
        request_id: str = "",
        expected_output_tokens: int | None = None,
        timeout: float | None = None,
    ) -> pb.RouteReply:
        """route() for asyncio. The call runs on gRPC's own threads, not the event loop's
        executor, so its timeout holds however many calls are waiting there."""
        req = self._route_request(prompt, messages, candidates, policy, request_id,
                                  expected_output_tokens)
        call = self._stub.Route.future(
            req, timeout=self.timeout if timeout is None else timeout,
            metadata=self.metadata or None)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle(_: object) -> None:
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                pass

        call.add_done_callback(settle)
        try:
            await done
        except asyncio.CancelledError:
            call.cancel()
            raise
        try:
            return call.result()
        except grpc.RpcError as e:
            raise TiergateError.from_rpc(e) from None

    def _route_request(self, prompt: str | None, messages: Sequence[Message] | None,
                       candidates: Sequence[str], policy: Policy | None, request_id: str,
                       expected_output_tokens: int | None) -> pb.RouteRequest:
        req = pb.RouteRequest(request_id=request_id, candidates=list(candidates))
        self._input(req, prompt, messages)
        if policy is not None:
            req.policy.CopyFrom(policy.to_pb())
        if expected_output_tokens is not None:
            req.expected_output_tokens = expected_output_tokens
        return req

    def verify(
        self,
        answer: str,
        model: str,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        candidates: Sequence[str] = (),
        policy: Policy | None = None,
        peers: Sequence[tuple[str, str]] = (),
        peer_threshold: float | None = None,
        request_id: str = "",
        expected_output_tokens: int | None = None,
        timeout: float | None = None,
    ) -> pb.VerifyReply:
        """Ship `model`'s answer, or escalate (reply.escalate_to)? `peers` are (model, answer)
        pairs of other models' answers to the same prompt. `expected_output_tokens`: as the
        Route's, so `policy.max_cost_usd` rules out the same models for the escalation."""
        req = pb.VerifyRequest(
            request_id=request_id, answer=answer, model=model, candidates=list(candidates),
            peers=[pb.PeerAnswer(model=m, answer=a) for m, a in peers],
        )
        self._input(req, prompt, messages)
        if policy is not None:
            req.policy.CopyFrom(policy.to_pb())
        if peer_threshold is not None:
            req.peer_threshold = peer_threshold
        if expected_output_tokens is not None:
            req.expected_output_tokens = expected_output_tokens
        return self._call(self._stub.Verify, req, timeout)

    def feedback(
        self,
        model: str,
        score: float,
        *,
        request_id: str = "",
        prompt: str = "",
        answer: str = "",
        timeout: float | None = None,
    ) -> pb.FeedbackReply:
        """An observed outcome in [0, 1] of `model` on an earlier Route's prompt (its
        request_id) or on `prompt`."""
        req = pb.FeedbackRequest(
            request_id=request_id, prompt=prompt, model=model, score=score, answer=answer
        )
        return self._call(self._stub.Feedback, req, timeout)

    def info(self, *, timeout: float | None = None) -> pb.InfoReply:
        """Version, revisions, limits and the catalog with prices."""
        return self._call(self._stub.Info, pb.InfoRequest(), timeout)

    def health(self, service: str = "tiergate.v1.Router", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status name: "SERVING" once warm, "NOT_SERVING" while warming up
        or draining."""
        r = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def cascade(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        call_model: Callable[[str], str | Reply],
        verify: VerifyMode = "borderline",
        max_escalations: int = 2,
        candidates: Sequence[str] = (),
        policy: Policy | None = None,
        expected_output_tokens: int | None = None,
        timeout: float | None = None,
    ) -> CascadeResult:
        """Route, call `call_model(model)` (the caller's code: it calls the provider and
        returns the answer text, or a `Reply` saying the provider cut it short), Verify, and
        escalate to Verify's escalate_to, at most `max_escalations` times. `verify` as the HTTP
        front's policies: "never" (the routed model's answer ships), "borderline" (verify when
        Route says verify_recommended, and an empty answer from any pick: one without a letter
        or digit, or cut short), or "always". The last answer ships when no escalation is
        left. An exception from
        call_model propagates. A Verify that fails (busy, past the timeout, unreachable, an
        answer over its limits) never loses the answer in hand: it ships unverified, or, if
        empty, goes up the prices; the attempt's `verify_error` says why."""
        if max_escalations < 0:
            raise _bad("max_escalations must be >= 0")
        r = self.route(prompt, messages=messages, candidates=candidates, policy=policy,
                       expected_output_tokens=expected_output_tokens, timeout=timeout)
        costs = {c.model: c.expected_cost_usd for c in r.candidates}
        model, attempts, cut_seen = r.model, [], False
        while True:
            reply = call_model(model)
            # As the HTTP front, a cut answer counts as empty once per cascade: when a pricier
            # model's is cut too, the request wants more than the providers' limits give.
            answer, was_cut = ((reply.text, reply.cut_short) if isinstance(reply, Reply)
                               else (reply, False))
            cut, cut_seen = was_cut and not cut_seen, cut_seen or was_cut
            attempt = Attempt(model=model, answer=answer)
            attempts.append(attempt)
            hops_left = len(attempts) - 1 < max_escalations
            # As the HTTP front: an empty answer is verified (and so escalated) from any pick,
            # and one cut short is verified as empty (p 0: it goes to the likeliest pricier
            # model).
            empty = cut or _says_nothing(answer)
            check = verify == "always" or (
                verify == "borderline" and (r.verify_recommended or empty))
            if not check or not hops_left:
                break
            try:
                v = self.verify("" if cut else answer, model, prompt, messages=messages,
                                candidates=candidates, policy=policy,
                                expected_output_tokens=expected_output_tokens, timeout=timeout)
            except TiergateError as e:
                # The answer is paid for: whatever kept Verify from judging it (busy, past
                # the timeout, unreachable, an answer over its limits), it ships unverified,
                # but an empty one goes up the prices (the next candidate within
                # max_cost_usd), as the HTTP front does.
                attempt.verify_error = e.code.name
                nxt = _next_up(r, model, policy) if empty else None
                if nxt is None:
                    break
                model = nxt
                continue
            attempt.p_pass = v.p_pass
            attempt.decision = "escalate" if v.decision == pb.ESCALATE else "ship"
            if v.decision != pb.ESCALATE or not v.escalate_to:
                break
            model = v.escalate_to
        last = attempts[-1]
        return CascadeResult(
            model=last.model,
            answer=last.answer,
            expected_cost_usd=sum(costs.get(a.model, 0.0) for a in attempts),
            escalations=len(attempts) - 1,
            attempts=attempts,
            route=r,
        )
