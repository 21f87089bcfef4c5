"""Drives clients/python's tiergate_client against a real server (tests/python_client.rs
starts it, with feedback on) and prints what it observed, as JSON, on the last line. Input
(stdin): {"addr": "host:port", "dead_addr": "host:port with nothing listening"}, or
{"addr": ..., "fault": path} for the busy-Verify case against a server on the fault backend."""
import json
import sys

import grpc

from tiergate_client import Client, Policy, Reply, TiergateError

EASY = "What is 2 + 2?"
HARD = ("Prove that there are infinitely many primes p such that p + 2 is also prime, or "
        "explain precisely which known results come closest and why the full statement "
        "remains open.")
MCQ = ("Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\n"
       "Answer with the letter.")
GOOD, UNUSABLE = "The answer is B.", "I don't know."


def error(f):
    try:
        f()
    except TiergateError as e:
        return {"code": e.code.name, "details": e.details}
    return None


def busy(spec):
    """The cascade while Verify cannot answer: the encoder hangs from the first provider call
    on (the fault backend's control file), so each Verify passes the client's 3 s timeout.
    The empty answer goes up the prices; the next one ships unverified."""
    called = []

    def set_mode(mode):
        with open(spec["fault"], "w") as f:
            f.write(mode)

    def call_model(model):
        called.append(model)
        set_mode("hang")
        return "" if len(called) == 1 else GOOD

    with Client(spec["addr"], timeout=3.0) as c:
        res = c.cascade(EASY, call_model=call_model, verify="always")
    set_mode("ok")
    # Its own generous timeout: the hung batches finish first.
    with Client(spec["addr"], timeout=30) as c:
        r = c.route(EASY)
    return {"called": called, "routed": r.model, "by_price": [x.model for x in r.candidates],
            "answer": res.answer, "escalations": res.escalations,
            "decisions": [a.decision for a in res.attempts]}


