"""The `mooncake` store: hidden-state records in a Mooncake distributed store, reachable from any node.

Layout. One Mooncake object per record, named ``torchspec/<run id>/r/<quoted key>``, holding the record
in `torchspec.transfer.record`'s layout (the local store's file format). One object rather
than one per tensor because a record is produced, consumed and deleted as a unit: one master round trip
per put/get/delete instead of four, a reader sees a whole record or none (Mooncake publishes an object
at the end of its put), and each key has one size for the byte accounting.

Memory. The process that creates the store (the trainer driver) mounts the run's global segment
(``mooncake.global_segment_size``); every process that unpickles it (engines, trainer ranks, Ray actors,
on any node) opens its own client that mounts nothing, so records live with their consumer and survive
their producer. Records are hard-pinned: Mooncake never evicts them. A put that finds no room (the
segment is full, or ``capacity_bytes`` would be exceeded) retries until ``put_timeout_s``, then raises
`StoreFull`.

Staging buffer. Every put and get passes through the client's registered staging buffer
(``mooncake.local_buffer_size``). A client lets at most ``mooncake.max_batch_size`` records through it at once
(the other threads wait), and the run's start checks that that many records of ``mooncake.max_seq_len`` tokens
fit the buffer (`torchspec.transfer.capacity.check_mooncake`), so a transfer never finds the buffer full.

Accounting is read from Mooncake itself, so it holds across processes and nodes: ``keys()`` lists the run's
objects from the master's HTTP admin server (``/get_all_keys``), ``bytes_used()`` sums their sizes
(header + payload, like the local store). The ``capacity_bytes`` check is made before each put and
is not atomic across producers: concurrent puts may overshoot it by one record each (the segment size
is the hard limit). ``put_stats()`` sums small per-process ledger objects under ``torchspec/<run id>/s/``.

The master. With ``mooncake.master_server_address`` null the creating process starts ``mooncake_master``
on 127.0.0.1 (`torchspec.transfer.mooncake_master`) and stops it in ``close()``; otherwise it connects to
the given master, whose admin server is ``mooncake.master_metrics_port`` on the same host. Transfer-engine
metadata goes peer to peer ("P2PHANDSHAKE") unless ``mooncake.metadata_server`` names a server.

Losing the master. A Mooncake call that fails is followed by a one-second ``/health`` probe of the master's
admin server; when that does not answer, the call raises `StoreUnavailable` naming the master's address and
the operation, and from then on this process's store fails at once (no more RPCs, each of which Mooncake
retries for seconds) while ``clear()`` and ``close()`` only drop the client, so a run's clean-up finishes.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import uuid
import weakref
from dataclasses import dataclass

import torch

from torchspec.config.errors import ConfigError
from torchspec.config.schema import MooncakeConfig
from torchspec.transfer import record
from torchspec.transfer.base import PUT_TIMEOUT_S, StoreFull, StoreUnavailable, over_capacity

_RECORDS, _LEDGERS = "r/", "s/"

# Mooncake's error codes (mooncake-store/include/types.h) that the store reacts to.
NO_AVAILABLE_HANDLE = -200      # no segment has room for the object
BUFFER_ALLOC_FAILED = -600      # the client's local staging buffer has no room
OBJECT_NOT_FOUND = -704
MIN_SEGMENT = 16 << 20          # the smallest global segment Mooncake's allocator accepts


def _host_bytes(t: torch.Tensor) -> memoryview:
    flat = record.tensor_bytes(t)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.numpy())


def encode_record(tensors: dict[str, torch.Tensor]) -> tuple[list, int]:
    """(parts, total bytes): the buffers whose concatenation is the stored object (no copy of the payload)."""
    prefix, offsets, total = record.layout(tensors)
    parts, pos = [prefix], len(prefix)
    for t, off in zip(tensors.values(), offsets):
        if off > pos:
            parts.append(bytes(off - pos))
        if t.numel():
            parts.append(_host_bytes(t))
        pos = off + t.numel() * t.element_size()
    if total > pos:
        parts.append(bytes(total - pos))
    return parts, total


_log = logging.getLogger("torchspec.transfer")

# Mooncake's own log level, read from the environment when its library loads: WARNING unless
# logging.log_level=debug (then its INFO lines, ~15 per process at start). A value the user set is kept.
LOG_ENV = "MC_LOG_LEVEL"
# glog lines every healthy client start prints (at error level, though nothing is wrong): dropped unless verbose.
SETUP_NOISE = ("Logging before InitGoogleLogging()", "Local segment descriptor not found")


def mooncake_log_env(verbose: bool) -> dict[str, str]:
    """The environment that sets Mooncake's log level, for this process or one it starts."""
    return {LOG_ENV: os.environ.get(LOG_ENV) or ("INFO" if verbose else "WARNING")}


