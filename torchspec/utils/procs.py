"""Child processes: how one ended, in words, and the job loop of a worker process (shared by the launchers and
the engines that start processes)."""

from __future__ import annotations

import os
import queue
import signal
import time
from typing import Any, Iterator

PARENT_CHECK_S = 2.0   # how often an idle worker process checks that its parent still exists


def inbox_jobs(inbox, check_s: float = PARENT_CHECK_S) -> Iterator[Any]:
    """A worker's jobs from `inbox` until a None (stop) arrives or its parent process is gone: a worker that
    outlives its parent without a stop (only non-daemonic ones can) ends instead of waiting forever."""
    parent = os.getppid()
    while True:
        try:
            job = inbox.get(timeout=check_s)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if job is None:
            return
        yield job


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


DRAIN_WAIT_S = 0.05   # how long dropping a worker's queued jobs waits for one more (the queue's feeder thread may
                      # still be writing jobs the pipe had no room for)


def drop_queued(inbox) -> int:
    """Take every job still queued in `inbox` (one this process put there), so the worker reads the stop that
    follows right after the job it is on; returns how many were dropped."""
    dropped = 0
    while True:
        try:
            inbox.get(timeout=DRAIN_WAIT_S)
        except (queue.Empty, OSError, ValueError):
            return dropped
        dropped += 1


def stop_workers(procs, inboxes, grace: float, drop_jobs: bool = False) -> None:
    """Ask each live worker to stop (a None job), wait up to `grace` s in all, terminate those still running
    (e.g. stuck in a collective), then drop the inboxes' feeder-thread joins: jobs still queued for a worker
    that died (a full pipe nobody reads) would block that thread for good, and multiprocessing joins it at
    exit, hanging the caller after its error; nothing queued is wanted any more. drop_jobs: first take the
    jobs still queued (independent workers only: workers that must run the same jobs in lockstep, as tensor-
    parallel ranks, could then stop at different jobs), so a live worker stops after the job it is on instead
    of working through its backlog (up to a whole prompt queue) before it reads the stop."""
    if drop_jobs:
        for q in inboxes:
            drop_queued(q)
    for q, p in zip(inboxes, procs):
        if p.is_alive():
            q.put(None)
    deadline = time.monotonic() + grace
    for p in procs:
        if p.pid is None:   # never started (a failed start)
            continue
        p.join(timeout=max(deadline - time.monotonic(), 0.01))
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    for q in inboxes:
        q.cancel_join_thread()
        q.close()