def main():
    spec = json.load(sys.stdin)
    if "fault" in spec:
        print(json.dumps(busy(spec)))
        return
    out = {}
    with Client(spec["addr"], timeout=30, metadata=[("x-request-source", "python-client-test")]) as c:
        out["health"] = c.health()
        info = c.info()
        price = {e.model: e.in_usd_per_mtok + e.out_usd_per_mtok for e in info.catalog}
        out["price"] = price
        easy, hard = c.route(EASY, request_id="easy-1"), c.route(HARD)
        out["easy"] = {"model": easy.model, "request_id": easy.request_id}
        out["hard"] = {"model": hard.model}
        # The same turn as chat messages decides the same.
        out["easy_messages"] = c.route(messages=[{"role": "user", "content": EASY}]).model
        # A policy reaches the server: no candidate reaches a floor of 0.999.
        out["strict_reason"] = c.route(EASY, policy=Policy(quality_floor=0.999)).reason

        r = c.route(MCQ)
        v_good = c.verify(GOOD, r.model, MCQ)
        v_bad = c.verify(UNUSABLE, r.model, messages=[{"role": "user", "content": MCQ}])
        out["mcq"] = {
            "model": r.model,
            "good": {"decision": v_good.decision, "p_pass": v_good.p_pass},
            "unusable": {"decision": v_bad.decision, "p_pass": v_bad.p_pass,
                         "escalate_to": v_bad.escalate_to, "threshold": v_bad.threshold},
        }

        # The output length reaches Verify: opus fits 0.05 USD at its default 250 tokens,
        # not at 4000, so an empty answer from flash has nowhere to go then.
        budget = Policy(max_cost_usd=0.05)
        pair = ["gemini-2.5-flash", "claude-opus-4.8"]
        out["budget_escalation"] = [
            c.verify("", "gemini-2.5-flash", "Write a haiku.", candidates=pair, policy=budget,
                     expected_output_tokens=n).escalate_to
            for n in (None, 4000)
        ]

        # The cascade: the routed model answers unusably, the one Verify names well.
        called = []

        def call_model(model):
            called.append(model)
            return UNUSABLE if len(called) == 1 else GOOD

        res = c.cascade(MCQ, call_model=call_model, verify="always")
        out["cascade"] = {
            "called": list(called), "model": res.model, "answer": res.answer,
            "escalations": res.escalations, "cost": res.expected_cost_usd,
            "route_costs": {x.model: x.expected_cost_usd for x in res.route.candidates},
            "decisions": [a.decision for a in res.attempts],
        }
        # No escalation left: the routed model's answer ships unverified.
        called.clear()
        res0 = c.cascade(MCQ, call_model=call_model, verify="always", max_escalations=0)
        out["cascade_no_hops"] = {"called": list(called), "answer": res0.answer,
                                  "decisions": [a.decision for a in res0.attempts]}
        # Borderline under relative_floor 1.0: Route picks the candidate it rates highest,
        # with nothing rated above it to escalate to, so it does not ask for Verify; an empty
        # answer is verified and goes on anyway.
        top = Policy(relative_floor=1.0)
        re_ = c.route(EASY, policy=top)
        called.clear()

        def call_empty(model):
            called.append(model)
            return "" if len(called) == 1 else GOOD

        rb = c.cascade(EASY, call_model=call_empty, policy=top)
        out["cascade_empty"] = {"routed": re_.model, "verify_recommended": re_.verify_recommended,
                                "called": list(called), "escalations": rb.escalations,
                                "answer": rb.answer}

        # The same for an answer without a letter or digit, and for one the provider cut
        # short (a Reply saying so), which Verify is asked about as empty; a Reply not marked
        # cut (say, cut at the caller's own limit) is an answer as any other: under borderline
        # on this pick it is not verified, and ships.
        cut_text = "Let me work this out step by step. First"
        for name, first in [("cascade_symbols", " . "),
                            ("cascade_cut", Reply(cut_text, cut_short=True)),
                            ("cascade_capped", Reply(cut_text))]:
            called.clear()

            def call_first(model, first=first):
                called.append(model)
                return first if len(called) == 1 else GOOD

            rc = c.cascade(EASY, call_model=call_first, policy=top)
            out[name] = {"called": list(called), "escalations": rc.escalations,
                         "answer": rc.answer, "p_pass": rc.attempts[0].p_pass}
        # Cut twice: the second cut answer is not sent on again.
        called.clear()

        def call_cut(model):
            called.append(model)
            return Reply(f"{cut_text} ({len(called)})", cut_short=True)

        rc = c.cascade(EASY, call_model=call_cut, policy=top)
        out["cascade_cut_twice"] = {"called": list(called), "escalations": rc.escalations,
                                    "answer": rc.answer}

        # An answer Verify refuses to read (over max_input_bytes, 256 KiB): paid for, so it
        # ships unverified rather than being lost to an exception.
        called.clear()
        huge = "The answer is B. " * 20000

        def call_huge(model):
            called.append(model)
            return huge

        rh = c.cascade(MCQ, call_model=call_huge, verify="always")
        out["cascade_unreadable"] = {
            "called": list(called), "shipped": rh.answer == huge,
            "verify_errors": [a.verify_error for a in rh.attempts]}

        # The error pickles whole (a process pool sends it back to its parent).
        import pickle
        e = pickle.loads(pickle.dumps(TiergateError(grpc.StatusCode.UNAVAILABLE, "x", 0.25)))
        out["pickled"] = [e.code.name, e.details, e.retry_after_s]
        # Portkey metadata carries the request id Route echoes (for Feedback by id).
        from tiergate_client.portkey import route_metadata
        out["portkey_request_id"] = route_metadata(c, EASY, request_id="pk-1").get(
            "tiergate_request_id")

        fb = c.feedback(easy.model, 1.0, request_id="easy-1")
        out["feedback_accepted"] = fb.accepted

        out["errors"] = {
            "empty_prompt": error(lambda: c.route("")),
            "unknown_candidate": error(lambda: c.route(EASY, candidates=["no-such-model"])),
            "bad_score": error(lambda: c.feedback(easy.model, 2.0, prompt=EASY)),
            "both_inputs": error(lambda: c.route(EASY, messages=[{"role": "user", "content": EASY}])),
            "bad_message": error(lambda: c.route(messages=[{"role": "user"}])),
        }
    with Client(spec["dead_addr"], timeout=2) as dead:
        out["errors"]["down"] = error(lambda: dead.route(EASY))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
