"""Expected speedup of EAGLE-3 chain decoding: an ESTIMATE from tau and measured forward costs.

One speculative round costs one target forward over k+1 tokens (verification) plus k draft forwards
(the first over the newly accepted rows, then k-1 single-token steps) and yields tau tokens on average;
plain decoding costs one single-token target forward per token. So

    speedup ~= tau * t_target(1) / (t_target(k+1) + k * t_draft(1))

It ignores sampling, scheduling and batching overheads of a real server, and the costs are measured here
with transformers eager kernels (batch 1, the given context length), not a serving engine's: treat it as
an estimate of the order of magnitude, and measure a server for real numbers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from torchspec.eval.speculative import HFTarget


@dataclass
class ForwardCosts:
    target_decode_s: float   # one target forward over 1 new token
    target_verify_s: float   # one target forward over k+1 new tokens
    draft_step_s: float      # one draft forward over 1 new token
    num_draft_steps: int
    context_len: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_speedup(tau: float, costs: ForwardCosts) -> float:
    """tau * t_target(1) / (t_target(k+1) + k * t_draft(1)); see the module docstring."""
    k = costs.num_draft_steps
    return tau * costs.target_decode_s / (costs.target_verify_s + k * costs.draft_step_s)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(fns, repeats: int, warmup: int, device) -> list[float]:
    """Median wall time of each fn, measured interleaved so that load drifts hit all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


@torch.no_grad()
def measure_costs(target: HFTarget, draft, num_draft_steps: int, context_len: int = 256, repeats: int = 10,
                  warmup: int = 3, seed: int = 0) -> ForwardCosts:
    """Median wall time of each forward after a `context_len`-token random context (batch 1)."""
    g = torch.Generator().manual_seed(seed)
    vocab = draft.config.vocab_size
    ctx = torch.randint(0, vocab, (context_len,), generator=g).tolist()
    device = target.device
    target.reset()
    _, aux = target.forward(ctx, num_logits=1)

    def target_step(n):
        def run():
            target.forward(ctx[:n])
            target.crop(context_len)
        return run

    ddev = next(draft.parameters()).device
    ddtype = next(draft.parameters()).dtype
    kv = draft.new_kv_cache()
    ids = torch.tensor([ctx[1:] + ctx[:1]], device=ddev)
    hidden, _ = draft.forward_step(ids, aux[None].to(ddev, ddtype), torch.arange(context_len, device=ddev)[None], kv)
    last = hidden[:, -1:]
    one = torch.tensor([[ctx[0]]], device=ddev)
    pos = torch.tensor([[context_len]], device=ddev)

    def draft_step():
        draft.forward_step(one, last, pos, kv)
        kv.crop(context_len)

    t1, tk, td = _median_times([target_step(1), target_step(num_draft_steps + 1), draft_step], repeats, warmup,
                               device)
    return ForwardCosts(t1, tk, td, num_draft_steps, context_len, str(device))
