#!/usr/bin/env python3
"""Leave one task out: new traffic from models the heads know.

The sealed evaluation's new sources (math word problems, prompt-only MCQ, graded chat) are
answered by models that are in our training data under other tasks. Leave-one-source-out
(scripts/loso.sh) cannot imitate that: each data model belongs to one source, so leaving a
source out leaves its models out too. Here one *task* of a source (e.g. routerbench_0shot's
mbpp) leaves training while the source's other tasks keep its models known:

1. $WORK/data-wo-<slug>/train.jsonl.gz: train rows without (SOURCE, TASK); dev and catalog
   linked. <slug> is SOURCE-TASK-<hash of DATA and TRAIN_FLAGS>.
2. `tiergate train` on it (flags in TRAIN_FLAGS, default the quick recipe loso used:
   --verify-rows 3000 --verify-folds 0) -> $WORK/heads-wo-<slug>-<md5 of BIN>.json (kept
   between runs: a change of DATA or TRAIN_FLAGS makes another slug, another binary other
   heads).
3. The task's rows from train *and* dev (neither fitted those heads) become one traffic
   source named SOURCE:TASK -> $WORK/traffic-<slug>.jsonl.gz.
4. scripts/protocol.py on it with those heads (calibration on 20% of its prompts, thresholds
   picked on others; its docstring has every rule); extra arguments go to protocol.py
   (e.g. --no-calibration, --no-memory).

usage: python3 scripts/loto.py SOURCE TASK[,TASK...] [protocol.py flags...]
       (several tasks leave together and come back as one traffic, e.g. the MMLU-Pro subjects
       of the sealed set's kind that train never holds)
env:   WORK (default /tmp/loto), BIN (default target/release/tiergate), DATA (../shared/data),
       TRAIN_FLAGS
"""
import gzip, hashlib, json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    source, task, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    tasks = set(task.split(","))
    work = os.path.abspath(os.environ.get("WORK", "/tmp/loto"))
    data = os.path.abspath(os.environ.get("DATA", os.path.join(ROOT, "..", "shared", "data")))
    bin_ = os.path.abspath(os.environ.get("BIN", os.path.join(ROOT, "target", "release", "tiergate")))
    flags = os.environ.get("TRAIN_FLAGS", "--verify-rows 3000 --verify-folds 0").split()
    # What the heads and splits depend on is in their names, so a change never reuses them.
    key = hashlib.md5(json.dumps([data, flags]).encode()).hexdigest()[:8]
    slug = f"{source}-{task}-{key}".replace("/", "_")
    ddir = os.path.join(work, f"data-wo-{slug}")
    os.makedirs(ddir, exist_ok=True)
    traffic = os.path.join(work, f"traffic-{slug}.jsonl.gz")
    train_out = os.path.join(ddir, "train.jsonl.gz")
    if not (os.path.exists(train_out) and os.path.exists(traffic)):
        kept, left = split_out(data, train_out, traffic,
                               lambda r, split: r["source"] == source and r["task"] in tasks,
                               f"{source}:{task}")
        if left == 0:
            sys.exit(f"no rows of {source}/{task} in {data}")
        log(f"train rows kept {kept}; {source}/{task} rows (train + dev) as new traffic {left}")
    sys.exit(train_and_run(bin_, data, work, ddir, f"wo-{slug}", flags, traffic,
                           f"{source}:{task}", rest))


def split_out(data, train_out, traffic, leaves, name):
    """Train rows that do not leave -> train_out; the rows that leave (`leaves(row, split)`,
    train and dev) -> traffic, as source `name`. Both written whole or not at all (nothing
    when no row leaves). Returns (rows kept, rows left out)."""
    kept = left = 0
    with gzip.open(train_out + ".part", "wt") as tr, gzip.open(traffic + ".part", "wt") as tf:
        for split in ("train", "dev"):
            with gzip.open(os.path.join(data, f"{split}.jsonl.gz"), "rt") as f:
                for line in f:
                    r = json.loads(line)
                    if leaves(r, split):
                        r["source"] = name
                        tf.write(json.dumps(r) + "\n")
                        left += 1
                    elif split == "train":
                        tr.write(line)
                        kept += 1
    for part, final in ((train_out + ".part", train_out), (traffic + ".part", traffic)):
        if left:
            os.replace(part, final)
        else:
            os.remove(part)
    return kept, left


def train_and_run(bin_, data, work, ddir, tag, flags, traffic, source, rest):
    """Links dev and the catalog into ddir, trains $WORK/heads-<tag>-<binary md5>.json on ddir
    (kept between runs of the same binary: another build may train other heads) and runs
    protocol.py on `traffic`'s `source` with them; its exit code."""
    for name in ("dev.jsonl.gz", "catalog.json"):
        link = os.path.join(ddir, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(data, name), link)
    h = hashlib.md5()
    with open(bin_, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    tag = f"{tag}-{h.hexdigest()[:8]}"
    heads = os.path.join(work, f"heads-{tag}.json")
    if not os.path.exists(heads):
        cmd = [bin_, "train", "--data-dir", ddir, "--out", heads + ".part",
               "--card", os.path.join(work, f"card-{tag}.md"), *flags]
        log("training:", " ".join(cmd))
        with open(os.path.join(work, f"train-{tag}.log"), "w") as lf:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=lf, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            sys.exit(f"train failed (exit {rc}); see {lf.name}")
        os.replace(heads + ".part", heads)
    env = dict(os.environ, BIN=bin_, WORK=os.path.join(work, "protocol"))
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "protocol.py"), "--data", traffic,
           "--sources", source, "--heads", heads, *rest]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    main()
