"""`run_training(cfg)`: the whole pipeline of one training run, on one machine.

    dataset (torchspec.data) -> draft vocabulary -> target head + draft (torchspec.models)
    -> store (torchspec.transfer) -> engines placed by the local launcher + controller
    -> Trainer.train_step over micro-batches, for num_epochs / num_train_steps
    -> checkpoints every save_interval steps (and per epoch), exported draft, metrics.jsonl

Resume: `training.load_path` restores the draft, optimizer, scheduler, RNG, step and the data
position (no sample skipped or repeated); with `training.continual_training` only the weights.
Ctrl-C (or SIGTERM): the engines stop, a checkpoint is written, the store is emptied.
A trainer rank or engine that dies, or a store whose service is lost (`StoreUnavailable`: the Mooncake
master): `WorkerFailure` naming it and the latest checkpoint, after the same clean-up (no checkpoint is
written: the last completed step's is on disk if save_interval wrote it).
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

from torchspec.data.sample import sample_ids_of
from torchspec.pipeline.build import ModelSpec, draft_config_for
from torchspec.pipeline.controller import Controller
from torchspec.pipeline.failures import WorkerFailure
from torchspec.pipeline.launcher import engine_side, plan_placement, start_engines, start_trainer_ranks
from torchspec.transfer.base import StoreUnavailable

log = logging.getLogger("torchspec.pipeline")
RATE_WINDOW = 20   # optimizer steps over which metrics' samples/s rates are measured
# RunResult.trained / .losses keep (at least) the most recent this many entries, so the driver does not grow
# with the run; the checkpoints and metrics.jsonl hold the whole history.
TRAINED_KEPT = 200_000


def _extend_bounded(items: list, new, keep: int) -> None:
    """Append `new`, then drop the oldest when over 2 x keep (amortised O(1): at least `keep` stay)."""
    items.extend(new)
    if len(items) > 2 * keep:
        del items[:len(items) - keep]


@dataclass
class RunResult:
    output_dir: Path
    global_step: int = 0
    start_step: int = 0                     # the step this run resumed from
    # the most recent TRAINED_KEPT (at least) of: (step, mean micro-batch loss) and, per trained sample,
    # (step after training it, epoch, sample id)
    losses: list[tuple[int, float]] = field(default_factory=list)
    trained: list[tuple[int, int, str]] = field(default_factory=list)
    pool_sizes: list[int] = field(default_factory=list)   # the most recent pool sizes (controller.POOL_HISTORY)
    pool_peak: int = 0                      # the largest pool of the run, in samples
    store_peak_bytes: int = 0               # the most bytes of records the controller had in the store at once
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


def _engine_metrics(engines) -> dict[str, float]:
    """The engines' own metrics (Engine.metrics, torchspec/inference/engine_metrics.py) as engine<i>/<name>."""
    from torchspec.inference.engine_metrics import step_metrics

    read = getattr(engines, "metrics", None)
    return step_metrics(read()) if callable(read) else {}


def _put_bandwidth(store) -> float:
    nbytes, seconds = store.put_stats()
    return nbytes / seconds / 1e9 if seconds else 0.0


