"""The mooncake store against a real mooncake_master on 127.0.0.1 (TCP), and inference.store selection.

Needs the `mooncake` package (pip install -e '.[mooncake]'); without it the Mooncake tests skip,
unless TORCHSPEC_REQUIRE_MOONCAKE=1 (then they fail).
"""

import os
import time

import pytest
import torch
from store_helpers import (alive, check_capacity_wait, check_odd_dtypes_and_shapes, check_roundtrip,
                           check_shared_across_processes, mooncake_missing, record_bytes, small_mooncake)
from store_helpers import assert_same as _assert_same
from store_helpers import make_record as _record

from torchspec.config.errors import ConfigError
from torchspec.config.schema import Config
from torchspec.transfer.base import StoreFull
from torchspec.transfer.factory import build_store, store_type

SEGMENT = 16 << 20      # the run's Mooncake segment in these tests (the default is 8 GiB)
STAGING = 4 << 20       # each client's local staging buffer


@pytest.fixture
def needs_mooncake():
    reason = mooncake_missing()
    if reason:
        pytest.skip(reason)


def _settings(**kw):
    from torchspec.transfer.mooncake import MooncakeSettings

    return MooncakeSettings(global_segment_size=kw.pop("segment", SEGMENT), local_buffer_size=STAGING, **kw)


@pytest.fixture(scope="module")
def _shared_store():
    if mooncake_missing():
        pytest.skip(mooncake_missing())
    from torchspec.transfer.mooncake import MooncakeStore

    s = MooncakeStore(_settings(), put_timeout_s=5.0)
    yield s
    s.close()


@pytest.fixture
def store(_shared_store):
    """One master for the module's simple tests (starting and stopping one takes ~2 s); each test starts empty."""
    _shared_store.clear()
    assert _shared_store.bytes_used() == 0
    return _shared_store


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_bitwise_and_accounting(store, dtype):
    check_roundtrip(store, dtype)


def test_every_dtype_and_odd_shapes_bit_exact(store):
    check_odd_dtypes_and_shapes(store)


def test_capacity_blocks_until_delete_then_times_out(needs_mooncake):
    from torchspec.transfer.mooncake import MooncakeStore

    rec = _record(1)
    store = MooncakeStore(_settings(), capacity_bytes=2 * record_bytes(rec), put_timeout_s=5.0)
    try:
        check_capacity_wait(store, rec)
    finally:
        store.close()


def test_full_segment_raises_store_full_and_evicts_nothing(needs_mooncake):
    """Without capacity_bytes the Mooncake segment is the bound: a put that finds no room waits, then raises
    StoreFull; records already stored are hard-pinned, never evicted to make room."""
    from torchspec.transfer.mooncake import MooncakeStore

    store = MooncakeStore(_settings(), put_timeout_s=0.3)
    try:
        recs, n = {}, 0
        with pytest.raises(StoreFull, match="global_segment_size"):
            while n < 20:
                recs[f"r{n}"] = _record(n, T=96, H=2048)      # ~3 MB each, in a 16 MiB segment
                store.put(f"r{n}", recs[f"r{n}"])
                n += 1
        assert 3 <= n <= 5
        assert store.keys() == sorted(f"r{i}" for i in range(n))
        for i in range(n):
            _assert_same(store.get(f"r{i}"), recs[f"r{i}"])
        store.delete("r0")                                   # room again
        store.put(f"r{n}", recs[f"r{n}"])
        _assert_same(store.get(f"r{n}"), recs[f"r{n}"])
    finally:
        store.close()


class _CountingClient:
    """Wraps a Mooncake client: counts the records inside put_parts / get_buffer at once (each held 50 ms)."""

    def __init__(self, client):
        import threading

        self._client, self._lock, self.now, self.peak = client, threading.Lock(), 0, 0

    def _held(self, fn, *a, **kw):
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(0.05)
            return fn(*a, **kw)
        finally:
            with self._lock:
                self.now -= 1

    def put_parts(self, *a, **kw):
        return self._held(self._client.put_parts, *a, **kw)

    def get_buffer(self, *a, **kw):
        return self._held(self._client.get_buffer, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.mark.parametrize("max_batch_size", [1, 3])
def test_max_batch_size_bounds_records_in_the_staging_buffer(store, monkeypatch, max_batch_size):
    """mooncake.max_batch_size: at most that many records pass through one client's staging buffer at once
    (puts and gets of 8 threads wait for their turn); every record still round-trips."""
    from concurrent.futures import ThreadPoolExecutor

    from torchspec.transfer.mooncake import MooncakeStore

    copy = MooncakeStore.__new__(MooncakeStore)
    copy.__setstate__(store.__getstate__())          # a process's view of the store (as an engine unpickles it)
    copy.settings = _settings(max_batch_size=max_batch_size)
    copy._reset_process_state()
    counting = _CountingClient(copy._client())
    monkeypatch.setattr(copy, "_mc", counting)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: copy.put(f"k{i}", _record(i)), range(8)))
        got = list(pool.map(lambda i: copy.get(f"k{i}"), range(8)))
    assert counting.peak == max_batch_size
    for i, rec in enumerate(got):
        _assert_same(rec, _record(i))
    copy.close()


