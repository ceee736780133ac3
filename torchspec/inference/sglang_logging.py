"""The sgl engine's logging on the ModelRunner path (every config): what ``inference.sglang.log_level``,
``log_requests`` and ``log_requests_level`` do there. No SGLang server runs on that path, so SGLang's own
``configure_logger`` (called by its launcher in each scheduler process) and its tokenizer manager's request log
never run; this module does their jobs for our processes. No sglang import.

- log_level: in each TP rank process (a process of its own, as SGLang's scheduler is), the root logger gets the
  level and one stderr handler with SGLang's usual line, ``[<time> TP<rank>] <message>``, so SGLang's and the
  rank's messages read as a scheduler's would; in the engine's own process (tp_size 1: the ModelRunner runs
  there, next to torchspec's logging) only the ``sglang`` logger's level is set, torchspec's lines unchanged.
- log_requests: the engine logs every forward it serves at INFO, through the
  ``torchspec.inference.sglang.requests`` logger (the run's log; ``request_logger``), with ``request_log_lines``;
  log_requests_level picks the detail: 0 one line per forward, its sample ids and token counts; 1 also a line per
  sample, its length, loss-masked (trained) tokens and images; 2 also the first HEAD_IDS input ids of each; 3 all.
"""

from __future__ import annotations

import logging
from typing import Sequence

HEAD_IDS = 64   # input ids shown per sample at log_requests_level 2
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def rank_log_format(tp_rank: int) -> str:
    """SGLang's scheduler line: time and the process's TP rank, then the message."""
    return f"[%(asctime)s TP{int(tp_rank)}] %(message)s"


def configure_rank_logging(level: str, tp_rank: int) -> None:
    """In a TP rank process: the root logger at `level` (inference.sglang.log_level), its handlers replaced by
    one stderr handler with ``rank_log_format``."""
    logging.basicConfig(level=_level(level), format=rank_log_format(tp_rank), datefmt=DATE_FORMAT, force=True)


def set_sglang_log_level(level: str) -> None:
    """In the engine's process (tp_size 1): SGLang's loggers at `level`; the process's other logging unchanged."""
    logging.getLogger("sglang").setLevel(_level(level))


def _level(name: str) -> int:
    """The logging level of a name; WARNING (the key's default) for a name logging does not know (a config never
    has one: torchspec.config.validate refuses it)."""
    value = logging.getLevelName(str(name).upper())
    return value if isinstance(value, int) else logging.WARNING


REQUEST_LOGGER = "torchspec.inference.sglang.requests"


def request_logger() -> logging.Logger:
    """The logger of log_requests' lines, at INFO whatever the process's root level (a Ray worker's is WARNING);
    in a process whose logging nobody configured (a spawned engine process) it gets a stderr handler with the
    driver's line format, so the lines are not dropped."""
    log = logging.getLogger(REQUEST_LOGGER)
    log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    return log


def request_log_lines(records: Sequence, requests: Sequence[tuple], level: int) -> list[str]:
    """The log of one forward (log_requests): `records` are the samples as stored (sample_id, loss_mask,
    images), `requests` the (input ids, multimodal inputs) the ranks run, in the same order."""
    counts = [len(ids) for ids, _ in requests]
    lines = [f"sgl engine: forward of {len(requests)} request(s), {sum(counts)} tokens: "
             + ", ".join(f"{r.sample_id} ({n})" for r, n in zip(records, counts))]
    if level < 1:
        return lines
    for r, (ids, mm) in zip(records, requests):
        ids = list(ids)
        line = (f"  {r.sample_id}: {len(ids)} tokens, {int(r.loss_mask.sum())} loss-masked"
                + (f", {len(r.images)} image(s)" if getattr(r, "images", ()) else ""))
        if level == 2:
            more = len(ids) - HEAD_IDS
            line += f", input ids {ids[:HEAD_IDS]}" + (f" ... ({more} more)" if more > 0 else "")
        elif level >= 3:
            line += f", input ids {ids}"
        lines.append(line)
    return lines