class _Run:
    """One training run: what `run_training` sets up, the steps, the end (or the interruption) and the
    clean-up, with the run's state in one place."""

    def __init__(self, cfg, engine_factory: Callable | None, on_step: Callable | None, progress: bool):
        from torchspec.config.render import redacted_dict
        from torchspec.config.target import TargetInfo
        from torchspec.data.dataset import from_config as dataset_from_config, load_tokenizer, vocab_map_for
        from torchspec.training.checkpoint import CheckpointManager, check_output_dir
        from torchspec.training.metrics import MetricsLogger, Throughput
        from torchspec.training.optim import plan_steps
        from torchspec.transfer.capacity import check_hidden_dim, check_mooncake, check_store_capacity, store_budget
        from torchspec.transfer.factory import build_store, check_store
        from torchspec.utils.hub import resolve_hub_ids

        self.cfg, self.engine_factory, self.on_step, self.progress = cfg, engine_factory, on_step, progress
        self.given_cfg = cfg   # as the user wrote it (before dataset.regenerate points it at the replies)
        tr = cfg.training
        self.out_dir = Path(cfg.output_dir)
        check_output_dir(self.out_dir, tr.load_path)   # never mix two runs in one directory
        resolve_hub_ids(cfg)   # hub ids -> local snapshot folders (model_download_dir), before any reader
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.result = RunResult(output_dir=self.out_dir)
        self.ranks = self.trainer = self.engines = self.controller = self.evaluator = None
        self.store = None
        self.last_eval = self.last_saved = None
        self.window: list[dict] = []      # micro-batch metrics of the current accumulation window
        self.ahead: deque = deque()       # micro-batch sets taken and being read ahead (training.prefetch_depth)
        self.trained_samples, self.train_s = 0, 0.0

        # data, vocabulary, target facts, placement, store
        self.tokenizer = load_tokenizer(cfg)
        if cfg.dataset.regenerate:   # the target writes the replies first; a resume or later run reuses them
            from torchspec.inference.regenerate_job import regenerate_for_training

            cfg = self.cfg = regenerate_for_training(cfg, self.tokenizer, progress=progress)
        self.samples = dataset_from_config(cfg, self.tokenizer, "train", progress=progress)
        self.target = TargetInfo.from_config(cfg)   # the target's facts, derived once
        self.target_config = self.target.config
        self.draft_config = draft_config_for(cfg, self.target_config)
        self.aux_layers = list(self.target.aux_layers)
        self.run_config = redacted_dict(cfg)   # secrets out: saved in every checkpoint, logged to W&B/TB
        if tr.load_path:   # before anything starts: refuse what the checkpoint cannot continue, warn the rest
            from torchspec.training.resume import check_resume

            check_resume(tr.load_path, self.run_config, self.draft_config.to_dict(), self.aux_layers,
                         sample_ids_of(self.samples), weights_only=bool(tr.continual_training))
        d2t, t2d = vocab_map_for(self.samples, self.draft_config.vocab_size, self.draft_config.draft_vocab_size)
        self.placement = plan_placement(cfg)   # local or Ray (inference.launcher)
        log.info("placement: %s", self.placement.describe())
        self.world = len(self.placement.trainer_devices)
        self.plan = plan_steps(tr, len(self.samples), self.world)
        self.spec = ModelSpec(self.draft_config, d2t, t2d, self.plan.lr_total_steps, tr.load_path,
                              bool(tr.continual_training))
        self.capture = None   # debug.save_debug_train_data: the records trained on (written) or to replay (read)
        if cfg.debug.save_debug_train_data:
            from torchspec.pipeline.capture import CaptureDir, capture_meta

            self.capture = CaptureDir(cfg.debug.save_debug_train_data, capture_meta(cfg),
                                      create=not cfg.debug.debug_train_only)
        # the store's byte budget: inference.store_capacity, or a share of the free space where records go
        self.dtype = engine_side(self.placement)[0]
        kind = check_store(cfg)
        self.budget = store_budget(cfg, kind, self.placement.trainer_devices[0])
        log.info("store budget: %s", self.budget.source)
        check_store_capacity(cfg, self.target.hidden_size, len(self.aux_layers), self.dtype, self.world,
                             self.budget)   # before anything is started: a store too small would wait for good
        if kind == "mooncake":   # hidden_dim, max_seq_len; each client's buffer holds max_batch_size records
            check_mooncake(cfg, self.target.hidden_size, len(self.aux_layers), self.dtype)
        else:
            check_hidden_dim(cfg, self.target.hidden_size)
        self.store = build_store(cfg, self.budget)   # inference.store: memory (colocated), local or mooncake
        self.result.store_root = getattr(self.store, "root", None)   # the local store's directory only
        self.ckpts = CheckpointManager(self.out_dir, tr.max_checkpoints, tr.save_interval, tr.save_per_epoch)
        self.ckpts.sweep_stale()   # temp dirs of a run killed mid-save or mid-publish
        self.export_meta = {"aux_layer_ids": self.aux_layers,
                            "target_num_hidden_layers": self.target.num_hidden_layers}
        self.t_start = time.monotonic()
        self.throughput = Throughput(self.t_start, RATE_WINDOW)
        self.logger = MetricsLogger(self.out_dir, cfg.logging, total_steps=self.plan.num_train_steps,
                                    progress=progress, run_config=self.run_config)

    # -- start ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Trainer ranks (restored from training.load_path), resolved_config.yaml, engines, the evaluator, the
        controller."""
        from torchspec.config.render import save_resolved_config

        cfg, tr, inf = self.cfg, self.cfg.training, self.cfg.inference
        self.ranks = start_trainer_ranks(cfg, self.spec, self.store, self.placement, self.out_dir)
        self.trainer = self.ranks.trainer
        data_state = None
        if self.ranks.checkpoint is not None:
            ckpt = self.ranks.checkpoint
            data_state = None if tr.continual_training else ckpt.data_state
            log.info("%s %s (step %d)", "weights from" if tr.continual_training else "resumed from", ckpt.path,
                     ckpt.step)
            if not tr.continual_training:   # the resumed run's lines after its checkpoint are replaced by ours
                dropped = self.logger.truncate_after(ckpt.step)
                if dropped:
                    log.info("metrics.jsonl: %d line(s) after step %d dropped (they are trained again)", dropped,
                             ckpt.step)
        self.result.start_step = self.result.global_step = self.trainer.global_step
        # only now, with every check of the start passed: a refused start (or resume) leaves the file as it was
        log.info("resolved config saved to %s", save_resolved_config(self.given_cfg, self.out_dir))
        self.engines = self._engines()
        if self.placement.colocate and hasattr(self.engines, "phase"):   # the forward is a phase of the step
            self.engines.phase = lambda: self.trainer.clock.phase("target_forward")
        self.evaluator = _evaluator(cfg, self.aux_layers, self.tokenizer, self.engines, self.store, self.world,
                                    self.progress)
        if self.evaluator is not None and self.trainer.global_step == 0:
            self.evaluate(0)   # the untrained draft: the baseline of the eval curves
        self.controller = Controller(
            self.samples, self.engines, self.store, micro_batch_size=tr.micro_batch_size, num_ranks=self.world,
            num_epochs=self.plan.num_epochs, max_sample_pool_size=inf.max_sample_pool_size,
            inference_batch_size=inf.inference_batch_size, inference_buffer_threshold=inf.inference_buffer_threshold,
            inference_fetch_batch=inf.inference_fetch_batch, seed=int(tr.seed), data_state=data_state,
            store_capacity=self.budget.capacity, record_bytes=self._record_bytes)
        self.trainer.clock.take()   # phases are counted from here (start-up is not a step)

    def _record_bytes(self, num_tokens: int) -> int:
        from torchspec.transfer.capacity import record_bytes

        return record_bytes(num_tokens, self.target.hidden_size, len(self.aux_layers), self.dtype)

    def _engines(self):
        """The run's engines; debug.debug_train_only: the records of a capture instead (no target forward)."""
        cfg = self.cfg
        if not cfg.debug.debug_train_only:
            return start_engines(cfg, self.store, self.placement, self.engine_factory,
                                 getattr(self.samples, "record_tokenizer", None))
        from torchspec.inference.deferred import tokenizing_factory
        from torchspec.pipeline.capture import ReplayEngine
        from torchspec.pipeline.launcher_local import InlineEngines

        # deferred: the replay runs in this process, so the records are tokenized here (to skip, as the capture
        # did, the samples without a supervised token)
        tokenizer = getattr(self.samples, "record_tokenizer", None)
        engines = InlineEngines(tokenizing_factory(ReplayEngine, tokenizer)(self.capture, self.store,
                                                                            self.placement.trainer_devices[0]))
        engines.tokenizes = tokenizer is not None
        return engines

    @property
    def done(self) -> bool:
        return self.trainer.global_step >= self.plan.num_train_steps

    # -- one step -------------------------------------------------------------------------------------
    def _micro_batches_left(self) -> int:
        tr = self.cfg.training
        return (self.plan.num_train_steps - self.trainer.global_step) * int(tr.draft_accumulation_steps) \
            - self.trainer.micro_step

    def fetch(self):
        """The next micro-batch of every rank (None when the data is done), and the read-ahead topped up to
        training.prefetch_depth sets that are ready now (the ranks read them while this one trains); the
        wait is timed."""
        clock = self.trainer.clock
        t0, busy0 = time.perf_counter(), getattr(self.engines, "busy_s", 0.0)
        if self.ahead:
            batches = self.ahead.popleft()
        else:
            batches = self.controller.next_micro_batches()
            if batches is not None:
                self.ranks.prefetch(batches)
        if batches is not None:
            room = min(int(self.cfg.training.prefetch_depth), self._micro_batches_left() - 1)
            while len(self.ahead) < room:
                more = self.controller.next_micro_batches(wait=False)
                if more is None:
                    break
                self.ranks.prefetch(more)
                self.ahead.append(more)
        waited = time.perf_counter() - t0
        if self.placement.colocate:   # the inline engine ran the target inside that wait (its own phase)
            waited -= getattr(self.engines, "busy_s", 0.0) - busy0
        clock.add("data_wait", waited)
        return batches

    def train(self, batches) -> None:
        """Train on one micro-batch per rank; after an optimizer step, log, evaluate and save as due."""
        t0 = time.monotonic()
        m = self.ranks.train_step(batches)
        self.train_s += time.monotonic() - t0
        self.trained_samples += sum(len(b) for b in batches)
        self.result.trained_tokens += sum(s.length for b in batches for s in b)
        self.window.append(m)
        if self.capture is not None and not self.cfg.debug.debug_train_only:   # keep what was trained on
            for s in (s for b in batches for s in b if s.sample_id not in self.capture):
                self.capture.write(s.sample_id, self.store.get(s.key))
        epoch = self.controller.epoch
        epoch_ended = self.controller.mark_trained(batches)
        step_of = self.trainer.global_step + (0 if m["stepped"] else 1)
        _extend_bounded(self.result.trained, ((step_of, epoch, s.sample_id) for b in batches for s in b),
                        TRAINED_KEPT)
        if not m["stepped"] and epoch_ended:   # an epoch's last, partial accumulation window
            m = {**self.ranks.finish_accumulation(), "stepped": True}
        if m["stepped"]:
            self.after_step(m, epoch_ended)

    def after_step(self, m: dict, epoch_ended: bool, call_hook: bool = True) -> None:
        step, clock = self.trainer.global_step, self.trainer.clock
        if self.evaluator is not None and self.evaluator.due(step):
            with clock.phase("eval"):
                self.evaluate(step)
        if self.ckpts.due(step, epoch_ended):
            with clock.phase("checkpoint"):
                self.save(step)
        record = self.step_record(m, epoch_ended)
        record.update(clock.take())   # time/<phase>_s of this step (eval and checkpoint included)
        with clock.phase("log"):      # counted in the next step's record
            self.logger.log(step, record)
        _extend_bounded(self.result.losses, [(step, record["loss"])], TRAINED_KEPT)
        self.result.global_step = step
        if self.on_step is not None and call_hook:
            self.on_step(step, record)

    def step_record(self, m: dict, epoch_ended: bool) -> dict:
        from torchspec.training.metrics import window_means

        c, now = self.controller, time.monotonic()
        elapsed = now - self.t_start
        record = {k: v for k, v in m.items() if k in ("lr", "grad_norm")}
        record.update(window_means(self.window))
        self.window.clear()
        record.update(epoch=c.epoch - (1 if epoch_ended else 0), pool_size=c.pool_size(),
                      inference_samples_per_s=_inference_capacity(c, self.engines),
                      data_wait_frac=c.data_wait_s / elapsed, data_wait_s=c.data_wait_s, elapsed_s=elapsed,
                      store_bytes=self.store.bytes_used(), store_put_gb_per_s=_put_bandwidth(self.store))
        record.update(self.throughput.rates(now, self.trained_samples, self.train_s))
        record.update(_engine_metrics(self.engines))
        return record

    def evaluate(self, step: int) -> None:
        if self.evaluator is not None and self.last_eval != step:
            self.logger.log_eval(step, self.evaluator.evaluate(self.trainer, step))
            self.last_eval = step

    def save(self, step: int) -> None:
        if self.last_saved == step:
            return
        path = self.ckpts.save(step, self.ranks.state_dict(), self.controller.data_state(), self.trainer.draft,
                               self.draft_config, export_fn=self.export, export_meta=self.export_meta,
                               run_config=self.run_config)
        self.result.checkpoints.append(path)
        self.last_saved = step
        if self.evaluator is not None:
            self.evaluator.note_checkpoint(step, path)

    def export(self, draft, path) -> None:
        from torchspec.export import export_draft

        export_draft(draft, path, self.target_config, self.aux_layers)

    # -- the end --------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Data done or num_train_steps reached: final eval, checkpoint, export, report."""
        if self.controller is None:
            return
        self.controller.shutdown()
        self.evaluate(self.trainer.global_step)
        self.save(self.trainer.global_step)
        self.result.export_dir = self.ckpts.export_final(self.trainer.draft, self.export)
        _write_report(self.out_dir)

    def interrupt(self) -> None:
        """Ctrl-C / SIGTERM: close the open accumulation window, stop the engines, write a checkpoint."""
        self.result.interrupted = True
        log.warning("interrupted: stopping engines, writing a checkpoint, emptying the store")
        if self.controller is None:
            return
        if self.trainer.micro_step:   # close the open accumulation window so its samples count
            self.after_step(self.ranks.finish_accumulation(), False, call_hook=False)
        self.controller.shutdown()
        self.save(self.trainer.global_step)

    def failure(self, e: Exception) -> WorkerFailure:
        """A rank or engine died, or the store's service is lost: one error naming the checkpoint to resume from."""
        latest = self.ckpts.latest()
        resume = (f"; the latest checkpoint is {latest} (resume: training.load_path={self.out_dir})"
                  if latest is not None else "; no checkpoint had been written")
        return WorkerFailure(f"{str(e).rstrip('.')}{resume}")

    def close(self) -> None:
        """Stop engines and ranks, empty and close the store, close the logger (always runs)."""
        r = self.result
        if self.controller is not None:
            self.controller.shutdown()
            r.pool_sizes = list(self.controller.pool_stats.sizes)
            r.pool_peak, r.store_peak_bytes = self.controller.pool_stats.peak_size, self.controller.pool_stats.peak_bytes
            r.generated_tokens = self.controller.tokens_generated
            r.data_wait_frac = self.controller.data_wait_s / max(time.monotonic() - self.t_start, 1e-9)
            if self.controller.skipped_empty:
                log.info("dataset.defer_tokenization: %d sample(s) had no supervised token once tokenized (not "
                         "trained, as the up-front path drops them)", self.controller.skipped_empty)
        elif self.engines is not None:
            self.engines.close()
        if self.ranks is not None:
            self.ranks.close()
        if self.store is not None:
            try:
                r.store_put_bytes, r.store_put_s = self.store.put_stats()
                self.store.clear()
                r.store_bytes_end = self.store.bytes_used()
            except StoreUnavailable as e:   # already reported (or being); the store is only closed now
                log.warning("store not emptied: %s", e)
            self.store.close()
        self.logger.close()
        r.elapsed_s = time.monotonic() - self.t_start
        r.samples_per_s = self.trained_samples / max(r.elapsed_s, 1e-9)


