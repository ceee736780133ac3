"""Resumable checkpoints, written atomically.

Layout (one directory per checkpoint; the name sorts by step):

    output_dir/checkpoints/step_00000100/
        model.safetensors    the draft's full state dict (what tools/convert_to_hf.py reads)
        draft_config.json    the draft's config
        export_meta.json     aux-layer ids etc. for tools/convert_to_hf.py (when given)
        run_config.json      the run's config, secrets redacted (what a resume compares with; when given)
        trainer_state.pt     optimizer, lr scheduler, RNG states, global_step (no weights)
        data_state.json      the controller's data position (training/data_state.py: epoch, trained position ranges)
        meta.json            {"step", "time", "files": {name: bytes}}: written last
        export/              the exported draft (when an export function is given)
    output_dir/export/       the newest exported draft

Every checkpoint is written into `checkpoints/.tmp-step_N-<pid>/` and renamed into place only
when complete, so a process killed mid-write leaves a temp dir that `latest()` never returns.
`latest()` also checks meta.json against the files.

output_dir/export is published by renaming the new dir over the old one (Linux: one atomic exchange of
the two; elsewhere: old -> `.tmp-trash-export-<pid>`, new -> export/, two renames), and the old copy is
deleted only after that, so export/ is never missing while a complete copy exists. Temp dirs
(`.tmp-*-<pid>`) of processes that are gone are swept by `sweep_stale()` (at the start of a run) and by
every `save()`; a trashed export whose replacement never arrived is put back first.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("torchspec.training")

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MODEL_FILE = "model.safetensors"
DRAFT_CONFIG_FILE = "draft_config.json"
TRAINER_STATE_FILE = "trainer_state.pt"
DATA_STATE_FILE = "data_state.json"
META_FILE = "meta.json"
EXPORT_META_FILE = "export_meta.json"
RUN_CONFIG_FILE = "run_config.json"
EXPORT_DIR = "export"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    trainer_state: dict        # "model" (state dict) + optimizer/scheduler/rng/global_step unless weights_only
    data_state: dict | None
    draft_config: dict


class CheckpointManager:
    """Saves, rotates and finds checkpoints under `output_dir/checkpoints`.

    max_checkpoints: keep only the newest N complete checkpoints (None or 0 keeps all).
    Call `save` from one process (rank 0); gather the trainer state on every rank first.
    """

    def __init__(self, output_dir: str | os.PathLike, max_checkpoints: int | None = None,
                 save_interval: int | None = None, save_per_epoch: bool = False):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINTS
        self.max_checkpoints = max_checkpoints or 0
        if self.max_checkpoints < 0:
            raise ValueError(f"training.max_checkpoints must be >= 0 or null, got {max_checkpoints}")
        self.save_interval = save_interval
        self.save_per_epoch = save_per_epoch

    def due(self, step: int, epoch_ended: bool = False) -> bool:
        """Whether optimizer step `step` is saved: every `training.save_interval` steps, and at the end of
        an epoch with `training.save_per_epoch`."""
        return bool(self.save_interval and step % self.save_interval == 0) or (epoch_ended and self.save_per_epoch)

    def save(self, step: int, trainer_state: dict, data_state: dict | None, draft: torch.nn.Module,
             draft_config: Any, export_fn: Callable[[torch.nn.Module, Path], None] | None = None,
             export_meta: dict | None = None, run_config: dict | None = None) -> Path:
        """Write checkpoint `step` atomically; returns its directory.

        Weights come from trainer_state["model"] when present (full, gathered), else from
        `draft.state_dict()`. export_fn(draft, dir) writes the exported draft into `dir`; the copy
        at output_dir/export is then replaced by it. export_meta ({"aux_layer_ids", ...}) is saved as
        export_meta.json for tools/convert_to_hf.py; run_config (the redacted config) as run_config.json.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep_stale()
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            self._write(tmp, step, trainer_state, data_state, draft, draft_config, export_fn, export_meta,
                        run_config)
        except (OSError, RuntimeError) as e:   # disk full, quota, permissions: nothing partial is left
            shutil.rmtree(tmp, ignore_errors=True)
            cause = _os_error(e)
            if cause is None:
                raise
            raise _write_error(final, cause) from None

        if final.exists():  # the same step saved twice (e.g. interval and epoch end coincide)
            _remove_tree(final)
        os.rename(tmp, final)
        _fsync(self.root)
        if export_fn is not None:
            self._publish_export(final / EXPORT_DIR)
        self._rotate()
        return final

    @staticmethod
    def _write(tmp: Path, step, trainer_state, data_state, draft, draft_config, export_fn, export_meta,
               run_config) -> None:
        state = dict(trainer_state)
        weights = state.pop("model", None)
        if weights is None:
            weights = draft.state_dict()
        _save_safetensors(weights, tmp / MODEL_FILE)
        _write_json(tmp / DRAFT_CONFIG_FILE, _config_dict(draft_config))
        with open(tmp / TRAINER_STATE_FILE, "wb") as f:   # a Python file: a failed write raises its OSError
            torch.save(state, f)
        _fsync(tmp / TRAINER_STATE_FILE)
        _write_json(tmp / DATA_STATE_FILE, data_state)
        if export_meta is not None:
            _write_json(tmp / EXPORT_META_FILE, export_meta)
        if run_config is not None:
            _write_json(tmp / RUN_CONFIG_FILE, run_config)
        if export_fn is not None:
            export_fn(draft, tmp / EXPORT_DIR)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        _write_json(tmp / META_FILE, {"step": int(step), "time": time.time(), "files": files})
        _fsync(tmp)

    def export_final(self, draft: torch.nn.Module, export_fn: Callable[[torch.nn.Module, Path], None]) -> Path:
        """Write output_dir/export (atomically) from the draft as it is now."""
        self.sweep_stale()
        tmp = self.output_dir / f"{TMP_PREFIX}{EXPORT_DIR}-{os.getpid()}"
        try:
            export_fn(draft, tmp)
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            cause = _os_error(e)
            if cause is None:
                raise
            raise _write_error(self.output_dir / EXPORT_DIR, cause) from None
        return self._swap_into(tmp, self.output_dir / EXPORT_DIR)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # -- internals -------------------------------------------------------------------------------
    def _rotate(self) -> None:
        if self.max_checkpoints <= 0:
            return
        for old in self.checkpoints()[:-self.max_checkpoints]:
            _remove_tree(old)

    def sweep_stale(self) -> list[Path]:
        """Remove the temp dirs (`.tmp-*-<pid>`) that this process or a process that is gone left in
        output_dir and checkpoints/ (a kill mid-save or mid-publish); a trashed export with no export/ beside
        it is renamed back to export/ instead. Temp dirs of running processes stay. Returns what was removed."""
        removed = []
        trash_export = f"{TMP_PREFIX}trash-{EXPORT_DIR}-"
        for root in (self.output_dir, self.root):
            if not root.is_dir():
                continue
            for p in sorted(root.iterdir()):
                if not (p.name.startswith(TMP_PREFIX) and p.is_dir() and _owner_gone(p.name)):
                    continue
                dest = self.output_dir / EXPORT_DIR
                if root == self.output_dir and p.name.startswith(trash_export) and not dest.exists():
                    os.rename(p, dest)   # killed between the two renames: the old export is still whole
                    log.warning("%s: restored from %s (a publish was interrupted)", dest, p.name)
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        if removed:
            log.info("removed %d temp dir(s) left by an interrupted save: %s", len(removed),
                     ", ".join(str(p) for p in removed))
        return removed

    def _publish_export(self, src: Path) -> None:
        tmp = self.output_dir / f"{TMP_PREFIX}{EXPORT_DIR}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            shutil.copytree(src, tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(self.output_dir / EXPORT_DIR, _os_error(e) or e) from None
        self._swap_into(tmp, self.output_dir / EXPORT_DIR)

    @staticmethod
    def _swap_into(tmp: Path, dest: Path) -> Path:
        """Rename the complete dir `tmp` over `dest`; the old `dest` is deleted only once the new one is there."""
        if not dest.exists():
            os.rename(tmp, dest)
        elif _exchange(tmp, dest):   # atomic: dest is the new dir, tmp the old one
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            trash = dest.with_name(f"{TMP_PREFIX}trash-{dest.name}-{os.getpid()}")
            os.rename(dest, trash)
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        _fsync(dest.parent)
        return dest


