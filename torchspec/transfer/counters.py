"""int64 counters in a small file, shared by every process on the node that opens the same path.

Locked with flock (plus a thread lock), and picklable by path: a process that unpickles one attaches
to the same file, whoever started it (torch.multiprocessing, Ray, anything else). The local store
keeps its capacity accounting here.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from contextlib import contextmanager


class FileCounters:
    def __init__(self, path: str, n: int, create: bool = False):
        self.path, self.n = str(path), n
        self._fd = os.open(self.path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        if create:
            os.ftruncate(self._fd, 8 * n)
        self._map = mmap.mmap(self._fd, 8 * n)
        self._vals = memoryview(self._map).cast("q")
        self._tlock = threading.Lock()

    def __reduce__(self):
        return FileCounters, (self.path, self.n)

    @contextmanager
    def lock(self):
        with self._tlock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __getitem__(self, i: int) -> int:
        return self._vals[i]

    def __setitem__(self, i: int, v) -> None:
        self._vals[i] = int(v)
