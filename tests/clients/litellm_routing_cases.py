"""A real litellm.Router (mock_response deployments, no network) routed by
tiergate_client.litellm.TiergateRouting against a real tiergate server (tests/python_client.rs);
prints, as JSON on the last line, which deployment answered each case and the decision
written to its metadata. Input (stdin): {"addr", "dead_addr"}."""
import asyncio
import json
import os
import sys

# LiteLLM would fetch its price map from the network at import; use the bundled copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_TELEMETRY"] = "False"

import litellm  # noqa: E402

from tiergate_client import Client  # noqa: E402
from tiergate_client.litellm import TiergateRouting  # noqa: E402

litellm.suppress_debug_info = True

EASY = "What is 2 + 2?"
HARD = ("Prove that there are infinitely many primes p such that p + 2 is also prime, or "
        "explain precisely which known results come closest and why the full statement "
        "remains open.")


def deployment(name, tiergate_model=None):
    d = {"model_name": "auto",
         "litellm_params": {"model": f"openai/{name}", "api_key": "unused",
                            "mock_response": f"answered by {name}"}}
    if tiergate_model:
        d["model_info"] = {"tiergate_model": tiergate_model}
    return d


MODEL_LIST = [
    # Not mapped to the catalog: never picked while mapped ones are there.
    deployment("unmapped"),
    deployment("flash", "gemini-2.5-flash"),
    deployment("sonnet", "claude-sonnet-4.6"),
    deployment("opus", "claude-opus-4.8"),
]


def ask(router, prompt, use_async=False):
    """Which deployment answered, and the decision the strategy wrote to the metadata the
    caller passed (LiteLLM hands that dict to its callbacks and logs)."""
    msgs = [{"role": "user", "content": prompt}]
    meta = {}
    if use_async:
        r = asyncio.run(router.acompletion(model="auto", messages=msgs, metadata=meta))
    else:
        r = router.completion(model="auto", messages=msgs, metadata=meta)
    return {"answer": r.choices[0].message.content, "tiergate": meta.get("tiergate")}


class Recording:
    """The client, noting the turns each Route was sent."""

    def __init__(self, client):
        self.client, self.sent = client, []

    def route(self, *args, **kw):
        self.sent.append(kw.get("messages"))
        return self.client.route(*args, **kw)


def with_reply(addr, prompt):
    """A conversation holding an earlier reply as LiteLLM returns it (a Message object), then
    the hard question: Route is sent all three turns."""
    router = litellm.Router(model_list=MODEL_LIST, num_retries=0)
    rec = Recording(Client(addr, timeout=5))
    TiergateRouting(router, rec, default_model="claude-sonnet-4.6").install()
    first = router.completion(model="auto", messages=[{"role": "user", "content": "hi"}])
    msgs = [{"role": "user", "content": "hi"}, first.choices[0].message,
            {"role": "user", "content": prompt}]
    r = router.completion(model="auto", messages=msgs)
    return {"answer": r.choices[0].message.content,
            "roles": [t["role"] for t in rec.sent[-1] or []]}


def cooled(addr):
    """flash is rate-limited: LiteLLM cools it down after its first failure, and its retry
    goes to a deployment that is not cooling (as LiteLLM's own strategies do), not to flash
    again."""
    failing = [dict(d) for d in MODEL_LIST]
    for i, d in enumerate(failing):
        if (d.get("model_info") or {}).get("tiergate_model") == "gemini-2.5-flash":
            failing[i] = {**d, "litellm_params": {**d["litellm_params"],
                                                   "mock_response": "litellm.RateLimitError"}}
    router = litellm.Router(model_list=failing, num_retries=2, retry_after=0, allowed_fails=0,
                            cooldown_time=60)
    TiergateRouting(router, Client(addr, timeout=5), default_model="claude-sonnet-4.6").install()
    r = router.completion(model="auto", messages=[{"role": "user", "content": EASY}])
    # With nothing to route on, the fallback skips the cooling deployment too, even when it is
    # the default one.
    fallback = TiergateRouting(router, Client(addr, timeout=5), default_model="gemini-2.5-flash")
    d = fallback.get_available_deployment("auto", messages=None)
    return {"answer": r.choices[0].message.content,
            "fallback": d["model_info"]["tiergate_model"]}


def named(router):
    """A request for one deployment by its LiteLLM model: served by it, not routed."""
    r = router.completion(model="openai/opus", specific_deployment=True,
                          messages=[{"role": "user", "content": EASY}])
    return {"answer": r.choices[0].message.content}


def run(addr):
    router = litellm.Router(model_list=MODEL_LIST, num_retries=0)
    client = Client(addr, timeout=5)
    TiergateRouting(router, client, default_model="claude-sonnet-4.6").install()
    return {
        "with_reply": with_reply(addr, HARD),
        "named": named(router),
        "cooled": cooled(addr),
        "easy": ask(router, EASY),
        "hard": ask(router, HARD),
        "hard_async": ask(router, HARD, use_async=True),
        # Content as a list of parts (OpenAI's format) is read as its text.
        "easy_parts": ask(router, [{"type": "text", "text": EASY}]),
        # Over the server's max_input_bytes (256 KiB): refused, the default deployment serves.
        "too_long": ask(router, "word " * 60000),
    }


def hung():
    """tiergate accepts connections and never answers; 20 requests at once on an event loop
    whose default executor has 2 threads (LiteLLM runs its own work there): each async pick
    gives up at the client's 0.5 s timeout and the default deployment serves. Waiting on
    executor threads, the picks would queue: 20 x 0.5 s / 2 threads = 5 s for the last."""
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    addr = "127.0.0.1:%d" % silent.getsockname()[1]
    router = litellm.Router(model_list=MODEL_LIST, num_retries=0)
    TiergateRouting(router, Client(addr, timeout=0.5), default_model="claude-sonnet-4.6").install()

    async def one():
        r = await router.acompletion(model="auto", messages=[{"role": "user", "content": EASY}])
        return r.choices[0].message.content

    async def go():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        t0 = time.monotonic()
        answers = await asyncio.gather(*(one() for _ in range(40)))
        return {"answers": sorted(set(answers)), "seconds": time.monotonic() - t0}

    try:
        return asyncio.run(go())
    finally:
        silent.close()


def main():
    spec = json.load(sys.stdin)
    print(json.dumps({"up": run(spec["addr"]), "down": run(spec["dead_addr"]), "hung": hung()}))


if __name__ == "__main__":
    main()
