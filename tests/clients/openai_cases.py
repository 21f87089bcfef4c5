"""Runs chat-completion cases through the official `openai` client against tiergate's
OpenAI-compatible front and prints what the client saw, as JSON, for tests/gateway_openai.rs
to check. Input (stdin): {"base_url": ..., "cases": [{"name", "model", "messages",
"extra_body"?, "headers"?, "stream"?, "kind"?: "models" | "model" | "completions"}]}."""
import json
import sys

from openai import APIStatusError, OpenAI


def tiergate_headers(headers):
    return {
        k.lower(): v
        for k, v in headers.items()
        if k.lower().startswith(("x-tiergate-", "x-ratelimit-")) or k.lower() == "retry-after"
    }


def run(client, case):
    if case.get("kind") == "models":
        return {"ids": [m.id for m in client.models.list()]}
    try:
        if case.get("kind") == "model":
            m = client.models.retrieve(case["model"])
            return {"id": m.id, "object": m.object}
        if case.get("kind") == "completions":
            # A path the front does not serve (the legacy completions API).
            client.completions.create(model=case["model"], prompt="hi")
            return {"status": 200}
    except APIStatusError as e:
        return {"status": e.status_code, "error": e.body, "headers": tiergate_headers(e.response.headers)}
    kw = dict(
        model=case["model"],
        messages=case["messages"],
        extra_body=case.get("extra_body"),
        extra_headers=case.get("headers"),
    )
    try:
        if case.get("stream"):
            with client.chat.completions.with_streaming_response.create(stream=True, **kw) as r:
                chunks = [c for c in r.parse()]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                usage = next((c.usage.model_dump() for c in chunks if c.usage), None)
                return {"headers": tiergate_headers(r.headers), "text": text, "chunks": len(chunks),
                        "usage": usage}
        raw = client.chat.completions.with_raw_response.create(**kw)
        c = raw.parse()
        return {
            "headers": tiergate_headers(raw.headers),
            "model": c.model,
            "text": c.choices[0].message.content,
            "usage": c.usage.model_dump() if c.usage else None,
        }
    except APIStatusError as e:
        return {"status": e.status_code, "error": e.body, "headers": tiergate_headers(e.response.headers)}


def main():
    spec = json.load(sys.stdin)
    # No client-side retries: the gateway's own retries are what is under test.
    client = OpenAI(base_url=spec["base_url"], api_key="unused", max_retries=0, timeout=120)
    print(json.dumps({c["name"]: run(client, c) for c in spec["cases"]}))


if __name__ == "__main__":
    main()
