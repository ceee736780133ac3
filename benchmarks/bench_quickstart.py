#!/usr/bin/env python
"""The CPU quickstart's training phase, this checkout against an earlier commit, in one run on one machine.

Both train the quickstart's draft (`python -m torchspec.train_entry --config configs/quickstart.yaml`) on
the same cached target and conversations (`python scripts/quickstart.py --target-only` builds them first
when missing). The baseline runs from a `git worktree` of --baseline. Runs alternate (baseline, current,
baseline, ...) so a machine that gets busier hurts both alike. Reported per run: the training phase
(first to last optimizer step, eval steps included, as metrics.jsonl's elapsed_s shows it), the whole
train_entry process, and the final held-out eval; then the median ratio baseline / current.

    python benchmarks/bench_quickstart.py --baseline cad7e24 [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(src: Path, cache: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "torchspec.train_entry", "--config", str(src / "configs" / "quickstart.yaml"),
            f"model.target_model_path={cache / 'target'}", f"dataset.train_data_path={cache / 'data' / 'train.jsonl'}",
            f"dataset.eval_data_path={cache / 'data' / 'eval.jsonl'}", f"output_dir={out}",
            f"cache_dir={out.parent / (out.name + '-cache')}"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.time()
    subprocess.run(args, cwd=src, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval/loss" in x]
    return {"train_s": round(steps[-1]["elapsed_s"] - steps[0]["elapsed_s"], 1), "process_s": round(wall, 1),
            "steps": len(steps), "eval_loss": round(evals[-1]["eval/loss"], 3),
            "eval_acc_0": round(evals[-1]["eval/acc_0"], 3), "tau": evals[-1].get("eval/tau")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="commit to compare with")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "quickstart"))
    args = p.parse_args(argv)
    cache = Path(args.cache_dir)
    if not (cache / "target" / "quickstart_done.json").exists() or not (cache / "data" / "quickstart_done.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "quickstart.py"), "--cache-dir", str(cache),
                        "--target-only"], cwd=REPO, check=True)
    work = Path(tempfile.mkdtemp(prefix="torchspec-qs-bench-"))
    base = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    try:
        for i in range(args.repeats):
            for name, src in (("baseline", base), ("current", REPO)):
                r = train(src, cache, work / f"{name}-{i}")
                runs[name].append(r)
                print(f"[bench] {name} ({args.baseline if name == 'baseline' else 'this checkout'}) run {i + 1}: "
                      f"{json.dumps(r)}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r["train_s"] for r in v) for k, v in runs.items()}
    print(json.dumps({"median_train_s": med, "speedup": round(med["baseline"] / med["current"], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
