#!/usr/bin/env python
"""Time and peak memory of one Eagle3 TTT training step (forward + backward) per attention backend, off CUDA.

A small draft (H 256, 4/2 heads of 64, vocab 1024 -> 512), fp32, one row of T tokens (--docs N packs N
equal documents into it), every token supervised. Each (backend, T) runs in a fresh subprocess; its peak
memory is the peak resident set size of the step above the resident size just before it (Linux: the peak
is reset through /proc/self/clear_refs), so allocator caches of earlier runs cannot hide or add to it.

    python benchmarks/bench_ttt_cpu.py [--lengths 4096,8192,16384] [--backends sdpa,flex_attention]
        [--ttt-length 7] [--docs 1] [--threads 2]
    python benchmarks/bench_ttt_cpu.py --one sdpa 8192     # one measurement, printed as JSON

Memory must grow linearly with T (no [T, T] score or mask tensor lives through a step).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

V, V_DRAFT, H = 1024, 512, 256


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def build(T: int, docs: int, seed: int = 0):
    from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3
    from torchspec.models.target_head import TargetHead

    torch.manual_seed(seed)
    cfg = DraftConfig.from_dict(dict(
        hidden_size=H, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=max(T, 4096), vocab_size=V,
        draft_vocab_size=V_DRAFT, target_hidden_size=H))
    draft = LlamaForCausalLMEagle3(cfg)
    keep = torch.randperm(V)[:V_DRAFT].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    draft.set_vocab_map(keep - torch.arange(V_DRAFT), t2d)
    w = torch.randn(V, H) * 0.02
    w[~t2d] *= 0.05   # the target's argmax lies in the draft vocab: every row is supervised
    head = TargetHead(w)
    doc = torch.arange(T) * docs // T + 1
    batch = dict(input_ids=torch.randint(0, V, (1, T)), loss_mask=torch.ones(1, T, dtype=torch.long),
                 attention_mask=doc[None], aux_hidden_states=torch.randn(1, T, 3 * H),
                 final_hidden_states=torch.randn(1, T, H))
    return draft, head, batch


def measure(backend: str, T: int, ttt_length: int, docs: int = 1) -> dict:
    """One step in THIS process: {'seconds', 'peak_mib'} (peak RSS of the step above the RSS before it)."""
    from torchspec.models.eagle3 import eagle3_loss

    draft, head, batch = build(T, docs)
    warm = {k: v[:, :64] for k, v in batch.items()}   # first-use costs (thread pools, kernels) outside the step
    eagle3_loss(draft, head, warm, ttt_length, backend).loss.backward()
    draft.zero_grad(set_to_none=False)                 # gradient buffers exist before the measured step
    Path("/proc/self/clear_refs").write_text("5")      # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    eagle3_loss(draft, head, batch, ttt_length, backend).loss.backward()
    seconds = time.perf_counter() - t0
    return dict(backend=backend, T=T, ttt_length=ttt_length, docs=docs, seconds=round(seconds, 3),
                peak_mib=round((_status_kib("VmHWM") - before) / 1024, 1))


def measure_in_subprocess(backend: str, T: int, ttt_length: int = 7, docs: int = 1, threads: int = 2,
                          timeout: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", backend, str(T), "--ttt-length", str(ttt_length),
           "--docs", str(docs), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode:
        from torchspec.utils.procs import exit_text   # SIGKILL with no output: most likely the OOM killer

        raise RuntimeError(f"{' '.join(cmd)} {exit_text(out.returncode)}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384")
    p.add_argument("--backends", default="sdpa,flex_attention")
    p.add_argument("--ttt-length", type=int, default=7)
    p.add_argument("--docs", type=int, default=1, help="documents packed in the row (equal lengths)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("BACKEND", "T"), help="measure one step here, print JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.ttt_length, args.docs)))
        return
    rows = [measure_in_subprocess(b, int(T), args.ttt_length, args.docs, args.threads)
            for T in args.lengths.split(",") for b in args.backends.split(",")]
    print(f"ttt_length {args.ttt_length}, {args.docs} document(s) per row, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'backend':16} {'T':>7} {'step s':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['backend']:16} {r['T']:>7} {r['seconds']:>8.2f} {r['peak_mib']:>9.1f}")


if __name__ == "__main__":
    main()
