"""Start and stop a `mooncake_master` on 127.0.0.1 for one run (when `mooncake.master_server_address` is null).

The master listens for clients' RPCs on a free port and serves its HTTP admin endpoints (`/health`,
`/get_all_keys`) on another; both bind 127.0.0.1 only, so a master we start serves this machine alone.
Transfer-engine metadata needs no server: clients use Mooncake's peer-to-peer handshake.
The master dies with the thread that started it (a parent-death signal: start it from a long-lived thread,
as the runner does from the main one), and `stop()` ends it earlier.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from torchspec.utils.net import LOOPBACK, free_port, free_ports  # noqa: F401  (free_port: re-exported)


def master_binary() -> str:
    """The mooncake_master executable shipped inside the `mooncake` package (the console script of the same
    name only exec()s it), else whatever is on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("mooncake")
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, "mooncake_master")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    path = shutil.which("mooncake_master")
    if path is None:
        from torchspec.utils.optional import install_hint, mooncake_extra

        raise FileNotFoundError(f"mooncake_master is not installed; install it with: {install_hint(mooncake_extra())}")
    return path


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _die_with_parent():
    """A preexec_fn that SIGTERMs the master when the thread that started it dies (Linux), or None.

    libc's prctl is looked up here, in the parent: the child between fork and exec of a threaded
    process (Ray, torch) must not dlopen, which could deadlock on a loader lock another thread held."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


@dataclass
class MasterProcess:
    proc: subprocess.Popen
    rpc_address: str        # host:port clients connect to
    admin_url: str          # http://host:port of the HTTP admin server
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def _log_tail(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln[:1] in "EF"] or lines
    return " | ".join(errors[-n:])


def start_master(timeout_s: float = 30.0, extra_flags: tuple[str, ...] = ()) -> MasterProcess:
    """Start mooncake_master on 127.0.0.1 with free ports and wait until it answers /health."""
    binary = master_binary()
    rpc_port, admin_port = free_ports(2)
    fd, log_path = tempfile.mkstemp(prefix="torchspec-mooncake-master-", suffix=".log")
    flags = [
        f"--rpc_address={LOOPBACK}", f"--rpc_port={rpc_port}",
        f"--metrics_host={LOOPBACK}", f"--metrics_port={admin_port}",
        "--enable_http_metadata_server=false", "--enable_metric_reporting=false",
        # Records are hard-pinned by the store; never evict anything to make room.
        "--eviction_high_watermark_ratio=1.0",
        *extra_flags,
    ]
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen([binary, *flags], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent())
    master = MasterProcess(proc, f"{LOOPBACK}:{rpc_port}", f"http://{LOOPBACK}:{admin_port}", log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if not master.alive():
            tail = _log_tail(log_path)
            master.stop()
            raise RuntimeError(f"mooncake: mooncake_master exited at start (code {proc.returncode}): {tail} "
                               "(mooncake.master_server_address is null, so torchspec starts one on 127.0.0.1)")
        try:
            if b'"ok"' in http_get(master.admin_url + "/health", timeout=1.0):
                return master
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            tail = _log_tail(log_path)
            master.stop()
            raise RuntimeError(f"mooncake: mooncake_master did not become ready within {timeout_s:.0f}s: {tail} "
                               "(mooncake.master_server_address is null, so torchspec starts one on 127.0.0.1)")
        time.sleep(0.05)


def check_reachable(address: str, key: str = "mooncake.master_server_address", timeout_s: float = 5.0) -> None:
    """One clear error when nothing accepts TCP connections at host:port (Mooncake's own client retries for
    about 90 s before failing)."""
    from torchspec.config.errors import ConfigError

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{key}={address!r}: expected host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={address!r}: the Mooncake master is unreachable ({e})") from None


def check_admin(admin_url: str, key: str = "mooncake.master_metrics_port") -> None:
    """One clear error when no Mooncake admin server answers /health at admin_url (the store lists its keys
    there; a wrong port would otherwise fail deep inside the first key listing)."""
    from torchspec.config.errors import ConfigError

    try:
        ok = b'"ok"' in http_get(admin_url + "/health")
    except (urllib.error.URLError, OSError) as e:
        ok, why = False, getattr(e, "reason", e)
    else:
        why = "it does not answer /health as a Mooncake master"
    if not ok:
        port = admin_url.rpartition(":")[2]
        raise ConfigError(f"{key}={port}: no Mooncake master admin server at {admin_url} ({why}); set it to the "
                          "master's --metrics_port")