def _quiet_setup_stderr(verbose: bool):
    """Around a client's setup: its stderr (file descriptor 2, where Mooncake's C++ logs go) is held and written
    back without the SETUP_NOISE lines; everything else, errors included, still reaches stderr."""
    import contextlib
    import sys
    import tempfile

    @contextlib.contextmanager
    def held():
        if verbose:
            yield
            return
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                kept = [ln for ln in tmp.read().splitlines(keepends=True)
                        if not any(n.encode() in ln for n in SETUP_NOISE)]
                if kept:
                    os.write(2, b"".join(kept))
    return held()


def require_mooncake(verbose: bool = False):
    """Import mooncake.store, or one ImportError with the install hint (and which wheel / system library)."""
    from torchspec.utils.optional import install_hint, mooncake_extra, require

    os.environ.update(mooncake_log_env(verbose))   # before the library loads: it reads the level once

    try:
        return require("mooncake.store", mooncake_extra())
    except ImportError as e:
        msg = str(e)
        if "libcuda" in msg:
            msg += ("; on a machine without CUDA use the non-CUDA build instead: pip uninstall -y mooncake-transfer-engine "
                    f"&& {install_hint('mooncake-cpu')}")
        elif "libibverbs" in msg:
            msg += "; Mooncake also needs the system library libibverbs (apt-get install libibverbs1)"
        raise ImportError(msg) from None


class MooncakeSetupError(ConfigError, ConnectionError):
    """A client could not connect with the `mooncake` settings (one line naming the keys, via train_entry)."""


_D = MooncakeConfig   # the defaults live in the schema only


@dataclass(frozen=True)
class MooncakeSettings:
    """What every process needs to open a client (built from the `mooncake` config section)."""
    master_address: str | None = _D.master_server_address      # host:port; None = start a master on 127.0.0.1
    master_metrics_port: int = _D.master_metrics_port
    metadata_server: str | None = _D.metadata_server
    metadata_port: int | None = _D.metadata_port
    protocol: str = _D.protocol
    device_name: str = _D.device_name
    local_hostname: str | None = _D.local_hostname
    global_segment_size: int = _D.global_segment_size
    local_buffer_size: int = _D.local_buffer_size
    max_batch_size: int = _D.max_batch_size    # records through one client's staging buffer at once
    verbose: bool = False   # logging.log_level=debug: Mooncake's INFO log, unfiltered

    @classmethod
    def from_config(cls, mc, verbose: bool = False) -> "MooncakeSettings":
        return cls(verbose=verbose, master_address=mc.master_server_address, master_metrics_port=int(mc.master_metrics_port),
                   metadata_server=mc.metadata_server, metadata_port=mc.metadata_port, protocol=mc.protocol,
                   device_name=mc.device_name or "", local_hostname=mc.local_hostname,
                   global_segment_size=int(mc.global_segment_size), local_buffer_size=int(mc.local_buffer_size),
                   max_batch_size=int(mc.max_batch_size))

    def metadata(self) -> str:
        if not self.metadata_server:
            return "P2PHANDSHAKE"
        if self.metadata_port and "://" not in self.metadata_server and ":" not in self.metadata_server:
            return f"http://{self.metadata_server}:{self.metadata_port}/metadata"
        return self.metadata_server


