#!/usr/bin/env python
"""Benchmark peer: SpecForge 0.2.0's plain EAGLE-3 training step, run in-process on our batches.

SpecForge is optional and never a dependency of torchspec: it is imported lazily, only through its
public classes, and nothing of it is copied here. What one timed step covers (per batch):

  host -> device copy; frozen HF target forward (transformers AutoModelForCausalLM, sdpa) giving the
  outputs of the aux decoder layers (SpecForge's default ids [1, L//2 - 1, L - 4], id k = output of
  decoder layer k) and the final-normed hidden state; then SpecForge's consumer step
  `Eagle3TrainStrategy.forward_loss` (TargetHead.preprocess shift, teacher from the target lm_head,
  `OnlineEagle3Model` TTT unroll, loss = sum 0.8**i * ploss_i) -> backward -> `BF16Optimizer.step()`
  (grad-norm clip, fp32-master AdamW, cosine warmup schedule), synchronised on CUDA.

SpecForge 0.2.0 has no in-process target: its "online" mode captures aux/final hidden states in an
external SGLang server and the trainer (consumer) re-projects the final hidden state with a frozen
bf16 `TargetHead`. The HF forward above stands in for that server. The teacher is either
  compact_teacher=True  (default): `target_hidden_for_compact` + `target_head_weight` kwargs of
      OnlineEagle3Model.forward: draft-vocab logits plus a chunked full-vocab logsumexp/argmax,
      never a [B, T, V] tensor (SpecForge's planner, specforge/application/planning.py, allows
      training.compact_teacher only in offline mode);
  compact_teacher=False: the stock online-consumer path: `TargetHead(final_hidden)` materialises
      full-vocab [B, T, V] bf16 logits and the torch.compile'd `_compute_target_p` upcasts to fp32.

Stand-ins: with triton installed (the GPU machine) none at all. SpecForge needs no sglang, yunchang,
datasets, wandb or pydantic on this path (only torch, transformers, safetensors, huggingface_hub and
triton). Where triton is missing (CPU smoke runs), a `triton` / `triton.language` module is put in
sys.modules only while `specforge.core.loss` is imported (it needs `triton.jit` and
`triton.language.constexpr` to define its kernels) and removed right after, so torch never sees it;
its jit returns kernels that raise if launched. Those Triton kernels (LogSoftmaxLoss) cannot run on
CPU anyway, so on CPU the loss is SpecForge's own torch reference `specforge.core.loss._compute_loss`
(same value: masked soft-label cross-entropy averaged over B*T) for the duration of the call.
CUDA runs refuse the stand-in. Importing SpecForge sets torch._dynamo.config.recompile_limit = 64.
The first steps include torch.compile time (its RMSNorm, flex attention, teacher); flex_attention
has no backward on CPU, so CPU runs use attention_backend="sdpa".

    python benchmarks/specforge_ref.py --smoke     # tiny random Qwen3 target, 3 CPU steps
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types

import torch

_SF: types.SimpleNamespace | None = None


class _Kernel:
    """What the stand-in `triton.jit` returns: launching it (`kernel[grid](...)`) raises."""
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise RuntimeError(f"triton stand-in: kernel {self.fn.__name__} cannot run without triton")


def _triton_standin() -> dict[str, types.ModuleType]:
    def jit(fn=None, **_):
        return _Kernel(fn) if fn is not None else _Kernel

    tri, lang = types.ModuleType("triton"), types.ModuleType("triton.language")
    tri.jit, tri.language, lang.constexpr = jit, lang, type("constexpr", (), {})
    return {"triton": tri, "triton.language": lang}


def _import_specforge() -> types.SimpleNamespace:
    global _SF
    if _SF is None:
        # First the modules that need no triton: their torch.compile decorators load torch's
        # inductor (which probes for triton) before any stand-in exists.
        from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
        stub = importlib.util.find_spec("triton") is None
        if stub and "specforge.core.loss" not in sys.modules:
            sys.modules.update(_triton_standin())
            try:
                import specforge.core.loss  # noqa: F401
            finally:
                sys.modules.pop("triton", None)
                sys.modules.pop("triton.language", None)
        import specforge.algorithms.eagle3.model as eagle3_model
        import specforge.core.loss as sf_loss
        from specforge.core.compact_teacher import validate_vocab_mapping_consistency
        from specforge.modeling.target.target_head import TargetHead
        from specforge.optimizer import BF16Optimizer
        from specforge.runtime.contracts import TrainBatch
        from specforge.training.strategies.base import Eagle3TrainStrategy
        _SF = types.SimpleNamespace(
            Draft=LlamaForCausalLMEagle3, Online=eagle3_model.OnlineEagle3Model, model_mod=eagle3_model,
            loss_mod=sf_loss, Strategy=Eagle3TrainStrategy, TargetHead=TargetHead, Optimizer=BF16Optimizer,
            TrainBatch=TrainBatch, check_maps=validate_vocab_mapping_consistency, triton_stub=stub)
    return _SF


def available() -> str | None:
    """None if SpecForge imports (with the stand-ins above), else a one-line reason."""
    try:
        _import_specforge()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"specforge not importable: {type(e).__name__}: {e}".splitlines()[0]
    return None


def specforge_vocab_maps(kept_ids: list[int], target_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecForge's draft-vocab buffers from the kept target ids (sorted ascending, one per draft id).

    d2t: int64 [draft_vocab], an offset: target_id = draft_id + d2t[draft_id], so d2t[i] = kept[i] - i.
    t2d: bool [target_vocab], True at the kept target ids.
    """
    ids = torch.as_tensor(kept_ids, dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0 or (ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all())):
        raise ValueError("kept_ids must be a non-empty, strictly ascending list")
    if int(ids[0]) < 0 or int(ids[-1]) >= target_vocab:
        raise ValueError(f"kept_ids must lie in [0, {target_vocab})")
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(ids.numel()), t2d


