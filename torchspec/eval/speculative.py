"""Greedy chain speculative decoding of an HF target with an EAGLE-3 draft, as a server runs it.

One round (vLLM's / SGLang's EAGLE-3 chain mode, temperature 0):
  1. the draft proposes k tokens autoregressively: its first pass reads, for every position t the
     target has processed since the last round, the token x_{t+1} and the target's aux features
     g_t (fc applied); then k-1 single-token steps, each reading the previous draft token and the
     draft's own previous (pre-norm) hidden output, placed at the next position;
  2. the target verifies [last token, d_1..d_k] in one forward; the longest prefix of drafts equal
     to the target's argmax is accepted, plus the target's own next token (the bonus token);
  3. the target's KV cache and the draft's cache are rolled back past the rejected positions, so
     every cached draft row at a position t < current is one fed with target features.

tau (mean acceptance length) = tokens produced per verification forward = 1 + accepted / drafts,
vLLM's `mean acceptance length` (its spec_decode counters count every verification that carried
draft tokens, and all its accepted tokens, even those cut by max_tokens; so do we). The prompt's
prefill forward is not a verification and is not counted.
Greedy speculative decoding is lossless: the output equals plain greedy decoding token for token.

Image prompts (a VLM target): a `Prompt` carries its images; the target expands each image placeholder
exactly as the hf engine does for training (inference/vlm.py) and its prefill gets the processed pixel
inputs. From there on the sequence is the expanded one, for the target (whose model keeps the image's
rotary offsets for the later, text-only forwards) and for the draft (positions counted along the expanded
sequence, as in training).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class SpecStats:
    """Counters with vLLM's spec_decode metric semantics (summable over prompts)."""

    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.accepted_per_pos:
            self.accepted_per_pos = [0] * self.num_speculative_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def merge(self, other: "SpecStats") -> "SpecStats":
        if other.num_speculative_tokens != self.num_speculative_tokens:
            raise ValueError("cannot merge stats of different draft step counts")
        return SpecStats(
            self.num_speculative_tokens, self.num_drafts + other.num_drafts,
            self.num_draft_tokens + other.num_draft_tokens, self.num_accepted_tokens + other.num_accepted_tokens,
            [a + b for a, b in zip(self.accepted_per_pos, other.accepted_per_pos)])

    @property
    def tau(self) -> float:
        """Mean acceptance length: tokens per verification forward (bonus token included)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """Fraction of drafts whose i-th token was accepted (i = 0..k-1)."""
        return [a / self.num_drafts if self.num_drafts else float("nan") for a in self.accepted_per_pos]

    def as_dict(self) -> dict:
        return {"tau": self.tau, "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate_per_pos": self.acceptance_rate_per_pos}


# --------------------------------------------------------------------------------------------------
# Prompts


class Prompt(list):
    """A prompt's token ids (a list, so text prompts are plain id lists) and the images its placeholders
    stand for, in order (data/multimodal.py references; empty for text)."""

    def __init__(self, ids=(), images: Sequence[str] = ()):
        super().__init__(int(t) for t in ids)
        self.images = tuple(images)


def images_of(prompt) -> tuple[str, ...]:
    return tuple(getattr(prompt, "images", ()) or ())


# --------------------------------------------------------------------------------------------------
# Target


class HFTarget:
    """A transformers causal LM with a KV cache that can be rolled back, returning per processed token
    its greedy next token and its aux features (concat of the outputs of `aux_layers`, our id k = output
    of decoder layer k, captured by hooks exactly as the hf engine captures them for training). `vision` (a
    VLM target's image side, inference/vlm.py) lets it run image prompts; without it they are refused."""

    def __init__(self, model, aux_layers: Sequence[int], vision=None):
        self.model = model
        self.vision = vision
        self.aux_layers = [int(k) for k in aux_layers]
        self.device = next(model.parameters()).device
        from torchspec.inference.hf import AuxCapture

        self.capture = AuxCapture(model.get_decoder(), self.aux_layers)
        self.cache = None
        self.num_forwards = 0
        # transformers renamed the forward's cache argument from past_key_values to cache (after 5.17);
        # an unknown name is swallowed by **kwargs and the model silently runs without the cache.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        if self.vision is not None:   # the previous prompt's image rotary offsets must not leak into this one
            self.vision.reset_positions()

    def prefill_inputs(self, prompt) -> tuple[list[int], dict]:
        """(the token ids the target runs for `prompt`, the prefill's extra inputs): for an image prompt the
        ids with each image placeholder expanded and the processed pixel inputs, as the hf engine's records."""
        images = images_of(prompt)
        if not images:
            return list(prompt), {}
        from torchspec.data.sample import Sample
        from torchspec.inference import vlm

        ids = torch.tensor(list(prompt), dtype=torch.long)
        sample = Sample("prompt", ids, torch.zeros_like(ids, dtype=torch.uint8), images=images)
        if self.vision is None:
            vlm.refuse_images([sample], self.model)
        expanded = self.vision.expand(sample)
        extra = self.vision.forward_inputs([expanded], expanded.input_ids[None], self.device, self.model.dtype)
        return expanded.input_ids.tolist(), extra
    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], num_logits: int = 0, **extra) -> tuple[list[int], torch.Tensor]:
        """Process `token_ids` after the cached ones: (argmax next token of the last `num_logits` positions,
        all of them when 0; aux [n, 3H] of every position). `extra`: a prefill's image inputs."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        self.capture.clear()
        out = self.model(input_ids=ids, **{self._cache_arg: self.cache}, use_cache=True, logits_to_keep=num_logits,
                         **extra)
        self.num_forwards += 1
        aux = self.capture.take()[0]
        return out.logits[0].argmax(dim=-1).tolist(), aux

    def crop(self, length: int) -> None:
        """Keep the first `length` cached positions."""
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)

    def close(self) -> None:
        self.capture.close()


# --------------------------------------------------------------------------------------------------
# Proposers


class Proposer(Protocol):
    """Proposes k draft tokens (target vocab ids) to follow `tokens`.

    `tokens` holds every known token (the last one not yet seen by the target); `aux` [len(tokens)-1, 3H]
    holds the target's aux features of every position the target has processed and kept, in order.
    """

    def reset(self) -> None: ...

    def propose(self, tokens: Sequence[int], aux: torch.Tensor, k: int) -> list[int]: ...


class Eagle3Proposer:
    """The EAGLE-3 chain proposer over our draft's inference API (docs/interfaces.md: `forward_step`).

    The draft cache holds one row per position t < len(tokens)-1 fed with (x_{t+1}, fc(g_t)); chain rows
    of the previous round past that are dropped (crop) and the newly verified positions fed, exactly as
    vLLM overwrites its draft KV slots after verification.
    """

    def __init__(self, draft):
        self.draft = draft
        self.device = next(draft.parameters()).device
        self.dtype = next(draft.parameters()).dtype
        self.kv = None
        self.num_fed = 0  # target-fed rows in self.kv

    def reset(self) -> None:
        self.kv = self.draft.new_kv_cache()
        self.num_fed = 0

    def _ids(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(rows)], dtype=torch.long, device=self.device)

    def _greedy(self, logits: torch.Tensor) -> int:
        return int(self.draft.to_target_ids(logits.argmax(dim=-1)).item())

    @torch.inference_mode()
    def propose(self, tokens: Sequence[int], aux: torch.Tensor, k: int) -> list[int]:
        m = len(tokens) - 1  # positions the target has processed and kept
        if aux.shape[0] != m:
            raise ValueError(f"aux has {aux.shape[0]} rows for {m} processed positions")
        self.kv.crop(self.num_fed)
        start = self.num_fed
        pos = torch.arange(start, m, device=self.device)[None]
        hidden, logits = self.draft.forward_step(
            self._ids(tokens[start + 1:m + 1]), aux[start:m][None].to(self.device, self.dtype), pos, self.kv)
        self.num_fed = m
        drafts = [self._greedy(logits[0, -1])]
        hidden = hidden[:, -1:]
        for j in range(1, k):
            pos = torch.tensor([[m - 1 + j]], device=self.device)
            hidden, logits = self.draft.forward_step(self._ids(drafts[-1:]), hidden, pos, self.kv)
            drafts.append(self._greedy(logits[0, -1]))
        return drafts


# --------------------------------------------------------------------------------------------------
# Decoding loops


@dataclass
class SpecOutput:
    tokens: list[int]   # new tokens (prompt excluded)
    stats: SpecStats


def _stop_set(eos_token_id) -> frozenset:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def greedy_generate(target: HFTarget, prompt: Sequence[int], max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """Plain greedy decoding with the target, one token per forward (the reference output).
    Stops after `max_new_tokens` or after an EOS token (one id or several). `prompt` may be a `Prompt`
    with images (a VLM target)."""
    stop = _stop_set(eos_token_id)
    target.reset()
    ids, extra = target.prefill_inputs(prompt)
    nxt, _ = target.forward(ids, num_logits=1, **extra)
    out = [nxt[-1]]
    while len(out) < max_new_tokens and out[-1] not in stop:
        nxt, _ = target.forward(out[-1:], num_logits=1)
        out.append(nxt[-1])
    return out


def speculative_generate(target: HFTarget, proposer: Proposer, prompt: Sequence[int], num_draft_steps: int,
                         max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None) -> SpecOutput:
    """Greedy chain speculative decoding (module docstring). Returns exactly what greedy decoding
    returns, plus vLLM-style acceptance counters."""
    if num_draft_steps < 1:
        raise ValueError(f"num_draft_steps must be >= 1, got {num_draft_steps}")
    if len(prompt) == 0:
        raise ValueError("empty prompt")
    k = num_draft_steps
    stop = _stop_set(eos_token_id)
    stats = SpecStats(k)
    target.reset()
    proposer.reset()
    ids, extra = target.prefill_inputs(prompt)   # image placeholders expanded, as in training
    nxt, aux = target.forward(ids, num_logits=1, **extra)  # prefill: not a verification
    tokens = list(ids) + [nxt[-1]]
    aux_rows = [aux]
    out = [nxt[-1]]
    while len(out) < max_new_tokens and out[-1] not in stop:
        drafts = proposer.propose(tokens, torch.cat(aux_rows), k)
        kept = len(tokens) - 1  # == target.length
        verify, aux = target.forward([tokens[-1]] + list(drafts))
        n = 0
        while n < k and drafts[n] == verify[n]:
            n += 1
        stats.observe(k, n)
        new = list(drafts[:n]) + [verify[n]]
        target.crop(kept + n + 1)
        aux_rows.append(aux[:n + 1])
        tokens += new
        ends = [i for i, t in enumerate(new) if t in stop]
        if ends:
            new = new[:ends[0] + 1]
        out += new
    return SpecOutput(out[:max_new_tokens], stats)