def test_processes_share_records_and_accounting(store):
    check_shared_across_processes(store)


def test_close_stops_the_master_it_started(needs_mooncake):
    from torchspec.transfer.mooncake import MooncakeStore

    store = MooncakeStore(_settings())
    pid = store.master_pid
    assert pid is not None and alive(pid)
    store.put("k", _record(3))
    store.close()
    assert not alive(pid)
    assert store.bytes_used() == 0 and store.keys() == []     # like the local store after close
    with pytest.raises(RuntimeError, match="after close"):
        store.put("k2", _record(3))


def test_unreachable_master_is_one_clear_error(needs_mooncake):
    from torchspec.transfer.mooncake import MooncakeStore
    from torchspec.transfer.mooncake_master import free_port

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"mooncake\.master_server_address='127\.0\.0\.1:\d+'.*unreachable"):
        MooncakeStore(_settings(master_address=f"127.0.0.1:{free_port()}"))
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="mooncake.master_server_address='nohostport': expected host:port"):
        MooncakeStore(_settings(master_address="nohostport"))


def test_sizes_mooncake_cannot_use_are_config_errors(store):
    from torchspec.transfer.mooncake import MooncakeStore

    with pytest.raises(ConfigError, match="mooncake.global_segment_size=1048576: Mooncake needs at least"):
        MooncakeStore(_settings(segment=1 << 20))
    with pytest.raises(ConfigError, match=r"staging buffer \(mooncake.local_buffer_size=4194304\)"):
        store.put("big", {"x": torch.zeros(5 << 20, dtype=torch.uint8)})
    assert store.keys() == []


def test_client_setup_failure_is_one_config_error_and_stops_the_master(needs_mooncake, monkeypatch):
    """Mooncake refusing the client (a wrong protocol / device / local_hostname: its own retries take ~20 s,
    so a stand-in refuses here) is one ConfigError naming the keys; the master started for it is stopped."""
    import mooncake.store

    from torchspec.transfer import mooncake_master
    from torchspec.transfer.mooncake import MooncakeStore

    started = []
    real_start = mooncake_master.start_master
    monkeypatch.setattr(mooncake_master, "start_master", lambda: started.append(real_start()) or started[-1])

    class Refusing:
        def setup(self, *args):
            return -1

    monkeypatch.setattr(mooncake.store, "MooncakeDistributedStore", Refusing)
    with pytest.raises(ConfigError, match=r"client setup failed.*protocol 'tcp' \(mooncake\.protocol\)"):
        MooncakeStore(_settings())
    [master] = started
    assert not master.alive()


def test_master_that_cannot_start_is_one_clear_error(needs_mooncake):
    from torchspec.transfer.mooncake_master import start_master

    with pytest.raises(RuntimeError, match="mooncake_master exited at start.*master_server_address is null"):
        start_master(timeout_s=20, extra_flags=("--no_such_flag_torchspec=1",))


def test_given_master_is_used_and_left_running(needs_mooncake):
    """mooncake.master_server_address set: the store connects to that master and does not stop it."""
    from torchspec.transfer.mooncake import MooncakeStore
    from torchspec.transfer.mooncake_master import free_port, start_master

    master = start_master()
    try:
        port = int(master.admin_url.rpartition(":")[2])
        store = MooncakeStore(_settings(master_address=master.rpc_address, master_metrics_port=port))
        assert store.master_pid is None
        store.put("k", _record(4))
        _assert_same(store.get("k"), _record(4))
        store.close()
        assert master.alive()
        with pytest.raises(ConfigError, match=r"mooncake\.master_metrics_port=\d+: no Mooncake master admin server"):
            MooncakeStore(_settings(master_address=master.rpc_address, master_metrics_port=free_port()))
    finally:
        master.stop()


# -- inference.store selection ----------------------------------------------------------------------

