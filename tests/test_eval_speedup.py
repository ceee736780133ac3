"""The expected-speedup estimate: its formula, and cost measurement that leaves the caches as it found them."""

import pytest
import torch

from torchspec.eval.speedup import ForwardCosts, estimate_speedup, measure_costs


def test_formula():
    c = ForwardCosts(target_decode_s=0.010, target_verify_s=0.012, draft_step_s=0.001, num_draft_steps=3,
                     context_len=128, device="cpu")
    assert estimate_speedup(3.0, c) == pytest.approx(3.0 * 0.010 / (0.012 + 3 * 0.001))
    assert estimate_speedup(1.0, ForwardCosts(1.0, 1.0, 0.0, 3, 1, "cpu")) == 1.0  # free draft, nothing accepted


def test_measure_costs(tiny_target_dir):
    from transformers import AutoModelForCausalLM

    from torchspec.eval.speculative import HFTarget
    from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3

    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()
    target = HFTarget(model, [0, 1, 2])
    draft = LlamaForCausalLMEagle3(DraftConfig.from_target(model.config)).eval()
    c = measure_costs(target, draft, num_draft_steps=2, context_len=16, repeats=3, warmup=1)
    assert c.target_decode_s > 0 and c.target_verify_s > 0 and c.draft_step_s > 0
    assert c.num_draft_steps == 2 and c.context_len == 16 and c.device == "cpu"
    assert target.length == 16  # every timed forward was rolled back
