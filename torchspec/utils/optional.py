"""Lazy imports of optional heavy dependencies, with a one-line install hint when missing.

The distribution is `torchspec-eagle3` (pyproject.toml); the import package stays `torchspec`. The bare name
`torchspec` on the public package index is an unrelated placeholder, so no hint ever names it: from a source
checkout (the usual install, `pip install -e .`) the hint installs the extra from that checkout's path; from a
wheel it names the installed distribution, which pip then finds already installed and only adds the extra's
requirements.
"""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path
from types import ModuleType

DISTRIBUTION = "torchspec-eagle3"


def source_checkout() -> Path | None:
    """The repository this torchspec runs from (its pyproject.toml names our distribution), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if re.search(rf'^name\s*=\s*"{re.escape(DISTRIBUTION)}"', text, re.M) else None


def install_hint(extra: str) -> str:
    """The pip command that installs torchspec's `extra` (a name of pyproject's optional-dependencies)."""
    root = source_checkout()
    if root is not None:
        return f"pip install -e '{root}[{extra}]'"
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def mooncake_extra() -> str:
    """The Mooncake extra for this machine, chosen as scripts/setup_mooncake.sh does: the default wheel links
    libcuda, so a machine without an NVIDIA driver (no nvidia-smi) gets the non-CUDA build."""
    return "mooncake" if shutil.which("nvidia-smi") else "mooncake-cpu"


def require(module_name: str, extra: str) -> ModuleType:
    """Import `module_name`, or raise ImportError telling which torchspec extra provides it.

    Call it inside the function that needs the dependency, never at module top level:
        sgl = require("sglang", "sglang")
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"{module_name} is needed here but is not installed ({e}); "
            f"install it with: {install_hint(extra)}"
        ) from None
