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

Tensor parallel (tp_size > 1): ``SGLangTPGroup``. ModelRunner takes one TP rank per
process, so the engine spawns tp_size rank processes (torch.multiprocessing "spawn", not daemonic), rank i with
``gpu_id = base_gpu_id + i``, ``tp_rank=i``, the engine's ``tp_size`` and the same ``nccl_port``. Each builds its
ModelRunner, whose constructor sets up torch.distributed itself (``init_torch_distributed``:
``init_distributed_environment(world_size=tp_size * pp_size, rank=tp_size * pp_rank + tp_rank, local_rank=gpu_id,
distributed_init_method="tcp://127.0.0.1:<nccl_port>")`` when no dist_init_addr is set, then
``initialize_model_parallel(tensor_model_parallel_size=tp_size, ...)``), so the ranks meet at that port. Every
batch goes to every rank (the same prompts: each rank builds the same ScheduleBatch, as SGLang's schedulers
do after their broadcast), all run the forward (its collectives need every rank), and rank 0 alone cuts the
rows and puts the records, from its own process.

Why rank 0's rows are the whole record: without dp attention, with the all-reduce fusions off (sglang.py
``ENGINE_MANAGED``), a decoder layer's attention and MLP outputs leave their RowParallelLinear (o_proj,
down_proj; MoE layers all-reduce their output) already summed over the TP group, so the ``(hidden_states,
residual)`` a layer returns -- what the aux hooks add up -- are [tokens, H], full width and the same on every
rank; the final norm's output that the logits processor keeps is full width too (only the vocab-parallel
lm_head's logits are gathered). Nothing is gathered here; a width that is not (aux + 1) x H is one error.

Errors: a rank that raises sends its one-line error and the engine raises it ("TP rank i of n: ..."); a rank
that dies (killed, out of memory) is seen by polling the processes every ``ALIVE_CHECK_S``. Either way the
other ranks are stopped (asked, then terminated after ``CLOSE_GRACE_S``: they may be blocked in a collective
that will never complete), so nothing hangs.

Images (a Qwen-VL target, any tp_size): ``SGLangImageInputs`` is the tokenizer manager's half, in the engine
process: SGLang's multimodal processor built as its tokenizer manager builds it (``import_processors``,
``get_processor``, ``get_mm_processor`` with transport "default": the tensors stay in this process); per image
request ``process_mm_data_async(image_data=, input_text=<ids>, request_obj=GenerateReqInput)`` gives the expanded
ids and items, ``MultimodalInputs.from_processor_output`` their pad values. Those requests -- (ids,
MultimodalInputs) per prompt, made once -- are what every rank runs: in this process at tp_size 1, sent with the
batch to every rank process at tp_size > 1 (SGLang's rank-0 scheduler receives a tokenized request and
``broadcast_pyobj``s it over the TP cpu group to the other ranks, managers/scheduler.py ``recv_requests``; here
the engine process is the sender and a multiprocessing queue per rank the channel; made once, every rank has
the same pad values). ``_attach_images`` then does on each rank what the scheduler's ``handle_generate_request``
does (the model's ``pad_input_ids``, ``req.extend_image_inputs``, M-RoPE positions when missing, from a
processor each rank keeps as the scheduler keeps its ``_mm_processor``). ScheduleBatch carries
``req.multimodal_inputs`` to ``ForwardBatch.mm_inputs``, which the model's forward embeds.

