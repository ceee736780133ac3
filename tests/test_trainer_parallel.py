"""Data-parallel trainer on CPU (gloo, 2 processes): DDP and FSDP2 equal one process on the whole batch."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from torchspec.utils.net import free_port

import test_trainer
from test_trainer import batches, make_cfg, make_trainer

MODES = ("ddp", "fsdp")


def _train(rank, world, mode, micro, out_path):
    from torchspec.training.parallel import DistInfo
    from torchspec.training.trainer import Trainer, seed_everything

    cfg = make_cfg(draft_accumulation_steps=2, parallel_mode=mode, max_grad_norm=0.05)
    torch.manual_seed(0)
    head = torch.nn.Linear(test_trainer.H, test_trainer.V, bias=False)
    seed_everything(0)
    tr = Trainer(cfg, test_trainer.ToyDraft(), head, "cpu", dist=DistInfo(rank, world), total_steps=8,
                 loss_fn=test_trainer.toy_loss)
    # each rank takes every other row of each micro-batch
    results = [tr.train_step({k: v[rank::world] for k, v in m.items()}) for m in micro]
    results.append(tr.finish_accumulation())  # the odd micro-batch: a partial window
    state = tr.state_dict()  # a collective under FSDP
    if rank == 0:
        torch.save((state["model"], [r.get("grad_norm") for r in results]), out_path)


def _worker(rank, world, port, micro, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in MODES:
            _train(rank, world, mode, micro, out_dir / f"{mode}.pt")
        dist.barrier()  # both ranks done before either tears gloo down (else a rank can abort at exit)
    finally:
        dist.destroy_process_group()
    # Reached only when both modes succeeded (an exception above exits with status 1). Skipping the
    # interpreter's teardown avoids a rare abort in a C++ destructor at exit ("terminate called without
    # an active exception", seen once in a full-suite run), which would read as a failed rank.
    os._exit(0)


def test_two_ranks_equal_one_process(tmp_path):
    micro = batches(3, b=4)  # accumulation 2: one full window, then a partial one
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, micro, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.time() + 120
        while any(p.exitcode is None for p in procs):
            assert all(p.exitcode in (None, 0) for p in procs), "a rank failed (see its traceback above)"
            assert time.time() < deadline, "ranks timed out"
            time.sleep(0.1)
    finally:
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    ref = make_trainer(make_cfg(draft_accumulation_steps=2, max_grad_norm=0.05))
    ref_norms = [ref.train_step(m).get("grad_norm") for m in micro] + [ref.finish_accumulation()["grad_norm"]]
    for mode in MODES:
        state, grad_norms = torch.load(tmp_path / f"{mode}.pt")
        assert [g is None for g in grad_norms] == [n is None for n in ref_norms] == [True, False, True, False]
        assert [g for g in grad_norms if g is not None] == \
            pytest.approx([n for n in ref_norms if n is not None], rel=1e-5), mode
        for k, v in ref.draft.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=f"{mode}: {k}")