def is_complete(path: Path) -> bool:
    """True when meta.json exists, parses and every file it lists is present with its size."""
    return incomplete_why(path) is None


def incomplete_why(path: Path) -> str | None:
    """What makes the checkpoint dir `path` incomplete (a missing or cut file, meta.json unreadable), or None."""
    try:
        files = json.loads((path / META_FILE).read_text())["files"]
        for name, size in files.items():
            if not (path / name).is_file():
                return f"{name} is missing"
            have = (path / name).stat().st_size
            if have != size:
                return f"{name} has {have} bytes, {META_FILE} says {size}: truncated or replaced"
        return None
    except FileNotFoundError:
        return f"no {META_FILE}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{META_FILE} is unreadable ({type(e).__name__})"


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete `step_N` dirs directly under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and is_complete(p)),
                  key=lambda p: p.name)


def check_output_dir(output_dir: str | os.PathLike, load_path: str | os.PathLike | None) -> None:
    """Refuse to start a run whose output_dir holds another run (its metrics, checkpoints or export would be
    mixed with, or rotated away by, the new one). Resuming that run (training.load_path inside output_dir)
    is fine. Raises ConfigError before anything is written."""
    from torchspec.config.errors import ConfigError
    from torchspec.training.metrics import METRICS_FILE
    from torchspec.utils.paths import check_writable_dir

    out = Path(output_dir).expanduser()
    check_writable_dir(out)
    if load_path is not None:
        inside = Path(load_path).expanduser().resolve()
        if inside == out.resolve() or out.resolve() in inside.parents:
            return
    ckpts = out / CHECKPOINTS
    held = [name for name, there in (
        (METRICS_FILE, (out / METRICS_FILE).is_file() and (out / METRICS_FILE).stat().st_size > 0),
        (f"{CHECKPOINTS}/{STEP_PREFIX}*", ckpts.is_dir() and any(p.name.startswith(STEP_PREFIX) for p in ckpts.iterdir())),
        (EXPORT_DIR, (out / EXPORT_DIR).is_dir())) if there]
    if held:
        how = ("training.load_path points elsewhere, so this would be a second run in it"
               if load_path is not None else f"resume it with training.load_path={out}")
        raise ConfigError(f"output_dir={out} already holds a training run ({', '.join(held)}); {how}, or choose "
                          "an empty output_dir (nothing there was changed)")