def _route_ip(address: str) -> str:
    """This node's IP on the route to host:port (a UDP connect sends nothing)."""
    host = address.rpartition(":")[0].strip("[]")
    if host.startswith("127.") or host == "localhost":
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


# Clients inherited through fork(): kept referenced, since destroying one in the child would disconnect
# (and unmount the segment of) the parent's client.
_inherited_clients: list = []
# Clients of a lost master, never closed (closing one retries the master's RPCs for seconds).
_abandoned_clients: list = []


def _stop_master(master) -> None:
    master.stop()


class MooncakeStore:
    def __init__(self, settings: MooncakeSettings | None = None, capacity_bytes: int | None = None,
                 put_timeout_s: float = PUT_TIMEOUT_S):
        from torchspec.transfer import mooncake_master as mm

        self.settings = settings or MooncakeSettings()
        require_mooncake(self.settings.verbose)
        if self.settings.global_segment_size < MIN_SEGMENT:
            raise ConfigError(f"mooncake.global_segment_size={self.settings.global_segment_size}: Mooncake needs "
                              f"at least {MIN_SEGMENT} bytes (16MB)")
        self.capacity_bytes = capacity_bytes
        self.put_timeout_s = put_timeout_s
        self.run_id = uuid.uuid4().hex
        self._prefix = f"torchspec/{self.run_id}/"
        self._owner = True        # False in every copy unpickled from this one
        self._owner_pid = os.getpid()
        self._closed = False
        self._master = None
        self._finalizer = None
        if self.settings.master_address is None:
            self._master = mm.start_master()
            self.master_address = self._master.rpc_address
            self.admin_url = self._master.admin_url
            self._finalizer = weakref.finalize(self, _stop_master, self._master)
        else:
            self.master_address = self.settings.master_address
            mm.check_reachable(self.master_address)
            host = self.master_address.rpartition(":")[0]
            self.admin_url = f"http://{host}:{self.settings.master_metrics_port}"
            mm.check_admin(self.admin_url)
        self._reset_process_state()
        try:
            self._client()   # the owner mounts the run's segment now, so engines have somewhere to put
        except BaseException:
            self.close()
            raise

    def _reset_process_state(self) -> None:
        self._gone = None       # why the master was found lost (this process), else None
        self._mc = self._pin = None
        self._mc_pid = None
        self._ledger = None
        self._put_bytes = 0
        self._put_ns = 0
        self._in_flight = threading.BoundedSemaphore(self.settings.max_batch_size)   # records in the staging buffer

    # Pickled to engines / trainer ranks / Ray actors: they open their own client; only the owner stops the master.
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_mc", "_pin", "_master", "_finalizer", "_in_flight")}
        state["_master"] = state["_finalizer"] = None
        state["_owner"] = False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_process_state()

    @property
    def master_pid(self) -> int | None:
        """Pid of the master this store started (owner process only), else None."""
        return self._master.pid if self._master is not None else None

    def _is_owner(self) -> bool:
        return self._owner and os.getpid() == self._owner_pid

    def _client(self):
        if self._gone is not None:
            raise self._lost(self._gone)
        if self._mc is not None and self._mc_pid == os.getpid():
            return self._mc
        if self._closed:
            raise RuntimeError("mooncake store: used after close()")
        if self._mc is not None:
            _inherited_clients.append(self._mc)
        s = self.settings
        require_mooncake(s.verbose)   # in an engine / rank / Ray actor: the log level before the library loads
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        owner = self._is_owner()
        hostname = s.local_hostname or _route_ip(self.master_address)
        with _quiet_setup_stderr(s.verbose):
            client = MooncakeDistributedStore()
            rc = client.setup(hostname, s.metadata(), s.global_segment_size if owner else 0, s.local_buffer_size,
                              s.protocol, s.device_name, self.master_address)
        if rc != 0:
            raise MooncakeSetupError(
                f"mooncake: client setup failed (code {rc}; Mooncake's log above says why) for master "
                f"{self.master_address} (mooncake.master_server_address), metadata {s.metadata()!r} "
                f"(mooncake.metadata_server), protocol {s.protocol!r} (mooncake.protocol), local_hostname {hostname!r} (mooncake.local_hostname)")
        _log.info("mooncake client (pid %d): %s -> master %s over %s%s", os.getpid(), hostname, self.master_address,
                  s.protocol, f", {s.global_segment_size} B segment mounted" if owner else "")
        self._pin = ReplicateConfig()
        self._pin.with_hard_pin = True
        self._mc, self._mc_pid = client, os.getpid()
        self._ledger = None
        self._put_bytes = self._put_ns = 0
        return client

    # -- a lost master -------------------------------------------------------------------------------
    def master_down(self) -> bool:
        """Whether the master's admin server fails to answer /health within a second."""
        from torchspec.transfer.mooncake_master import http_get

        try:
            return b'"ok"' not in http_get(self.admin_url + "/health", timeout=1.0)
        except (urllib.error.URLError, OSError):
            return True

    def _lost(self, what: str) -> StoreUnavailable:
        self._gone = self._gone or what
        whose = "started by this run" if self.settings.master_address is None else "mooncake.master_server_address"
        return StoreUnavailable(f"the Mooncake master at {self.master_address} ({whose}; admin {self.admin_url}) "
                                f"stopped answering: {self._gone}")

    def _failed(self, what: str) -> Exception:
        """The error of a Mooncake call that failed: StoreUnavailable when the master is gone, else RuntimeError."""
        if self._gone is not None or self.master_down():
            return self._lost(what)
        return RuntimeError(f"mooncake store: {what}")

    def _name(self, key: str) -> str:
        return self._prefix + _RECORDS + urllib.parse.quote(key, safe="")

    def _listed(self, kind: str) -> list[str]:
        from torchspec.transfer.mooncake_master import http_get

        if self._gone is not None:
            raise self._lost(self._gone)
        try:
            text = http_get(self.admin_url + "/get_all_keys").decode()
        except (urllib.error.URLError, OSError) as e:
            raise self._failed(f"listing the run's keys at {self.admin_url} failed ({getattr(e, 'reason', e)})") from None
        head = self._prefix + kind
        return [k for k in text.split("\n") if k.startswith(head)]

    # -- the Store protocol ------------------------------------------------------------------------
    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        mc = self._client()
        name = self._name(key)
        if mc.is_exist(name) == 1:
            raise KeyError(f"mooncake store: key {key!r} is already present")
        parts, total = encode_record(tensors)
        if total > self.settings.local_buffer_size:
            raise ConfigError(f"mooncake store: a record of {total} bytes does not fit the client's staging "
                              f"buffer (mooncake.local_buffer_size={self.settings.local_buffer_size})")
        deadline = time.monotonic() + self.put_timeout_s
        self._wait_capacity(total, deadline)
        t0 = time.perf_counter_ns()
        while True:
            with self._in_flight:
                rc = mc.put_parts(name, *parts, config=self._pin)
            if rc == 0:
                break
            if rc not in (NO_AVAILABLE_HANDLE, BUFFER_ALLOC_FAILED):
                raise self._failed(f"put of {key!r} ({total} bytes) failed with Mooncake code {rc}")
            if time.monotonic() > deadline:
                raise StoreFull(
                    f"mooncake store: a record of {total} bytes found no room within {self.put_timeout_s:.0f}s "
                    f"(in use {self.bytes_used()} bytes); raise mooncake.global_segment_size or lower "
                    "inference.max_sample_pool_size")
            time.sleep(0.01)
        self._put_bytes += total
        self._put_ns += time.perf_counter_ns() - t0
        self._write_ledger(mc)

    def _wait_capacity(self, nbytes: int, deadline: float) -> None:
        if self.capacity_bytes is None:
            return
        from torchspec.transfer.base import RoomWait

        wait = RoomWait("mooncake", nbytes, self.capacity_bytes, self.put_timeout_s)
        while True:
            used = self.bytes_used()
            if used + nbytes <= self.capacity_bytes:
                return
            if nbytes > self.capacity_bytes or time.monotonic() > deadline:
                raise over_capacity("mooncake", nbytes, self.capacity_bytes, used)
            wait.still_waiting(used)
            time.sleep(0.01)

    def _write_ledger(self, mc) -> None:
        if self._ledger is None:
            self._ledger = self._prefix + _LEDGERS + uuid.uuid4().hex
        rc = mc.upsert(self._ledger, struct.pack("<qq", self._put_bytes, self._put_ns), self._pin)
        if rc != 0:
            raise self._failed(f"writing put statistics failed with Mooncake code {rc}")

    def get(self, key: str) -> dict[str, torch.Tensor]:
        with self._in_flight:
            buf = self._get_bytes(key)
        return record.decode(buf)

    def _get_bytes(self, key: str) -> torch.Tensor:
        handle = self._client().get_buffer(self._name(key))
        if handle is None:
            if self.master_down():
                raise self._lost(f"get of {key!r} failed")
            if self._client().is_exist(self._name(key)) == 1:
                raise RuntimeError(f"mooncake store: get of {key!r} failed (Mooncake's log above says why)")
            raise KeyError(f"mooncake store: no key {key!r}")
        # Copy out of the client's staging buffer at once: returned tensors own their memory and the
        # staging buffer (mooncake.local_buffer_size) is free for the next transfer.
        buf = torch.frombuffer(handle, dtype=torch.uint8).clone()
        del handle
        return buf

    def delete(self, key: str) -> None:
        rc = self._client().remove(self._name(key), True)   # force: a reader's lease does not block a delete
        if rc == OBJECT_NOT_FOUND:
            raise KeyError(f"mooncake store: no key {key!r}")
        if rc != 0:
            raise self._failed(f"delete of {key!r} failed with Mooncake code {rc}")

    def keys(self) -> list[str]:
        if self._closed:
            return []
        n = len(self._prefix + _RECORDS)
        return sorted(urllib.parse.unquote(k[n:]) for k in self._listed(_RECORDS))

    def bytes_used(self) -> int:
        if self._closed:
            return 0
        mc = self._client()
        return sum(max(mc.get_size(k), 0) for k in self._listed(_RECORDS))   # < 0: deleted since listed

    def put_stats(self) -> tuple[int, float]:
        """(bytes put, seconds spent inside put) summed over every process using this store."""
        mc = self._client()
        nbytes = ns = 0
        for k in self._listed(_LEDGERS):
            raw = mc.get(k)
            if len(raw) == 16:
                b, n = struct.unpack("<qq", raw)
                nbytes, ns = nbytes + b, ns + n
        return nbytes, ns / 1e9

    def clear(self) -> None:
        """Delete every record of this run (used on shutdown so the store ends empty); nothing once the master
        is lost (its records went with it)."""
        if self._gone is not None:
            return
        self._client().remove_by_regex("^" + re.escape(self._prefix + _RECORDS), True)

    def close(self) -> None:
        """The owner deletes the run's objects, disconnects and stops the master it started; any other
        process only disconnects its own client. With the master lost, only the client is dropped."""
        owner = self._is_owner()
        mc = self._mc if self._mc_pid == os.getpid() else None
        if mc is not None and self._gone is not None:
            _abandoned_clients.append(mc)   # its close() would retry the lost master for seconds
        elif mc is not None:
            if owner:
                mc.remove_by_regex("^" + re.escape(self._prefix), True)
            mc.close()
        self._mc = None
        if owner:
            self._closed = True     # the run's objects are gone (a master we started goes with them)
            if self._finalizer is not None:
                self._finalizer()
