"""The official openai client through the real Portkey gateway (tests/gateway_portkey.rs
starts it in front of stand-in upstreams), with tiergate's pick put in Portkey's metadata by
tiergate_client.portkey; prints what answered each case, as JSON on the last line. Input
(stdin): {"portkey": base URL, "config": Portkey config, "addr", "dead_addr"}."""
import json
import sys

import openai

from tiergate_client import Client
from tiergate_client.portkey import portkey_headers

EASY = "What is 2 + 2?"
HARD = ("Prove that there are infinitely many primes p such that p + 2 is also prime, or "
        "explain precisely which known results come closest and why the full statement "
        "remains open.")


def ask(pk, tg, prompt, config):
    msgs = [{"role": "user", "content": prompt}]
    headers = portkey_headers(tg, messages=msgs, config=config, metadata={"team": "search"})
    r = pk.chat.completions.create(model="auto", messages=msgs, extra_headers=headers)
    return {"model": r.model, "text": r.choices[0].message.content,
            "metadata": json.loads(headers["x-portkey-metadata"])}


def main():
    spec = json.load(sys.stdin)
    pk = openai.OpenAI(base_url=spec["portkey"], api_key="unused", max_retries=0, timeout=30)
    out = {}
    with Client(spec["addr"], timeout=10) as tg:
        out["easy"] = ask(pk, tg, EASY, spec["config"])
        out["hard"] = ask(pk, tg, HARD, spec["config"])
    with Client(spec["dead_addr"], timeout=2) as dead:
        out["down"] = ask(pk, dead, EASY, spec["config"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
