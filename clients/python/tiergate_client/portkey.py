"""tiergate's pick as Portkey metadata, for a Portkey config whose conditional strategy routes
on `metadata.tiergate_model` (deploy/portkey/config.json):

    headers = portkey_headers(tg, messages=turns, config=config)
    openai.OpenAI(base_url="http://portkey:8787/v1", api_key="unused").chat.completions.create(
        model="auto", messages=turns, extra_headers=headers)

When tiergate cannot answer, the metadata carries no `tiergate_model` (and says why in
`tiergate_error`), so the config's default target serves: routing fails open.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .client import Client, Message, Policy
from .errors import TiergateError

KEY = "tiergate_model"


def route_metadata(
    client: Client,
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    candidates: Sequence[str] = (),
    policy: Policy | None = None,
    request_id: str = "",
) -> dict[str, str]:
    """Portkey metadata (string values, as Portkey takes them) for this request: the chosen
    catalog model under `tiergate_model`, with its expected cost and `request_id` (echoed by
    Route; give one to send `feedback(request_id=...)` for this request later)."""
    try:
        r = client.route(prompt, messages=messages, candidates=candidates, policy=policy,
                         request_id=request_id)
    except TiergateError as e:
        return {"tiergate_error": e.code.name}
    return {
        KEY: r.model,
        "tiergate_expected_cost_usd": f"{r.expected_cost_usd:.8f}",
        "tiergate_request_id": r.request_id,
    }


def portkey_headers(
    client: Client,
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    config: Mapping[str, Any] | str | None = None,
    metadata: Mapping[str, str] | None = None,
    candidates: Sequence[str] = (),
    policy: Policy | None = None,
    request_id: str = "",
) -> dict[str, str]:
    """`x-portkey-metadata` (the caller's `metadata` plus tiergate's) and, when given,
    `x-portkey-config` (a config object or the id of a saved config)."""
    meta = dict(metadata or {})
    meta.update(route_metadata(client, prompt, messages=messages, candidates=candidates,
                               policy=policy, request_id=request_id))
    headers = {"x-portkey-metadata": json.dumps(meta)}
    if config is not None:
        headers["x-portkey-config"] = config if isinstance(config, str) else json.dumps(config)
    return headers
