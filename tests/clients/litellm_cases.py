"""Calls tiergate's OpenAI-compatible front through LiteLLM's SDK (`openai/<model>` with
api_base, as a LiteLLM deployment would) and prints what LiteLLM returned, as JSON, for
tests/gateway_openai.rs. Input (stdin): {"base_url": ..., "cases": [{"name", "model",
"messages", "extra_body"?}]}."""
import json
import os
import sys

# LiteLLM would fetch its price map from the network at import; use the bundled copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_TELEMETRY"] = "False"

import litellm  # noqa: E402

# LiteLLM prints help text to stdout on errors; stdout carries the JSON.
litellm.suppress_debug_info = True


def run(base_url, case):
    try:
        r = litellm.completion(
            model="openai/" + case["model"],
            api_base=base_url,
            api_key="unused",
            messages=case["messages"],
            extra_body=case.get("extra_body"),
            num_retries=0,
        )
    except Exception as e:  # LiteLLM's mapped errors carry the HTTP status
        return {"status": getattr(e, "status_code", None), "kind": type(e).__name__, "error": str(e)}
    headers = r._hidden_params.get("additional_headers") or {}
    return {
        "model": r.model,
        "text": r.choices[0].message.content,
        "headers": {k: v for k, v in headers.items() if "x-tiergate-" in k},
        "usage_cost": getattr(r.usage, "cost", None),
    }


def main():
    spec = json.load(sys.stdin)
    print(json.dumps({c["name"]: run(spec["base_url"], c) for c in spec["cases"]}))


if __name__ == "__main__":
    main()
