"""The `hf` engine: the target runs in-process with transformers.

One forward of the target's base model (the lm_head never runs) per batch of samples, right-padded
and without an attention mask (causal attention never lets a real position see the padding after it).
Forward hooks on the configured decoder layers capture their outputs (our id k = output of decoder
layer k = transformers ``hidden_states[k + 1]``), so only those layers are kept, not all L of them.
The final, post-norm hidden state is the base model's ``last_hidden_state``. Each sample's record
(docs/interfaces.md) goes to the Store under its sample id. A vision-language target (inference/vlm.py)
runs its images through its processor and its records are of the expanded token sequence.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch

# TargetLoadError and resolve_aux_layers (TargetInfo's aux-layer rule) stay importable from here for existing callers.
from torchspec.config.target import TargetInfo, TargetLoadError, resolve_aux_layers  # noqa: F401
from torchspec.inference import vlm
from torchspec.inference.base import StoredSample, compute_dtype, put_record
from torchspec.inference.engine_metrics import ForwardCounters
from torchspec.models.attention import varlen_sdpa


def load_target(path: str, dtype: torch.dtype, device: torch.device | str, trust_remote_code: bool = False):
    """Load the target's causal-LM checkpoint (local dir or hub id) in eval mode, grads off."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    # Straight onto the GPU (no full copy in host memory first); on CPU the default placement.
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    try:
        if vlm.is_vlm_dir(path):
            model = vlm.load_vlm(path, dtype, trust_remote_code, **placement)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **placement)
    except Exception as e:  # user-caused: wrong path / id, or a model needing trust_remote_code
        where = "a local directory" if os.path.isdir(str(path)) else "not a local directory; tried it as a hub id"
        raise TargetLoadError(
            f"model.target_model_path={path!r} ({where}) could not be loaded as a causal LM: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return model.to(device).eval().requires_grad_(False)


def _base_model(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    return base if base is not None else getattr(model, model.base_model_prefix)


class AuxCapture:
    """Forward hooks on the decoder layers `aux_layers` of `base` (a model with `.layers`): after a forward,
    `take()` returns the concat of their outputs [..., 3H] (our id k = OUTPUT of decoder layer k, transformers
    `hidden_states[k + 1]`) and forgets them. The one capture of aux hidden states (engine and tau eval)."""

    def __init__(self, base, aux_layers: Sequence[int]):
        layers = getattr(base, "layers", None)
        if layers is None:
            raise TargetLoadError(f"{type(base).__name__} has no .layers; its aux layers cannot be hooked")
        self.aux_layers = [int(k) for k in aux_layers]
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks = [layers[k].register_forward_hook(self._hook(k)) for k in sorted(set(self.aux_layers))]

    def _hook(self, k: int):
        def capture(module, args, output):
            self._captured[k] = output[0] if isinstance(output, (tuple, list)) else output
        return capture

    def clear(self) -> None:
        self._captured.clear()

    def take(self) -> torch.Tensor:
        aux = torch.cat([self._captured[k] for k in self.aux_layers], dim=-1)
        self._captured.clear()
        return aux

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._captured.clear()


PAD_WASTE = 1.25   # a forward batch computes at most this many (padded) tokens per real one
# ... unless its padded size is below the tokens a GPU computes in the time the host takes to launch the
# forward (~0.5 ms per layer of Python and kernel launches, at ~4e14 FLOP/s): such a forward is
# launch-bound, so padding is free and one forward beats several. ~50k tokens for a 16M-parameter
# 8-layer model, ~450 for an 8B one; 0 off CUDA (a CPU forward is compute-bound).
LAUNCH_S_PER_LAYER = 5e-4
GPU_FLOPS = 4e14


def launch_bound_tokens(model, device: torch.device) -> int:
    """Padded tokens one forward of `model` on `device` may compute at no cost (see LAUNCH_S_PER_LAYER)."""
    if device.type != "cuda":
        return 0
    layers = max(1, int(getattr(model.config, "num_hidden_layers", 1) or 1))
    params = sum(p.numel() for p in model.parameters())
    return int(LAUNCH_S_PER_LAYER * GPU_FLOPS * layers / (2 * max(params, 1)))


class HFEngine:
    def __init__(self, model, store, aux_layers: Sequence[int] | None = None, batch_size: int = 1,
                 vision: "vlm.QwenVLInputs | None" = None):
        self.model = model
        self.store = store
        self.batch_size = batch_size
        self.base = _base_model(model)
        self.aux_layers = list(TargetInfo.from_target_config(model.config, aux_layers).aux_layers)
        self.device = next(model.parameters()).device
        self.capture = AuxCapture(self.base, self.aux_layers)
        self.free_tokens = launch_bound_tokens(model, self.device)
        self.vision = vision   # a VLM target's image side (None: text only)
        self.counts = ForwardCounters("hf", padded=True)

    @classmethod
    def from_config(cls, cfg, store, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        device = torch.device(device)
        if dtype is None:
            dtype = compute_dtype(device)
        model = load_target(cfg.model.target_model_path, dtype, device,
                            trust_remote_code=bool(cfg.model.trust_remote_code))
        return cls(model, store, aux_layers=cfg.inference.aux_hidden_states_layers,
                   batch_size=cfg.inference.inference_batch_size,
                   vision=vlm.vision_inputs(model, cfg.model.target_model_path, bool(cfg.model.trust_remote_code)))

    @torch.inference_mode()
    def _forward(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded rows and NO attention mask: under the causal mask a real position t < len sees only
        keys <= t, all real, with positions 0..t as unpadded; the padded positions' outputs are dropped by
        the caller. So attention stays the causal kernel (is_causal) and no [B, 1, T, T] mask is built."""
        lengths = [int(s.input_ids.numel()) for s in samples]
        ids = torch.zeros(len(samples), max(lengths), dtype=torch.long)
        for i, s in enumerate(samples):
            ids[i, :lengths[i]] = s.input_ids
        self.capture.clear()
        runner, extra = self.base, {}
        if self.vision is not None:
            runner, extra = self.vision.runner, self.vision.forward_inputs(samples, ids, self.device,
                                                                            self.model.dtype)
        with varlen_sdpa():   # every batch has another padded length
            out = runner(input_ids=ids.to(self.device), use_cache=False, **extra)
        return self.capture.take(), out.last_hidden_state

    def chunks(self, samples: Sequence) -> list[list]:
        """Forward batches: samples sorted by length, at most `batch_size` each, and a new batch begun when
        padding to the next (longer) sample would exceed both PAD_WASTE x the batch's real tokens and the
        launch-bound size `free_tokens`."""
        out: list[list] = []
        real = 0
        for s in sorted(samples, key=lambda s: s.input_ids.numel()):
            n = int(s.input_ids.numel())
            chunk = out[-1] if out else None
            if chunk is None or len(chunk) == self.batch_size or \
                    (len(chunk) + 1) * n > max(PAD_WASTE * (real + n), self.free_tokens):
                out.append([s])
                real = n
            else:
                chunk.append(s)
                real += n
        return out

    def generate(self, samples: Sequence) -> list[StoredSample]:
        if self.vision is None:
            vlm.refuse_images(samples, self.model)
        else:   # records of the expanded sequence (inference/vlm.py)
            samples = [self.vision.expand(s) for s in samples]
        done: dict[str, StoredSample] = {}
        for chunk in self.chunks(samples):
            t0 = time.perf_counter()
            aux, final = self._forward(chunk)
            self.counts.add(sum(int(s.input_ids.numel()) for s in chunk), time.perf_counter() - t0,
                            padded_tokens=len(chunk) * int(aux.shape[1]))
            for j, s in enumerate(chunk):
                n = int(s.input_ids.numel())
                done[s.sample_id] = put_record(self.store, s, aux[j, :n], final[j, :n])
        return [done[s.sample_id] for s in samples]

    def metrics(self) -> dict[str, float]:
        """Since the engine started: forward batches, real and padded tokens, seconds in the target's forward,
        and real tokens per forward second."""
        return self.counts.metrics()

    def close(self) -> None:
        self.capture.close()