def run_training(cfg, *, engine_factory: Callable | None = None, on_step: Callable | None = None,
                 progress: bool = True) -> RunResult:
    """Train a draft as `cfg` says. engine_factory(store, device) -> Engine overrides the engine (tests);
    on_step(step, metrics) is called after every optimizer step (raising KeyboardInterrupt there acts
    as Ctrl-C)."""
    if cfg.debug.debug_inference_only:   # the engines alone: records to debug.save_debug_train_data
        from torchspec.config.render import save_resolved_config
        from torchspec.pipeline.capture import run_capture

        log.info("resolved config saved to %s", save_resolved_config(cfg, cfg.output_dir))
        t0 = time.monotonic()
        capture = run_capture(cfg, engine_factory=engine_factory, progress=progress)
        return RunResult(output_dir=Path(cfg.output_dir), elapsed_s=time.monotonic() - t0,
                         generated_tokens=sum(e["length"] for e in capture.index.values()))
    run = _Run(cfg, engine_factory, on_step, progress)
    interrupts = _Interrupts()
    try:
        with interrupts.installed():
            try:
                run.start()
                while not run.done:
                    batches = run.fetch()
                    if batches is None:
                        break
                    with interrupts.critical():   # every rank takes the step, or none does
                        run.train(batches)
            except (WorkerFailure, StoreUnavailable) as e:
                raise run.failure(e) from None
            except KeyboardInterrupt:
                with interrupts.critical():
                    run.interrupt()
            else:
                run.finish()
    finally:
        run.close()
    return run.result