def _draft_config(tc, draft_vocab_size: int):
    from transformers import LlamaConfig

    rope = getattr(tc, "rope_parameters", None)
    rope_kw = {"rope_parameters": dict(rope)} if rope else {
        "rope_theta": getattr(tc, "rope_theta", 10000.0), "rope_scaling": getattr(tc, "rope_scaling", None)}
    return LlamaConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=tc.rms_norm_eps,
        hidden_act=tc.hidden_act, pad_token_id=tc.pad_token_id if tc.pad_token_id is not None else 0,
        num_hidden_layers=1, tie_word_embeddings=False, draft_vocab_size=draft_vocab_size, **rope_kw)


def run_specforge(target_dir, batches, *, ttt_length=7, draft_vocab_size, d2t, t2d, lr=1e-4,
                  total_steps=None, warmup_ratio=0.015, max_grad_norm=0.5, attention_backend="flex_attention",
                  device=None, compact_teacher=True, aux_layer_ids=None, seed=0) -> dict:
    """Train a fresh 1-layer SpecForge EAGLE-3 draft on `batches` (one optimizer step each), timed.

    batches: dicts of CPU tensors input_ids [B, T] long, attention_mask and loss_mask [B, T], right-
    padded. d2t / t2d: see specforge_vocab_maps. total_steps (default len(batches)) and warmup_ratio
    set the cosine schedule. Returns step_s (whole step), target_s (h2d + target forward part),
    losses (weighted TTT loss), accs (last step, per TTT position), tokens, supervised_tokens.
    """
    from transformers import AutoModelForCausalLM

    sf = _import_specforge()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda and sf.triton_stub:
        raise RuntimeError("SpecForge on CUDA needs the real triton (its loss kernels), not the stand-in")
    dtype = torch.bfloat16 if cuda else torch.float32
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).to(dev).eval()
    target.requires_grad_(False)
    tc = target.config
    layers = list(aux_layer_ids or [1, tc.num_hidden_layers // 2 - 1, tc.num_hidden_layers - 4])

    torch.manual_seed(seed)
    draft = sf.Draft(_draft_config(tc, draft_vocab_size), attention_backend=attention_backend)
    draft.t2d.copy_(torch.as_tensor(t2d, dtype=torch.bool))
    draft.d2t.copy_(torch.as_tensor(d2t, dtype=torch.long))
    sf.check_maps(draft.t2d, draft.d2t)
    draft.load_embedding(str(target_dir))  # the target's model.embed_tokens.weight
    draft.freeze_embedding()
    draft = draft.to(device=dev, dtype=dtype)
    model = sf.Online(draft, length=ttt_length, attention_backend=attention_backend)
    model = model.to(device=dev, dtype=dtype)
    head = sf.TargetHead(str(target_dir))  # frozen target lm_head, as SpecForge's consumer holds it
    with torch.no_grad():
        head.fc.weight.copy_(target.get_output_embeddings().weight)
    head.freeze_weights()
    head = head.eval().to(device=dev, dtype=dtype)
    strategy = sf.Strategy(model, target_head=head, ploss_decay=0.8, compact_teacher=compact_teacher)
    total = total_steps or len(batches)
    opt = sf.Optimizer(draft, lr=lr, max_grad_norm=max_grad_norm, total_steps=total,
                       warmup_ratio=warmup_ratio, lr_scheduler="cosine")

    captured: dict[int, torch.Tensor] = {}
    hooks = [target.model.layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in sorted(set(layers))]
    saved_loss = sf.model_mod.LogSoftmaxLoss
    if not cuda:  # the Triton loss kernels need a GPU: SpecForge's torch reference of the same loss
        sf.model_mod.LogSoftmaxLoss = types.SimpleNamespace(apply=sf.loss_mod._compute_loss)
    step_s, target_s, losses, accs = [], [], [], []
    tokens = supervised = 0
    try:
        for b in batches:
            tokens += int(b["attention_mask"].sum())
            supervised += int(b["loss_mask"].sum())
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            ids = b["input_ids"].to(dev, non_blocking=True)
            am = b["attention_mask"].to(dev, non_blocking=True)
            lm = b["loss_mask"].to(dev, non_blocking=True)
            with torch.no_grad():
                final = target.model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
                aux = torch.cat([captured[i] for i in layers], dim=-1)
            captured.clear()
            if cuda:
                torch.cuda.synchronize(dev)
            t1 = time.perf_counter()
            batch = sf.TrainBatch(sample_ids=[], strategy="eagle3", metadata={"target_repr": "hidden_state"},
                                  tensors={"input_ids": ids, "attention_mask": am, "loss_mask": lm,
                                           "hidden_state": aux, "target": final})
            out = strategy.forward_loss(batch)
            out.loss.backward()
            opt.step()  # clip, AdamW on fp32 masters, lr scheduler step, copy back
            if cuda:
                torch.cuda.synchronize(dev)
            t2 = time.perf_counter()
            step_s.append(t2 - t0)
            target_s.append(t1 - t0)
            losses.append(float(out.loss.detach()))
            accs = [float(a) for a in out.metrics["acces"]]
    finally:
        sf.model_mod.LogSoftmaxLoss = saved_loss
        for h in hooks:
            h.remove()
    return {"step_s": step_s, "target_s": target_s, "losses": losses, "accs": accs,
            "tokens": tokens, "supervised_tokens": supervised}


def _smoke() -> None:
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from torchspec.utils.tiny import make_tiny_target

    reason = available()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = make_tiny_target(tmp, vocab_size=512, hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
        V = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        kept = sorted(torch.randperm(V, generator=g)[:V // 4].tolist())
        d2t, t2d = specforge_vocab_maps(kept, V)
        B, T, batches = 2, 64, []
        for _ in range(3):
            lengths = torch.tensor([T, T - 16])
            am = (torch.arange(T)[None] < lengths[:, None]).long()
            lm = am * (torch.arange(T)[None] >= 8).long()
            batches.append({"input_ids": torch.randint(0, V, (B, T), generator=g) * am,
                            "attention_mask": am, "loss_mask": lm})
        res = run_specforge(tmp, batches, ttt_length=7, draft_vocab_size=len(kept), d2t=d2t, t2d=t2d,
                            lr=1e-3, total_steps=3, warmup_ratio=0.0, max_grad_norm=0.5,
                            attention_backend="sdpa", device="cpu")
    print("losses", [round(x, 5) for x in res["losses"]])
    print("accs (last step)", [round(x, 3) for x in res["accs"]])
    print("step_s", [round(x, 3) for x in res["step_s"]], "tokens", res["tokens"],
          "supervised", res["supervised_tokens"])
    ok = all(torch.isfinite(torch.tensor(res["losses"]))) and len(set(res["losses"])) == len(res["losses"])
    print("smoke", "OK" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    if "--smoke" in sys.argv[1:]:
        _smoke()
    else:
        print(__doc__)
