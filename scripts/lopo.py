#!/usr/bin/env python3
"""Leave prompts out: new prompts of a known source, answered by known models, at scale.

The sealed evaluation's first kind (multiple-choice with chain-of-thought answers, models seen
in training) is new prompts of a source whose models the heads know, with a calibration fifth
of its prompts (how many is not known here). Dev alone gives about 100 calibration prompts for
MMLU-Pro, and leave-one-task-out (scripts/loto.py) makes the task new too. Here a share of
SOURCE's train prompts leaves training:

1. $WORK/data-lopo-<slug>/train.jsonl.gz: train rows without SOURCE's prompts whose
   md5("lopo:" + prompt_id) falls under SHARE; dev and catalog linked.
2. `tiergate train` on it (TRAIN_FLAGS, default none: the shipped recipe) ->
   $WORK/heads-lopo-<slug>-<md5 of BIN>.json (kept between runs of one binary; <slug> hashes
   DATA, SHARE and TRAIN_FLAGS).
3. Those prompts' train rows and SOURCE's dev rows (neither fitted those heads) become one
   traffic source named SOURCE:lopo -> $WORK/traffic-lopo-<slug>.jsonl.gz.
4. scripts/protocol.py on it with those heads; extra arguments go to protocol.py
   (e.g. --seed N).

usage: python3 scripts/lopo.py SOURCE [protocol.py flags...]
env:   WORK (default /tmp/lopo), BIN (default target/release/tiergate), DATA (../shared/data),
       SHARE (default 0.5), TRAIN_FLAGS
"""
import hashlib, json, os, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from loto import split_out, train_and_run  # noqa: E402  (the split, training, the run)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def unit(s):
    return int(hashlib.md5(s.encode()).hexdigest()[:8], 16) / 2**32


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    source, rest = sys.argv[1], sys.argv[2:]
    work = os.path.abspath(os.environ.get("WORK", "/tmp/lopo"))
    data = os.path.abspath(os.environ.get("DATA", os.path.join(ROOT, "..", "shared", "data")))
    bin_ = os.path.abspath(os.environ.get("BIN", os.path.join(ROOT, "target", "release", "tiergate")))
    share = float(os.environ.get("SHARE", "0.5"))
    flags = os.environ.get("TRAIN_FLAGS", "").split()
    key = hashlib.md5(json.dumps([data, share, flags]).encode()).hexdigest()[:8]
    slug = f"{source}-{key}".replace("/", "_")
    ddir = os.path.join(work, f"data-lopo-{slug}")
    os.makedirs(ddir, exist_ok=True)
    traffic = os.path.join(work, f"traffic-lopo-{slug}.jsonl.gz")
    train_out = os.path.join(ddir, "train.jsonl.gz")
    if not (os.path.exists(train_out) and os.path.exists(traffic)):
        kept, left = split_out(
            data, train_out, traffic,
            lambda r, split: r["source"] == source and (
                split == "dev" or unit("lopo:" + r["prompt_id"]) < share),
            f"{source}:lopo")
        if left == 0:
            sys.exit(f"no rows of {source} in {data}")
        log(f"train rows kept {kept}; {source} rows left out (train) and dev as new traffic {left}")
    sys.exit(train_and_run(bin_, data, work, ddir, f"lopo-{slug}", flags, traffic,
                           f"{source}:lopo", rest))


if __name__ == "__main__":
    main()
