"""`run_training(cfg)`: the whole pipeline of one training run, on one machine.

    dataset (torchspec.data) -> draft vocabulary -> target head + draft (torchspec.models)
    -> store (torchspec.transfer) -> engines placed by the local launcher + controller
    -> Trainer.train_step over micro-batches, for num_epochs / num_train_steps
    -> checkpoints every save_interval steps (and per epoch), exported draft, metrics.jsonl

Resume: `training.load_path` restores the draft, optimizer, scheduler, RNG, step and the data
position (no sample skipped or repeated); with `training.continual_training` only the weights.
Ctrl-C (or SIGTERM): the engines stop, a checkpoint is written, the store is emptied.
A trainer rank or engine that dies: `WorkerFailure` naming it and the latest checkpoint, after the same
clean-up (no checkpoint is written: the last completed step's is on disk if save_interval wrote it).
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torchspec.pipeline.build import ModelSpec, draft_config_for
from torchspec.pipeline.controller import Controller
from torchspec.pipeline.failures import WorkerFailure
from torchspec.pipeline.launcher import plan_placement, start_engines, start_trainer_ranks

log = logging.getLogger("torchspec.pipeline")
RATE_WINDOW = 20   # optimizer steps over which metrics' samples/s rates are measured


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
    trained_tokens: int = 0
    generated_tokens: int = 0               # tokens whose hidden states the engines put in the store
    store_put_bytes: int = 0
    store_put_s: float = 0.0                # time engines spent writing records (device -> shared memory)
    elapsed_s: float = 0.0


def _aux_layers(cfg, text_config) -> list[int]:
    from torchspec.inference.hf import resolve_aux_layers

    return resolve_aux_layers(cfg.inference.aux_hidden_states_layers, text_config.num_hidden_layers)


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM become KeyboardInterrupt: at once, or, inside `critical()` (one
    training step across all ranks), when the section ends, so ranks never part mid-collective."""

    def __init__(self):
        self.pending = False
        self.depth = 0

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        try:
            old = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:   # not the main thread: leave signals alone
            yield self
            return
        try:
            yield self
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    @contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt


def _evaluator(cfg, aux_layers, tokenizer, engines, store, world: int, progress: bool):
    """Eval during training (dataset.eval_data_path), its held-out hidden states made by the run's engines."""
    from torchspec.eval.during_training import TrainingEvaluator

    if not cfg.dataset.eval_data_path:
        return None
    if world > 1 and cfg.training.parallel_mode == "fsdp":
        log.warning("dataset.eval_data_path: eval during training runs on trainer rank 0 alone, which FSDP "
                    "cannot do; skipped (use training.parallel_mode=ddp to evaluate)")
        return None
    evaluator = TrainingEvaluator.from_config(cfg, aux_layers, tokenizer, progress=progress)
    evaluator.prepare(engines, store)
    return evaluator


def _write_report(out_dir: Path) -> None:
    from torchspec.eval.report import write_report

    try:
        path = write_report(out_dir)
    except Exception as e:   # a finished run keeps its checkpoints and metrics even if plotting fails
        log.warning("training report not written: %s: %s", type(e).__name__, e)
    else:
        log.info("training report: %s", path)


def _inference_capacity(controller, engines) -> float | None:
    """Samples/s the engines sustain when never paused: generated / (busy seconds per engine)."""
    busy = getattr(engines, "busy_s", 0.0)
    return controller.samples_generated * engines.num_workers / busy if busy else None