def test_store_selection_auto_local_and_multi_node():
    cfg = Config()
    assert cfg.inference.store == "auto" and store_type(cfg) == "local"
    cfg.inference.store = "mooncake"
    assert store_type(cfg) == "mooncake"
    cfg.inference.store = "redis"
    with pytest.raises(ConfigError, match="inference.store='redis'"):
        store_type(cfg)
    cfg.inference.store = "auto"
    cfg.training.training_num_nodes = 2
    assert store_type(cfg) == "mooncake"
    with pytest.raises(ConfigError, match="mooncake.master_server_address is null.*training_num_nodes=2"):
        build_store(cfg)        # a master on 127.0.0.1 cannot serve other nodes


def test_settings_defaults_are_the_schemas():
    from torchspec.config.schema import MooncakeConfig
    from torchspec.transfer.mooncake import MooncakeSettings

    assert MooncakeSettings() == MooncakeSettings.from_config(MooncakeConfig())


def test_build_store_local_by_default(tmp_path):
    from torchspec.transfer.local import LocalStore

    cfg = Config()
    cfg.inference.store_capacity = 1 << 20
    s = build_store(cfg)
    try:
        assert isinstance(s, LocalStore) and s.capacity_bytes == 1 << 20
    finally:
        s.close()


def test_build_store_mooncake_from_config(needs_mooncake):
    from torchspec.transfer.mooncake import MooncakeStore

    cfg = Config()
    cfg.inference.store = "mooncake"
    cfg.mooncake.global_segment_size = SEGMENT
    cfg.mooncake.local_buffer_size = STAGING
    s = build_store(cfg)
    try:
        assert isinstance(s, MooncakeStore) and s.capacity_bytes is None
        s.put("k", _record(2))
        _assert_same(s.get("k"), _record(2))
    finally:
        s.close()


# -- the full pipeline ------------------------------------------------------------------------------

def test_pipeline_two_engines_through_mooncake(tmp_path, tiny_target_dir, cpu_only, needs_mooncake, monkeypatch):
    from pipeline_helpers import ids_by_epoch, tiny_run_config

    import torchspec.transfer.factory as factory
    from torchspec.pipeline.runner import run_training
    from torchspec.transfer.mooncake import MooncakeStore

    built, original = [], factory.build_store
    monkeypatch.setattr(factory, "build_store", lambda cfg, *a: built.append(original(cfg, *a)) or built[-1])

    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, num_epochs=1)
    cfg.inference.store = "mooncake"
    small_mooncake(cfg)
    result = run_training(cfg, progress=False)

    [store] = built
    assert isinstance(store, MooncakeStore)
    from torchspec.data.dataset import from_config, load_tokenizer
    all_ids = sorted(s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False))
    assert sorted(ids_by_epoch(result.trained)[0]) == all_ids and len(all_ids) == 12   # each sample once
    assert result.global_step == 6 and not result.interrupted
    assert all(loss == loss and loss > 0 for _, loss in result.losses)
    assert result.store_bytes_end == 0 and result.store_root is None
    assert result.store_put_bytes > 0 and result.store_put_s > 0      # engines' puts, summed over processes
    assert max(result.pool_sizes) <= cfg.inference.max_sample_pool_size
    assert not alive(store._master.pid)                               # the master is gone


def test_pipeline_ray_engine_actor_through_mooncake(tmp_path, tiny_target_dir, cpu_only, needs_mooncake):
    """The store pickled into a Ray actor (a Ray of this machine, 127.0.0.1, started by the run): every
    sample trained once, the store empty at the end."""
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    from pipeline_helpers import ids_by_epoch, tiny_run_config
    from ray_helpers import loopback_only

    from torchspec.pipeline.runner import run_training

    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=1, num_epochs=1)
    cfg.inference.launcher = "ray"
    cfg.inference.store = "mooncake"
    small_mooncake(cfg)
    with loopback_only():
        result = run_training(cfg, progress=False)
    ids = ids_by_epoch(result.trained)[0]
    assert len(ids) == len(set(ids)) == 12 and result.global_step == 6
    assert result.store_bytes_end == 0 and result.store_put_bytes > 0


def test_master_dies_with_a_killed_owner(needs_mooncake):
    """SIGKILL of the process that started the master (no close(), no finalizers): the master goes too."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from torchspec.transfer.mooncake import MooncakeStore, MooncakeSettings; "
            f"s = MooncakeStore(MooncakeSettings(global_segment_size={SEGMENT}, local_buffer_size={STAGING})); "
            "print(s.master_pid, flush=True); time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), text=True)
    try:
        pid = int(owner.stdout.readline())
        assert alive(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
    finally:
        owner.kill()
        owner.wait()
