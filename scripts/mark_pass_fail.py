#!/usr/bin/env python3
"""One-off migration of a heads file trained before `pass_fail` was recorded: sets each model's
`pass_fail` (every training label 0 or 1) from train.jsonl.gz, the rule `tiergate train` now
applies itself. Edits the JSON text in place, so nothing else in the file changes.
Usage: mark_pass_fail.py HEADS.json TRAIN.jsonl.gz"""
import gzip, json, re, sys

heads, train = sys.argv[1], sys.argv[2]
binary = {}
for line in gzip.open(train, "rt", encoding="utf-8"):
    r = json.loads(line)
    s = r.get("score")
    if s is not None:
        binary[r["model"]] = binary.get(r["model"], True) and s in (0, 1)
text = open(heads, encoding="utf-8").read()
models = json.loads(text)["models"]
for name in models:
    if name not in binary:
        sys.exit(f"{name}: no training rows")
    key = json.dumps(name)
    pat = re.compile(re.escape(key) + r':\{([^{}]*"train_rows":\d+)\}')
    text, n = pat.subn(lambda m: f'{key}:{{{m.group(1)},"pass_fail":{str(binary[name]).lower()}}}', text)
    if n != 1:
        sys.exit(f"{name}: matched {n} times")
json.loads(text)
open(heads, "w", encoding="utf-8").write(text)
print(f"marked {len(models)} models; preference-labelled: "
      f"{sorted(m for m in models if not binary[m])[:5]}... ({sum(not binary[m] for m in models)})")