def _put_bandwidth(store) -> float:
    nbytes, seconds = store.put_stats()
    return nbytes / seconds / 1e9 if seconds else 0.0


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
    from torchspec.training.checkpoint import CheckpointManager
    from torchspec.training.metrics import MetricsLogger
    from torchspec.training.optim import plan_steps
    from torchspec.transfer.factory import build_store

    tr, inf = cfg.training, cfg.inference
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(output_dir=out_dir)

    # -- data, vocabulary, placement, trainer ranks --------------------------------------------------
    tokenizer = load_tokenizer(cfg)
    samples = dataset_from_config(cfg, tokenizer, "train", progress=progress)
    target_config = AutoConfig.from_pretrained(cfg.model.target_model_path,
                                               trust_remote_code=cfg.model.trust_remote_code)
    text_config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    draft_config = draft_config_for(cfg, target_config)
    aux_layers = _aux_layers(cfg, text_config)
    d2t, t2d = vocab_map_for(samples, draft_config.vocab_size, draft_config.draft_vocab_size)

    placement = plan_placement(cfg)   # local or Ray (inference.launcher)
    log.info("placement: %s", placement.describe())
    world = len(placement.trainer_devices)
    plan = plan_steps(tr, len(samples), world)
    spec = ModelSpec(draft_config, d2t, t2d, plan.lr_total_steps, tr.load_path, bool(tr.continual_training))
    store = build_store(cfg)   # inference.store: local (shared memory) or mooncake
    result.store_root = getattr(store, "root", None)   # the local store's directory; mooncake has none

    ckpts = CheckpointManager(out_dir, tr.max_checkpoints)
    export_meta = {"aux_layer_ids": aux_layers, "target_num_hidden_layers": text_config.num_hidden_layers}

    def export_fn(d, path):
        from torchspec.export import export_draft

        export_draft(d, path, target_config, aux_layers)

    ranks = trainer = engines = controller = evaluator = None
    last_eval = None
    from torchspec.config.render import redacted_dict

    logger = MetricsLogger(out_dir, cfg.logging, total_steps=plan.num_train_steps, progress=progress,
                           run_config=redacted_dict(cfg))  # W&B / TensorBoard get the config, secrets out
    window: list[dict] = []   # micro-batch metrics of the current accumulation window
    t_start = time.monotonic()
    train_time = 0.0
    trained_samples = 0
    recent = deque(maxlen=RATE_WINDOW + 1)   # (time, trained samples, train seconds) at recent steps
    last_saved = None

    def save(step: int):
        nonlocal last_saved
        if last_saved == step:
            return
        path = ckpts.save(step, ranks.state_dict(), controller.data_state(), trainer.draft, draft_config,
                          export_fn=export_fn, export_meta=export_meta)
        result.checkpoints.append(path)
        last_saved = step
        if evaluator is not None:
            evaluator.note_checkpoint(step, path)

    def evaluate(step: int):
        nonlocal last_eval
        if evaluator is not None and last_eval != step:
            logger.log_eval(step, evaluator.evaluate(trainer, step))
            last_eval = step

    def after_step(m: dict, epoch_ended: bool, call_hook: bool = True):
        step = trainer.global_step
        clock = trainer.clock
        if evaluator is not None and evaluator.due(step):
            with clock.phase("eval"):
                evaluate(step)
        if step % tr.save_interval == 0 or (epoch_ended and tr.save_per_epoch):
            with clock.phase("checkpoint"):
                save(step)
        elapsed = time.monotonic() - t_start
        record = {k: v for k, v in m.items() if k in ("lr", "grad_norm")}
        for key in sorted({k for w in window for k in w if k == "loss" or k.startswith(("acc_", "loss_"))}):
            record[key] = _mean(window, key)
        record.update(epoch=controller.epoch - (1 if epoch_ended else 0), pool_size=controller.pool_size(),
                      inference_samples_per_s=_inference_capacity(controller, engines),
                      data_wait_frac=controller.data_wait_s / elapsed, data_wait_s=controller.data_wait_s,
                      elapsed_s=elapsed, store_bytes=store.bytes_used(),
                      store_put_gb_per_s=_put_bandwidth(store))
        # rates over the last RATE_WINDOW steps (start-up and compilation drop out of them)
        recent.append((time.monotonic(), trained_samples, train_time))
        (t0, n0, busy0), (t1, n1, busy1) = recent[0], recent[-1]
        if len(recent) == 1:
            t0, n0, busy0 = t_start, 0, 0.0
        record["samples_per_s"] = (n1 - n0) / max(t1 - t0, 1e-9)
        record["training_samples_per_s"] = (n1 - n0) / max(busy1 - busy0, 1e-9)
        window.clear()
        record.update(clock.take())   # time/<phase>_s of this step (eval and checkpoint included)
        with clock.phase("log"):      # counted in the next step's record
            logger.log(step, record)
        result.losses.append((step, record["loss"]))
        result.global_step = step
        if on_step is not None and call_hook:
            on_step(step, record)

    interrupts = _Interrupts()
    try:
        with interrupts.installed():
            try:
                ranks = start_trainer_ranks(cfg, spec, store, placement, out_dir)
                trainer = ranks.trainer
                data_state = None
                if ranks.checkpoint is not None:
                    data_state = None if tr.continual_training else ranks.checkpoint.data_state
                    log.info("%s %s (step %d)", "weights from" if tr.continual_training else "resumed from",
                             ranks.checkpoint.path, ranks.checkpoint.step)
                result.start_step = result.global_step = trainer.global_step
                engines = start_engines(cfg, store, placement, engine_factory)
                evaluator = _evaluator(cfg, aux_layers, tokenizer, engines, store, world, progress)
                if evaluator is not None and trainer.global_step == 0:
                    evaluate(0)   # the untrained draft: the baseline of the eval curves
                controller = Controller(
                    samples, engines, store, micro_batch_size=tr.micro_batch_size, num_ranks=world,
                    num_epochs=plan.num_epochs, max_sample_pool_size=inf.max_sample_pool_size,
                    inference_batch_size=inf.inference_batch_size,
                    inference_buffer_threshold=inf.inference_buffer_threshold, seed=int(tr.seed),
                    data_state=data_state)
                trainer.clock.take()   # phases are counted from here (start-up is not a step)
                while trainer.global_step < plan.num_train_steps:
                    t0, busy0 = time.perf_counter(), getattr(engines, "busy_s", 0.0)
                    batches = controller.next_micro_batches()
                    waited = time.perf_counter() - t0
                    if placement.colocate:   # the inline engine ran the target inside that wait
                        target_s = getattr(engines, "busy_s", 0.0) - busy0
                        trainer.clock.add("target_forward", target_s)
                        waited -= target_s
                    trainer.clock.add("data_wait", waited)
                    if batches is None:
                        break
                    with interrupts.critical():
                        t0 = time.monotonic()
                        m = ranks.train_step(batches)
                        train_time += time.monotonic() - t0
                        trained_samples += sum(len(b) for b in batches)
                        result.trained_tokens += sum(s.length for b in batches for s in b)
                        window.append(m)
                        epoch = controller.epoch
                        epoch_ended = controller.mark_trained(batches)
                        result.trained.extend((trainer.global_step + (0 if m["stepped"] else 1), epoch,
                                               s.sample_id) for b in batches for s in b)
                        if not m["stepped"] and epoch_ended:   # an epoch's last, partial accumulation window
                            m = ranks.finish_accumulation()
                            m["stepped"] = True
                        if m["stepped"]:
                            after_step(m, epoch_ended)
            except WorkerFailure as e:   # a rank or engine died: name the checkpoint to resume from
                latest = ckpts.latest()
                resume = (f"; the latest checkpoint is {latest} (resume: training.load_path={out_dir})"
                          if latest is not None else "; no checkpoint had been written")
                raise WorkerFailure(f"{str(e).rstrip('.')}{resume}") from None
            except KeyboardInterrupt:
                result.interrupted = True
                log.warning("interrupted: stopping engines, writing a checkpoint, emptying the store")
                if controller is not None:
                    with interrupts.critical():
                        if trainer.micro_step:   # close the open accumulation window so its samples count
                            after_step(ranks.finish_accumulation(), False, call_hook=False)
                        controller.shutdown()
                        save(trainer.global_step)
            else:
                if controller is not None:
                    controller.shutdown()
                    evaluate(trainer.global_step)
                    save(trainer.global_step)
                    result.export_dir = ckpts.export_final(trainer.draft, export_fn)
                    _write_report(out_dir)
    finally:
        if controller is not None:
            controller.shutdown()
            result.pool_sizes = list(controller.pool_stats.sizes)
            result.generated_tokens = controller.tokens_generated
            result.data_wait_frac = controller.data_wait_s / max(time.monotonic() - t_start, 1e-9)
        elif engines is not None:
            engines.close()
        if ranks is not None:
            ranks.close()
        result.store_put_bytes, result.store_put_s = store.put_stats()
        store.clear()
        result.store_bytes_end = store.bytes_used()
        store.close()
        logger.close()
        result.elapsed_s = time.monotonic() - t_start
        result.samples_per_s = trained_samples / max(result.elapsed_s, 1e-9)
    return result
