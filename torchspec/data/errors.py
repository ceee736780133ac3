"""The one error type the data pipeline raises for problems a user can fix."""

from __future__ import annotations

from torchspec.config.schema import BAD_RECORDS_NAMED, ON_BAD_RECORD


class DataError(ValueError):
    """A problem with the user's data, paths or template choice.

    The message always names where the problem is (config key, file and line/record) and,
    where there is one, what to do about it. It is meant to be shown as-is, without a traceback.
    """


def where(path, line: int | None = None, unit: str = "line") -> str:
    """`file` or `file line N` (`unit` is "line" for JSONL, "record" for a JSON list, "row" for parquet)."""
    return f"{path}" if line is None else f"{path} {unit} {line}"


class BadRecords:
    """What dataset.on_bad_record does with a record that raised a DataError.

    "error": the DataError propagates (the run stops with that one line). "skip": the record is left out,
    counted, and its message (which names file and line) kept for the first `named` records.
    """

    def __init__(self, policy: str = "error", named: int | None = None):
        if policy not in ON_BAD_RECORD:
            raise DataError(f"dataset.on_bad_record: unknown value {policy!r}; choose one of: "
                            f"{', '.join(ON_BAD_RECORD)}")
        self.policy = policy
        self.limit = BAD_RECORDS_NAMED if named is None else named
        self.count = 0
        self.named: list[str] = []

    @property
    def skipping(self) -> bool:
        return self.policy == "skip"

    def handle(self, error: DataError) -> None:
        """Raise `error` ("error"), or count it and keep its message ("skip")."""
        if not self.skipping:
            raise error
        self.count += 1
        if len(self.named) < self.limit:
            self.named.append(str(error))
