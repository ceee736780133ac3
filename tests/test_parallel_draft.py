"""Data-parallel training of the real Eagle3 draft: DDP and FSDP2 over 2 ranks equal one process.

Each rank trains on half the rows of every micro-batch (AdamW, accumulation 2, clipping); one process
trains on the whole micro-batches. The weights after a few optimizer steps must agree, measured
relative to how far training moved them: to fp32 precision on CPU (2 gloo processes, runs in CI), to
bf16 precision on 2 GPUs (NCCL, bf16 autocast; marked `gpu`, needs 2 CUDA devices).
"""

import os

import pytest
import torch
from batch_helpers import random_batch
import torch.multiprocessing as mp

from torchspec.utils.net import free_port

H, V, B, STEPS = 256, 512, 4, 3
T = 256  # tokens per row on GPU (the CPU variant uses fewer)


def _micro_batches(n):
    g = torch.Generator().manual_seed(1)
    return [random_batch(g, B, T, H, V) for _ in range(n)]


def _train(device, rank, world, mode, out_path):
    from torchspec.config.schema import Config
    from torchspec.models.draft import DraftConfig, build_draft
    from torchspec.models.target_head import TargetHead
    from torchspec.training.parallel import DistInfo
    from torchspec.training.trainer import Trainer, seed_everything

    cfg = Config()
    t = cfg.training
    t.ttt_length, t.learning_rate, t.warmup_ratio, t.draft_accumulation_steps = 3, 1e-3, 0.0, 2
    t.max_grad_norm, t.parallel_mode, t.attention_backend = 0.5, mode, "sdpa"
    dcfg = DraftConfig.from_dict({
        "hidden_size": H, "intermediate_size": 2 * H, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4 * T,
        "vocab_size": V, "draft_vocab_size": V,
    })
    g = torch.Generator().manual_seed(0)
    head = TargetHead(torch.randn(V, H, generator=g) / H ** 0.5, torch.randn(V, H, generator=g))
    seed_everything(0)
    draft = build_draft(dcfg, target_head=head)
    init = {k: v.detach().clone() for k, v in draft.state_dict().items()}
    tr = Trainer(cfg, draft, head, device, dist=DistInfo(rank, world) if world > 1 else None,
                 total_steps=STEPS)
    for m in _micro_batches(2 * STEPS):
        tr.train_step({k: v[rank::world] for k, v in m.items()})
    state = tr.state_dict()  # collective under FSDP
    if rank == 0:
        torch.save({"init": init, "final": {k: v.float().cpu() for k, v in state["model"].items()}}, out_path)


def _worker(rank, world, port, out_dir, cuda, tokens):
    import torch.distributed as dist

    global T
    T = tokens
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in ("ddp", "fsdp"):
            _train(f"cuda:{rank}" if cuda else "cpu", rank, world, mode, out_dir / f"{mode}.pt")
        dist.barrier()  # both ranks done before either tears gloo down (else a rank can abort at exit)
    finally:
        dist.destroy_process_group()
    # Reached only when both modes succeeded (an exception above exits with status 1). Skipping the
    # interpreter's teardown avoids a rare abort in a C++ destructor at exit ("terminate called without
    # an active exception", seen once in a full-suite run), which would read as a failed rank.
    os._exit(0)


@pytest.mark.parametrize("cuda", [
    False,
    pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                  reason="needs 2 CUDA devices")]),
], ids=["cpu-gloo", "cuda-nccl"])
def test_ddp_and_fsdp2_equal_one_process(tmp_path, monkeypatch, cuda):
    tokens = T if cuda else 24
    monkeypatch.setattr(__import__(__name__), "T", tokens)
    _train("cuda:0" if cuda else "cpu", 0, 1, "ddp", tmp_path / "single.pt")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, tmp_path, cuda, tokens)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    single = torch.load(tmp_path / "single.pt")
    for mode in ("ddp", "fsdp"):
        other = torch.load(tmp_path / f"{mode}.pt")
        for name, w in single["final"].items():
            if not torch.is_floating_point(w):
                continue
            moved = (w - single["init"][name].float()).norm()
            if moved == 0:  # frozen (embeddings): must be untouched on both sides
                assert torch.equal(other["final"][name], w), (mode, name)
                continue
            rel = ((other["final"][name] - w).norm() / moved).item()
            print(f"{mode} {name}: |diff| / |update| = {rel:.2e}")
            # measured on 2 H200 (bf16 autocast), DDP: at most 4.0e-2; on CPU (fp32): ~1e-5
            assert rel < (0.1 if cuda else 1e-3), (mode, name, rel)