Engines spanning nodes (nnodes N > 1): ``SGLangTPGroup`` on node r starts only that node's ranks
(``node_ranks``: global tp_rank r * tp_size/N + i on GPU base_gpu_id + i); ``server_args.dist_init_addr`` is set,
so every ModelRunner meets at ``tcp://<dist_init_addr>``; only global rank 0 (node 0) gets the store and puts;
the other nodes' groups return no records (sglang.py, Engines spanning nodes).
NOT RUN against a real SGLang, on a GPU or over real nodes:
tests/test_sglang_engine.py runs it against a stand-in ModelRunner whose ranks meet through torch.distributed
(gloo, CPU) at the nccl_port and check they got the same batch; tests/test_sglang_multimodal.py runs image
samples against stand-ins of the processor and multimodal classes above, at tp_size 1 and 2 (the two stand-in
ranks check through gloo that they got the same ids, image pad values included).
"""

from __future__ import annotations

import queue as queue_mod
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import torch

from torchspec.inference.base import StoredSample, compute_dtype, put_record
from torchspec.utils.procs import exit_text, inbox_jobs, stop_workers

ALIVE_CHECK_S = 0.2    # how often the engine, while it waits for its TP ranks, checks that they live
CLOSE_GRACE_S = 30.0   # how long a stopping rank may take before it is terminated (after an error: ERROR_GRACE_S)
ERROR_GRACE_S = 5.0
SETTLE_S = 1.0         # after a rank's failure, how long to wait for the others' before naming the first

# Called first in every TP rank process (before SGLang is imported), e.g. to register out-of-tree SGLang models;
# must be picklable (a module-level function). None: nothing.
rank_process_setup: Optional[Callable[[], None]] = None


def sglang_api() -> SimpleNamespace:
    """The SGLang classes this path uses (the one place it imports SGLang internals)."""
    from torchspec.utils.optional import require

    require("sglang", "sglang")   # one-line install hint when missing
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.schedule_batch import MultimodalInputs, Req, ScheduleBatch
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
                           SpeculativeAlgorithm=SpeculativeAlgorithm, MultimodalInputs=MultimodalInputs)


def sglang_mm_api() -> SimpleNamespace:
    """The SGLang pieces of its tokenizer manager's image path (only imported for an image target)."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.utils.hf_transformers_utils import get_processor

    return SimpleNamespace(GenerateReqInput=GenerateReqInput, get_mm_processor=get_mm_processor,
                           import_processors=import_processors, get_processor=get_processor)


def start_mm_processor(model_config, server_args):
    """SGLang's own multimodal processor for the target, built as its tokenizer manager builds it
    (``init_tokenizer_and_processor``): the processors registered from ``sglang.srt.multimodal.processors``,
    the target's HF processor by ``get_processor``, ``get_mm_processor(hf_config, server_args, processor,
    transport_mode, model_config=)``. Transport "default": the processor's tensors stay in this process (the
    tokenizer manager picks CUDA IPC only to hand them to scheduler processes). -> (processor, its API)."""
    mm = sglang_mm_api()
    mm.import_processors("sglang.srt.multimodal.processors")
    processor = mm.get_processor(server_args.tokenizer_path, tokenizer_mode=server_args.tokenizer_mode,
                                 trust_remote_code=server_args.trust_remote_code, revision=server_args.revision,
                                 use_fast=not server_args.disable_fast_image_processor)
    return mm.get_mm_processor(model_config.hf_config, server_args, processor, "default",
                               model_config=model_config), mm


class SGLangImageInputs:
    """The tokenizer manager's half of an image request, in the engine process: SGLang's multimodal processor
    run once per image request, its output turned into the request's MultimodalInputs. What it gives (the
    expanded ids and MultimodalInputs per prompt) is what every TP rank attaches to its Req: SGLang's rank-0
    scheduler receives the tokenized request and ``broadcast_pyobj``s it over the TP cpu group to the other
    ranks' schedulers; here the engine sends it to every rank process (SGLangTPGroup.generate). Made once, so
    every rank gets the same pad values (SGLang's ``enable_broadcast_mm_inputs_process`` makes them on the
    entry rank and broadcasts them for the same reason)."""

    def __init__(self, processor, mm_api: SimpleNamespace, api: SimpleNamespace):
        self.processor, self.mm_api, self.api = processor, mm_api, api

    @classmethod
    def start(cls, engine_kwargs: dict[str, Any], model_config=None) -> "SGLangImageInputs":
        """model_config: a ModelRunner's (in a rank process); None: ``ModelConfig.from_server_args``, as the
        tokenizer manager makes its own (no model is loaded)."""
        api = sglang_api()
        server_args = api.ServerArgs(**engine_kwargs)
        if model_config is None:
            model_config = api.ModelConfig.from_server_args(server_args)
        return cls(*start_mm_processor(model_config, server_args), api)

    def _one(self, rid: str, ids: list[int], uris: list[str]):
        """(the expanded input ids, MultimodalInputs) of one image request, as SGLang makes them: its tokenizer
        manager runs the multimodal processor on the request's ids and images (``process_mm_data_async(
        image_data=, input_text=<the ids>, request_obj=GenerateReqInput)``) and takes the processor's input_ids
        (each image pad repeated as many times as the image has merged patches); the scheduler turns the
        processor output into ``MultimodalInputs.from_processor_output`` (hash and pad value per image)."""
        import asyncio

        request = self.mm_api.GenerateReqInput(input_ids=list(ids), image_data=list(uris), rid=rid)
        loop = asyncio.new_event_loop()   # the processor's API is async; nothing else runs on this loop
        try:
            out = loop.run_until_complete(self.processor.process_mm_data_async(
                image_data=list(uris), input_text=list(ids), request_obj=request))
        finally:
            loop.close()
        return list(out.input_ids), self.api.MultimodalInputs.from_processor_output(out)

    def requests(self, prompts: Sequence[Sequence[int]], images: Optional[Sequence[Sequence[str]]]) -> list[tuple]:
        """Per prompt (token ids; images: its image URIs, [] for text) the request a rank runs: (ids as SGLang
        runs them, MultimodalInputs or None)."""
        return [self._one(str(i), list(ids), list(images[i])) if images and images[i] else (list(ids), None)
                for i, ids in enumerate(prompts)]

    def close(self) -> None:
        processor, self.processor = self.processor, None
        for pool in ("io_executor", "cpu_executor"):   # BaseMultimodalProcessor's worker pools
            executor = getattr(processor, pool, None)
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)


