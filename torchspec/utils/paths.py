"""`check_writable_dir`: a directory the run will write (output_dir) can be created and written here, checked
before anything is written, by every entry point that writes there (training, the regeneration job)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torchspec.config.errors import FileError


def check_writable_dir(path: str | os.PathLike, key: str = "output_dir", label: str | None = None) -> None:
    """`path`, or the nearest part of it that exists, is a directory this process may create entries in.
    Raises FileError (one line starting with `label`, default "key=path", then the part that stops it and
    why); leaves nothing behind."""
    out = Path(path).expanduser()
    label = label or f"{key}={out}"
    there = out
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise FileError(f"{label}: {there} is a file, not a directory; choose another {key}")
    why = None
    if not os.access(there, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(there) else "permission denied"
    else:   # the permission bits do not stop root, nor tell a pseudo file system (/proc, /sys): try it
        try:
            shutil.rmtree(tempfile.mkdtemp(prefix=".torchspec-write-check-", dir=there))
        except OSError as e:
            why = f"cannot create a directory there: {e.strerror or e}"
    if why:
        raise FileError(f"{label}: {there} is not writable ({why}); choose a writable {key}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
