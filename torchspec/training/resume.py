"""What a resumed run may change: the checkpoint's saved config against the new one, checked before any
rank, engine or store starts.

Refused (one ConfigError line naming the checkpoint and the keys), because the checkpoint cannot continue:
  - the draft's architecture (draft_config.json: hidden sizes, heads, vocab_size, draft_vocab_size,
    target_hidden_size, ...), from model.draft_model_config / training.draft_vocab_size / the target;
  - the target layers the draft reads (inference.aux_hidden_states_layers, as resolved);
  - the data (resume only): every sample id the checkpoint trained in its epoch must be in the new
    dataset (ids hash the source file's content, so another or an edited file fails here).
Honoured with a warning (RESUME_WARNINGS says what each does); the lr schedule (num_train_steps,
num_epochs, learning_rate, min_lr, ...) is rebuilt from the new config at the resumed step by
`Trainer.load_state_dict`. Anything else (logging, eval, save_interval, inference, ...) just takes the new value.
Continual training (weights only) checks the architecture alone: everything else starts afresh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torchspec.config.errors import ConfigError
from torchspec.training.checkpoint import (DATA_STATE_FILE, DRAFT_CONFIG_FILE, EXPORT_META_FILE, RUN_CONFIG_FILE,
                                           resolve_checkpoint)

log = logging.getLogger("torchspec.training")

_SCHEDULE = "honoured: the lr schedule is rebuilt from this config at the resumed step"
RESUME_WARNINGS = {
    "training.num_train_steps": _SCHEDULE,
    "training.num_epochs": _SCHEDULE,
    "training.learning_rate": _SCHEDULE,
    "training.min_lr": _SCHEDULE,
    "training.warmup_ratio": _SCHEDULE,
    "training.lr_decay_style": _SCHEDULE,
    "training.lr_total_steps": _SCHEDULE,
    "training.weight_decay": "honoured from the resumed step (AdamW's moments are kept)",
    "training.max_grad_norm": "honoured from the resumed step",
    "training.ttt_length": "honoured: the loss unrolls the new number of steps (the weights fit either way)",
    "training.loss_mask_alignment": "honoured: rows are supervised by the new rule from the resumed step",
    "training.micro_batch_size": ("honoured: the rest of the epoch comes in the same sample order, grouped "
                                  "into batches of the new size (steps per epoch change)"),
    "training.draft_accumulation_steps": "honoured: samples per optimizer step change (steps per epoch change)",
    "training.training_num_nodes": "honoured: samples per optimizer step change with the trainer count",
    "training.training_num_gpus_per_node": "honoured: samples per optimizer step change with the trainer count",
    "training.seed": ("honoured: the rest of the epoch is drawn in another order (no sample skipped or "
                      "repeated)"),
    "training.max_seq_length": "honoured: samples are cut at the new length from the resumed step",
    "dataset.train_data_path": "honoured: the same samples (ids match) read from the new path",
    "dataset.chat_template": "honoured: the samples are tokenized with the new template",
    "dataset.last_turn_loss_only": "honoured: supervision follows the new setting",
    "model.target_model_path": ("honoured: hidden states come from the new path's target (its shapes fit "
                                "the draft; make sure it is the same model)"),
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "dataset", "training", "inference", "logging") and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e}); resume from another checkpoint") from None


def _changes(old: dict, new: dict, keys) -> list[str]:
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _other_data(data_state: dict, sample_ids) -> str | None:
    """Why the checkpoint's data position cannot be of this dataset, or None."""
    from torchspec.training.data_state import ids_digest

    if "dataset_digest" in data_state:   # data_state.py's format
        n = int(data_state.get("num_samples", -1))
        if n != len(sample_ids):
            return f"it was trained on {n} samples, this data has {len(sample_ids)}"
        if data_state["dataset_digest"] != ids_digest(sample_ids):
            return f"the same number of samples ({n}), other sample ids"
        return None
    trained = set(data_state.get("trained_ids") or [])   # the format before it: the ids of the epoch
    missing = trained - set(sample_ids)
    if missing:
        return (f"{len(missing)} of the {len(trained)} samples it trained in epoch {data_state.get('epoch')} "
                "are not in it")
    return None


def check_resume(load_path, new_run_config: dict, draft_config: dict, aux_layers, sample_ids,
                 weights_only: bool = False) -> Path:
    """Compare the checkpoint `load_path` resolves to with the new run; raise ConfigError for what it
    cannot continue, log a warning for each change it honours. Returns the checkpoint's directory.

    new_run_config: the new config as `redacted_dict(cfg)`; draft_config: the new draft's config dict;
    aux_layers: the resolved aux layer ids; sample_ids: the new training dataset's sample ids."""
    path = resolve_checkpoint(load_path)
    draft_config, new_run_config = json.loads(json.dumps(draft_config)), json.loads(json.dumps(new_run_config))
    where = f"training.load_path={load_path}"
    saved_draft = _read_json(path / DRAFT_CONFIG_FILE) or {}
    arch = _changes(saved_draft, draft_config, sorted(set(saved_draft) | set(draft_config)))
    if arch:
        raise ConfigError(f"{where}: this config's draft differs from the checkpoint's ({'; '.join(arch)}); a "
                          f"checkpoint continues only with its own architecture: set these back "
                          f"(model.draft_model_config, training.draft_vocab_size) or train from scratch in another "
                          f"output_dir")
    meta = _read_json(path / EXPORT_META_FILE) or {}
    if meta.get("aux_layer_ids") is not None and list(meta["aux_layer_ids"]) != list(aux_layers):
        raise ConfigError(f"{where}: the draft was trained on target layers {meta['aux_layer_ids']}, this config "
                          f"gives {list(aux_layers)} (inference.aux_hidden_states_layers); set them back")
    if weights_only:
        return path

    data_state = _read_json(path / DATA_STATE_FILE) or {}
    saved_run = _flat(_read_json(path / RUN_CONFIG_FILE) or {})
    new_run = _flat(new_run_config)
    why = _other_data(data_state, sample_ids)
    if why:
        old_data = saved_run.get("dataset.train_data_path", "its dataset")
        raise ConfigError(f"{where}: dataset.train_data_path={new_run.get('dataset.train_data_path')} is not the "
                          f"data this checkpoint was trained on ({why}; it was trained on "
                          f"{old_data}): resume with the same data, or start from its weights with "
                          "training.continual_training=true")
    if saved_run:
        for key, what in RESUME_WARNINGS.items():
            if key in saved_run and saved_run[key] != new_run.get(key):
                log.warning("resume from %s: %s %r -> %r: %s", path, key, saved_run[key], new_run.get(key), what)
    else:
        log.warning("resume from %s: the checkpoint has no %s (written by an older version): only the draft's "
                    "architecture and the data were compared", path, RUN_CONFIG_FILE)
    return path
