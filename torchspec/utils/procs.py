"""How a child process ended, in words (shared by the launchers and the engines that start processes)."""

from __future__ import annotations

import signal


def exit_text(code: int | None) -> str:
    """How a process ended, from its exit code (negative = killed by that signal)."""
    if code is None:
        return "is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"
