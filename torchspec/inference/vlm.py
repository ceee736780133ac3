"""Vision-language targets in the hf engine: images -> pixel inputs, placeholders -> the expanded sequence.

A tokenized sample holds ONE image-pad token per image (the chat template's placeholder, data/multimodal.py).
The target's image processor turns each image into patches and a grid (t, h, w); the model replaces
t*h*w / merge_size^2 consecutive pad tokens by the image's merged patch embeddings. So the sequence the
target runs, and the one it serves with, is the EXPANDED one: each pad repeated that many times. The
record (input_ids, loss_mask, hidden states) is of that expanded sequence, and the draft trains on it
unchanged; the expanded pads are never supervised (loss_mask 0).

Supported families: Qwen-VL (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl` model types): the pad is
`config.image_token_id`, the processor gives `pixel_values` and `image_grid_thw`, and the model's own
forward computes the 3-D rotary positions from them. Other VLMs are refused with a message naming their
model type (Kimi-K2.5 is served by SGLang; its hf path is not built).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from torchspec.config.target import TargetLoadError
from torchspec.data.errors import DataError
from torchspec.data.multimodal import load_image

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def is_vlm_config(config) -> bool:
    """Whether a target config (transformers config or config.json dict) describes a vision-language model."""
    if isinstance(config, dict):
        return config.get("vision_config") is not None
    return getattr(config, "vision_config", None) is not None


def is_vlm_dir(path) -> bool:
    f = Path(str(path)) / "config.json"
    if not f.is_file():
        return False
    try:
        return is_vlm_config(json.loads(f.read_text()))
    except (OSError, ValueError):
        return False


def load_vlm(path, dtype: torch.dtype, trust_remote_code: bool = False, **placement):
    """The target as an image-text-to-text model (transformers' class for Qwen-VL and kin)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                       **placement)


@dataclass
class VisionSample:
    """A sample with its image placeholders expanded, and the pixel inputs of its images (None for text)."""

    sample_id: str
    input_ids: torch.Tensor        # expanded
    loss_mask: torch.Tensor        # expanded; 0 on every image token
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    images: tuple[str, ...] = ()   # the images kept (those whose placeholder max_seq_length left), in order


class QwenVLExpansion:
    """Qwen-VL family's expansion rule alone (the target's config and image processor; no model): what an
    engine that runs the target elsewhere (sgl) needs to write records of the expanded sequence."""

    def __init__(self, config, image_processor, engine: str = "hf"):
        model_type = getattr(config, "model_type", "")
        if model_type not in QWEN_VL_TYPES:
            raise TargetLoadError(f"model.target_model_path: the vision-language model type {model_type!r} is not "
                                  f"supported by the {engine} engine (supported: {', '.join(QWEN_VL_TYPES)})")
        self.pad_id = int(config.image_token_id)
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self.processor = image_processor

    def expand(self, sample) -> VisionSample:
        ids = sample.input_ids.to(torch.long)
        mask = sample.loss_mask.to(torch.uint8)
        images = tuple(getattr(sample, "images", ()) or ())
        at = (ids == self.pad_id).nonzero().flatten()
        if len(at) > len(images):
            raise DataError(f"sample {sample.sample_id}: {len(at)} image placeholder token(s) for {len(images)} "
                            "image(s); does the text itself contain the image-pad token?")
        images = images[:len(at)]   # max_seq_length cut the rest off together with their placeholders
        if not images:
            return VisionSample(sample.sample_id, ids, mask, None, None, ())
        pixels = self.processor(images=[load_image(r, f"sample {sample.sample_id}") for r in images],
                                return_tensors="pt")
        grid = pixels["image_grid_thw"].to(torch.long)
        repeats = torch.ones_like(ids)
        repeats[at] = grid.prod(-1) // (self.merge ** 2)
        ids = ids.repeat_interleave(repeats)
        mask = mask.repeat_interleave(repeats)
        mask[ids == self.pad_id] = 0
        return VisionSample(sample.sample_id, ids, mask, pixels["pixel_values"], grid, images)


class QwenVLInputs(QwenVLExpansion):
    """Qwen-VL family in the hf engine: the expansion rule and the forward's extra inputs."""

    def __init__(self, model, image_processor):
        super().__init__(model.config, image_processor)
        self.runner = model.model   # vision tower + language model; its last_hidden_state is post-norm
        # transformers >= 5 wants the tokens' modality (1 = image) to build the 3-D rotary positions
        import inspect

        self.wants_token_types = "mm_token_type_ids" in inspect.signature(self.runner.forward).parameters

    def forward_inputs(self, chunk: Sequence[VisionSample], input_ids: torch.Tensor, device, dtype) -> dict:
        """The forward's image inputs for the chunk (its padded `input_ids` [B, T]): pixel_values and
        image_grid_thw of its images in sequence order, and the token modalities (empty for text only)."""
        with_images = [s for s in chunk if s.pixel_values is not None]
        if not with_images:
            return {}
        out = {"pixel_values": torch.cat([s.pixel_values for s in with_images]).to(device, dtype),
               "image_grid_thw": torch.cat([s.image_grid_thw for s in with_images]).to(device)}
        if self.wants_token_types:
            out["mm_token_type_ids"] = self.token_types(input_ids).to(device)
        return out

    def reset_positions(self) -> None:
        """Forget the rotary offsets the model kept from its last image prefill (transformers' Qwen-VL models
        keep them for the cached decode steps that follow; a new prompt must not inherit them)."""
        if hasattr(self.runner, "rope_deltas"):
            self.runner.rope_deltas = None

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 where a token is an image token, 0 elsewhere (padding included)."""
        return (input_ids == self.pad_id).to(torch.int32)


def _image_processor(target_path, trust_remote_code: bool):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(target_path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise TargetLoadError(f"model.target_model_path={str(target_path)!r} is a vision-language model, but its "
                              f"image processor could not be loaded: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


def vision_inputs(model, target_path, trust_remote_code: bool = False) -> QwenVLInputs | None:
    """The multimodal side of a loaded target (None for a text-only target)."""
    if not is_vlm_config(model.config):
        return None
    return QwenVLInputs(model, _image_processor(target_path, trust_remote_code))


def vision_expansion(target_config, target_path, trust_remote_code: bool = False,
                     engine: str = "sgl") -> QwenVLExpansion | None:
    """The expansion rule of a target known by its config alone (None for a text-only target)."""
    if not is_vlm_config(target_config):
        return None
    return QwenVLExpansion(target_config, _image_processor(target_path, trust_remote_code), engine)


def image_request_uri(ref: str) -> str:
    """An image reference (data/multimodal.py: an absolute path or a data: URI) as a serving engine's request
    takes it: data: URIs as they are, paths as file:// URIs (percent-encoded, so any file name survives; SGLang
    reads a bare path only when it ends in a known image extension and tries anything else as base64)."""
    return ref if ref.startswith("data:") else Path(ref).as_uri()


def expand_for_engine(samples: Sequence, expansion: QwenVLExpansion | None, target_config):
    """(the samples as their records will be: image placeholders expanded; per sample the image URIs its
    request sends, [] for a text sample, or None when no sample has images). A text target (no expansion)
    refuses image samples. For an engine that runs the target elsewhere (sgl) and checks what came back."""
    if expansion is None:
        refuse_images(samples, target_config)
        return list(samples), None
    expanded = [expansion.expand(s) for s in samples]
    if not any(e.images for e in expanded):
        return expanded, None
    return expanded, [[image_request_uri(r) for r in e.images] for e in expanded]


def refuse_images_in(samples: Sequence, engine: str) -> None:
    """An engine that does not send images yet (sgl, vllm) refuses image samples instead of running their
    unexpanded text (which would train the draft on sequences the target never serves)."""
    for s in samples:
        if getattr(s, "images", ()):
            raise DataError(f"sample {s.sample_id} has {len(s.images)} image(s); the {engine} engine does not send "
                            "images yet: use inference.inference_engine_type: hf for image conversations")


def refuse_images(samples: Sequence, model) -> None:
    """A text-only target (a loaded model, or its config) cannot run a sample that has images: one DataError."""
    config = getattr(model, "config", model)
    for s in samples:
        if getattr(s, "images", ()):
            name = getattr(config, "model_type", None) or type(model).__name__
            raise DataError(f"sample {s.sample_id} has {len(s.images)} image(s), but the target ({name}) is not a "
                            "vision-language model; use a VLM target or text-only data")

