"""Evaluation during training: eval loss / acc_k on held-out samples, optionally tau, best-score tracking.

The runner drives it (docs/interfaces.md, "Eval during training"):

    evaluator = TrainingEvaluator.from_config(cfg, aux_layers, tokenizer)   # None without eval_data_path
    evaluator.prepare(engines, store)            # once, before the controller starts: hidden states of the
                                                 # held-out samples made by the run's own engines, kept in RAM
    ...after an optimizer step:
    if evaluator.due(step):
        metrics = evaluator.evaluate(trainer, step)   # {"loss", "acc_k", "loss_k", ["tau", ...], "score"}
        logger.log_eval(step, metrics)                # -> "eval/..." keys in metrics.jsonl and the bar
    ...after a checkpoint save: evaluator.note_checkpoint(step, path)

Score: eval tau when tau is measured (dataset.eval_tau_prompts > 0), else minus the eval loss; higher is
better. The best is recorded in output_dir/eval_best.json and every checkpoint saved after an eval gets
an eval.json (the latest eval's metrics and whether it is the best so far).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from torchspec.eval.acceptance import measure_acceptance, prompts_from_samples
from torchspec.eval.speculative import Prompt, images_of

BEST_FILE = "eval_best.json"
CHECKPOINT_EVAL_FILE = "eval.json"


class TrainingEvaluator:
    def __init__(self, samples: Sequence, *, interval: int, micro_batch_size: int, output_dir,
                 tau_prompts: Sequence[Sequence[int]] = (), num_draft_steps: int = 3, max_new_tokens: int = 64,
                 target_loader: Callable | None = None, eos_token_id=None):
        if interval < 1:
            raise ValueError(f"dataset.eval_interval must be >= 1, got {interval}")
        self.samples = list(samples)
        self.interval = int(interval)
        self.micro_batch_size = int(micro_batch_size)
        self.output_dir = Path(output_dir)
        self.tau_prompts = [Prompt(p, images_of(p)) for p in tau_prompts]   # images kept (a VLM target)
        self.num_draft_steps = int(num_draft_steps)
        self.max_new_tokens = int(max_new_tokens)
        self.target_loader = target_loader  # device -> HFTarget, called once, on the first tau measurement
        self.eos_token_id = eos_token_id
        self.records: list[dict] | None = None
        self._target = None
        self.best: dict | None = None
        self.last: dict | None = None
        best = self.output_dir / BEST_FILE
        if best.is_file():  # a resumed run keeps its best so far
            self.best = json.loads(best.read_text())

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, aux_layers: Sequence[int], tokenizer=None, progress: bool = False):
        """From dataset.eval_* (None when dataset.eval_data_path is not set)."""
        ds = cfg.dataset
        if not ds.eval_data_path:
            return None
        from torchspec.data.dataset import from_config as dataset_from_config

        samples = dataset_from_config(cfg, tokenizer, "eval", progress=progress)
        n = len(samples) if ds.eval_max_samples is None else min(len(samples), int(ds.eval_max_samples))
        held_out = [samples[i] for i in range(n)]
        prompts = prompts_from_samples(samples, int(ds.eval_tau_prompts)) if ds.eval_tau_prompts else []

        def load(device):
            from torchspec.eval.speculative import HFTarget
            from torchspec.inference.hf import load_target
            from torchspec.inference.vlm import vision_inputs

            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
            model = load_target(cfg.model.target_model_path, dtype, device,
                                trust_remote_code=bool(cfg.model.trust_remote_code))
            return HFTarget(model, aux_layers, vision_inputs(model, cfg.model.target_model_path,
                                                             bool(cfg.model.trust_remote_code)))

        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        return cls(held_out, interval=ds.eval_interval, micro_batch_size=cfg.training.micro_batch_size,
                   output_dir=cfg.output_dir, tau_prompts=prompts, num_draft_steps=ds.eval_num_draft_steps,
                   max_new_tokens=ds.eval_max_new_tokens, target_loader=load, eos_token_id=eos)

    def prepare(self, engines, store, timeout_s: float = 3600.0) -> None:
        """Hidden states of the held-out samples, once: through the run's engines (EngineGroup: submit /
        wait), read back from the store into this process's memory, then deleted from the store."""
        if self.records is not None:
            return
        chunk = max(1, self.micro_batch_size)
        pending = 0
        for i in range(0, len(self.samples), chunk):
            engines.submit((i // chunk) % engines.num_workers, self.samples[i:i + chunk])
            pending += 1
        got: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"eval hidden states: engines did not finish within {timeout_s:.0f} s")
            for _, stored in engines.wait(timeout=1.0):
                pending -= 1
                for s in stored:
                    rec = store.get(s.key)
                    got[s.sample_id] = {k: v.clone() for k, v in rec.items()}
                    store.delete(s.key)
        self.records = [got[s.sample_id] for s in self.samples]

    def set_records(self, records: list[dict]) -> None:
        """Hidden-state records made elsewhere (tests, or a caller with its own engine)."""
        self.records = list(records)

    # ---- evaluation -------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0

    @torch.no_grad()
    def eval_metrics(self, trainer) -> dict:
        """loss, loss_k, acc_k pooled exactly over all held-out rows (per-row means, not means of batches)."""
        from torchspec.models.eagle3 import total_loss
        from torchspec.transfer.batch import collate

        if self.records is None:
            raise RuntimeError("TrainingEvaluator.prepare() (or set_records) must run before evaluate()")
        sums: dict[str, list[float]] = {}
        batches = []
        for i in range(0, len(self.records), self.micro_batch_size):
            m = trainer.eval_step(collate(self.records[i:i + self.micro_batch_size], pack=True))  # = padded
            batches.append(m)
            for key, vals in m.get("counts", {}).items():
                sums[key] = [a + b for a, b in zip(sums[key], vals)] if key in sums else list(vals)
        out: dict[str, float] = {}
        if sums.get("num_valid"):
            n = sums["num_valid"]
            for k, nk in enumerate(n):
                out[f"acc_{k}"] = sums["correct"][k] / nk if nk else float("nan")
                out[f"loss_{k}"] = sums["loss_sum"][k] / nk if nk else float("nan")
            out["loss"] = total_loss([out[f"loss_{k}"] if nk else 0.0 for k, nk in enumerate(n)])
        else:  # no counts from the trainer: plain mean over batches
            keys = {k for m in batches for k in m if k == "loss" or k.startswith(("acc_", "loss_"))}
            out = {k: sum(m[k] for m in batches if k in m) / sum(k in m for m in batches) for k in keys}
        out["num_samples"] = len(self.records)
        return out

    def measure_tau(self, draft, device) -> dict:
        if self._target is None:
            self._target = self.target_loader(device)
        was_training = draft.training
        draft.eval()
        try:
            res = measure_acceptance(self._target, draft, self.tau_prompts, self.num_draft_steps,
                                     self.max_new_tokens, self.eos_token_id, compare_greedy=False)
        finally:
            draft.train(was_training)
        out = {"tau": res.stats.tau}
        out.update({f"accept_rate_{i}": r for i, r in enumerate(res.stats.acceptance_rate_per_pos)})
        return out

    def evaluate(self, trainer, step: int) -> dict:
        """Eval metrics at `step` (keys without the eval/ prefix; MetricsLogger.log_eval adds it)."""
        t0 = time.monotonic()
        metrics = self.eval_metrics(trainer)
        if self.tau_prompts and self.target_loader is not None:
            metrics.update(self.measure_tau(trainer.draft, next(trainer.draft.parameters()).device))
        metrics["score"] = metrics["tau"] if "tau" in metrics else -metrics["loss"]
        metrics["eval_s"] = time.monotonic() - t0
        self._track(step, metrics)
        return metrics

    # ---- best tracking -------------------------------------------------------------------------------
    @property
    def metric_name(self) -> str:
        return "eval/tau" if self.tau_prompts else "eval/loss"

    def _track(self, step: int, metrics: dict) -> None:
        score = metrics["score"]
        value = metrics["tau"] if "tau" in metrics else metrics["loss"]
        is_best = math.isfinite(score) and (self.best is None or score > self.best["score"])
        self.last = {"step": step, "metrics": metrics, "is_best": is_best}
        if is_best:
            self.best = {"step": step, "metric": self.metric_name, "value": value, "score": score,
                         "checkpoint": None}
            self._write_best()

    def _write_best(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / (BEST_FILE + ".tmp")
        tmp.write_text(json.dumps(self.best, indent=2) + "\n")
        tmp.replace(self.output_dir / BEST_FILE)

    def note_checkpoint(self, step: int, path) -> None:
        """After a checkpoint save: write its eval.json and, when it is the best eval's step, name it."""
        if self.last is None:
            return
        info = {"eval_step": self.last["step"], "checkpoint_step": step, "metric": self.metric_name,
                "metrics": self.last["metrics"],
                "is_best_so_far": self.best is not None and self.best["step"] == self.last["step"] == step}
        (Path(path) / CHECKPOINT_EVAL_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if self.best is not None and self.best["step"] == step:
            try:
                rel = str(Path(path).resolve().relative_to(self.output_dir.resolve()))
            except ValueError:
                rel = str(path)
            self.best["checkpoint"] = rel
            self._write_best()