def text_requests(prompts: Sequence[Sequence[int]]) -> list[tuple]:
    """The requests of text prompts (no image inputs), as SGLangImageInputs.requests gives them."""
    return [(list(ids), None) for ids in prompts]


class SGLangModelRunnerTarget:
    """The target as SGLang's ModelRunner in this process; `forward` gives the packed hidden-state rows."""

    def __init__(self, runner, api: SimpleNamespace, mm_processor=None):
        self.runner, self.api = runner, api
        self.mm_processor = mm_processor   # an image target's (for M-RoPE positions the processor left out)

    @classmethod
    def start(cls, engine_kwargs: dict[str, Any], gpu_id: int, tp_rank: int = 0,
              tp_size: int = 1) -> "SGLangModelRunnerTarget":
        """This process's ModelRunner: TP rank `tp_rank` of `tp_size` (engine_kwargs["tp_size"]) on GPU `gpu_id`."""
        api = sglang_api()
        server_args = api.ServerArgs(**engine_kwargs)
        runner = api.ModelRunner(
            model_config=api.ModelConfig.from_server_args(server_args),
            mem_fraction_static=server_args.mem_fraction_static, gpu_id=int(gpu_id),
            tp_rank=int(tp_rank), tp_size=int(tp_size), moe_ep_rank=0, moe_ep_size=1, pp_rank=0, pp_size=1,
            nccl_port=int(engine_kwargs["nccl_port"]), server_args=server_args)
        return cls(runner, api)

    def _attach_images(self, req, mm_inputs) -> None:
        """What SGLang's scheduler does to a request with multimodal inputs (``handle_generate_request``): the
        model's ``pad_input_ids`` puts each image's pad value on its tokens (the embedding routine finds the
        image positions by them), ``req.extend_image_inputs``, and the M-RoPE positions computed when the
        processor gave none (``_maybe_compute_mrope_positions``). The forward then reads them from
        ``forward_batch.mm_inputs`` (ScheduleBatch -> ModelWorkerBatch.multimodal_inputs)."""
        pad = getattr(self.runner.model, "pad_input_ids", None)
        if pad is not None:
            req.origin_input_ids = pad(req.origin_input_ids, mm_inputs)
        req.extend_image_inputs(mm_inputs)
        mm = req.multimodal_inputs
        if mm.mrope_positions is None and self.mm_processor is not None:   # (the scheduler's check too)
            positions, delta = self.mm_processor.compute_mrope_positions(req.origin_input_ids, mm.mm_items)
            if positions is not None:
                mm.mrope_positions, mm.mrope_position_delta = positions, delta

    @torch.no_grad()
    def forward(self, requests: Sequence[tuple]) -> torch.Tensor:
        """One extend forward over `requests` ((token ids, MultimodalInputs or None) each: SGLangImageInputs.
        requests / text_requests): the hidden-state rows of every token, packed in request order, as the tensor
        the model produced (its device and dtype)."""
        api, runner = self.api, self.runner
        params = api.SamplingParams(max_new_tokens=1, temperature=0.0)
        reqs = []
        for i, (ids, mm_inputs) in enumerate(requests):
            req = api.Req(rid=str(i), origin_input_text="", origin_input_ids=list(ids), sampling_params=params)
            if mm_inputs is not None:
                self._attach_images(req, mm_inputs)
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
        self.runner = self.mm_processor = None


