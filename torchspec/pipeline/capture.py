"""The two halves of the pipeline alone: an offline capture of hidden-state records, and training from it.

    debug.debug_inference_only + debug.save_debug_train_data=DIR
        the engines run the target over the dataset (one epoch) and every hidden-state record is written to
        DIR: one safetensors file per sample (records/<n>.safetensors) and one line per record in
        DIR/records.jsonl ({"sample_id", "file", "length"}), appended as records are written, so a capture
        that is stopped resumes where it stopped (samples already in DIR are not run again).
    debug.debug_train_only + debug.save_debug_train_data=DIR
        the trainer trains from DIR with no engine and no target forward: `ReplayEngine` puts DIR's records
        in the store in the order the controller asks for them, so the run trains on exactly the records the
        online run would have made (same sample order, same numbers).

    save_debug_train_data=DIR alone (an online run)
        the run also writes every record it trains on to DIR, in the same layout.

DIR/capture.json names the target and the tokenization the records were made with; training from a capture
made for another target or max_seq_length is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from torchspec.config.errors import ConfigError
from torchspec.data.sample import sample_ids_of
from torchspec.inference.base import StoredSample

log = logging.getLogger("torchspec.pipeline")
RECORDS, META = "records.jsonl", "capture.json"


def capture_meta(cfg) -> dict:
    """What a capture's records depend on (besides the sample ids)."""
    return {"target_model_path": str(cfg.model.target_model_path),
            "aux_hidden_states_layers": cfg.inference.aux_hidden_states_layers,
            "max_seq_length": int(cfg.training.max_seq_length),
            "chat_template": cfg.dataset.chat_template}


class CaptureDir:
    """Hidden-state records on disk, by sample id."""

    def __init__(self, root: str | os.PathLike, meta: dict, *, create: bool):
        self.root = Path(root)
        key = "debug.save_debug_train_data"
        if create:
            self.root.joinpath("records").mkdir(parents=True, exist_ok=True)
            found = self._read_meta()
            if found is None:
                (self.root / META).write_text(json.dumps(meta, indent=1) + "\n")
            elif found != meta:
                raise ConfigError(f"{key}={self.root}: holds a capture made with other settings ({self._diff(found, meta)}); "
                                  "choose another directory")
        else:
            found = self._read_meta()
            if found is None:
                raise ConfigError(f"{key}={self.root}: no capture there ({META} missing); make one first with "
                                  f"debug.debug_inference_only=true {key}={self.root}")
            if found != meta:
                raise ConfigError(f"{key}={self.root}: the capture was made with other settings "
                                  f"({self._diff(found, meta)}); capture again for this config")
        self.index: dict[str, dict] = {}
        path = self.root / RECORDS
        if path.exists():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:   # a line cut by a kill: its record is written again
                    log.warning("%s line %d: incomplete entry ignored", path, n)
                    continue
                if (self.root / entry["file"]).exists():
                    self.index[entry["sample_id"]] = entry

    def _read_meta(self) -> dict | None:
        path = self.root / META
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None

    @staticmethod
    def _diff(found: dict, want: dict) -> str:
        keys = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
        return ", ".join(f"{k}: {found.get(k)!r} there, {want.get(k)!r} now" for k in keys)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def write(self, sample_id: str, record: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = f"records/{len(self.index):08d}.safetensors"
        tmp = self.root / (name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in record.items()}, str(tmp))
        os.replace(tmp, self.root / name)
        entry = {"sample_id": sample_id, "file": name, "length": int(record["input_ids"].numel())}
        with open(self.root / RECORDS, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.index[sample_id] = entry

    def read(self, sample_id: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        entry = self.index.get(sample_id)
        if entry is None:
            raise ConfigError(f"debug.save_debug_train_data={self.root}: no record of sample {sample_id!r} (the "
                              "capture is incomplete or was made from other data); run the capture again")
        return load_file(str(self.root / entry["file"]))


class ReplayEngine:
    """The Engine of a train-only run: records come from a CaptureDir instead of a target forward."""

    def __init__(self, capture: CaptureDir, store, device: str = "cpu"):
        self.capture, self.store, self.device = capture, store, torch.device(device)

    def generate(self, samples: Sequence) -> list[StoredSample]:
        out = []
        for s in samples:
            record = {k: v.to(self.device) for k, v in self.capture.read(s.sample_id).items()}
            self.store.put(s.sample_id, record)
            out.append(StoredSample(s.sample_id, s.sample_id, int(record["input_ids"].numel())))
        return out

    def close(self) -> None:
        pass


def run_capture(cfg, *, engine_factory=None, progress: bool = True) -> CaptureDir:
    """debug_inference_only: the engines over one epoch of the dataset, every record written to the capture
    directory (resumable). Returns the capture."""
    from tqdm.auto import tqdm

    from torchspec.config.target import TargetInfo
    from torchspec.data.dataset import from_config as dataset_from_config, load_tokenizer
    from torchspec.pipeline.controller import Controller
    from torchspec.pipeline.launcher import engine_side, plan_placement, start_engines
    from torchspec.transfer.capacity import record_bytes, store_budget
    from torchspec.transfer.factory import build_store, check_store

    inf = cfg.inference
    capture = CaptureDir(cfg.debug.save_debug_train_data, capture_meta(cfg), create=True)
    samples = dataset_from_config(cfg, load_tokenizer(cfg), "train", progress=progress)
    ids = sample_ids_of(samples)
    done = [i for i in ids if i in capture]
    if len(done) == len(ids):
        log.info("capture %s: all %d samples already captured", capture.root, len(ids))
        return capture
    placement = plan_placement(cfg)
    target, (dtype, _) = TargetInfo.from_config(cfg), engine_side(placement)
    budget = store_budget(cfg, check_store(cfg), placement.trainer_devices[0])
    store = build_store(cfg, budget)
    engines = controller = None
    bar = tqdm(total=len(ids), initial=len(done), desc="capturing", unit="sample", disable=not progress)
    try:
        engines = start_engines(cfg, store, placement, engine_factory, getattr(samples, "record_tokenizer", None))
        controller = Controller(samples, engines, store, micro_batch_size=inf.inference_batch_size, num_ranks=1,
                                num_epochs=1, max_sample_pool_size=max(inf.max_sample_pool_size,
                                                                       inf.inference_batch_size),
                                inference_batch_size=inf.inference_batch_size,
                                inference_buffer_threshold=inf.inference_buffer_threshold,
                                inference_fetch_batch=inf.inference_fetch_batch, seed=int(cfg.training.seed),
                                data_state={"epoch": 0, "trained_ids": done}, store_capacity=budget.capacity,
                                record_bytes=lambda n: record_bytes(n, target.hidden_size, len(target.aux_layers),
                                                                    dtype))
        while (batches := controller.next_micro_batches()) is not None:
            for s in batches[0]:
                capture.write(s.sample_id, store.get(s.key))
            controller.mark_trained(batches)
            bar.update(len(batches[0]))
    finally:
        bar.close()
        if controller is not None:
            controller.shutdown()
        elif engines is not None:
            engines.close()
        store.clear()
        store.close()
    log.info("capture %s: %d records", capture.root, len(capture))
    return capture
