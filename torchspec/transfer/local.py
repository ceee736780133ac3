"""The embedded `local` store: hidden-state records in shared memory, no external process.

Each record is one file in a per-run directory on the node's shared-memory filesystem
(``/dev/shm`` on Linux) in `torchspec.transfer.record`'s layout (a small JSON header, then the tensors'
bytes, 64-byte aligned).
``put`` writes the file (GPU tensors through a pinned staging buffer) and publishes it with an
atomic rename, so a reader never sees half a record; ``get`` maps the file copy-on-write and returns tensor views
of it (zero copy); ``delete`` unlinks it. Any process on the node that holds this object (pickled
to it, by torch.multiprocessing or by Ray) can put, get and delete by key.

Capacity is accounted in bytes of shared memory (header + payload) in a counter file inside the
store's directory (`torchspec.transfer.counters`), shared by every process holding the store; a put that does not fit waits for deletes, up to ``put_timeout_s``, then raises
`StoreFull`. When the owning process drops the store, the directory is removed.

A driver killed with SIGKILL cannot remove its directory, so the directory's name carries its owner
(pid namespace, pid, the process's start time): every new store first removes the directories of
owners that no longer run (`sweep_stale_stores`), never one whose owner is alive or unknown.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp

from torchspec.transfer import record
from torchspec.transfer.base import PUT_TIMEOUT_S, RoomWait, over_capacity
from torchspec.transfer.counters import FileCounters

# Record files are named by quote(key), which never yields "%" followed by a lowercase letter: files of
# the store's own (the counters, records being written) start with such a "%" and cannot be a key's.
_COUNTERS_FILE = "%counters"
_TMP_PREFIX = "%tmp"
_USED, _PUT_BYTES, _PUT_NS = range(3)

_MIN_SHM_FREE = 1 << 30
_DIR_PREFIX = "torchspec-store-"
# <prefix><pid namespace>-<pid>-<start time>-<mkdtemp's random part>
_OWNED_DIR = re.compile(re.escape(_DIR_PREFIX) + r"(\d+)-(\d+)-(\d+)-[^-]+")

log = logging.getLogger("torchspec.transfer")


def _shm_root() -> str | None:
    """/dev/shm when it is writable and has room (containers often mount a tiny one), else the temp dir."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    if os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= _MIN_SHM_FREE:
        return "/dev/shm"
    return None


def store_base() -> str:
    """Where a new local store makes its directory: /dev/shm, or the temp dir when /dev/shm is unusable."""
    return _shm_root() or tempfile.gettempdir()


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str:
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        return "0"


def _owner_tag() -> str:
    """This process as a store directory names its owner."""
    return f"{_pid_namespace()}-{os.getpid()}-{_start_time(os.getpid()) or 0}"


def _owner_gone(name: str) -> bool:
    """True only when the directory's owner is known and no longer runs; a directory of another pid
    namespace (its pids mean other processes) or without an owner in its name is never judged."""
    m = _OWNED_DIR.fullmatch(name)
    if m is None or m[1] != _pid_namespace():
        return False
    pid, started = int(m[2]), m[3]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, another user's
        return False
    now = _start_time(pid)
    return started != "0" and now is not None and now != started   # the pid was reused by another process


def sweep_stale_stores(base: str | os.PathLike) -> list[Path]:
    """Remove the local-store directories under `base` whose owner process is gone (a driver killed
    with SIGKILL leaves its records in shared memory); returns the removed ones."""
    removed, nbytes = [], 0
    for d in Path(base).glob(_DIR_PREFIX + "*"):
        if not _owner_gone(d.name):
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file()) if d.is_dir() else 0
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
            nbytes += size
    if removed:
        log.warning("removed %d local store(s) left in %s by runs that no longer run (%.1f MB): %s",
                    len(removed), base, nbytes / 1e6, ", ".join(d.name for d in removed))
    return removed


def _write_all(f, data: memoryview) -> None:
    while data:   # a raw write may be partial
        data = data[f.write(data):]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:   # deleted meanwhile
        return 0


