"""The engines' text generation, for regeneration (torchspec/data/regenerate.py).

Each generator is called as `generator(prompts, stop_ids, settings) -> [Completion]`: prompts are token
id lists, a reply ends at the first of `stop_ids` (not included in the Completion) or after
`settings.max_new_tokens` tokens (then `truncated`). Settings are dataset.generation's: temperature 0 is
greedy; top_k 0 and top_p 1 are off; `seed` seeds the sampling.

  hf    transformers `generate` on the loaded target: one left-padded batch per call.
  vllm  `vllm.LLM.generate` with `SamplingParams` (vLLM schedules the batch itself).
  sgl   `sglang.Engine.generate(input_ids=..., sampling_params=...)`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from torchspec.data.regenerate import Completion


def _cut(ids: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int) -> Completion:
    """A reply up to (not including) its first stop token; truncated when none came within max_new_tokens."""
    ids = [int(t) for t in ids]
    stops = set(int(s) for s in stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return Completion(ids[:i], truncated=False)
    return Completion(ids[:max_new_tokens], truncated=True)


class HFGenerator:
    """transformers `generate` on `model` (a causal LM): left padding, greedy at temperature 0, otherwise
    sampling under `torch.manual_seed(seed + call number)` in a forked RNG (the caller's RNG is untouched)."""

    def __init__(self, model, pad_token_id: int):
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.device = next(model.parameters()).device
        self.calls = 0

    @torch.inference_mode()
    def __call__(self, prompts: list[list[int]], stop_ids: list[int], settings) -> list[Completion]:
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        sample = float(settings.temperature) > 0
        kwargs = dict(max_new_tokens=int(settings.max_new_tokens), do_sample=sample, eos_token_id=list(stop_ids),
                      pad_token_id=self.pad_token_id, repetition_penalty=1.0, top_k=None, top_p=None,
                      temperature=None)
        if sample:
            kwargs.update(temperature=float(settings.temperature), top_p=float(settings.top_p),
                          top_k=int(settings.top_k))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(settings.seed) + self.calls)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        self.calls += 1
        replies = [_cut(row[width:].tolist(), stop_ids, int(settings.max_new_tokens)) for row in out.cpu()]
        return replies

    def close(self) -> None:
        self.model = None


def vllm_sampling_params(stop_ids: list[int], settings, seed: int):
    """`vllm.SamplingParams` of these settings (vLLM: top_k 0 = off, temperature 0 = greedy)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=int(settings.max_new_tokens), temperature=float(settings.temperature),
                          top_p=float(settings.top_p), top_k=int(settings.top_k), seed=seed,
                          stop_token_ids=list(stop_ids), skip_special_tokens=False, detokenize=False)


class _SeededRequests:
    """A server generator's request count: request i of the run is seeded with settings.seed + i."""

    requests = 0

    def request_params(self, make, n: int, stop_ids: list[int], settings) -> list:
        """make(stop_ids, settings, seed) for the next n requests."""
        first = int(settings.seed) + self.requests
        self.requests += n
        return [make(stop_ids, settings, first + i) for i in range(n)]


class VLLMGenerator(_SeededRequests):
    """`vllm.LLM.generate` on token-id prompts; each request seeded with seed + its index over the run."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, prompts: list[list[int]], stop_ids: list[int], settings) -> list[Completion]:
        if not prompts:
            return []
        params = self.request_params(vllm_sampling_params, len(prompts), stop_ids, settings)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        # token_ids end with the stop token when one stopped the reply (finish_reason "stop")
        return [_cut(o.outputs[0].token_ids, stop_ids, int(settings.max_new_tokens)) for o in outs]

    def close(self) -> None:
        """Stop vLLM's engine core (its own process, holding the device memory) before training starts."""
        if self.llm is not None:
            llm, self.llm = self.llm, None
            llm.llm_engine.engine_core.shutdown()


def sgl_sampling_params(stop_ids: list[int], settings, seed: int) -> dict:
    """SGLang's sampling_params dict of these settings (SGLang: top_k -1 = off)."""
    params = {"max_new_tokens": int(settings.max_new_tokens), "temperature": float(settings.temperature),
              "top_p": float(settings.top_p), "top_k": int(settings.top_k) or -1,
              "stop_token_ids": list(stop_ids), "skip_special_tokens": False}
    if float(settings.temperature) > 0:
        params["sampling_seed"] = seed
    return params


class SGLGenerator(_SeededRequests):
    """`sglang.Engine.generate(input_ids=..., sampling_params=[...])`; replies are each output's `output_ids`."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, prompts: list[list[int]], stop_ids: list[int], settings) -> list[Completion]:
        if not prompts:
            return []
        params = self.request_params(sgl_sampling_params, len(prompts), stop_ids, settings)
        outs = self.engine.generate(input_ids=[list(p) for p in prompts], sampling_params=params)
        return [_cut(o["output_ids"], stop_ids, int(settings.max_new_tokens)) for o in outs]

    def close(self) -> None:
        """Stop SGLang's scheduler and detokenizer processes."""
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()
