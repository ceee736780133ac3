"""The sgl engine's in-process path: SGLang's own ``ModelRunner`` in the engine's process, one prefill
(extend) forward per batch, the hidden states kept as torch tensors on the device from the hooks to
``put_record`` -- never a Python list, never a process hop.

Why this path exists: through ``sgl.Engine(return_hidden_states=True)`` the states leave SGLang's scheduler
as Python float lists (``.cpu().clone().tolist()``, managers/scheduler_output_processor_mixin.py) and travel
by ZMQ to the caller: for a 7168-wide target, 4 captured states and a 20k-token sample, ~18 GB of Python
objects per sample. Here the engine process IS the model's process, so the record is written where the
tensors are.

The SGLang calls, by name (v0.5.x; the same sequence SpecForge's sglang capture backend drives against
sglang 0.5.9, and the scheduler itself for a prefill batch):
- ``sglang.srt.server_args.ServerArgs(**kwargs)``: the same keyword arguments ``sgl.Engine(**kwargs)`` turns
  into its ServerArgs (sglang.py ``build_engine_kwargs``), so both paths run one configuration, hooks
  included (``forward_hooks``: ModelRunner registers them on load, model_executor/hook_manager.py);
- ``sglang.srt.configs.model_config.ModelConfig.from_server_args(server_args)``;
- ``sglang.srt.model_executor.model_runner.ModelRunner(model_config=, mem_fraction_static=, gpu_id=,
  tp_rank=0, tp_size=1, moe_ep_rank=0, moe_ep_size=1, pp_rank=0, pp_size=1, nccl_port=, server_args=)``:
  loads the weights, sets up torch.distributed for its (one-rank) TP group on ``tcp://127.0.0.1:<nccl_port>``,
  allocates ``req_to_token_pool`` and ``token_to_kv_pool_allocator``;
- per batch: ``managers.schedule_batch.Req(rid=, origin_input_text="", origin_input_ids=, sampling_params=)``
  with ``fill_ids`` = the prompt and no cached prefix; ``ScheduleBatch.init_new(reqs=, req_to_token_pool=,
  token_to_kv_pool_allocator=, tree_cache=, model_config=, enable_overlap=False, spec_algorithm=NONE)``,
  ``prepare_for_extend()``, ``get_model_worker_batch()``; ``model_executor.forward_batch_info.ForwardBatch
  .init_new(model_worker_batch, model_runner)`` with ``capture_hidden_mode = CaptureHiddenMode.FULL`` (the
  logits processor then keeps every token's state); ``model_runner.forward(forward_batch)`` ->
  ``ModelRunnerOutput.logits_output.hidden_states`` [tokens of the batch, (aux + 1) x H], packed in request
  order; afterwards both pools are cleared (nothing of a batch is reused: no radix cache).

Not built: tensor parallelism here (tp_size > 1 needs one ModelRunner per TP rank, each in its own process
with the same batch on every rank, which is what sgl.Engine's schedulers do) and images (SGLang's tokenizer
manager builds the multimodal inputs). Those run through ``sgl.Engine`` (sglang.py chooses, ``uses_model_runner``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch


def sglang_api() -> SimpleNamespace:
    """The SGLang classes this path uses (the one place it imports SGLang internals)."""
    from torchspec.utils.optional import require

    require("sglang", "sglang")   # one-line install hint when missing
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    return SimpleNamespace(ModelConfig=ModelConfig, Req=Req, ScheduleBatch=ScheduleBatch,
                           CacheInitParams=CacheInitParams, RadixCache=RadixCache,
                           CaptureHiddenMode=CaptureHiddenMode, ForwardBatch=ForwardBatch, ModelRunner=ModelRunner,
                           SamplingParams=SamplingParams, ServerArgs=ServerArgs,
                           SpeculativeAlgorithm=SpeculativeAlgorithm)


class SGLangModelRunnerTarget:
    """The target as SGLang's ModelRunner in this process; `forward` gives the packed hidden-state rows."""

    def __init__(self, runner, api: SimpleNamespace):
        self.runner, self.api = runner, api

    @classmethod
    def start(cls, engine_kwargs: dict[str, Any], gpu_id: int) -> "SGLangModelRunnerTarget":
        api = sglang_api()
        server_args = api.ServerArgs(**engine_kwargs)
        runner = api.ModelRunner(
            model_config=api.ModelConfig.from_server_args(server_args),
            mem_fraction_static=server_args.mem_fraction_static, gpu_id=int(gpu_id),
            tp_rank=0, tp_size=1, moe_ep_rank=0, moe_ep_size=1, pp_rank=0, pp_size=1,
            nccl_port=int(engine_kwargs["nccl_port"]), server_args=server_args)
        return cls(runner, api)

    @torch.no_grad()
    def forward(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """One extend forward over `prompts` (token id lists): the hidden-state rows of every token, packed
        in prompt order, as the tensor the model produced (its device and dtype)."""
        api, runner = self.api, self.runner
        params = api.SamplingParams(max_new_tokens=1, temperature=0.0)
        reqs = []
        for i, ids in enumerate(prompts):
            req = api.Req(rid=str(i), origin_input_text="", origin_input_ids=list(ids), sampling_params=params)
            req.fill_ids = req.origin_input_ids   # the whole prompt is extended: no cached prefix
            req.extend_input_len = len(req.fill_ids) - len(req.prefix_indices)
            req.logprob_start_len = len(req.origin_input_ids) - 1
            reqs.append(req)
        tree_cache = api.RadixCache(api.CacheInitParams(
            disable=False, req_to_token_pool=runner.req_to_token_pool,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, page_size=runner.server_args.page_size))
        try:
            batch = api.ScheduleBatch.init_new(
                reqs=reqs, req_to_token_pool=runner.req_to_token_pool,
                token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, tree_cache=tree_cache,
                model_config=runner.model_config, enable_overlap=False,
                spec_algorithm=api.SpeculativeAlgorithm.NONE)
            batch.prepare_for_extend()
            forward_batch = api.ForwardBatch.init_new(batch.get_model_worker_batch(), runner)
            forward_batch.capture_hidden_mode = api.CaptureHiddenMode.FULL
            out = runner.forward(forward_batch)
            logits_output = getattr(out, "logits_output", out)   # ModelRunnerOutput (older releases: a tuple)
            if isinstance(logits_output, tuple):
                logits_output = logits_output[0]
            states = logits_output.hidden_states
        finally:   # nothing of this batch is reused (no radix cache): free its KV slots for the next
            runner.req_to_token_pool.clear()
            runner.token_to_kv_pool_allocator.clear()
        if states is None:
            raise RuntimeError("sgl engine: SGLang's ModelRunner returned no hidden states (the logits processor "
                               "keeps them only with CaptureHiddenMode.FULL)")
        return states

    def close(self) -> None:
        self.runner = None
