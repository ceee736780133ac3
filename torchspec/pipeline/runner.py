"""`run_training(cfg)`: the whole pipeline of one training run, on one machine.

    dataset (torchspec.data) -> draft vocabulary -> target head + draft (torchspec.models)
    -> store (torchspec.transfer) -> engines placed by the local launcher + controller
    -> Trainer.train_step over micro-batches, for num_epochs / num_train_steps
    -> checkpoints every save_interval steps (and per epoch), exported draft, metrics.jsonl

Resume: `training.load_path` restores the draft, optimizer, scheduler, RNG, step and the data
position (no sample skipped or repeated); with `training.continual_training` only the weights.
Ctrl-C (or SIGTERM): the engines stop, a checkpoint is written, the store is emptied.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from torchspec.pipeline.batch import collate
from torchspec.pipeline.controller import Controller
from torchspec.pipeline.launcher_local import plan_local, start_engines

log = logging.getLogger("torchspec.pipeline")


@dataclass
class RunResult:
    output_dir: Path
    global_step: int = 0
    start_step: int = 0                     # the step this run resumed from
    losses: list[tuple[int, float]] = field(default_factory=list)     # (step, mean micro-batch loss)
    trained: list[tuple[int, int, str]] = field(default_factory=list)  # (step after training it, epoch, sample id)
    pool_sizes: list[int] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    export_dir: Path | None = None
    interrupted: bool = False
    store_bytes_end: int = -1
    store_root: Path | None = None          # the local store's shared-memory directory (removed at the end)
    samples_per_s: float = 0.0
    data_wait_frac: float = 0.0
    store_put_bytes: int = 0
    elapsed_s: float = 0.0


def _draft_config(cfg, target_config):
    from torchspec.models.draft import DraftConfig

    dvs = cfg.training.draft_vocab_size
    if cfg.model.draft_model_config:
        dc = DraftConfig.from_json(cfg.model.draft_model_config)
        return dc.replace(draft_vocab_size=dvs) if dvs is not None else dc
    return DraftConfig.from_target(target_config, draft_vocab_size=dvs)


def _aux_layers(cfg, text_config) -> list[int]:
    from torchspec.inference.hf import resolve_aux_layers

    return resolve_aux_layers(cfg.inference.aux_hidden_states_layers, text_config.num_hidden_layers)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (schedulers, `kill`) takes the same clean path as Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _mean(values: list[dict], key: str) -> float | None:
    vals = [m[key] for m in values if key in m]
    return sum(vals) / len(vals) if vals else None


def run_training(cfg, *, engine_factory: Callable | None = None, on_step: Callable | None = None,
                 progress: bool = True) -> RunResult:
    """Train a draft as `cfg` says. engine_factory(store, device) -> Engine overrides the engine (tests);
    on_step(step, metrics) is called after every optimizer step (raising KeyboardInterrupt there acts
    as Ctrl-C)."""
    from transformers import AutoConfig

    from torchspec.data.dataset import from_config as dataset_from_config, load_tokenizer, vocab_map_for
    from torchspec.models.draft import build_draft
    from torchspec.models.target_head import TargetHead
    from torchspec.training.checkpoint import CheckpointManager, load_checkpoint
    from torchspec.training.metrics import MetricsLogger
    from torchspec.training.optim import plan_steps
    from torchspec.training.trainer import Trainer, seed_everything
    from torchspec.transfer.local import LocalStore

    tr, inf = cfg.training, cfg.inference
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(output_dir=out_dir)

    # -- data, vocabulary, models -------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg)
    samples = dataset_from_config(cfg, tokenizer, "train", progress=progress)
    target_config = AutoConfig.from_pretrained(cfg.model.target_model_path,
                                               trust_remote_code=cfg.model.trust_remote_code)
    text_config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    draft_config = _draft_config(cfg, target_config)
    aux_layers = _aux_layers(cfg, text_config)
    d2t, t2d = vocab_map_for(samples, draft_config.vocab_size, draft_config.draft_vocab_size)
    target_head = TargetHead.from_pretrained(cfg.model.target_model_path, cfg.model.lm_head_key,
                                             cfg.model.embedding_key)
    seed_everything(int(tr.seed))
    draft = build_draft(draft_config, target_head, {"d2t": d2t, "t2d": t2d})

    placement = plan_local(cfg)
    log.info("placement: %s", placement.describe())
    world = len(placement.trainer_devices)
    if world != 1:
        raise NotImplementedError(f"training.training_num_gpus_per_node={world}: the local runner drives one "
                                  "trainer rank for now")
    device = torch.device(placement.trainer_devices[0])
    plan = plan_steps(tr, len(samples), world)
    trainer = Trainer(cfg, draft, target_head, device, total_steps=plan.lr_total_steps)

    data_state = None
    if tr.load_path:
        ckpt = load_checkpoint(tr.load_path, weights_only=bool(tr.continual_training))
        trainer.load_state_dict(ckpt.trainer_state, weights_only=bool(tr.continual_training))
        data_state = None if tr.continual_training else ckpt.data_state
        log.info("%s %s (step %d)", "weights from" if tr.continual_training else "resumed from", ckpt.path, ckpt.step)
    result.start_step = result.global_step = trainer.global_step

    ckpts = CheckpointManager(out_dir, tr.max_checkpoints)
    export_meta = {"aux_layer_ids": aux_layers, "target_num_hidden_layers": text_config.num_hidden_layers}

    def export_fn(d, path):
        from torchspec.export import export_draft

        export_draft(d, path, target_config, aux_layers)

    # -- store, engines, controller ------------------------------------------------------------------
    store = LocalStore(capacity_bytes=inf.store_capacity)
    result.store_root = store.root
    engines = controller = None
    logger = MetricsLogger(out_dir, cfg.logging, total_steps=plan.num_train_steps, progress=progress)
    window: list[dict] = []   # micro-batch metrics of the current accumulation window
    t_start = time.monotonic()
    train_time = 0.0
    trained_samples = 0
    last_saved = None

    def save(step: int):
        nonlocal last_saved
        if last_saved == step:
            return
        path = ckpts.save(step, trainer.state_dict(), controller.data_state(), trainer.draft, draft_config,
                          export_fn=export_fn, export_meta=export_meta)
        result.checkpoints.append(path)
        last_saved = step

    def after_step(m: dict, epoch_ended: bool, call_hook: bool = True):
        step = trainer.global_step
        elapsed = time.monotonic() - t_start
        record = {k: v for k, v in m.items() if k in ("lr", "grad_norm")}
        for key in sorted({k for w in window for k in w if k == "loss" or k.startswith(("acc_", "loss_"))}):
            record[key] = _mean(window, key)
        record.update(epoch=controller.epoch - (1 if epoch_ended else 0), pool_size=controller.pool_size(),
                      samples_per_s=trained_samples / elapsed,
                      inference_samples_per_s=controller.samples_generated / elapsed,
                      training_samples_per_s=trained_samples / max(train_time, 1e-9),
                      data_wait_frac=controller.data_wait_s / elapsed, store_bytes=store.bytes_used())
        window.clear()
        logger.log(step, record)
        result.losses.append((step, record["loss"]))
        result.global_step = step
        if step % tr.save_interval == 0 or (epoch_ended and tr.save_per_epoch):
            save(step)
        if on_step is not None and call_hook:
            on_step(step, record)

    try:
        with _sigterm_as_interrupt():
            try:
                engines = start_engines(cfg, store, placement, engine_factory)
                controller = Controller(
                    samples, engines, store, micro_batch_size=tr.micro_batch_size, num_ranks=world,
                    num_epochs=plan.num_epochs, max_sample_pool_size=inf.max_sample_pool_size,
                    inference_batch_size=inf.inference_batch_size,
                    inference_buffer_threshold=inf.inference_buffer_threshold, seed=int(tr.seed),
                    data_state=data_state)
                while trainer.global_step < plan.num_train_steps:
                    batches = controller.next_micro_batches()
                    if batches is None:
                        break
                    mb = batches[0]
                    batch = collate([store.get(s.key) for s in mb])
                    t0 = time.monotonic()
                    m = trainer.train_step(batch)
                    train_time += time.monotonic() - t0
                    trained_samples += len(mb)
                    window.append(m)
                    epoch = controller.epoch
                    epoch_ended = controller.mark_trained(batches)
                    result.trained.extend((trainer.global_step + (0 if m["stepped"] else 1), epoch, s.sample_id)
                                          for s in mb)
                    if not m["stepped"] and epoch_ended:   # an epoch's last, partial accumulation window
                        m = trainer.finish_accumulation()
                        m["stepped"] = True
                    if m["stepped"]:
                        after_step(m, epoch_ended)
            except KeyboardInterrupt:
                result.interrupted = True
                log.warning("interrupted: stopping engines, writing a checkpoint, emptying the store")
                if controller is not None:
                    if trainer.micro_step:   # close the open accumulation window so its samples count
                        after_step(trainer.finish_accumulation(), False, call_hook=False)
                    controller.shutdown()
                    save(trainer.global_step)
            else:
                if controller is not None:
                    controller.shutdown()
                    save(trainer.global_step)
                    result.export_dir = ckpts.export_final(trainer.draft, export_fn)
    finally:
        if controller is not None:
            controller.shutdown()
            result.pool_sizes = list(controller.pool_stats.sizes)
            result.data_wait_frac = controller.data_wait_s / max(time.monotonic() - t_start, 1e-9)
        elif engines is not None:
            engines.close()
        store.clear()
        result.store_bytes_end = store.bytes_used()
        store.close()
        logger.close()
        result.elapsed_s = time.monotonic() - t_start
        result.samples_per_s = trained_samples / max(result.elapsed_s, 1e-9)
    return result
