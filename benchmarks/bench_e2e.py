#!/usr/bin/env python
"""End-to-end training throughput of the REAL pipeline against SpecForge's online loop and our own isolated step.

One call, one device, the same data and steps for all three:
 1. torchspec: `run_training` (what `python -m torchspec.train_entry` runs: dataset -> HF engine -> local
    store -> controller -> trainer), colocated on one GPU (`--layout colocated`) or engine and trainer on
    two GPUs (`--layout split`). Per-step times and phases come from its metrics.jsonl.
 2. ceiling: our Trainer.train_step alone on the SAME micro-batches the run trained (hidden states made by
    the target beforehand, batches already on the device): what the pipeline could reach with zero overhead.
 3. SpecForge 0.2.0's online loop (benchmarks/specforge_ref.py: target forward + OnlineEagle3Model + AdamW)
    on the same micro-batches, right-padded as it pads them. Skipped with a note when SpecForge is missing.

Targets (benchmarks/e2e_setup.py): `small` (8 layers, hidden 384, ~16M parameters) and `8b` (Qwen3-8B's
shape, random bf16 weights). Data: chat conversations with a ShareGPT-like length spread (median ~300
tokens, tail past 4k), cut to --max-len.

    python benchmarks/bench_e2e.py --target small --steps 300
    python benchmarks/bench_e2e.py --target 8b --steps 120 --mbs 2 --max-len 4096 --draft-vocab 32000
    python benchmarks/bench_e2e.py ... --repeats 2     (the pipeline twice: its run-to-run spread in one call)
    python benchmarks/bench_e2e.py ... --also-sync-phases   (once more with the old step clock, which
                                                            synchronized at every phase end: an A/B in one call)
    python benchmarks/bench_e2e.py ... --also-no-engine-stream   (once more with the colocated engine run on the
                                                            trainer's stream when waited for: an A/B in one call)

Prints tokens/s, supervised tokens/s, steps/s, step-time p50/p90/max and the phase breakdown of each, and
the ratios torchspec / SpecForge and torchspec / ceiling over the same steps (after --warmup steps). Each run
also reports what the GPU did meanwhile (benchmarks/gpu_state.py: SM clock, power, temperature, the driver's
clock-lowering reasons, host load), so a run slowed by the machine is told apart from one slowed by the code.
Its `steady` block covers only the compared steps: how busy the training thread kept its core, the GPU there,
and the host (benchmarks/host_state.py: CPU time by kind over the machine, the busiest other processes, page
faults, forced context switches). Pending disk writes are flushed before each run (`flushed_before`): the
16 GB 8B target is written just before the first, and the kernel must not be writing it out while a run is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from e2e_setup import TARGETS, build_conversations, build_target  # noqa: E402
from gpu_state import GpuSampler  # noqa: E402
import host_state  # noqa: E402


def percentiles(xs: list[float]) -> dict:
    s = sorted(xs)
    return {"p50": round(statistics.median(s), 4), "p90": round(s[int(0.9 * (len(s) - 1))], 4),
            "max": round(s[-1], 4), "mean": round(sum(s) / len(s), 4)}


def over_2x_median(xs: list[float]) -> int:
    """How many of `xs` exceed twice their median."""
    limit = 2 * statistics.median(xs)
    return sum(x > limit for x in xs)


def outliers(pipeline: list[float], ceiling: list[float]) -> dict:
    """Slow steps told apart from long batches. Steps over 2x the median step, in the pipeline and in the
    ceiling (the same batches with zero overhead: with varying lengths a batch of long conversations is
    simply more work), and pipeline steps over 2x the ceiling's time for the SAME batch (pipeline hiccups)."""
    ratio = [a / b for a, b in zip(pipeline, ceiling)]
    return {"pipeline_over_2x_median": over_2x_median(pipeline), "ceiling_over_2x_median": over_2x_median(ceiling),
            "pipeline_over_2x_same_batch_ceiling": sum(r > 2 for r in ratio),
            "pipeline_to_same_batch_ceiling": percentiles(ratio)}


