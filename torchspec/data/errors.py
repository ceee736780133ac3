"""The one error type the data pipeline raises for problems a user can fix."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data, paths or template choice.

    The message always names where the problem is (config key, file and line/record) and,
    where there is one, what to do about it. It is meant to be shown as-is, without a traceback.
    """


def where(path, line: int | None = None, unit: str = "line") -> str:
    """`file` or `file line N` (`unit` is "line" for JSONL, "record" for a JSON list, "row" for parquet)."""
    return f"{path}" if line is None else f"{path} {unit} {line}"