def resolve_checkpoint(load_path: str | os.PathLike, key: str = "training.load_path") -> Path:
    """A complete checkpoint dir from a step dir, a `checkpoints/` dir or a run's output_dir (latest).
    Raises FileError (one line: the key, the path and what is wrong) when there is none."""
    from torchspec.config.errors import FileError

    path = Path(load_path).expanduser()
    where = f"{key}={path}"
    if not path.exists():
        raise FileError(f"{where}: does not exist")
    if not path.is_dir():
        raise FileError(f"{where}: is a file; give a checkpoint dir ({STEP_PREFIX}N/) or a run's output_dir")
    if (path / META_FILE).exists():
        why = incomplete_why(path)
        if why:
            raise FileError(f"{where}: an incomplete checkpoint ({why}); resume from another {STEP_PREFIX}N dir or "
                            "from the run's output_dir (its latest complete checkpoint)")
        return path
    for root in (path / CHECKPOINTS, path):
        found = complete_checkpoints(root)
        if found:
            for p in sorted(root.iterdir()):   # newer step dirs that a kill or a copy left incomplete
                if p.name.startswith(STEP_PREFIX) and p.name > found[-1].name and not is_complete(p):
                    log.warning("%s: skipped, an incomplete checkpoint (files missing or truncated); resuming "
                                "from %s", p, found[-1].name)
            return found[-1]
    broken = [f"{p.name}: {incomplete_why(p)}" for root in (path / CHECKPOINTS, path) if root.is_dir()
              for p in sorted(root.iterdir()) if p.name.startswith(STEP_PREFIX) and p.is_dir()]
    raise FileError(f"{where}: no complete checkpoint there " + (
        f"(incomplete: {'; '.join(broken)})" if broken else
        f"(expected {STEP_PREFIX}N/ dirs with {META_FILE}, or a run's output_dir containing {CHECKPOINTS}/)"))


def load_checkpoint(load_path: str | os.PathLike, weights_only: bool = False,
                    key: str = "training.load_path") -> LoadedCheckpoint:
    """Load a checkpoint for resume (everything) or continual training (weights_only: model only)."""
    from safetensors.torch import load_file

    from torchspec.config.errors import FileError

    path = resolve_checkpoint(load_path, key)

    def read(name, reader):
        try:
            return reader(path / name)
        except Exception as e:   # sizes match meta.json, yet the bytes do not parse: the file is corrupt
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise FileError(f"{path / name}: corrupt, cannot be read ({type(e).__name__}: {first}); resume from "
                            f"another checkpoint ({key}=<a step_N dir>) or delete this one") from None

    meta = read(META_FILE, lambda p: json.loads(p.read_text()))
    state: dict = {} if weights_only else read(TRAINER_STATE_FILE, lambda p: torch.load(
        p, map_location="cpu", weights_only=False))
    state["model"] = read(MODEL_FILE, lambda p: load_file(str(p)))
    data_state = None if weights_only else read(DATA_STATE_FILE, lambda p: json.loads(p.read_text()))
    return LoadedCheckpoint(path, int(meta["step"]), state, data_state,
                            read(DRAFT_CONFIG_FILE, lambda p: json.loads(p.read_text())))


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: the exception, or what it was raised from or during (torch's zip
    writer turns a failed file write into 'unexpected pos ...'), or one a library names only in its text."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    if "No space left on device" in text or "os error 28" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _write_error(where: Path, e: OSError) -> Exception:
    from torchspec.config.errors import FileError

    return FileError(f"{where}: not written: {e.strerror or e} (free space or permissions under {where.parent}); "
                     "nothing partial was left")


def _config_dict(config: Any) -> dict:
    if config is None or isinstance(config, dict):
        return dict(config or {})
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise TypeError(f"cannot serialise a draft config of type {type(config).__name__}")


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    seen, tensors = set(), {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if storage in seen else t  # tied weights: safetensors needs distinct storage
        seen.add(storage)
    save_file(tensors, str(path))
    _fsync(path)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner_gone(name: str) -> bool:
    """Whether the process whose pid ends a temp dir's name (`.tmp-...-<pid>`) is this one or has exited.
    A name without a pid is left alone."""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # someone else's live process
        return False
    return False


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the system or
    the file system cannot; then nothing was changed."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_tree(path: Path) -> None:
    """Delete a checkpoint: first rename it out of sight, so a crash mid-delete leaves no 'step_' dir."""
    trash = path.with_name(f"{TMP_PREFIX}trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
