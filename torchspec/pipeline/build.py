"""Build one trainer rank's models and Trainer (the same on every rank, in any process)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelSpec:
    """What every trainer rank needs to build an identical draft + Trainer (picklable)."""

    draft_config: object          # torchspec.models.draft.DraftConfig
    d2t: torch.Tensor
    t2d: torch.Tensor
    lr_total_steps: int
    load_path: str | None = None  # checkpoint to restore (training.load_path)
    weights_only: bool = False    # training.continual_training


def draft_config_for(cfg, target_config):
    """The draft's architecture: model.draft_model_config, else derived from the target; its vocabulary
    size by `torchspec.config.target.resolve_draft_vocab_size` (training.draft_vocab_size, else the draft
    config's, else the full vocabulary)."""
    from torchspec.config.target import resolve_draft_vocab_size
    from torchspec.models.draft import DraftConfig

    from torchspec.config.errors import ConfigError
    from torchspec.config.target import text_config_of

    dvs = cfg.training.draft_vocab_size
    if cfg.model.draft_model_config:
        dc = DraftConfig.from_json(cfg.model.draft_model_config)
        text = text_config_of(target_config)
        for key, target_key in (("target_hidden_size", "hidden_size"), ("vocab_size", "vocab_size")):
            want = text.get(target_key) if isinstance(text, dict) else getattr(text, target_key, None)
            if want is not None and getattr(dc, key) != int(want):   # else: a shape error at the first step
                raise ConfigError(f"model.draft_model_config={cfg.model.draft_model_config}: {key}="
                                  f"{getattr(dc, key)}, but the target ({cfg.model.target_model_path}) has "
                                  f"{target_key}={want}; set {key} to {want}")
        return dc.replace(draft_vocab_size=resolve_draft_vocab_size(dvs, dc.draft_vocab_size, dc.vocab_size))
    return DraftConfig.from_target(target_config, draft_vocab_size=dvs)


def build_trainer(cfg, spec: ModelSpec, device, dist=None):
    """(Trainer, loaded checkpoint or None): target head + seeded draft, restored from spec.load_path."""
    from torchspec.models.draft import build_draft
    from torchspec.models.target_head import TargetHead
    from torchspec.training.checkpoint import load_checkpoint
    from torchspec.training.trainer import Trainer, seed_everything

    target_head = TargetHead.from_pretrained(cfg.model.target_model_path, cfg.model.lm_head_key,
                                             cfg.model.embedding_key)
    seed_everything(int(cfg.training.seed))
    draft = build_draft(spec.draft_config, target_head, {"d2t": spec.d2t, "t2d": spec.t2d})
    trainer = Trainer(cfg, draft, target_head, device, dist=dist, total_steps=spec.lr_total_steps)
    ckpt = None
    if spec.load_path:
        ckpt = load_checkpoint(spec.load_path, weights_only=spec.weights_only)
        trainer.load_state_dict(ckpt.trainer_state, weights_only=spec.weights_only)
    return trainer, ckpt