def put_packed_rows(store, samples: Sequence, states: torch.Tensor, num_aux: int, hidden_size: int,
                    device: torch.device | str) -> list[StoredSample]:
    """Cut the packed rows of one forward ([tokens of the batch, (num_aux + 1) x H], samples in order) per sample
    and put each record (aux | final), as tensors of the engine's device and dtype."""
    lengths = [int(s.input_ids.numel()) for s in samples]
    width = (num_aux + 1) * hidden_size
    if tuple(states.shape) != (sum(lengths), width):
        raise RuntimeError(f"sgl engine: SGLang's ModelRunner returned hidden states of shape "
                           f"{tuple(states.shape)}, expected ({sum(lengths)}, {width}) = (tokens of the batch, "
                           f"{num_aux} aux layers + final, x H {hidden_size})")
    device = torch.device(device)
    states = states.to(device=device, dtype=compute_dtype(device))
    split = num_aux * hidden_size
    return [put_record(store, s, rows[:, :split].contiguous(), rows[:, split:].contiguous())
            for s, rows in zip(samples, torch.split(states, lengths))]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _rank_main(rank: int, tp_size: int, engine_kwargs: dict, gpu_id: int, store, record_layout: tuple,
               images: bool, setup: Optional[Callable[[], None]], inbox, outbox) -> None:
    """One TP rank's process: its ModelRunner, then every batch the engine sends; rank 0 puts the records.
    images: an image target; the rank keeps SGLang's multimodal processor as its scheduler does (M-RoPE
    positions a request arrives without); the requests' image inputs come made, with the batch."""
    target = processor = None
    try:
        if setup is not None:
            setup()
        from torchspec.inference.sglang_logging import configure_rank_logging

        configure_rank_logging(str(engine_kwargs.get("log_level") or "warning"), rank)   # inference.sglang.log_level
        target = SGLangModelRunnerTarget.start(engine_kwargs, gpu_id, tp_rank=rank, tp_size=tp_size)
        if images:
            processor = SGLangImageInputs.start(engine_kwargs, model_config=target.runner.model_config)
            target.mm_processor = processor.processor
        outbox.put(("ready", rank, None))
        for job in inbox_jobs(inbox):
            requests, records = job
            states = target.forward(requests)
            stored = put_packed_rows(store, records, states, *record_layout) if rank == 0 else None
            outbox.put(("done", rank, stored))
    except KeyboardInterrupt:
        pass
    except BaseException as e:
        traceback.print_exc(file=sys.stderr)   # the whole story in the rank's log; one line to the engine
        outbox.put(("error", rank, _one_line(e)))
    finally:
        if target is not None:
            target.close()
        if processor is not None:
            processor.close()