class LocalStore:
    def __init__(self, capacity_bytes: int | None = None, root: str | os.PathLike | None = None,
                 put_timeout_s: float = PUT_TIMEOUT_S):
        if root is None:
            base = store_base()
            sweep_stale_stores(base)
            root = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{_owner_tag()}-", dir=base)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.put_timeout_s = put_timeout_s
        # [bytes in use, bytes put, nanoseconds spent in put], shared by every process holding this store
        self._counters = FileCounters(str(self.root / _COUNTERS_FILE), 3, create=True)
        self._owner_pid = os.getpid()
        self._pinned = None
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)

    # Children get the same directory and counter; only the owner removes the directory.
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_finalizer"]
        state["_pinned"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._finalizer = None

    def _path(self, key: str) -> Path:
        return self.root / urllib.parse.quote(key, safe="")

    def _reserve(self, nbytes: int) -> None:
        deadline = time.monotonic() + self.put_timeout_s
        wait = None
        while True:
            with self._counters.lock():
                used = self._counters[_USED]
                if self.capacity_bytes is None or used + nbytes <= self.capacity_bytes:
                    self._counters[_USED] = used + nbytes
                    return
            if nbytes > self.capacity_bytes or time.monotonic() > deadline:
                raise over_capacity("local", nbytes, self.capacity_bytes, used)
            wait = wait or RoomWait("local", nbytes, self.capacity_bytes, self.put_timeout_s)
            wait.still_waiting(used)
            time.sleep(0.002)

    def _release(self, nbytes: int) -> None:
        with self._counters.lock():
            self._counters[_USED] -= nbytes

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        prefix, offsets, total = record.layout(tensors)
        path = self._path(key)
        if path.exists():
            raise KeyError(f"local store: key {key!r} is already present")
        self._reserve(total)
        t0 = time.perf_counter_ns()
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
        try:
            with open(tmp, "wb", buffering=0) as f:
                _write_all(f, memoryview(prefix))
                for t, off in zip(tensors.values(), offsets):
                    if t.numel():
                        f.seek(off)
                        _write_all(f, self._host_bytes(t))
                f.truncate(total)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            self._release(total)
            raise
        with self._counters.lock():
            self._counters[_PUT_BYTES] += total
            self._counters[_PUT_NS] += time.perf_counter_ns() - t0

    def _host_bytes(self, t: torch.Tensor) -> memoryview:
        """The tensor's bytes in host memory; device tensors go through a reused pinned buffer (a fast
        DMA copy, then one kernel copy into the file: no page faults on the shared-memory side)."""
        flat = record.tensor_bytes(t)
        if flat.device.type != "cpu":
            n = flat.numel()
            if self._pinned is None or self._pinned.numel() < n:
                self._pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            flat = self._pinned[:n].copy_(flat)
        return memoryview(flat.numpy())

    def get(self, key: str) -> dict[str, torch.Tensor]:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise KeyError(f"local store: no key {key!r}") from None
        return record.decode(torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            raise KeyError(f"local store: no key {key!r}") from None
        self._release(size)

    def keys(self) -> list[str]:
        return sorted(urllib.parse.unquote(p.name) for p in self.root.iterdir()
                      if not p.name.startswith((_COUNTERS_FILE, _TMP_PREFIX)))

    def bytes_used(self) -> int:
        return int(self._counters[_USED])

    def put_stats(self) -> tuple[int, float]:
        """(bytes put, seconds spent inside put) summed over every process using this store."""
        with self._counters.lock():
            return int(self._counters[_PUT_BYTES]), self._counters[_PUT_NS] / 1e9

    def clear(self) -> None:
        """Delete every record (used on shutdown so the store ends empty). Then, unless a put is still writing,
        the byte count is recounted from the records left: a Ctrl-C reaches every process of the run, and
        one that lands between a put's or delete's file operation and its count update leaves the count off
        by that record."""
        for key in self.keys():
            try:
                self.delete(key)
            except KeyError:
                pass
        with self._counters.lock():
            files = [p for p in self.root.iterdir() if not p.name.startswith(_COUNTERS_FILE)]
            if not any(p.name.startswith(_TMP_PREFIX) for p in files):
                self._counters[_USED] = sum(_size(p) for p in files)

    def close(self) -> None:
        """The owner deletes every record and removes the directory; in any other process (an engine or
        trainer rank holding a pickled or forked copy) there is nothing to release and the records stay."""
        if os.getpid() != self._owner_pid or self._finalizer is None:
            return
        self.clear()
        self._finalizer()
