"""Lazy imports of optional heavy dependencies, with a one-line install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


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
            f"install it with: pip install 'torchspec[{extra}]'"
        ) from None