def node_ranks(engine_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
    """(global TP rank, GPU id) of each TP rank this node runs: node r of N runs ranks r * tp/N .. (r + 1) * tp/N - 1
    on GPUs base_gpu_id + 0 .. tp/N - 1, as sgl.Engine places its schedulers (entrypoints/engine.py,
    ``_calculate_rank_ranges``; gpu_id = base_gpu_id + tp_rank % tp_size_per_node)."""
    tp_size, nnodes = int(engine_kwargs["tp_size"]), int(engine_kwargs.get("nnodes") or 1)
    node, base = int(engine_kwargs.get("node_rank") or 0), int(engine_kwargs.get("base_gpu_id") or 0)
    per_node = tp_size // nnodes
    return [(node * per_node + i, base + i) for i in range(per_node)]


class SGLangTPGroup:
    """An engine's tp_size TP rank processes (module docstring): the same batch to all, records put by rank 0."""

    def __init__(self, procs, inboxes, outbox, ranks: Optional[Sequence[int]] = None, tp_size: int = 0):
        self.procs, self.inboxes, self.outbox = procs, inboxes, outbox
        self.ranks = list(ranks) if ranks is not None else list(range(len(procs)))   # global TP rank of each
        self.tp_size = int(tp_size) or len(procs)   # the whole engine's, over every node
        self._closed = False

    @classmethod
    def start(cls, engine_kwargs: dict[str, Any], store, num_aux: int, hidden_size: int,
              device: torch.device | str, start_timeout: float, timeout_key: str = "",
              images: bool = False) -> "SGLangTPGroup":
        """This node's TP ranks (``node_ranks``); images: an image target (each rank also keeps SGLang's
        multimodal processor, _rank_main)."""
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        tp_size, ranks = int(engine_kwargs["tp_size"]), node_ranks(engine_kwargs)
        layout = (int(num_aux), int(hidden_size), str(device))
        outbox, inboxes = ctx.Queue(), [ctx.Queue() for _ in ranks]
        procs = [ctx.Process(target=_rank_main, name=f"torchspec-sgl-tp{r}", daemon=False,
                             args=(r, tp_size, engine_kwargs, gpu, store if r == 0 else None, layout,
                                   bool(images), rank_process_setup, inbox, outbox))
                 for (r, gpu), inbox in zip(ranks, inboxes)]
        group = cls(procs, inboxes, outbox, [r for r, _ in ranks], tp_size)
        try:   # a rank that fails or dies while loading is reported at once; the others are stopped
            for p in procs:
                p.start()
            group._wait("ready", start_timeout, f"sgl engine: the {len(procs)} TP ranks"
                        + (f" of node {engine_kwargs.get('node_rank') or 0}" if len(procs) < tp_size else "")
                        + f" were not ready within {start_timeout:.0f} s" + (f" ({timeout_key})" if timeout_key else ""))
        except BaseException:
            group.close(ERROR_GRACE_S)
            raise
        return group

    def _wait(self, expect: str, timeout: Optional[float], timeout_text: str = "") -> dict[int, Any]:
        """{rank: payload} of one `expect` message from every rank; a rank's error or death raises (one line)."""
        got: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(got) < len(self.procs):
            try:
                kind, rank, payload = self.outbox.get(timeout=ALIVE_CHECK_S)
            except queue_mod.Empty:
                if any(not p.is_alive() for r, p in zip(self.ranks, self.procs) if r not in got):
                    raise self._failure({})
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(timeout_text)
                continue
            if kind == "error":
                raise self._failure({rank: payload})
            if kind != expect:
                raise RuntimeError(f"sgl engine: TP rank {rank}: unexpected message {kind!r}")
            got[rank] = payload
        return got

    def _failure(self, errors: dict[int, str]) -> RuntimeError:
        """One line for the first failure: a rank's death or error. A rank whose collective broke because another
        rank died or raised fails too, a moment later; those are named after the cause, their messages left to
        their logs. The ranks are given SETTLE_S to show which came first."""
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            try:
                kind, rank, payload = self.outbox.get(timeout=ALIVE_CHECK_S)
                if kind == "error":
                    errors.setdefault(rank, payload)
            except queue_mod.Empty:
                pass
        causes = [f"TP rank {r} of {self.tp_size} (process {p.pid}) {exit_text(p.exitcode)}"
                  for r, p in zip(self.ranks, self.procs) if not p.is_alive() and p.exitcode != 0 and r not in errors]
        causes += [f"TP rank {r} of {self.tp_size} failed: {text}" for r, text in errors.items()]
        causes = causes or [f"TP rank {r} of {self.tp_size} (process {p.pid}) {exit_text(p.exitcode)} unasked"
                            for r, p in zip(self.ranks, self.procs) if not p.is_alive()]
        line = "sgl engine: " + causes[0]
        if len(causes) > 1:
            others = [c.split(" (process")[0].split(" failed:")[0].removeprefix("TP ") for c in causes[1:]]
            line += f" (then {', '.join(others)} failed too: see their logs)"
        return RuntimeError(line)

    def generate(self, records: Sequence, requests: Sequence[tuple]) -> list[StoredSample]:
        """One forward of `requests` (SGLangImageInputs.requests / text_requests, made once in the engine
        process) on every rank, each getting the same requests as SGLang's schedulers get them from their
        broadcast; rank 0 cuts the rows by `records` (the samples as stored) and puts them. Any rank's failure
        stops the group."""
        if self._closed:
            raise RuntimeError("sgl engine: its TP ranks were stopped after an earlier failure")
        requests = list(requests)
        try:
            for r, q in zip(self.ranks, self.inboxes):
                q.put((requests, list(records) if r == 0 else None))
            done = self._wait("done", None)
            return done[0] if 0 in done else []   # a node >= 1 of an engine spanning nodes puts nothing
        except BaseException:
            self.close(ERROR_GRACE_S)
            raise

    def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Ask every rank to stop; terminate those still running after `grace` s (stuck in a collective)."""
        if self._closed:
            return
        self._closed = True
        stop_workers(self.procs, self.inboxes, grace)
