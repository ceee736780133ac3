"""How a dead trainer rank or inference engine is reported: one error naming which one died and how
(exit code or signal of a process, Ray's reason for an actor), raised by the launchers as soon as
they see it, so a run stops within seconds instead of at training.distributed_timeout_minutes."""

from __future__ import annotations

from torchspec.transfer.base import StoreUnavailable
from torchspec.utils.procs import exit_text  # noqa: F401  (re-exported: the launchers import it from here)


class WorkerFailure(RuntimeError):
    """A trainer rank or inference engine died (crash, kill, out of memory) or raised."""


def ray_death_text(error) -> str:
    """Ray's actor-death error cut to what says why: its first sentence and the worker's exit type and
    detail (Ray's message goes on with ids and generic advice)."""
    text = " ".join(ln.strip() for ln in str(error).splitlines() if ln.strip())
    text = text.split(" Some common causes")[0]
    first = text.split(". ")[0].rstrip(".") + "."
    exit_at = text.find("Worker exit type:")
    if exit_at < 0 and " is unavailable" in first:
        # a call in flight when the actor died gets Ray's death report only if it comes within about a second
        # (timeout_ms_task_wait_for_death_info); later (a loaded machine, a lost node) Ray calls the actor
        # "temporarily unavailable", which, for a worker this run then stops on, would mislead
        return f"its connection broke mid-call, before Ray reported why (Ray: {first.rstrip('.')})."
    return first + (" " + text[exit_at:] if exit_at >= 0 else "")


def store_lost(error) -> StoreUnavailable | None:
    """The StoreUnavailable a Ray actor's task raised (Ray's task error carries it as `cause`), else None: a lost
    store is reported as itself (one line naming the master), not as the worker that met it first."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, StoreUnavailable) else None
