#!/usr/bin/env python
"""The quickstart: train an EAGLE-3 draft for a small local target, end to end, on CPU, in minutes.

    bash scripts/quickstart.sh                       # set-up + this script
    python scripts/quickstart.py [--cache-dir .cache/quickstart] [--rebuild] [k=v ...]

1. target + data (torchspec.data.quickstart_assets, cached under --cache-dir; nothing is downloaded);
2. draft: `python -m torchspec.train_entry --config configs/quickstart.yaml` (the full pipeline: HF engine
   -> store -> controller -> trainer -> checkpoints + export); extra k=v arguments are config overrides;
3. report: the run's own evaluator (torchspec.eval.during_training) on the held-out conversations, for the
   draft before training (random init) and after: acc_k, and tau (mean acceptance length of greedy
   speculative decoding against the target).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "quickstart.yaml"

from torchspec.data.quickstart_assets import build_data, build_target, log  # noqa: E402


def run_overrides(cache: Path) -> list[str]:
    return [f"model.target_model_path={cache / 'target'}", f"dataset.train_data_path={cache / 'data' / 'train.jsonl'}",
            f"dataset.eval_data_path={cache / 'data' / 'eval.jsonl'}", f"cache_dir={cache / 'dataset_cache'}"]


def train_draft(cache: Path, overrides: list[str]) -> Path:
    run_dir = cache / "run"
    shutil.rmtree(run_dir, ignore_errors=True)   # the quickstart trains from scratch every time
    cmd = [sys.executable, "-m", "torchspec.train_entry", "--config", str(CONFIG), *run_overrides(cache),
           f"output_dir={run_dir}", *overrides]
    log("draft: " + " ".join(cmd[1:]))
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    rc = subprocess.call(cmd, cwd=str(REPO), env=env)
    if rc != 0:
        raise SystemExit(f"[quickstart] training failed (exit code {rc}); see the output above")
    log(f"draft: trained in {time.time() - t0:.0f}s -> {run_dir}")
    return run_dir


def evaluate(cache: Path, run_dir: Path, num_tau_prompts: int = 8, max_new_tokens: int = 32) -> dict:
    """The run's evaluator on every held-out conversation, for the untrained and the trained draft."""
    from torchspec.config import load_config
    from torchspec.config.target import TargetInfo
    from torchspec.data.dataset import load_tokenizer
    from torchspec.eval.during_training import TrainingEvaluator
    from torchspec.inference.hf import HFEngine
    from torchspec.models.draft import DraftConfig
    from torchspec.pipeline.build import ModelSpec, build_trainer
    from torchspec.pipeline.launcher_local import InlineEngines
    from torchspec.training.checkpoint import load_checkpoint
    from torchspec.transfer.memory import MemoryStore

    scratch = cache / "quickstart_eval"   # the evaluator's eval_best.json goes here, not into the run
    shutil.rmtree(scratch, ignore_errors=True)
    cfg = load_config([str(CONFIG)], run_overrides(cache) + [
        f"output_dir={scratch}", "dataset.eval_max_samples=null", f"dataset.eval_tau_prompts={num_tau_prompts}",
        f"dataset.eval_max_new_tokens={max_new_tokens}"])
    target = TargetInfo.from_config(cfg)
    evaluator = TrainingEvaluator.from_config(cfg, list(target.aux_layers), load_tokenizer(cfg))
    store = MemoryStore()
    engines = InlineEngines(HFEngine.from_config(cfg, store, "cpu"))
    evaluator.prepare(engines, store)
    engines.close()

    ck = load_checkpoint(run_dir, weights_only=True, key="output_dir")
    weights = ck.trainer_state["model"]
    out = {"checkpoint": str(ck.path), "step": ck.step, "heldout_samples": len(evaluator.records)}
    for name, load_path in (("untrained", None), ("trained", str(run_dir))):
        spec = ModelSpec(DraftConfig.from_dict(ck.draft_config), weights["d2t"], weights["t2d"], 1, load_path, True)
        trainer, _ = build_trainer(cfg, spec, "cpu")   # untrained: the run's seed, as its step 0
        m = evaluator.evaluate(trainer, ck.step if load_path else 0)
        out[name] = {k: v for k, v in m.items() if k.startswith("acc_") or k in ("loss", "tau")}
    return out


def report(info_target: dict, result: dict, seconds: float) -> str:
    u, t = result["untrained"], result["trained"]
    ks = sorted(int(k.split("_")[1]) for k in u if k.startswith("acc_"))
    return "\n".join([
        "",
        "=" * 72,
        f"quickstart done in {seconds / 60:.1f} min",
        f"target: held-out next-token loss {info_target['heldout_loss']:.2f} nats "
        f"(untrained {info_target['initial_heldout_loss']:.2f}, uniform {info_target['uniform_loss']:.2f})",
        f"draft on {result['heldout_samples']} held-out conversations ({result['checkpoint']}):",
        "             " + " ".join(f"{'acc_' + str(k):>7}" for k in ks) + f" {'tau':>7}",
        "  untrained  " + " ".join(f"{u[f'acc_{k}']:7.3f}" for k in ks) + f" {u['tau']:7.2f}",
        "  trained    " + " ".join(f"{t[f'acc_{k}']:7.3f}" for k in ks) + f" {t['tau']:7.2f}",
        "=" * 72,
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/quickstart.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "quickstart"),
                   help="where the target, the data and the run go (default: %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the target and the data even if cached")
    p.add_argument("--target-only", action="store_true", help="stop after building the target and the data")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for the draft run")
    args = p.parse_args(argv)
    t0 = time.time()
    cache = Path(args.cache_dir).resolve()
    if args.rebuild:
        for d in ("target", "data"):
            shutil.rmtree(cache / d, ignore_errors=True)
    import torch

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
    info = build_target(cache / "target")
    build_data(cache / "data")
    if args.target_only:
        log(f"target and data ready in {time.time() - t0:.0f}s")
        return 0
    run_dir = train_draft(cache, args.overrides)
    result = evaluate(cache, run_dir)
    # (kept apart from metrics.jsonl: its eval/ lines are the run's own, on dataset.eval_tau_prompts)
    (run_dir / "quickstart_result.json").write_text(json.dumps({"target": info, **result}, indent=1))
    print(report(info, result, time.time() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
