"""Acceptance-length evaluation of a draft against its target on held-out prompts.

API: `load_target_and_draft(target_path, draft_dir)`, `prompts_from_samples(samples)`,
`measure_acceptance(target, draft, prompts, k, max_new_tokens)`; the CLI (`python -m torchspec.eval`)
wires them to files, with prompts from `torchspec.eval.prompts` (the generation prompt after a
conversation's last turn). `prompts_from_samples` (eval during training) cuts a tokenized sample before its
first supervised (assistant) token: the chat template's scaffolding up to and including the assistant header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from torchspec.eval.speculative import (Eagle3Proposer, HFTarget, Prompt, SpecStats, greedy_generate,
                                        speculative_generate)


class EvalError(ValueError):
    """A user-caused problem (paths, data); one line naming the file or option."""


@dataclass
class AcceptanceResult:
    stats: SpecStats
    num_prompts: int
    tokens_generated: int
    # token-level agreement of speculative and plain greedy output (None when greedy was not run)
    tokens_compared: int | None = None
    tokens_matching: int | None = None
    identical_outputs: int | None = None
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def match_rate(self) -> float | None:
        if self.tokens_compared is None:
            return None
        return self.tokens_matching / self.tokens_compared if self.tokens_compared else 1.0

    def as_dict(self) -> dict:
        d = {"num_prompts": self.num_prompts, "tokens_generated": self.tokens_generated, **self.stats.as_dict()}
        if self.tokens_compared is not None:
            d.update(greedy_match_rate=self.match_rate, identical_outputs=self.identical_outputs,
                     tokens_compared=self.tokens_compared)
        return d


def prompt_of(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> list[int] | None:
    """The tokens before the first supervised token (None when nothing is supervised or nothing precedes)."""
    sup = torch.nonzero(loss_mask.reshape(-1)).reshape(-1)
    if sup.numel() == 0 or int(sup[0]) == 0:
        return None
    return input_ids.reshape(-1)[: int(sup[0])].tolist()


def prompts_from_samples(samples, limit: int | None = None) -> list[Prompt]:
    """Each sample's prompt (`prompt_of`), with the sample's images (those whose placeholder the cut dropped
    are dropped by the target's expansion, as max_seq_length's are in training)."""
    out = []
    for s in samples:
        p = prompt_of(s.input_ids, s.loss_mask)
        if p is not None:
            out.append(Prompt(p, getattr(s, "images", ()) or ()))
            if limit is not None and len(out) >= limit:
                break
    return out


def load_target_and_draft(target_path, draft_dir, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(HFTarget with the export's aux layers hooked, draft in eval mode) from a target and an export dir
    (or a run's output_dir / a checkpoint dir, whose export/ is used)."""
    from torchspec.config.errors import ConfigError
    from torchspec.export import aux_layer_ids_of, load_exported
    from torchspec.inference.hf import load_target
    from torchspec.inference.vlm import vision_inputs

    given, draft_dir = draft_dir, draft_export_dir(draft_dir)  # checked before the target is loaded
    model = load_target(str(target_path), dtype, device, trust_remote_code=trust_remote_code)
    try:
        draft, cfg = load_exported(draft_dir, dtype=dtype)
    except ConfigError as e:
        raise EvalError(f"--draft {given}: {e}") from None
    if "embed_tokens.weight" not in _tensor_names(draft_dir):  # shared with the target, as servers do
        draft.load_embeddings(model.get_input_embeddings().weight.detach().to(dtype).cpu())
    draft = draft.to(device).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    if draft.config.vocab_size != vocab:
        raise EvalError(f"--draft {draft_dir}: vocab_size {draft.config.vocab_size} does not match the target's "
                        f"{vocab} ({target_path})")
    return HFTarget(model, aux_layer_ids_of(cfg), vision_inputs(model, target_path, trust_remote_code)), draft


def draft_export_dir(draft_dir) -> Path:
    """The export dir `draft_dir` names (itself, or the export/ of a run's output_dir or a checkpoint dir),
    checked without loading its weights (config.json, the weights' header, the aux-layer ids): a cheap
    check to make before anything long. EvalError of one line naming the file otherwise."""
    from torchspec.config.errors import ConfigError
    from torchspec.export import CONFIG_FILE, aux_layer_ids_of, check_exported

    path = Path(draft_dir)
    if not (path / CONFIG_FILE).is_file() and (path / "export" / CONFIG_FILE).is_file():
        path = path / "export"  # a run's output_dir or a checkpoint dir: its export
    if not (path / CONFIG_FILE).is_file():
        raise EvalError(f"--draft {draft_dir}: not an exported draft dir (no config.json); "
                        "export one with tools/convert_to_hf.py or use a run's output_dir/export")
    try:
        hf, _ = check_exported(path)
    except ConfigError as e:
        raise EvalError(f"--draft {draft_dir}: {e}") from None
    try:
        aux_layer_ids_of(hf)
    except (KeyError, TypeError, AttributeError):
        raise EvalError(f"--draft {draft_dir}: {path / CONFIG_FILE}: no aux-layer ids (neither "
                        "torchspec.aux_hidden_state_layer_ids nor eagle_config.eagle_aux_hidden_state_layer_ids)"
                        ) from None
    return path


def _tensor_names(draft_dir) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(Path(draft_dir) / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@torch.no_grad()
def measure_acceptance(target: HFTarget, draft, prompts: Sequence[Sequence[int] | Prompt], num_draft_steps: int,
                       max_new_tokens: int, eos_token_id=None, compare_greedy: bool = True,
                       progress: bool = False) -> AcceptanceResult:
    """Greedy chain speculative decoding over `prompts`; tau and per-position rates pooled over all of
    them (vLLM's counters summed); optionally each output checked against plain greedy decoding.
    A `Prompt` with images needs a VLM target (HFTarget with its vision side)."""
    proposer = Eagle3Proposer(draft)
    stats = SpecStats(num_draft_steps)
    result = AcceptanceResult(stats, len(prompts), 0)
    if compare_greedy:
        result.tokens_compared = result.tokens_matching = result.identical_outputs = 0
    it = prompts
    if progress:
        from tqdm import tqdm

        it = tqdm(prompts, desc="eval", unit="prompt")
    for prompt in it:
        out = speculative_generate(target, proposer, prompt, num_draft_steps, max_new_tokens, eos_token_id)
        stats = stats.merge(out.stats)
        result.outputs.append(out.tokens)
        result.tokens_generated += len(out.tokens)
        if compare_greedy:
            ref = greedy_generate(target, prompt, max_new_tokens, eos_token_id)
            n = max(len(ref), len(out.tokens))
            result.tokens_compared += n
            result.tokens_matching += sum(a == b for a, b in zip(ref, out.tokens))
            result.identical_outputs += int(ref == out.tokens)
    result.stats = stats
    return result