def config_for(args, target: Path, data: Path, out: Path):
    from torchspec.config.schema import Config

    cfg = Config()
    cfg.model.target_model_path = str(target)
    cfg.dataset.train_data_path, cfg.dataset.prompt_key, cfg.dataset.chat_template = str(data), "messages", "qwen"
    t = cfg.training
    t.micro_batch_size, t.ttt_length, t.max_seq_length = args.mbs, args.ttt, args.max_len
    t.num_train_steps, t.save_interval, t.draft_vocab_size = args.steps, 10**9, args.draft_vocab
    t.learning_rate, t.attention_backend, t.pack_samples = args.lr, args.attention, not args.no_pack
    i = cfg.inference
    i.colocate = args.layout == "colocated"
    i.inference_batch_size, i.max_sample_pool_size, i.inference_buffer_threshold = args.mbs, 8 * args.mbs, 4 * args.mbs
    cfg.output_dir, cfg.cache_dir = str(out / f"run-{args.target}-{args.layout}"), str(out / "cache")
    return cfg


class StepProfiler:
    """torch.profiler over steps (first, last] of the run (an `on_step` hook): prints the ops that took the
    most host and device time and writes a Chrome trace to `trace` (open it in chrome://tracing or Perfetto)."""

    def __init__(self, first: int, last: int, trace: Path):
        self.first, self.last, self.trace, self.prof = first, last, trace, None

    def __call__(self, step: int, record: dict) -> None:
        from torch.profiler import ProfilerActivity, profile

        if step == self.first:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, record_shapes=False)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.last and self.prof is not None:
            self.prof.__exit__(None, None, None)
            wall = time.perf_counter() - self.t0
            avg = self.prof.key_averages()
            # the tables' footers give the host's and the GPU's totals; the profiler itself slows the host,
            # so compare walls only between runs profiled alike
            print(f"[bench] profile of steps {self.first + 1}..{self.last}: wall {wall:.3f} s (profiled)", flush=True)
            print(f"[bench] profile of steps {self.first + 1}..{self.last}, by host time:", flush=True)
            print(avg.table(sort_by="cpu_time_total", row_limit=25), flush=True)
            print(f"[bench] profile of steps {self.first + 1}..{self.last}, by the ops' own host time:", flush=True)
            print(avg.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
            if torch.cuda.is_available():
                print("[bench] by device time:", flush=True)
                print(avg.table(sort_by="cuda_time_total", row_limit=15), flush=True)
            self.prof.export_chrome_trace(str(self.trace))
            print(f"[bench] trace: {self.trace}", flush=True)
            self.prof = None


class SteadyProbe:
    """An `on_step` hook marking the steady window (steps after `first` up to `last`): how busy the training
    thread and the whole process kept the host CPU there, and what the GPU did (a window of the run's
    GpuSampler, without the start-up around it). A training thread near 100% of the wall time means the
    step is bound by host work (launches, Python), not by the GPU."""

    def __init__(self, first: int, last: int, gpu: GpuSampler, then=None):
        self.first, self.last, self.gpu, self.then = first, last, gpu, then
        self.marks: list[tuple[float, float, float, int, dict]] = []

    def __call__(self, step: int, record: dict) -> None:
        if step in (self.first, self.last):
            cpu = os.times()
            self.marks.append((time.perf_counter(), time.thread_time(), cpu.user + cpu.system, self.gpu.mark(),
                               host_state.snapshot()))
        if self.then is not None:
            self.then(step, record)

    def summary(self) -> dict:
        if len(self.marks) != 2:
            return {"why": f"the run did not reach steps {self.first} and {self.last}"}
        (w0, t0, p0, g0, h0), (w1, t1, p1, g1, h1) = self.marks
        wall = w1 - w0
        return {"steps": [self.first + 1, self.last], "wall_s": round(wall, 2),
                "training_thread_cpu_share": round((t1 - t0) / wall, 3),
                "process_cpu_cores": round((p1 - p0) / wall, 2), "gpu": self.gpu.window(g0, g1),
                "host": host_state.window(h0, h1)}


def run_pipeline(cfg, args) -> tuple[dict, list[list[str]], list[float], list[float]]:
    """(summary, sample ids of each optimizer step, per-step wall times, per-step target_forward phase times)
    of the real pipeline."""
    from torchspec.pipeline.runner import run_training

    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    # the set-up's files (the first run's `flushed_before`) or the last run's: not written out during this one
    flushed = host_state.flush_pending_writes()
    hook = None
    if args.profile:
        first, n = (int(x) for x in args.profile.split(":"))
        hook = StepProfiler(first, first + n, Path(args.trace or Path(args.work) / "trace.json"))
    before = allocator_counts()
    t0 = time.time()
    with GpuSampler() as gpu:
        probe = SteadyProbe(args.warmup, min(args.steps, args.warmup + args.compare_steps), gpu, then=hook)
        r = run_training(cfg, progress=False, on_step=probe)
    wall = time.time() - t0
    after = allocator_counts()
    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    by_step: dict[int, list[str]] = defaultdict(list)
    for step, _, sid in r.trained:
        by_step[step].append(sid)
    ids = [by_step[x["step"]] for x in steps]
    times = [x["time/step_s"] for x in steps]
    target_forward = [x.get("time/target_forward_s", 0.0) for x in steps]
    steady = [x for x in steps[args.warmup:] if "time/eval_s" not in x and "time/checkpoint_s" not in x]
    phases = sorted({k for x in steady for k in x if k.startswith("time/") and k != "time/step_s"})
    step_total = sum(x["time/step_s"] for x in steady)
    summary = {"steps": len(steps), "wall_s": round(wall, 1), "run_s": round(r.elapsed_s, 1),
               "step_time": percentiles([x["time/step_s"] for x in steady]),
               "slow_steps_over_2x_median": over_2x_median([x["time/step_s"] for x in steady]),
               "phases_pct": {k[5:-2]: round(100 * sum(x.get(k, 0.0) for x in steady) / step_total, 1)
                              for k in phases},
               "final_loss": steps[-1]["loss"], "acc_0": steps[-1].get("acc_0"),
               # colocated, target, draft and batches share one caching allocator: retries (a cudaFree of
               # all cached blocks, then cudaMalloc again) would show a fragmented pool
               "cuda_allocator": {k: after[k] - before.get(k, 0) for k in after},
               "gpu": gpu.summary(),   # clocks, power, heat: a slow run on a held-down card is the machine
               "steady": probe.summary(), "flushed_before": flushed}
    return summary, ids, times, target_forward


def allocator_counts() -> dict:
    """CUDA caching-allocator counters of this process (empty off CUDA)."""
    if not torch.cuda.is_available():
        return {}
    st = torch.cuda.memory_stats()
    return {k: int(st.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")}


def sample_table(cfg):
    from torchspec.data.dataset import from_config, load_tokenizer

    return {s.sample_id: s for s in from_config(cfg, load_tokenizer(cfg), progress=False)}


class MemoryStore:
    """A dict standing in for the store when precomputing the ceiling's hidden states (not timed)."""

    def __init__(self):
        self.d = {}

    def put(self, key, tensors):
        self.d[key] = {k: v.detach().clone() for k, v in tensors.items()}


def run_ceiling(cfg, step_ids: list[list[str]], samples, device) -> tuple[list[float], list[float]]:
    """(draft step times, target forward times): our Trainer.train_step alone on the same micro-batches,
    inputs already on the device, and the HF engine's forward of each micro-batch alone."""
    from transformers import AutoConfig

    from torchspec.data.dataset import vocab_map_for
    from torchspec.inference.hf import HFEngine
    from torchspec.transfer.batch import collate
    from torchspec.pipeline.build import ModelSpec, build_trainer, draft_config_for

    target_config = AutoConfig.from_pretrained(cfg.model.target_model_path)
    draft_config = draft_config_for(cfg, target_config)
    d2t, t2d = vocab_map_for(list(samples.values()), draft_config.vocab_size, draft_config.draft_vocab_size)
    store = MemoryStore()
    engine = HFEngine.from_config(cfg, store, device)
    batches, target_s = [], []
    for ids in step_ids:
        t0 = time.perf_counter()
        engine.generate([samples[i] for i in ids])
        torch.cuda.synchronize() if torch.cuda.is_available() else None   # the GPU's time, not the launches'
        target_s.append(time.perf_counter() - t0)
        batch = collate([store.d.pop(i) for i in ids], pack=bool(cfg.training.pack_samples))
        batches.append({k: v.to(device) for k, v in batch.items()})
    engine.close()
    del engine
    spec = ModelSpec(draft_config, d2t, t2d, len(batches), None, False)
    trainer, _ = build_trainer(cfg, spec, device)
    times = []
    for b in batches:
        t0 = time.perf_counter()
        trainer.train_step(b)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        times.append(time.perf_counter() - t0)
    return times, target_s


def run_peer(cfg, step_ids, samples, args, device) -> dict | str:
    import specforge_ref

    why = specforge_ref.available()
    if why:
        return f"skipped: {why}"
    from transformers import AutoConfig

    from torchspec.data.dataset import vocab_map_for

    tc = AutoConfig.from_pretrained(cfg.model.target_model_path)
    d2t, t2d = vocab_map_for(list(samples.values()), tc.vocab_size, args.draft_vocab)
    kept = sorted(int(i) for i in torch.nonzero(t2d).flatten())
    sf_d2t, sf_t2d = specforge_ref.specforge_vocab_maps(kept, tc.vocab_size)
    batches = []
    for ids in step_ids:
        pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)   # right padding, as SpecForge
        batches.append({"input_ids": pad([samples[i].input_ids.long() for i in ids]),
                        "loss_mask": pad([samples[i].loss_mask for i in ids]),
                        "attention_mask": pad([torch.ones(len(samples[i].input_ids), dtype=torch.long) for i in ids])})
    return specforge_ref.run_specforge(
        cfg.model.target_model_path, batches, ttt_length=args.ttt, draft_vocab_size=args.draft_vocab,
        d2t=sf_d2t, t2d=sf_t2d, lr=args.lr, total_steps=len(batches), warmup_ratio=cfg.training.warmup_ratio,
        max_grad_norm=cfg.training.max_grad_norm, attention_backend=args.peer_attention, device=device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), default="small")
    p.add_argument("--layout", choices=["colocated", "split"], default="colocated")
    p.add_argument("--work", default="/tmp/torchspec-e2e")
    p.add_argument("--conversations", type=int, default=4000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50, help="steps left out of the steady-state figures")
    p.add_argument("--compare-steps", type=int, default=150, help="steady steps the three runs are compared on")
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--draft-vocab", type=int, default=2048)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--attention", default="auto")
    p.add_argument("--peer-attention", default="sdpa", help="SpecForge's attention backend")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the pipeline this many times in this call (each reported; ratios for each)")
    p.add_argument("--also-sync-phases", action="store_true",
                   help="run the pipeline once more with a synchronize at every phase end (the older step clock)")
    p.add_argument("--also-no-engine-stream", action="store_true",
                   help="run the pipeline once more with the colocated engine on the trainer's stream, run only when "
                        "waited for (as before the engine stream): an A/B in one call")
    p.add_argument("--no-pack", action="store_true")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--profile", metavar="FIRST:N", help="torch.profiler over N steps after step FIRST of the run")
    p.add_argument("--trace", help="where --profile writes its Chrome trace (default: <work>/trace.json)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    target = build_target(out / f"target-{args.target}", TARGETS[args.target])
    from transformers import AutoTokenizer

    data = out / f"conversations-{args.conversations}.jsonl"
    print("[bench] data:", build_conversations(data, args.conversations, AutoTokenizer.from_pretrained(str(target))),
          flush=True)
    cfg = config_for(args, target, data, out)
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "target": args.target,
              "layout": args.layout, "micro_batch_size": args.mbs, "ttt_length": args.ttt,
              "max_seq_length": args.max_len, "packed": not args.no_pack, "attention": args.attention}
    samples = sample_table(cfg)
    ours, step_ids, step_times, step_target_s = run_pipeline(cfg, args)
    lo, hi = args.warmup, min(len(step_ids), args.warmup + args.compare_steps)
    window = step_ids[lo:hi]
    warm = step_ids[max(0, lo - 5):lo]   # run first and not timed by the ceiling and the peer (compilation)
    tokens = sum(len(samples[i].input_ids) for ids in window for i in ids)
    supervised = sum(int(samples[i].loss_mask.sum()) for ids in window for i in ids)

    def rates(seconds: float) -> dict:
        return {"tokens_per_s": round(tokens / seconds), "supervised_tokens_per_s": round(supervised / seconds),
                "steps_per_s": round(len(window) / seconds, 2)}

    report["compared_steps"] = [lo + 1, hi]
    report["compared_tokens"], report["compared_supervised_tokens"] = tokens, supervised
    report["torchspec"] = {**ours, **rates(sum(step_times[lo:hi]))}
    print("[bench] torchspec:", json.dumps(report["torchspec"]), flush=True)

    def again(label: str, key: str, switch=None) -> dict:
        """The pipeline once more (with `switch` = (module, flag, value) set for this run): its own report."""
        old = getattr(switch[0], switch[1]) if switch else None
        if switch:
            setattr(switch[0], switch[1], switch[2])
        try:
            summary, ids, times, _ = run_pipeline(cfg, args)
        finally:
            if switch:
                setattr(switch[0], switch[1], old)
        if ids != step_ids:
            raise SystemExit(f"{label}: that run trained other batches than the first")
        r = {**summary, **rates(sum(times[lo:hi]))}
        print(f"[bench] torchspec ({key}):", json.dumps(r), flush=True)
        return r

    # --repeats: the same pipeline run again in this process (run-to-run spread on one machine)
    repeats = [again("--repeats", "repeat") for _ in range(args.repeats - 1)]
    if repeats:
        report["torchspec_repeats"] = repeats
    if args.also_sync_phases:
        from torchspec.training import phases

        report["torchspec_sync_each_phase"] = again("--also-sync-phases", "sync each phase",
                                                    (phases, "SYNC_EACH_PHASE", True))
    if args.also_no_engine_stream:
        from torchspec.pipeline import launcher_local

        report["torchspec_no_engine_stream"] = again("--also-no-engine-stream", "no engine stream",
                                                     (launcher_local, "ENGINE_STREAM", False))
    # the runs after the first: each gets its own ratios to the ceiling and the peer
    later_runs = report.get("torchspec_repeats", []) + \
        [report[k] for k in ("torchspec_sync_each_phase", "torchspec_no_engine_stream") if k in report]
    if not args.no_ceiling:
        with GpuSampler() as gpu:
            t, tf = (x[len(warm):] for x in run_ceiling(cfg, warm + window, samples, device))
        report["ceiling"] = {**rates(sum(t)), "step_time": percentiles(t), "gpu": gpu.summary()}
        report["torchspec_vs_ceiling"] = round(report["torchspec"]["tokens_per_s"] / report["ceiling"]["tokens_per_s"], 3)
        if args.layout == "colocated":   # colocated, the target's forward is part of every step: add it alone
            both = [a + b for a, b in zip(t, tf)]
            report["ceiling_with_target_forward"] = {**rates(sum(both)), "target_forward": percentiles(tf)}
            report["torchspec_vs_ceiling_with_target_forward"] = round(
                report["torchspec"]["tokens_per_s"] / report["ceiling_with_target_forward"]["tokens_per_s"], 3)
            report["step_outliers"] = outliers(step_times[lo:hi], both)
            # the colocated target's forwards over the window against the same steps' forwards alone (a step's
            # forwards in the pipeline serve the pool, not exactly that step's batch, so only the sums compare),
            # and how they spread over the steps: even (a card held under its clock) or in bursts (contention).
            # On CUDA the pipeline's forwards run on the engine's own stream, so its phase is their launch only
            # (their GPU work overlaps the draft step): a ratio under 1 is that overlap.
            report["step_outliers"]["target_forward_vs_alone"] = round(sum(step_target_s[lo:hi]) / sum(tf), 3)
            report["step_outliers"]["target_forward_per_step"] = percentiles(step_target_s[lo:hi])
            report["step_outliers"]["target_forward_alone_per_step"] = percentiles(tf)
            for r in later_runs:
                r["vs_ceiling_with_target_forward"] = round(
                    r["tokens_per_s"] / report["ceiling_with_target_forward"]["tokens_per_s"], 3)
        print("[bench] ceiling:", json.dumps({**report["ceiling"], "step_outliers": report.get("step_outliers")}),
              flush=True)
        if "torchspec_vs_ceiling_with_target_forward" in report:
            print("[bench] vs ceiling with target forward:", json.dumps(
                {"first run": report["torchspec_vs_ceiling_with_target_forward"],
                 "later runs": [r["vs_ceiling_with_target_forward"] for r in later_runs]}), flush=True)
    if not args.no_peer:
        with GpuSampler() as gpu:
            peer = run_peer(cfg, warm + window, samples, args, device)
        if isinstance(peer, str):
            report["specforge"] = peer
        else:
            t = peer["step_s"][len(warm):]
            report["specforge"] = {**rates(sum(t)), "step_time": percentiles(t),
                                   "attention": args.peer_attention, "final_loss": peer["losses"][-1],
                                   "gpu": gpu.summary()}
            report["torchspec_vs_specforge"] = round(
                report["torchspec"]["tokens_per_s"] / report["specforge"]["tokens_per_s"], 3)
            for r in later_runs:
                r["vs_specforge"] = round(r["tokens_per_s"] / report["specforge"]["tokens_per_s"], 3)
        print("[bench] specforge:", json.dumps(report["specforge"]), flush=True)
    print(json.dumps(report, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
