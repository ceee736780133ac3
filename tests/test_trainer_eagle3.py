"""The Trainer on the real Eagle3 draft + TTT loss (CPU, tiny shapes)."""

import pytest
import torch
from batch_helpers import random_batch
from safetensors.torch import load_file

from torchspec.config.schema import Config
from torchspec.models.draft import DraftConfig, build_draft
from torchspec.models.target_head import TargetHead
from torchspec.training.checkpoint import CheckpointManager, load_checkpoint
from torchspec.training.trainer import Trainer, seed_everything

H, V, T = 32, 40, 12


def draft_config():
    return DraftConfig.from_dict({
        "hidden_size": H, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "vocab_size": V, "draft_vocab_size": V,
    })


def target_head():
    g = torch.Generator().manual_seed(0)
    return TargetHead(torch.randn(V, H, generator=g), torch.randn(V, H, generator=g))


def make_trainer(seed=0, **training):
    cfg = Config()
    cfg.training.ttt_length, cfg.training.learning_rate, cfg.training.warmup_ratio = 3, 3e-3, 0.0
    cfg.training.seed = seed
    for k, v in training.items():
        setattr(cfg.training, k, v)
    head = target_head()
    seed_everything(seed)
    draft = build_draft(draft_config(), target_head=head)
    return Trainer(cfg, draft, head, "cpu", total_steps=20)


def batches(n, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [random_batch(g, b, T, H, V) for _ in range(n)]


def test_accumulation_matches_the_concatenated_batch():
    # Equal lengths + full loss masks + full draft vocab: every micro-batch has the same number of
    # valid rows per TTT step, so the mean of micro-batch losses is the big batch's loss.
    micro = batches(4)
    big = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    acc = make_trainer(draft_accumulation_steps=4, max_grad_norm=0.1)
    outs = [acc.train_step(m) for m in micro]
    one = make_trainer(draft_accumulation_steps=1, max_grad_norm=0.1)
    out = one.train_step(big)
    assert outs[-1]["stepped"] and out["stepped"]
    assert outs[-1]["grad_norm"] == pytest.approx(out["grad_norm"], rel=1e-4)
    assert sum(o["loss"] for o in outs) / 4 == pytest.approx(out["loss"], rel=1e-5)
    for (name, a), b in zip(acc.draft.named_parameters(), one.draft.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_same_seed_same_losses_bitwise_and_training_helps():
    data = batches(6)

    def run():
        tr = make_trainer(seed=7)
        return [tr.train_step(b)["loss"] for _ in range(3) for b in data]

    a, b = run(), run()
    assert a == b
    assert sum(a[-6:]) < sum(a[:6])  # the third pass over the batches has a lower loss than the first


def test_checkpoint_of_the_draft_round_trips_and_omits_frozen_embeddings(tmp_path):
    data = batches(6)
    ref = make_trainer()
    ref_losses = [ref.train_step(b)["loss"] for b in data]

    tr = make_trainer()
    losses = [tr.train_step(b)["loss"] for b in data[:3]]
    state = tr.state_dict()
    assert "embed_tokens.weight" not in state["model"] and {"fc.weight", "d2t", "t2d"} <= set(state["model"])
    mgr = CheckpointManager(tmp_path)
    d = mgr.save(tr.global_step, state, {"epoch": 0, "trained_ids": []}, tr.draft, tr.draft.config)
    assert set(load_file(str(d / "model.safetensors"))) == set(state["model"])
    # what tools/convert_to_hf.py does: rebuild the draft from draft_config.json + model.safetensors
    ck = load_checkpoint(d)
    rebuilt = build_draft(DraftConfig.from_dict(ck.draft_config), target_head=target_head())
    rebuilt.load_checkpoint_state_dict(ck.trainer_state["model"])
    for k, v in tr.draft.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k

    resumed = make_trainer(seed=3)
    resumed.load_state_dict(ck.trainer_state)
    losses += [resumed.train_step(b)["loss"] for b in data[3:]]
    assert losses == ref_losses


def test_eval_step_pools_exactly():
    tr = make_trainer()
    data = batches(2)
    parts = [tr.eval_step(b) for b in data]
    whole = tr.eval_step({k: torch.cat([b[k] for b in data]) for k in data[0]})
    for k in range(3):
        n = sum(p["counts"]["num_valid"][k] for p in parts)
        assert n == whole["counts"]["num_valid"][k] == 4 * (T - 1 - k)
        assert sum(p["counts"]["correct"][k] for p in parts) / n == pytest.approx(whole[f"acc_{k}"], abs=1e-6)
        assert sum(p["counts"]["loss_sum"][k] for p in parts) / n == pytest.approx(whole[f"loss_{k}"], rel=1e-5)


def test_gradient_checkpointing_steps_reach_the_loss(monkeypatch):
    import torchspec.models.eagle3 as e3

    seen = []
    real = e3.ttt_forward

    def spy(draft, **kw):
        seen.append((kw["gradient_checkpointing"], kw["checkpoint_steps"]))
        return real(draft, **kw)

    monkeypatch.setattr(e3, "ttt_forward", spy)
    plain = make_trainer()
    ckpt = make_trainer(gradient_checkpointing=True, gradient_checkpointing_steps=2)
    b = batches(1)[0]
    a, c = plain.train_step(b), ckpt.train_step(b)
    assert seen == [(False, None), (True, 2)]
    assert a["loss"] == pytest.approx(c["loss"], rel=1e-6)  # recomputation changes no number
