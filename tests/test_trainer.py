"""Trainer, optimizer and lr schedule (CPU, tiny shapes).

A small stand-in draft + loss with the Eagle3 loss's calling convention keeps these tests about
the trainer's own logic; tests/test_trainer_eagle3.py runs the same checks on the real draft.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from batch_helpers import random_batch

from torchspec.config.schema import Config
from torchspec.training.optim import lr_at, plan_steps
from torchspec.training.trainer import Trainer, seed_everything

H, V, T = 8, 16, 6


class ToyDraft(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * H, H, bias=False)
        self.norm = torch.nn.LayerNorm(H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, aux):
        return self.lm_head(self.norm(self.fc(aux)))


def toy_loss(draft, target_head, batch, ttt_length, attention_backend, **options):
    """Per-valid-row KL-style loss to the target head's distribution (like eagle3_loss's shape).

    Like eagle3_loss it calls `draft(...)`, so DDP / FSDP hooks on the root module fire."""
    logits = draft(batch["aux_hidden_states"])
    with torch.no_grad():
        p = torch.softmax(target_head(batch["final_hidden_states"]), -1)
    mask = batch["loss_mask"].bool()
    nll = -(p * torch.log_softmax(logits.float(), -1)).sum(-1)
    loss = nll[mask].mean()
    acc = (logits.argmax(-1) == p.argmax(-1))[mask].float().mean()
    return SimpleNamespace(loss=loss, losses=[loss.detach()], accs=[acc])


def make_cfg(**training):
    cfg = Config()
    for k, v in {"learning_rate": 1e-2, "warmup_ratio": 0.25, "min_lr": 1e-3, **training}.items():
        setattr(cfg.training, k, v)
    return cfg


def make_batch(gen, b=2):
    return random_batch(gen, b, T, H, V)


def make_trainer(cfg, total_steps=8, seed=0):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)  # the frozen target head: the same in every run
    seed_everything(seed)
    draft = ToyDraft()
    return Trainer(cfg, draft, head, "cpu", total_steps=total_steps, loss_fn=toy_loss)


def batches(n, b=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(gen, b) for _ in range(n)]


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    kw = dict(peak_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=12, style="cosine")
    assert [lr_at(n, **kw) for n in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    # halfway through the decay (step 8 of 4..12): cosine gives exactly the midpoint
    assert lr_at(8, **kw) == pytest.approx(0.55, abs=1e-12)
    assert lr_at(6, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8)), abs=1e-12)
    assert lr_at(12, **kw) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(50, **kw) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(8, **{**kw, "style": "linear"}) == pytest.approx(0.55, abs=1e-12)
    assert lr_at(10, **{**kw, "style": "linear"}) == pytest.approx(0.1 + 0.9 * 0.25, abs=1e-12)
    assert lr_at(10, **{**kw, "style": "constant"}) == 1.0
    with pytest.raises(ValueError, match="lr_decay_style"):
        lr_at(1, **{**kw, "style": "cosin"})


def test_trainer_reports_the_schedule_it_applies():
    cfg = make_cfg(learning_rate=2e-2, min_lr=2e-3, warmup_ratio=0.25, lr_decay_style="cosine")
    tr = make_trainer(cfg, total_steps=8)
    lrs = [tr.train_step(b)["lr"] for b in batches(10)]
    want = [lr_at(n, peak_lr=2e-2, min_lr=2e-3, warmup_steps=2, total_steps=8, style="cosine") for n in range(1, 11)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert lrs[0] == pytest.approx(1e-2) and lrs[1] == pytest.approx(2e-2) and lrs[7] == pytest.approx(2e-3)
    # lr_total_steps in the config wins over the runner's total
    tr = make_trainer(make_cfg(lr_total_steps=4, warmup_ratio=0.0, lr_decay_style="linear", min_lr=0.0),
                      total_steps=100)
    assert [tr.train_step(b)["lr"] for b in batches(4)] == pytest.approx([7.5e-3, 5e-3, 2.5e-3, 0.0])


def test_weight_decay_only_on_matrices():
    tr = make_trainer(make_cfg(weight_decay=0.1))
    groups = {g["weight_decay"]: g["params"] for g in tr.optimizer.param_groups}
    assert {p.ndim for p in groups[0.1]} == {2} and {p.ndim for p in groups[0.0]} == {1}


def test_accumulation_equals_one_step_on_the_concatenated_batch():
    micro = batches(4, b=2)
    big = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    acc = make_trainer(make_cfg(draft_accumulation_steps=4, max_grad_norm=0.05))
    outs = [acc.train_step(m) for m in micro]
    assert [o["stepped"] for o in outs] == [False, False, False, True] and acc.global_step == 1
    one = make_trainer(make_cfg(draft_accumulation_steps=1, max_grad_norm=0.05))
    out = one.train_step(big)
    assert out["stepped"] and one.global_step == 1
    assert outs[-1]["grad_norm"] == pytest.approx(out["grad_norm"], rel=1e-5)
    assert out["grad_norm"] > 0.05  # the clip was active in both
    for (name, a), b in zip(acc.draft.named_parameters(), one.draft.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # and the parameters did move
    assert not torch.equal(acc.draft.fc.weight, make_trainer(make_cfg()).draft.fc.weight)


def test_partial_window_is_rescaled_to_its_mean():
    micro = batches(2, b=2)
    big = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    acc = make_trainer(make_cfg(draft_accumulation_steps=4))
    for m in micro:
        assert not acc.train_step(m)["stepped"]
    stepped = acc.finish_accumulation()
    assert stepped["step"] == 1 and acc.finish_accumulation() is None
    one = make_trainer(make_cfg())
    one.train_step(big)
    for a, b in zip(acc.draft.parameters(), one.draft.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_same_seed_gives_bitwise_identical_losses():
    def run(seed):
        tr = make_trainer(make_cfg(seed=seed, draft_accumulation_steps=2), seed=seed)
        return [tr.train_step(b)["loss"] for b in batches(8)]

    a, b = run(3), run(3)
    assert a == b  # bitwise: float equality of every loss
    assert run(4) != a


def test_state_dict_round_trip_continues_bit_exactly():
    data = batches(8)
    ref = make_trainer(make_cfg(draft_accumulation_steps=2))
    ref_losses = [ref.train_step(b)["loss"] for b in data]

    first = make_trainer(make_cfg(draft_accumulation_steps=2))
    losses = [first.train_step(b)["loss"] for b in data[:4]]
    state = first.state_dict()
    torch.manual_seed(1234)  # disturb the RNG: load must restore it
    resumed = make_trainer(make_cfg(draft_accumulation_steps=2), seed=99)
    resumed.load_state_dict(state)
    assert resumed.global_step == 2
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    losses += [resumed.train_step(b)["loss"] for b in data[4:]]
    assert losses == ref_losses
    for a, b in zip(resumed.draft.parameters(), ref.draft.parameters()):
        assert torch.equal(a, b)


def test_weights_only_load_restarts_the_schedule():
    src = make_trainer(make_cfg())
    for b in batches(3):
        src.train_step(b)
    dst = make_trainer(make_cfg(), seed=5)
    dst.load_state_dict(src.state_dict(), weights_only=True)
    assert dst.global_step == 0 and not dst.optimizer.state
    assert torch.equal(dst.draft.fc.weight, src.draft.fc.weight)


def test_state_dict_refuses_mid_accumulation():
    tr = make_trainer(make_cfg(draft_accumulation_steps=2))
    tr.train_step(batches(1)[0])
    with pytest.raises(RuntimeError, match="accumulation"):
        tr.state_dict()


def test_eval_step_does_not_touch_weights_or_grads():
    tr = make_trainer(make_cfg())
    before = tr.draft.fc.weight.clone()
    m = tr.eval_step(batches(1)[0])
    assert set(m) >= {"loss", "acc_0"} and torch.equal(before, tr.draft.fc.weight)
    assert all(p.grad is None for p in tr.draft.parameters())


def test_plan_steps_counts_optimizer_steps():
    t = Config().training
    t.micro_batch_size, t.draft_accumulation_steps, t.num_epochs = 2, 3, 2
    p = plan_steps(t, num_samples=25, dp_world=2)  # 7 micro-batches per rank -> 3 steps per epoch
    assert (p.steps_per_epoch, p.num_train_steps, p.num_epochs, p.lr_total_steps) == (3, 6, 2, 6)
    t.num_train_steps, t.lr_total_steps = 7, 10
    p = plan_steps(t, num_samples=25, dp_world=2)
    assert (p.num_train_steps, p.num_epochs, p.lr_total_steps) == (7, 3, 10)
