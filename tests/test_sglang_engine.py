"""The sgl engine (torchspec/inference/sglang.py), run WITHOUT sglang: a stand-in `sglang` module is put in
sys.modules. Its Engine follows SGLang v0.5.10.post1 as the engine's docstring cites it:
- it takes the `sgl.Engine(**kwargs)` keyword arguments and refuses return_hidden_states without
  enable_return_hidden_states (tokenizer_manager.py:849-857);
- its model has SGLang's module names and layer protocol: decoder layers `model.layers.<i>` called as
  `layer(positions, hidden_states, forward_batch, residual)` returning `(hidden_states, residual)` whose sum is
  the residual stream, with the fused add-RMSNorm of the next layer (and of the final norm) updating both
  tensors IN PLACE (sgl_kernel semantics), and a `logits_processor` module returning an object whose
  `hidden_states` are the post-norm states of every packed token (CaptureHiddenMode.FULL);
- it registers `forward_hooks` like model_executor/hook_manager.py (factory(config), fnmatch on
  named_modules, register_forward_hook), runs every prompt of a generate() call as ONE packed extend batch,
  and returns per request `meta_info["hidden_states"] = [rows.tolist()]` sliced by prompt length in batch
  order (scheduler_output_processor_mixin.py:221-235);
- over several nodes (nnodes > 1): refuses tp_size not divisible by nnodes (server_args.py:6067) and a missing
  dist_init_addr (the TP ranks would meet on 127.0.0.1, model_runner.py:924-930); on node_rank >= 1 it returns
  only with SGLANG_BLOCK_NONZERO_RANK_CHILDREN=0 (else the real one blocks for good, engine.py:681-707), and
  then has no tokenizer manager: generate() fails.
The numbers are transformers': the residual stream after each decoder layer of the tiny target, computed
per prompt (no padding, as SGLang runs them), re-expressed as SGLang's (hidden_states, residual) pairs.
What this cannot show: that a real SGLang build behaves as cited (not run here: no sglang, no GPU build).
"""

import fnmatch
import importlib
import os
import sys
import types
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from torchspec.config.schema import Config
from torchspec.data.sample import Sample
from torchspec.inference import sglang as sgl_engine
from torchspec.inference.hf import HFEngine, load_target
from torchspec.transfer.local import LocalStore
from torchspec.utils.optional import install_hint

LENGTHS = [5, 37, 3, 12, 70, 21]
TOL = dict(rtol=1e-5, atol=1e-5)


# -- the stand-in sglang ---------------------------------------------------------------------------------

# ServerArgs fields (v0.5.10.post1 server_args.py, line of each) the engine and these tests pass; the
# stand-in refuses any other keyword, as the ServerArgs dataclass would.
SERVER_ARGS_FIELDS = {
    "model_path": 298, "skip_tokenizer_init": 302, "model_loader_extra_config": 304, "trust_remote_code": 305,
    "context_length": 306, "enable_multimodal": 308, "port": 314, "nccl_port": 319, "dtype": 330,
    "quantization": 331, "kv_cache_dtype": 333, "mem_fraction_static": 343, "chunked_prefill_size": 347,
    "tp_size": 371, "pp_size": 372, "watchdog_timeout": 382, "dist_timeout": 384, "base_gpu_id": 387,
    "log_level": 394, "log_requests": 396, "log_requests_level": 397, "enable_metrics": 405,
    "dist_init_addr": 451, "nnodes": 452, "node_rank": 453, "attention_backend": 475,
    "disable_flashinfer_autotune": 489, "moe_runner_backend": 522,
    "enforce_disable_flashinfer_allreduce_fusion": 525, "enable_aiter_allreduce_fusion": 526,
    "disable_radix_cache": 609, "disable_cuda_graph": 612, "enable_torch_compile": 636,
    "disable_piecewise_cuda_graph": 637, "enable_return_hidden_states": 662, "forward_hooks": 742,
}

@dataclass
class _ForwardBatch:
    layer_outputs: list            # transformers' output of decoder layer i, packed [num_tokens, H]
    return_hidden_states: bool


@dataclass
class _LogitsProcessorOutput:
    next_token_logits: torch.Tensor
    hidden_states: Optional[torch.Tensor] = None


class _Layer(torch.nn.Module):
    """SGLang's decoder-layer protocol around transformers' numbers for layer i."""

    def __init__(self, i: int, input_layernorm):
        super().__init__()
        self.i, self.input_layernorm = i, input_layernorm

    def forward(self, positions, hidden_states, forward_batch, residual):
        if residual is None:
            residual = hidden_states
        else:   # fused add-RMSNorm: residual += hidden_states; hidden_states = norm(residual), both in place
            residual.add_(hidden_states)
            hidden_states.copy_(self.input_layernorm(residual))
        out = forward_batch.layer_outputs[self.i]
        return out - residual, residual


class _Model(torch.nn.Module):
    def __init__(self, hf_base):
        super().__init__()
        self.embed_tokens = hf_base.embed_tokens
        self.layers = torch.nn.ModuleList(_Layer(i, layer.input_layernorm) for i, layer in enumerate(hf_base.layers))
        self.hf_norm = hf_base.norm

    def forward(self, input_ids, positions, forward_batch):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, forward_batch, residual)
        residual.add_(hidden)   # final fused add-norm, in place
        return self.hf_norm(residual)


class _LogitsProcessor(torch.nn.Module):
    def forward(self, input_ids, hidden_states, lm_head, forward_batch, aux_hidden_states=None):
        last = torch.tensor(forward_batch.last_index)
        return _LogitsProcessorOutput(next_token_logits=lm_head(hidden_states[last]),
                                      hidden_states=hidden_states if forward_batch.return_hidden_states else None)


class _CausalLM(torch.nn.Module):
    def __init__(self, hf_base, lm_head):
        super().__init__()
        self.model = _Model(hf_base)
        self.lm_head = lm_head
        self.logits_processor = _LogitsProcessor()

    def forward(self, input_ids, positions, forward_batch):
        return self.logits_processor(input_ids, self.model(input_ids, positions, forward_batch), self.lm_head,
                                     forward_batch)


def _register_forward_hooks(model, hook_specs):
    """model_executor/hook_manager.py:11-56, as cited."""
    names = dict(model.named_modules())
    for spec in hook_specs:
        module_name, fn = spec["hook_factory"].split(":", 1)
        hook = getattr(importlib.import_module(module_name), fn)(spec.get("config") or {})
        for name, module in names.items():
            if any(fnmatch.fnmatch(name, p) for p in spec["target_modules"]):
                module.register_forward_hook(hook)


class _KimiLikeWrapper(torch.nn.Module):
    """SGLang's multimodal wrapper shape (Kimi-K2.5): the causal LM as `language_model` (its decoder layers
    `language_model.model.layers.<k>`, its own `language_model.logits_processor`), beside a vision tower whose
    block list is as long as the decoder's (so the decoder list cannot be told by its length alone)."""

    def __init__(self, hf_model):
        super().__init__()
        self.language_model = _CausalLM(hf_model.model, hf_model.lm_head)
        n = len(hf_model.model.layers)
        self.vision_tower = torch.nn.Module()
        self.vision_tower.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(n))

    def forward(self, input_ids, positions, forward_batch):   # text only: the vision tower does not run
        return self.language_model(input_ids, positions, forward_batch)


class _HFNumbers:
    """transformers' numbers for the stand-in's SGLang-shaped model (shared by the Engine and ModelRunner stand-ins)."""

    def _load(self, path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def _text_base(self):
        return self.hf.model

    def _run_base(self, ids: list[int]) -> None:
        self.hf.model(input_ids=torch.tensor([ids]), use_cache=False)

    def _layer_outputs(self, ids: list[int]) -> list[torch.Tensor]:
        """transformers' output of every decoder layer for one prompt (pre-norm for the last one)."""
        outs = {}
        layers = self._text_base().layers
        handles = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple)
                                                                                    else o))
                   for i, layer in enumerate(layers)]
        try:
            self._run_base(ids)
        finally:
            for h in handles:
                h.remove()
        return [outs[i][0] for i in range(len(layers))]

    def _build_model(self):
        return (_KimiLikeWrapper(self.hf) if FakeEngine.multimodal
                else _CausalLM(self._text_base(), self.hf.lm_head)).eval()

    def _packed_forward(self, input_ids: list[list[int]], return_hidden_states: bool) -> _LogitsProcessorOutput:
        """Every prompt as ONE packed extend batch through the SGLang-shaped model (hooks fire here)."""
        per_prompt = [self._layer_outputs(ids) for ids in input_ids]
        packed = [torch.cat([p[i] for p in per_prompt]) for i in range(len(per_prompt[0]))]
        lens = [len(ids) for ids in input_ids]
        fb = _ForwardBatch(packed, return_hidden_states)
        fb.last_index = [sum(lens[:j + 1]) - 1 for j in range(len(lens))]
        flat = torch.tensor([t for ids in input_ids for t in ids])
        positions = torch.cat([torch.arange(n) for n in lens])
        return self.model(flat, positions, fb)


class FakeEngine(_HFNumbers):
    instances: list = []
    multimodal = False
    list_rows = 0   # requests whose hidden states this stand-in turned into Python lists (SGLang's scheduler does)

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(SERVER_ARGS_FIELDS))
        if unknown:
            raise TypeError(f"ServerArgs.__init__() got unexpected keyword arguments {unknown}")
        nnodes, node_rank = kwargs.get("nnodes", 1), kwargs.get("node_rank", 0)
        if nnodes > 1 and (kwargs.get("tp_size", 1) % nnodes or not kwargs.get("dist_init_addr")):
            raise AssertionError(f"stand-in sgl.Engine: nnodes={nnodes} needs tp_size % nnodes == 0 and a "
                                 f"dist_init_addr: {kwargs.get('tp_size')}, {kwargs.get('dist_init_addr')}")
        if node_rank >= 1 and os.environ.get("SGLANG_BLOCK_NONZERO_RANK_CHILDREN") != "0":
            raise AssertionError("stand-in sgl.Engine: node_rank >= 1 without SGLANG_BLOCK_NONZERO_RANK_CHILDREN=0 "
                                 "would never return")
        self.tokenizer_manager = object() if node_rank == 0 else None
        self.kwargs = kwargs
        self.calls = []
        self.shutdowns = 0
        self.hf = self._load(kwargs["model_path"])
        self.model = self._build_model()
        _register_forward_hooks(self.model, kwargs.get("forward_hooks") or [])
        FakeEngine.instances.append(self)

    def _tokenize_request(self, ids: list[int], images) -> list[int]:
        """The tokenizer manager's input_ids for one request (a text model: the ids as given)."""
        assert not images, "stand-in sgl.Engine: a text model got image_data"
        return ids

    @torch.no_grad()
    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_hidden_states=False,
                 image_data=None, **other):
        assert self.tokenizer_manager is not None, "node_rank >= 1: no tokenizer manager"
        self.calls.append(dict(sampling_params=sampling_params, return_hidden_states=return_hidden_states,
                               other=other, n=len(input_ids), image_data=image_data))
        if image_data is not None and len(image_data) != len(input_ids):   # io_struct.py:437-440
            raise ValueError("The length of image_data should be equal to the batch size.")
        input_ids = [self._tokenize_request(ids, image_data[i] if image_data else None)
                     for i, ids in enumerate(input_ids)]
        if return_hidden_states and not self.kwargs.get("enable_return_hidden_states"):
            raise ValueError("The server is not configured to return the hidden states. "
                             "Please set `--enable-return-hidden-states` to enable this feature.")
        assert prompt is None and sampling_params["max_new_tokens"] == 1
        out = self._packed_forward(input_ids, return_hidden_states)
        next_ids = out.next_token_logits.argmax(-1).tolist()
        results, offset = [], 0
        for ids, tok in zip(input_ids, next_ids):
            meta = {"prompt_tokens": len(ids), "completion_tokens": 1}
            if return_hidden_states and out.hidden_states is not None:
                FakeEngine.list_rows += 1
                meta["hidden_states"] = [out.hidden_states[offset:offset + len(ids)].cpu().clone().tolist()]
            offset += len(ids)
            results.append({"text": "", "output_ids": [tok], "meta_info": meta})
        return results

    def shutdown(self):
        self.shutdowns += 1


# -- the stand-in's in-process API (sglang.srt.*), each class named after the real one it mirrors ------------

class FakeServerArgs:
    """sglang.srt.server_args.ServerArgs: a dataclass of the fields above (others refused); its __post_init__
    fills mem_fraction_static when None and tokenizer_path from model_path; page_size defaults to 1; the
    processor fields the tokenizer manager reads keep their defaults (tokenizer_mode "auto", revision None,
    disable_fast_image_processor False, mm_process_config {})."""

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(SERVER_ARGS_FIELDS))
        if unknown:
            raise TypeError(f"ServerArgs.__init__() got unexpected keyword arguments {unknown}")
        self.__dict__.update({k: None for k in SERVER_ARGS_FIELDS})
        self.__dict__.update(kwargs)
        self.page_size = 1
        self.tokenizer_path, self.tokenizer_mode, self.revision = self.model_path, "auto", None
        self.disable_fast_image_processor, self.mm_process_config = False, {}
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.8


class FakeModelConfig:
    """sglang.srt.configs.model_config.ModelConfig (from_server_args reads model_path; hf_config: the target's
    transformers config)."""

    def __init__(self, model_path):
        from transformers import AutoConfig

        self.model_path = model_path
        self.hf_config = AutoConfig.from_pretrained(model_path)

    @classmethod
    def from_server_args(cls, server_args):
        return cls(server_args.model_path)


class FakeCaptureHiddenMode:
    """sglang.srt.model_executor.forward_batch_info.CaptureHiddenMode (NULL: none kept; FULL: every token)."""
    NULL, LAST, FULL = 0, 1, 2


class FakeSamplingParams:
    """sglang.srt.sampling.sampling_params.SamplingParams (keyword-only use)."""

    def __init__(self, max_new_tokens=128, temperature=1.0, **other):
        self.max_new_tokens, self.temperature = max_new_tokens, temperature


class FakeReq:
    """sglang.srt.managers.schedule_batch.Req: rid, origin_input_text, origin_input_ids, sampling_params;
    prefix_indices empty (nothing cached); fill_ids / extend_input_len set by whoever schedules it;
    origin_input_ids_unpadded = the ids as given (before image pad values); multimodal_inputs None until
    extend_image_inputs."""

    def __init__(self, rid, origin_input_text, origin_input_ids, sampling_params, **other):
        assert isinstance(origin_input_ids, list) and all(isinstance(t, int) for t in origin_input_ids)
        self.rid, self.origin_input_text, self.origin_input_ids = rid, origin_input_text, origin_input_ids
        self.origin_input_ids_unpadded = origin_input_ids
        self.multimodal_inputs = None
        self.sampling_params = sampling_params
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.fill_ids = None
        self.extend_input_len = None

    def extend_image_inputs(self, image_inputs):
        assert self.multimodal_inputs is None, "stand-in: merging multimodal inputs is not modelled"
        self.multimodal_inputs = image_inputs


class FakeModality:
    """sglang.srt.managers.schedule_batch.Modality."""
    IMAGE, VIDEO, AUDIO = "IMAGE", "VIDEO", "AUDIO"


@dataclass
class FakeMultimodalDataItem:
    """sglang.srt.managers.schedule_batch.MultimodalDataItem: one image; feature = pixel_values,
    model_specific_data["image_grid_thw"], offsets [(first, last)] of its tokens in the expanded ids; hash and
    pad_value set by set_pad_value (the real one hashes the feature; any value above the vocabulary will do)."""
    modality: str
    hash: Optional[int] = None
    pad_value: Optional[int] = None
    offsets: Optional[list] = None
    feature: Optional[torch.Tensor] = None
    model_specific_data: Optional[dict] = None

    def set_pad_value(self):
        if self.pad_value is None:
            self.hash = int(torch.randint(1 << 20, 1 << 30, ()).item())
            self.pad_value = self.hash % (1 << 30)

    def is_image(self):
        return self.modality == FakeModality.IMAGE

    def is_valid(self):
        return self.modality in (FakeModality.IMAGE, FakeModality.VIDEO, FakeModality.AUDIO)


@dataclass
class FakeMultimodalProcessorOutput:
    """sglang.srt.managers.schedule_batch.MultimodalProcessorOutput (what process_mm_data_async returns)."""
    mm_items: list
    input_ids: Optional[list] = None
    im_token_id: Optional[int] = None
    im_start_id: Optional[int] = None
    im_end_id: Optional[int] = None
    mrope_positions: Optional[torch.Tensor] = None
    mrope_position_delta: Optional[torch.Tensor] = None


@dataclass
class FakeMultimodalInputs:
    """sglang.srt.managers.schedule_batch.MultimodalInputs: from_processor_output(out) keeps the valid items,
    gives each its pad value (set_pad_value) and copies the processor's token ids and M-RoPE fields."""
    mm_items: list
    im_token_id: Optional[int] = None
    im_start_id: Optional[int] = None
    im_end_id: Optional[int] = None
    mrope_positions: Optional[torch.Tensor] = None
    mrope_position_delta: Optional[torch.Tensor] = None

    @staticmethod
    def from_processor_output(obj):
        ret = FakeMultimodalInputs(mm_items=[i for i in obj.mm_items if i.is_valid()])
        for item in ret.mm_items:
            item.set_pad_value()
        for arg in ("mrope_positions", "mrope_position_delta", "im_token_id", "im_start_id", "im_end_id"):
            if getattr(obj, arg, None) is not None:
                setattr(ret, arg, getattr(obj, arg))
        return ret


@dataclass
class FakeGenerateReqInput:
    """sglang.srt.managers.io_struct.GenerateReqInput (the fields a multimodal processor reads)."""
    input_ids: Optional[list] = None
    image_data: Optional[list] = None
    video_data: Optional[list] = None
    audio_data: Optional[list] = None
    rid: Optional[str] = None


MM_PROCESSORS: dict = {}   # stand-in PROCESSOR_MAPPING: architecture name -> processor class (tests register)


def _import_processors(package_name, overwrite=False):
    """sglang.srt.managers.multimodal_processor.import_processors (the stand-in's processors are registered by
    the tests in MM_PROCESSORS)."""
    assert package_name == "sglang.srt.multimodal.processors"


def _get_mm_processor(hf_config, server_args, processor, transport_mode, model_config=None, **kwargs):
    """sglang.srt.managers.multimodal_processor.get_mm_processor: the processor class registered for one of the
    config's architectures, built as cls(hf_config, server_args, processor, transport_mode)."""
    for arch, cls in MM_PROCESSORS.items():
        if arch in hf_config.architectures:
            return cls(hf_config, server_args, processor, transport_mode, **kwargs)
    raise ValueError(f"No processor registered for architecture: {hf_config.architectures}.")


def _get_processor(tokenizer_name, tokenizer_mode="auto", trust_remote_code=False, revision=None, use_fast=True,
                   **kwargs):
    """sglang.srt.utils.hf_transformers_utils.get_processor: transformers' AutoProcessor of the model. Here its two
    parts a Qwen-VL processor wraps, tokenizer and image_processor (AutoProcessor would also build the video
    processor, which needs torchvision, not installed here)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    return types.SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=trust_remote_code),
        image_processor=AutoImageProcessor.from_pretrained(tokenizer_name, trust_remote_code=trust_remote_code))


class FakeTokenPool:
    """ReqToTokenPool / TokenToKVPoolAllocator: a fixed number of token slots, freed only by clear()."""

    def __init__(self, size):
        self.size, self.used = size, 0

    def alloc(self, n):
        if self.used + n > self.size:
            raise RuntimeError(f"stand-in KV pool: out of memory ({self.used} + {n} > {self.size} slots)")
        self.used += n

    def clear(self):
        self.used = 0


class FakeCacheInitParams:
    """sglang.srt.mem_cache.cache_init_params.CacheInitParams."""

    def __init__(self, disable, req_to_token_pool, token_to_kv_pool_allocator, page_size, **other):
        self.disable, self.page_size = disable, page_size


class FakeRadixCache:
    """sglang.srt.mem_cache.radix_cache.RadixCache(params)."""

    def __init__(self, params):
        self.params = params


class FakeSpeculativeAlgorithm:
    """sglang.srt.speculative.spec_info.SpeculativeAlgorithm."""
    NONE = "NONE"


@dataclass
class FakeModelWorkerBatch:
    """managers/schedule_batch.py ModelWorkerBatch (the fields the forward reads)."""
    input_ids: torch.Tensor
    extend_seq_lens: list
    rids: list
    multimodal_inputs: Optional[list] = None   # per request: its MultimodalInputs or None


class FakeScheduleBatch:
    """sglang.srt.managers.schedule_batch.ScheduleBatch: init_new(reqs, req_to_token_pool,
    token_to_kv_pool_allocator, tree_cache, model_config, enable_overlap, spec_algorithm, ...);
    prepare_for_extend allocates each request's extend_input_len slots; get_model_worker_batch packs the
    fill_ids in request order."""

    @classmethod
    def init_new(cls, reqs, req_to_token_pool, token_to_kv_pool_allocator, tree_cache, model_config,
                 enable_overlap, spec_algorithm=None, enable_custom_logit_processor=False, chunked_req=None):
        b = cls()
        b.reqs, b.pool, b.kv = reqs, req_to_token_pool, token_to_kv_pool_allocator
        b.prepared = False
        b.multimodal_inputs = None
        return b

    def prepare_for_extend(self):
        for r in self.reqs:
            assert r.fill_ids is not None and r.extend_input_len == len(r.fill_ids) - len(r.prefix_indices)
            self.pool.alloc(1)
            self.kv.alloc(r.extend_input_len)
        self.multimodal_inputs = [r.multimodal_inputs for r in self.reqs]
        self.prepared = True

    def get_model_worker_batch(self):
        assert self.prepared, "ScheduleBatch: get_model_worker_batch before prepare_for_extend"
        return FakeModelWorkerBatch(torch.tensor([t for r in self.reqs for t in r.fill_ids]),
                                    [r.extend_input_len for r in self.reqs], [r.rid for r in self.reqs],
                                    self.multimodal_inputs)


class FakeForwardBatch:
    """sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new(model_worker_batch, model_runner);
    capture_hidden_mode starts NULL (the batch's own mode), set by the caller; mm_inputs = the batch's
    multimodal_inputs."""

    @classmethod
    def init_new(cls, batch, model_runner):
        fb = cls()
        fb.mm_inputs = batch.multimodal_inputs
        fb.input_ids, fb.extend_seq_lens_cpu = batch.input_ids, list(batch.extend_seq_lens)
        fb.capture_hidden_mode = FakeCaptureHiddenMode.NULL
        return fb


@dataclass
class FakeModelRunnerOutput:
    """model_executor/model_runner.py ModelRunnerOutput."""
    logits_output: _LogitsProcessorOutput
    can_run_graph: bool


class FakeModelRunner(_HFNumbers):
    """sglang.srt.model_executor.model_runner.ModelRunner(model_config, mem_fraction_static, gpu_id, tp_rank,
    tp_size, moe_ep_rank, moe_ep_size, pp_rank, pp_size, nccl_port, server_args, ...): loads the model,
    registers server_args.forward_hooks (hook_manager.register_forward_hooks), owns the two token pools;
    forward(forward_batch) -> ModelRunnerOutput whose logits_output.hidden_states are every token's state
    only under CaptureHiddenMode.FULL."""
    instances: list = []
    POOL_TOKENS = 200   # more than one test batch (LENGTHS: 148 tokens), less than two: unfreed slots fail

    def __init__(self, model_config, mem_fraction_static, gpu_id, tp_rank, tp_size, moe_ep_rank, moe_ep_size,
                 pp_rank, pp_size, nccl_port, server_args, dp_rank=None, is_draft_worker=False, **other):
        assert isinstance(server_args, FakeServerArgs) and isinstance(nccl_port, int)
        # one TP rank per process, on its own GPU (base_gpu_id + tp_rank), all ranks of the engine's tp_size
        assert tp_size == (server_args.tp_size or 1) and 0 <= tp_rank < tp_size and pp_size == 1, (tp_rank, tp_size)
        # node r of N runs TP ranks r*tp/N ..; GPU base_gpu_id + tp_rank % (tp/N) (entrypoints/engine.py)
        per_node = tp_size // (server_args.nnodes or 1)
        assert tp_rank // per_node == (server_args.node_rank or 0), (tp_rank, server_args.node_rank)
        assert gpu_id == (server_args.base_gpu_id or 0) + tp_rank % per_node, (gpu_id, server_args.base_gpu_id, tp_rank)
        assert nccl_port == server_args.nccl_port
        self.model_config, self.server_args, self.gpu_id = model_config, server_args, gpu_id
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.pid = os.getpid()
        _standin_fail(tp_rank, "start", server_args.log_level)
        _standin_log(f"runner {self.pid} {tp_rank} {gpu_id}")
        if tp_size > 1:   # init_torch_distributed: the ranks meet at tcp://<dist_init_addr>, when set (several
            import datetime   # nodes), else tcp://127.0.0.1:<nccl_port> (gloo here, CPU); rank = global tp_rank

            meet = server_args.dist_init_addr or f"127.0.0.1:{nccl_port}"
            _standin_log(f"meet {self.pid} {tp_rank} {meet}")
            torch.distributed.init_process_group(
                "gloo", init_method=f"tcp://{meet}", world_size=tp_size, rank=tp_rank,
                timeout=datetime.timedelta(seconds=server_args.dist_timeout or 120))
        self.hf = self._load(model_config.model_path)
        self.model = self._build_model()
        _register_forward_hooks(self.model, server_args.forward_hooks or [])
        self.req_to_token_pool = FakeTokenPool(64)
        self.token_to_kv_pool_allocator = FakeTokenPool(self.POOL_TOKENS)
        self.forwards = []
        FakeModelRunner.instances.append(self)

    @torch.no_grad()
    def forward(self, forward_batch):
        lens = forward_batch.extend_seq_lens_cpu
        ids = forward_batch.input_ids.tolist()
        prompts, offset = [], 0
        for n in lens:
            prompts.append(ids[offset:offset + n])
            offset += n
        self.forwards.append(lens)
        prompts = self._embed_routine(prompts, forward_batch.mm_inputs)
        _standin_fail(self.tp_rank, "forward", self.server_args.log_level)
        if self.tp_size > 1:   # a TP forward's collectives need every rank, each with the same batch
            mine = torch.tensor([len(ids), sum(ids), len(lens)], dtype=torch.int64)
            total = mine.clone()
            torch.distributed.all_reduce(total)
            assert torch.equal(total, mine * self.tp_size), f"TP rank {self.tp_rank}: the ranks got different batches"
        out = self._packed_forward(prompts, forward_batch.capture_hidden_mode == FakeCaptureHiddenMode.FULL)
        return FakeModelRunnerOutput(logits_output=out, can_run_graph=False)

    def _embed_routine(self, prompts, mm_inputs):
        """A text model: no request carries multimodal inputs (the VLM stand-in overrides this)."""
        assert not mm_inputs or all(m is None for m in mm_inputs), "stand-in: a text model got multimodal inputs"
        return prompts


def _standin_log(line: str) -> None:
    """One line to the file named by $STANDIN_TP_LOG (shared by the TP rank processes), if set."""
    path = os.environ.get("STANDIN_TP_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _standin_fail(rank: int, stage: str, log_level: Optional[str] = None) -> None:
    """$STANDIN_TP_FAIL (or ServerArgs.log_level "standin-fail:<spec>", which reaches ranks started by Ray actors)
    = "rank:stage:raise|exit": that rank fails at that stage (start / forward)."""
    spec = os.environ.get("STANDIN_TP_FAIL", "")
    if not spec and (log_level or "").startswith("standin-fail:"):
        spec = log_level.removeprefix("standin-fail:")
    if spec and spec.split(":")[:2] == [str(rank), stage]:
        if spec.endswith(":exit"):
            os._exit(3)
        raise ValueError(f"stand-in ModelRunner: rank {rank} fails at {stage}\n(second line of the message)")


def _install_stand_in_rank() -> None:
    """sglang_runner.rank_process_setup in the tests: each spawned TP rank gets the stand-in sglang modules, and
    logs (to $STANDIN_TP_LOG) every record put and every float Tensor.tolist() in its process."""
    sys.modules["sglang"] = types.ModuleType("sglang")
    sys.modules["sglang"].Engine = FakeEngine
    sys.modules.update(_srt_modules())
    install_rank_spies()


def install_rank_spies() -> None:
    """Log (to $STANDIN_TP_LOG) every record put and every float Tensor.tolist() in this process."""
    from torchspec.transfer.local import LocalStore as _Store

    real_tolist, real_put = torch.Tensor.tolist, _Store.put

    def tolist(self):
        if self.is_floating_point():
            _standin_log(f"tolist {os.getpid()} {tuple(self.shape)}")
        return real_tolist(self)

    def put(self, key, record):
        _standin_log(f"put {os.getpid()} {key} {record['aux_hidden_states'].dtype}")
        return real_put(self, key, record)
    torch.Tensor.tolist = tolist
    _Store.put = put


def _srt_modules() -> dict:
    """sys.modules entries of the stand-in's sglang.srt API."""
    mods = {}
    for name, attrs in {
        "sglang.srt": {},
        "sglang.srt.server_args": {"ServerArgs": FakeServerArgs},
        "sglang.srt.configs": {},
        "sglang.srt.configs.model_config": {"ModelConfig": FakeModelConfig},
        "sglang.srt.managers": {},
        "sglang.srt.managers.schedule_batch": {"Req": FakeReq, "ScheduleBatch": FakeScheduleBatch,
                                               "MultimodalInputs": FakeMultimodalInputs,
                                               "MultimodalDataItem": FakeMultimodalDataItem,
                                               "MultimodalProcessorOutput": FakeMultimodalProcessorOutput,
                                               "Modality": FakeModality},
        "sglang.srt.managers.io_struct": {"GenerateReqInput": FakeGenerateReqInput},
        "sglang.srt.managers.multimodal_processor": {"get_mm_processor": _get_mm_processor,
                                                     "import_processors": _import_processors},
        "sglang.srt.utils": {},
        "sglang.srt.utils.hf_transformers_utils": {"get_processor": _get_processor},
        "sglang.srt.mem_cache": {},
        "sglang.srt.mem_cache.cache_init_params": {"CacheInitParams": FakeCacheInitParams},
        "sglang.srt.mem_cache.radix_cache": {"RadixCache": FakeRadixCache},
        "sglang.srt.model_executor": {},
        "sglang.srt.model_executor.forward_batch_info": {"ForwardBatch": FakeForwardBatch,
                                                         "CaptureHiddenMode": FakeCaptureHiddenMode},
        "sglang.srt.model_executor.model_runner": {"ModelRunner": FakeModelRunner},
        "sglang.srt.sampling": {},
        "sglang.srt.sampling.sampling_params": {"SamplingParams": FakeSamplingParams},
        "sglang.srt.speculative": {},
        "sglang.srt.speculative.spec_info": {"SpeculativeAlgorithm": FakeSpeculativeAlgorithm},
    }.items():
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        mods[name] = m
    return mods


@pytest.fixture
def fake_sglang(monkeypatch):
    module = types.ModuleType("sglang")
    module.Engine = FakeEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    for name, sub in _srt_modules().items():
        monkeypatch.setitem(sys.modules, name, sub)
    module.srt = sys.modules["sglang.srt"]
    FakeEngine.instances = []
    FakeEngine.multimodal = False
    FakeEngine.list_rows = 0
    FakeModelRunner.instances = []
    yield module
    sgl_engine._captured.clear()


# -- helpers ---------------------------------------------------------------------------------------------

def _cfg(target_dir, aux=(0, 1, 2), tp_size=1) -> Config:
    """tp_size 1: the in-process ModelRunner path; > 1 (the stand-in needs no GPUs): one process per TP rank, or
    the sgl.Engine path with `_sgl_engine_path`."""
    cfg = Config()
    cfg.model.target_model_path = str(target_dir)
    cfg.inference.inference_engine_type = "sgl"
    cfg.inference.aux_hidden_states_layers = list(aux)
    cfg.inference.sglang.tp_size = tp_size
    return cfg


def _samples(vocab: int):
    g = torch.Generator().manual_seed(0)
    return [Sample(f"s{i}", torch.randint(0, vocab, (n,), generator=g), (torch.arange(n) % 3 > 0).to(torch.uint8))
            for i, n in enumerate(LENGTHS)]


def _hf_records(target_dir, tmp_path, aux, samples):
    store = LocalStore(root=tmp_path / "hf-store")
    engine = HFEngine(load_target(target_dir, torch.float32, "cpu"), store, aux_layers=aux, batch_size=len(samples))
    engine.generate(samples)
    engine.close()
    return {s.sample_id: store.get(s.sample_id) for s in samples}


def _sgl_engine_path(monkeypatch) -> None:
    """Take the sgl.Engine path (what engines spanning nodes run) on one node."""
    monkeypatch.setattr(sgl_engine, "uses_model_runner", lambda cfg, vision=None: False)


def _sgl_records(cfg, tmp_path, samples):
    from torchspec.inference.factory import build_engine

    store = LocalStore(root=tmp_path / "sgl-store")
    engine = build_engine(cfg, store, "cpu")
    assert isinstance(engine, sgl_engine.SGLangEngine)
    stored = engine.generate(samples)
    assert [(s.key, s.sample_id, s.length) for s in stored] == [(s.sample_id, s.sample_id, len(s)) for s in samples]
    records = {s.sample_id: store.get(s.sample_id) for s in samples}
    engine.close()
    return records, (FakeModelRunner.instances or FakeEngine.instances)[-1]


# -- tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp_size", [1, 2])   # 1: in-process ModelRunner; 2: sgl.Engine
@pytest.mark.parametrize("aux", [[0, 1, 2], [1, 2, 3]])   # 3 = L - 1: the last layer, pre-norm
def test_records_equal_hf_engine(fake_sglang, tiny_target_dir, tmp_path, aux, tp_size, monkeypatch):
    if tp_size > 1:
        _sgl_engine_path(monkeypatch)
    samples = _samples(512)
    want = _hf_records(tiny_target_dir, tmp_path, aux, samples)
    got, fake = _sgl_records(_cfg(tiny_target_dir, aux, tp_size), tmp_path, samples)
    if tp_size == 1:   # one extend forward for the whole batch, sgl.Engine never started
        assert fake.forwards == [[len(s) for s in samples]] and FakeEngine.instances == []
    else:   # one generate() call for the whole batch, prefill + one discarded token, hidden states on, no logprobs
        assert len(fake.calls) == 1 and fake.calls[0]["n"] == len(samples)
        assert fake.calls[0]["sampling_params"]["max_new_tokens"] == 1 and fake.calls[0]["return_hidden_states"]
        assert not fake.calls[0]["other"].get("return_logprob")
        assert fake.shutdowns == 1 and FakeModelRunner.instances == []
    for s in samples:
        g, w = got[s.sample_id], want[s.sample_id]
        assert set(g) == set(w) == {"input_ids", "loss_mask", "aux_hidden_states", "final_hidden_states"}
        for key in w:
            assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape, key
        assert torch.equal(g["input_ids"], w["input_ids"]) and torch.equal(g["loss_mask"], w["loss_mask"])
        torch.testing.assert_close(g["aux_hidden_states"], w["aux_hidden_states"], **TOL)
        torch.testing.assert_close(g["final_hidden_states"], w["final_hidden_states"], **TOL)


def test_off_by_one_layer_mapping_is_caught(fake_sglang, tiny_target_dir, tmp_path, monkeypatch):
    """Hooking the module of SGLang's internal capture id (k + 1) instead of our k gives other states."""
    aux = [0, 1, 2]
    samples = _samples(512)[:3]
    want = _hf_records(tiny_target_dir, tmp_path, aux, samples)
    monkeypatch.setattr(sgl_engine, "aux_hook_targets", lambda ks, prefix: [f"{prefix}.{k + 1}" for k in ks])
    got, _ = _sgl_records(_cfg(tiny_target_dir, aux), tmp_path, samples)
    for s in samples:
        g, w = got[s.sample_id]["aux_hidden_states"], want[s.sample_id]["aux_hidden_states"]
        assert (g - w).abs().max() > 1e-2   # far outside TOL
        with pytest.raises(AssertionError):
            torch.testing.assert_close(g, w, **TOL)
        # the final state does not depend on the aux mapping
        torch.testing.assert_close(got[s.sample_id]["final_hidden_states"], want[s.sample_id]["final_hidden_states"],
                                   **TOL)


def test_hook_must_find_the_layer_modules(fake_sglang, tiny_target_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sgl_engine, "aux_hook_targets", lambda ks, prefix: [f"model.decoder.{k}" for k in ks])
    with pytest.raises(RuntimeError, match="no output captured for aux layer"):
        _sgl_records(_cfg(tiny_target_dir), tmp_path, _samples(512)[:2])


def test_engine_kwargs_are_the_config(fake_sglang, tiny_target_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_target_dir, [0, 1, 2])
    sg = cfg.inference.sglang
    sg.mem_fraction_static = 0.55
    sg.context_length = 4096
    sg.attention_backend = "fa3"
    sg.dist_timeout = 77
    user_hook = {"name": "mine", "target_modules": ["lm_head"], "hook_factory": "x:y"}
    sg.extra_args = {"watchdog_timeout": 1800, "enable_torch_compile": True, "forward_hooks": [user_hook],
                     # protected: dropped with a warning each
                     "tp_size": 8, "port": 1, "chunked_prefill_size": 8192, "disable_radix_cache": False,
                     "enable_return_hidden_states": False, "model_path": "/elsewhere", "mem_fraction_static": 0.9,
                     "dtype": "float16", "enforce_disable_flashinfer_allreduce_fusion": False}
    warnings = []
    kw = sgl_engine.build_engine_kwargs(cfg, "cuda:3", [0, 1, 2], warn=warnings.append)
    dropped = {"tp_size", "port", "chunked_prefill_size", "disable_radix_cache", "enable_return_hidden_states",
               "model_path", "mem_fraction_static", "dtype", "enforce_disable_flashinfer_allreduce_fusion"}
    assert len(warnings) == len(dropped) and all(any(f".{k}=" in w for w in warnings) for k in dropped)
    assert kw["dtype"] == "bfloat16"   # the target's compute dtype on GPU, as the hf engine's
    assert kw["model_path"] == str(tiny_target_dir) and kw["trust_remote_code"] is False
    assert kw["tp_size"] == 1 and kw["pp_size"] == 1 and kw["nnodes"] == 1
    assert kw["mem_fraction_static"] == 0.55 and kw["context_length"] == 4096 and kw["attention_backend"] == "fa3"
    assert kw["dist_timeout"] == 77 and kw["log_level"] == "warning"
    assert kw["watchdog_timeout"] == 1800 and kw["enable_torch_compile"] is True
    # the invariants, and what this engine manages
    assert kw["disable_radix_cache"] is True and kw["enable_return_hidden_states"] is True
    assert kw["disable_cuda_graph"] is True and kw["chunked_prefill_size"] == -1
    assert kw["disable_piecewise_cuda_graph"] is True and kw["enforce_disable_flashinfer_allreduce_fusion"] is True
    assert kw["enable_aiter_allreduce_fusion"] is False
    assert kw["base_gpu_id"] == 3 and kw["node_rank"] == 0
    assert isinstance(kw["port"], int) and isinstance(kw["nccl_port"], int) and kw["port"] != 1
    assert kw["forward_hooks"][0] == user_hook
    ours = kw["forward_hooks"][1:]
    assert [h["target_modules"] for h in ours] == [["model.layers.0"], ["model.layers.1"], ["model.layers.2"],
                                                   ["logits_processor"]]
    assert ours[-1]["config"] == {"layers": [0, 1, 2], "prefix": "model.layers"}
    assert "dist_init_addr" not in kw and "quantization" not in kw   # null = SGLang's own default

    # what the engine really hands to SGLang: the same, with its own free ports; the in-process path builds
    # ServerArgs from the same keywords sgl.Engine takes, and ModelRunner gets the nccl_port among them
    cfg.inference.sglang.extra_args = {"watchdog_timeout": 1800}
    store = LocalStore(root=tmp_path / "store")
    engine = sgl_engine.build_engine(cfg, store, "cpu")
    runner = FakeModelRunner.instances[-1]
    defaults = ("page_size", "tokenizer_path", "tokenizer_mode", "disable_fast_image_processor", "mm_process_config")
    passed = {k: v for k, v in vars(runner.server_args).items() if v is not None and k not in defaults}
    expect = sgl_engine.build_engine_kwargs(cfg, "cpu", [0, 1, 2])
    assert isinstance(passed["nccl_port"], int) and runner.gpu_id == 0
    for k in ("port", "nccl_port"):
        passed.pop(k), expect.pop(k)
    expect.pop("mem_fraction_static", None), passed.pop("mem_fraction_static")   # ServerArgs fills its default
    assert passed == expect and passed["base_gpu_id"] == 0 and passed["dtype"] == "float32"
    engine.close()
    engine.close()   # idempotent
    assert engine.runner is None
    cfg.inference.sglang.tp_size = 2   # the sgl.Engine path (several nodes): the same keywords
    monkeypatch.setattr(sgl_engine, "uses_model_runner", lambda cfg, vision=None: False)
    engine = sgl_engine.build_engine(cfg, store, "cpu")
    passed = FakeEngine.instances[-1].kwargs
    expect = sgl_engine.build_engine_kwargs(cfg, "cpu", [0, 1, 2])
    for k in ("port", "nccl_port"):
        passed.pop(k), expect.pop(k)
    assert passed == expect and passed["tp_size"] == 2
    engine.close()
    engine.close()   # idempotent
    assert FakeEngine.instances[-1].shutdowns == 1


def test_without_enable_return_hidden_states_the_fake_refuses(fake_sglang, tiny_target_dir):
    """The stand-in enforces what SGLang's tokenizer manager does, so the invariant above matters."""
    kw = {"model_path": str(tiny_target_dir)}
    with pytest.raises(ValueError, match="enable-return-hidden-states"):
        FakeEngine(**kw).generate(input_ids=[[1, 2, 3]], sampling_params={"max_new_tokens": 1},
                                  return_hidden_states=True)


def test_missing_sglang_is_one_line_install_hint(tiny_target_dir, tmp_path, monkeypatch):
    from torchspec.inference.factory import build_engine

    monkeypatch.setitem(sys.modules, "sglang", None)   # import sglang -> ImportError
    with pytest.raises(ImportError) as e:
        build_engine(_cfg(tiny_target_dir), LocalStore(root=tmp_path / "store"), "cpu")
    msg = str(e.value)
    assert "\n" not in msg and install_hint("sglang") in msg


def test_refused_placements(fake_sglang, tiny_target_dir, tmp_path, monkeypatch):
    store = LocalStore(root=tmp_path / "store")
    cfg = _cfg(tiny_target_dir)
    cfg.inference.sglang.nnodes = 2
    with pytest.raises(sgl_engine.SGLangEngineError, match=r"inference.sglang.nnodes=2: .*only the Ray launcher"):
        sgl_engine.build_engine(cfg, store, "cpu")
    cfg = _cfg(tiny_target_dir)
    cfg.inference.colocate = True
    with pytest.raises(sgl_engine.SGLangEngineError, match=r"inference.colocate=true"):
        sgl_engine.build_engine(cfg, store, "cpu")
    monkeypatch.setattr(sgl_engine.multiprocessing, "current_process", lambda: types.SimpleNamespace(daemon=True))
    with pytest.raises(sgl_engine.SGLangEngineError, match=r"inference.sglang.tp_size=2: the sgl engine starts child "
                                                           r"processes .*which a daemonic process may not do"):
        sgl_engine.build_engine(_cfg(tiny_target_dir, tp_size=2), store, "cpu")
    assert FakeEngine.instances == [] and FakeModelRunner.instances == []   # refused before SGLang started
    # the in-process ModelRunner starts no child process: a daemonic engine process may run it
    sgl_engine.build_engine(_cfg(tiny_target_dir), store, "cpu").close()
    assert len(FakeModelRunner.instances) == 1


def test_bad_target_path_is_one_line(fake_sglang, tmp_path):
    from torchspec.inference.hf import TargetLoadError

    with pytest.raises(TargetLoadError, match="model.target_model_path="):
        sgl_engine.build_engine(_cfg(tmp_path / "nope"), LocalStore(root=tmp_path / "store"), "cpu")


# -- opt-in: a real SGLang on a GPU (never run here: no sglang on this machine or the GPU machine) ----------

def _real_sglang_reason():
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        return "needs a real sglang: pip install -e '.[sglang]'"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU for SGLang"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_real_sglang_reason() is not None, reason=str(_real_sglang_reason()))
def test_real_sglang_records_match_hf_engine(tiny_tokenizer, tmp_path):
    """The same comparison against a real sgl.Engine (bf16 on cuda:0): relative error of each record's
    states within bf16 noise (an off-by-one layer gives O(1))."""
    from torchspec.utils.tiny import make_tiny_target

    target = tmp_path / "target"
    make_tiny_target(target, arch="qwen3", tokenizer=tiny_tokenizer, head_dim=64)
    aux = [0, 1, 3]
    samples = _samples(512)
    store = LocalStore(root=tmp_path / "hf-store")
    hf = HFEngine(load_target(target, torch.bfloat16, "cuda:0"), store, aux_layers=aux, batch_size=len(samples))
    hf.generate(samples)
    hf.close()
    want = {s.sample_id: store.get(s.sample_id) for s in samples}
    cfg = _cfg(target, aux)
    cfg.inference.sglang.mem_fraction_static = 0.3
    cfg.inference.sglang.context_length = 256
    cfg.inference.sglang.attention_backend = "triton"
    got_store = LocalStore(root=tmp_path / "sgl-store")
    engine = sgl_engine.build_engine(cfg, got_store, "cuda:0")
    try:
        engine.generate(samples)
    finally:
        engine.close()
    for s in samples:
        g, w = got_store.get(s.sample_id), want[s.sample_id]
        for key in w:
            assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape, key
        for key in ("aux_hidden_states", "final_hidden_states"):
            rel = ((g[key].float() - w[key].float()).norm() / w[key].float().norm()).item()
            assert rel < 2e-2, (s.sample_id, key, rel)


def test_output_without_hidden_states_is_one_clear_error():
    from torchspec.inference.sglang import SGLangEngine

    engine = SGLangEngine.__new__(SGLangEngine)  # only _rows is exercised
    engine.aux_layers, engine.hidden_size = [0, 1, 2], 8
    with pytest.raises(RuntimeError, match=r"sample s0: SGLang returned no hidden states \(meta_info keys: "
                                           r"\['id'\]\); the engine must run with enable_return_hidden_states"):
        engine._rows({"meta_info": {"id": "x"}}, 3, "s0")
    rows = torch.arange(3 * 32, dtype=torch.float32).reshape(3, 32)
    assert torch.equal(engine._rows({"meta_info": {"hidden_states": [rows.tolist()]}}, 3, "s0"), rows)


@pytest.mark.parametrize("on", [False, True])
def test_enable_metrics_reaches_sgl_engine_and_its_metrics(fake_sglang, tiny_target_dir, tmp_path, on, monkeypatch):
    """inference.sglang.enable_metrics goes to sgl.Engine and decides whether the engine reads SGLang's metrics
    (off: metrics() is {} without reading anything; on: read from SGLang's Prometheus files, see
    tests/test_engine_metrics.py for the read itself)."""
    from torchspec.inference.factory import build_engine

    cfg = _cfg(tiny_target_dir, tp_size=2)
    _sgl_engine_path(monkeypatch)
    cfg.inference.sglang.enable_metrics = on
    engine = build_engine(cfg, LocalStore(root=tmp_path / "store"), "cpu")
    try:
        assert FakeEngine.instances[-1].kwargs["enable_metrics"] is on
        assert engine.enable_metrics is on
        if not on:
            assert engine.metrics() == {} and engine._registry is None
    finally:
        engine.close()


# -- the decoder-layer list, from the target's module tree (text and multimodal wrappers) -------------------

class _HFKimiLike(torch.nn.Module):
    """A transformers-side multimodal wrapper: the text causal LM as `language_model`, a vision tower of the
    same depth."""

    def __init__(self, lm):
        super().__init__()
        self.language_model = lm
        self.vision_tower = torch.nn.Module()
        self.vision_tower.encoder = torch.nn.Module()
        self.vision_tower.encoder.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in lm.model.layers)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()


def test_decoder_layers_found_in_text_and_wrapped_targets(tiny_target_dir):
    from torchspec.config.errors import ConfigError

    lm = load_target(tiny_target_dir, torch.float32, "cpu")
    L = len(lm.model.layers)
    assert sgl_engine.find_decoder_layers(lm, L) == "model.layers"
    assert sgl_engine.find_decoder_layers(_HFKimiLike(lm), L) == "language_model.model.layers"
    assert sgl_engine.final_module("language_model.model.layers") == "language_model.logits_processor"
    assert sgl_engine.final_module("model.layers") == "logits_processor"
    bare = torch.nn.Module()   # two lists of L entries and no embeddings to tell them apart
    bare.a, bare.b = torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(L)), \
        torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in range(L))
    with pytest.raises(ConfigError, match=r"cannot tell its decoder-layer list: ModuleLists of 4 .*\['a', 'b'\]"):
        sgl_engine.find_decoder_layers(bare, L)
    # from the config: the tiny target's own tree, built on the meta device
    assert sgl_engine.decoder_layers_prefix(_cfg(tiny_target_dir)) == "model.layers"


def test_multimodal_wrapper_records_equal_hf_engine(fake_sglang, tiny_target_dir, tmp_path, monkeypatch):
    """SGLang wraps a multimodal target's LM as language_model.*: hooks on the derived prefix (here given as the
    wrapped tree's, which the transformers-side search finds) capture the same states; `model.layers.<k>`
    would match nothing."""
    monkeypatch.setattr(FakeEngine, "multimodal", True)
    aux = [0, 1, 2]
    samples = _samples(512)[:3]
    want = _hf_records(tiny_target_dir, tmp_path, aux, samples)
    monkeypatch.setattr(sgl_engine, "decoder_layers_prefix", lambda cfg: "language_model.model.layers")
    got, fake = _sgl_records(_cfg(tiny_target_dir, aux), tmp_path, samples)
    hooks = fake.server_args.forward_hooks
    assert [h["target_modules"] for h in hooks] == [[f"language_model.model.layers.{k}", f"model.layers.{k}"]
                                                    for k in aux] + \
        [["language_model.logits_processor", "logits_processor"]]
    for s in samples:
        for key in ("aux_hidden_states", "final_hidden_states"):
            torch.testing.assert_close(got[s.sample_id][key], want[s.sample_id][key], **TOL)
    # the old fixed names (model.layers.<k>, logits_processor) match no module of the wrapper: nothing is hooked,
    # SGLang returns its final states alone
    monkeypatch.setattr(sgl_engine, "decoder_layers_prefix", lambda cfg: "model.layers")
    with pytest.raises(RuntimeError, match=r"hidden states of shape \(45, 64\), expected \(45, 256\)"):
        _sgl_records(_cfg(tiny_target_dir, aux), tmp_path / "old", samples)


# -- the in-process ModelRunner path: tensors end to end, records put from the model's own process ------------

def _float_tolist_spy(monkeypatch) -> list:
    """Every Tensor.tolist() of a floating-point tensor from here on (a Python float list being built)."""
    calls, real = [], torch.Tensor.tolist

    def tolist(self):
        if self.is_floating_point():
            calls.append(tuple(self.shape))
        return real(self)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return calls


def _put_spy(store) -> list:
    """(pid, aux, final) of every record put in `store`."""
    puts, real = [], store.put

    def put(key, record):
        puts.append((os.getpid(), record["aux_hidden_states"], record["final_hidden_states"]))
        return real(key, record)
    store.put = put
    return puts


@pytest.mark.parametrize("tp_size", [1, 2])
def test_in_process_path_never_builds_float_lists(fake_sglang, tiny_target_dir, tmp_path, monkeypatch, tp_size):
    """tp 1: the states reach put_record as torch tensors of the engine's dtype and no float list is ever built;
    the sgl.Engine path (here at tp 2) builds one per request in SGLang's scheduler, which the same spy sees.
    (The TP rank processes: test_tp_engine_records_equal_hf_engine.)"""
    if tp_size > 1:
        _sgl_engine_path(monkeypatch)
    samples = _samples(512)
    store = LocalStore(root=tmp_path / "store")
    puts = _put_spy(store)
    engine = sgl_engine.build_engine(_cfg(tiny_target_dir, tp_size=tp_size), store, "cpu")
    lists = _float_tolist_spy(monkeypatch)
    engine.generate(samples)
    engine.close()
    assert len(puts) == len(samples)
    assert all(isinstance(t, torch.Tensor) and t.dtype == engine.dtype for _, a, f in puts for t in (a, f))
    if tp_size == 1:
        assert lists == [] and FakeEngine.list_rows == 0 and FakeEngine.instances == []
    else:
        assert FakeEngine.list_rows == len(samples) and len(lists) == len(samples)


def test_in_process_path_frees_the_kv_pool_after_each_batch(fake_sglang, tiny_target_dir, tmp_path):
    """The stand-in's pool holds one test batch (148 tokens of 200): a second batch fits only if the first one's
    slots were freed (req_to_token_pool.clear / token_to_kv_pool_allocator.clear)."""
    samples = _samples(512)
    engine = sgl_engine.build_engine(_cfg(tiny_target_dir), LocalStore(root=tmp_path / "store"), "cpu")
    engine.generate(samples)
    engine.generate([Sample(f"again-{s.sample_id}", s.input_ids, s.loss_mask) for s in samples])
    runner = FakeModelRunner.instances[-1]
    assert len(runner.forwards) == 2 and runner.token_to_kv_pool_allocator.used == 0
    engine.close()


def test_in_process_path_without_full_capture_is_one_clear_error(fake_sglang, tiny_target_dir, tmp_path,
                                                                  monkeypatch):
    """The logits processor keeps every token's state only under CaptureHiddenMode.FULL."""
    real = FakeModelRunner.forward

    def forward_in_batch_mode(self, forward_batch):   # as if the batch kept its own mode (NULL)
        forward_batch.capture_hidden_mode = FakeCaptureHiddenMode.NULL
        return real(self, forward_batch)
    monkeypatch.setattr(FakeModelRunner, "forward", forward_in_batch_mode)
    engine = sgl_engine.build_engine(_cfg(tiny_target_dir), LocalStore(root=tmp_path / "store"), "cpu")
    with pytest.raises(RuntimeError, match=r"ModelRunner returned no hidden states .*CaptureHiddenMode.FULL"):
        engine.generate(_samples(512)[:2])
    assert FakeModelRunner.instances[-1].token_to_kv_pool_allocator.used == 0   # freed on failure too
    engine.close()


def test_path_choice_and_its_warnings(fake_sglang, tiny_target_dir, tmp_path, caplog):
    """Every config takes the ModelRunner path, engines spanning nodes included (their run, with no warning:
    test_sglang_multinode.py). enable_metrics on it: no SGLang scheduler runs there to keep sglang:* metrics, so
    a warning says so and the engine reports its own forward counters (sgl:forward_*) instead; off, none."""
    store = LocalStore(root=tmp_path / "store")
    cfg = _cfg(tiny_target_dir, tp_size=4)
    cfg.inference.sglang.nnodes = 2
    assert sgl_engine.uses_model_runner(cfg) and sgl_engine.uses_model_runner(_cfg(tiny_target_dir, tp_size=4))
    caplog.clear()
    cfg = _cfg(tiny_target_dir)
    cfg.inference.sglang.enable_metrics = True
    with caplog.at_level("WARNING", logger="torchspec.inference.sglang"):
        engine = sgl_engine.build_engine(cfg, store, "cpu")
    assert engine.runner is not None and engine.llm is None and engine.enable_metrics is True
    assert "enable_metrics: the ModelRunner path runs no SGLang scheduler" in caplog.text
    assert FakeModelRunner.instances[-1].server_args.enable_metrics is False   # SGLang's switch: nothing to serve
    samples = _samples(512)[:3]
    engine.generate(samples[:2])
    engine.generate(samples[2:])
    m = engine.metrics()
    assert m["sgl:forward_batches"] == 2.0
    assert m["sgl:forward_tokens"] == float(sum(len(s.input_ids) for s in samples))
    assert m["sgl:forward_s"] > 0
    assert m["sgl:forward_tokens_per_s"] == pytest.approx(m["sgl:forward_tokens"] / m["sgl:forward_s"])
    engine.close()
    off = sgl_engine.build_engine(_cfg(tiny_target_dir), LocalStore(root=tmp_path / "store_off"), "cpu")
    off.generate(samples[:1])
    assert off.metrics() == {}
    off.close()


def _child_engine(target_dir: str, store, out) -> None:
    """In a spawned engine process: the stand-in installed, the engine built and run over the test samples;
    reports its pid, the ModelRunner's pid and the pid of every put."""
    sys.modules["sglang"] = types.ModuleType("sglang")
    sys.modules["sglang"].Engine = FakeEngine
    sys.modules.update(_srt_modules())
    puts = _put_spy(store)
    engine = sgl_engine.build_engine(_cfg(target_dir), store, "cpu")
    engine.generate(_samples(512))
    engine.close()
    out.put((os.getpid(), FakeModelRunner.instances[-1].pid, [p for p, _, _ in puts], FakeEngine.list_rows))


def test_records_are_put_from_the_engine_process(tiny_target_dir, tmp_path):
    """The engine in its own (spawned) process: the model forward and every put happen in that process, and the
    launcher's process reads records equal to the hf engine's from the store."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = LocalStore(root=tmp_path / "store")   # owned here, as the launcher's; the engine process gets it
    proc = ctx.Process(target=_child_engine, args=(str(tiny_target_dir), store, out))
    proc.start()
    child, runner_pid, put_pids, list_rows = out.get(timeout=300)
    proc.join(60)
    assert proc.exitcode == 0
    samples = _samples(512)
    assert child != os.getpid() and runner_pid == child and put_pids == [child] * len(samples) and list_rows == 0
    want = _hf_records(tiny_target_dir, tmp_path, [0, 1, 2], samples)
    for s in samples:
        g = store.get(s.sample_id)
        for key in ("aux_hidden_states", "final_hidden_states"):
            torch.testing.assert_close(g[key], want[s.sample_id][key], **TOL)


# -- tensor parallel on one node: one process per TP rank, rank 0 puts the records -------------------------------

@pytest.fixture
def tp_ranks(fake_sglang, tmp_path, monkeypatch):
    """The spawned TP ranks get the stand-in (sglang_runner.rank_process_setup) and log to a file; -> read it."""
    from torchspec.inference import sglang_runner

    log = tmp_path / "ranks.log"
    monkeypatch.setenv("STANDIN_TP_LOG", str(log))
    monkeypatch.setattr(sglang_runner, "rank_process_setup", _install_stand_in_rank)
    return lambda: [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []


def test_tp_engine_records_equal_hf_engine(tp_ranks, tiny_target_dir, tmp_path, monkeypatch):
    """tp_size 2: two rank processes, each its own ModelRunner (tp_rank 0/1, GPU base + rank, one nccl_port: they
    meet through torch.distributed and check every forward got the same batch); the records, put by rank 0 alone,
    equal the hf engine's; no process builds a float list; sgl.Engine never starts."""
    samples = _samples(512)
    want = _hf_records(tiny_target_dir, tmp_path, [0, 1, 2], samples)
    store = LocalStore(root=tmp_path / "store")
    engine_lists = _float_tolist_spy(monkeypatch)
    engine = sgl_engine.build_engine(_cfg(tiny_target_dir, tp_size=2), store, "cpu")
    group = engine.runner
    try:
        stored = engine.generate(samples[:4])
        stored += engine.generate(samples[4:])   # a second batch: the ranks loop
    finally:
        engine.close()
    assert [(s.key, s.sample_id, s.length) for s in stored] == [(s.sample_id, s.sample_id, len(s)) for s in samples]
    assert [p.exitcode for p in group.procs] == [0, 0]   # asked to stop, both ended cleanly
    log = tp_ranks()
    runners = {int(pid): (int(rank), int(gpu)) for kind, pid, rank, gpu in (ln for ln in log if ln[0] == "runner")}
    assert sorted(runners.values()) == [(0, 0), (1, 1)] and os.getpid() not in runners
    rank0 = next(pid for pid, (rank, _) in runners.items() if rank == 0)
    puts = [ln for ln in log if ln[0] == "put"]
    assert [ln[2] for ln in puts] == [s.sample_id for s in samples]
    assert {int(ln[1]) for ln in puts} == {rank0} and all(ln[3] == "torch.float32" for ln in puts)
    assert [ln for ln in log if ln[0] == "tolist"] == [] and engine_lists == []
    assert FakeEngine.instances == [] and FakeModelRunner.instances == []   # nothing ran in this process
    for s in samples:
        g, w = store.get(s.sample_id), want[s.sample_id]
        assert torch.equal(g["input_ids"], w["input_ids"]) and torch.equal(g["loss_mask"], w["loss_mask"])
        for key in ("aux_hidden_states", "final_hidden_states"):
            assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape
            torch.testing.assert_close(g[key], w[key], **TOL)


@pytest.mark.parametrize("rank,stage,how", [(1, "forward", "raise"), (1, "forward", "exit"), (1, "start", "raise"),
                                            (0, "forward", "raise")])
def test_tp_rank_failure_is_one_error_and_stops_the_group(tp_ranks, tiny_target_dir, tmp_path, monkeypatch,
                                                          rank, stage, how):
    """A rank that raises (at start or in a forward) or dies: one error line in the engine's caller naming the rank,
    the other rank (left waiting in a collective) is stopped, nothing hangs and nothing is put."""
    import time

    from torchspec.inference import sglang_runner

    monkeypatch.setenv("STANDIN_TP_FAIL", f"{rank}:{stage}:{how}")
    monkeypatch.setattr(sglang_runner, "ERROR_GRACE_S", 2.0)
    started = []
    real_start = sglang_runner.SGLangTPGroup.start.__func__

    def start(cls, *a, **k):   # keep the group to look at its processes afterwards, even when start fails
        real_init = cls.__init__

        def init(self, *ia):
            real_init(self, *ia)
            started.append(self)
        monkeypatch.setattr(cls, "__init__", init)
        return real_start(cls, *a, **k)
    monkeypatch.setattr(sglang_runner.SGLangTPGroup, "start", classmethod(start))
    store = LocalStore(root=tmp_path / "store")
    t0 = time.monotonic()
    other = 1 - rank   # its collective breaks when this rank goes: named after the cause, if it failed in time
    then = fr"( \(then rank {other} of 2 failed too: see their logs\))?$"
    expect = (fr"^sgl engine: TP rank {rank} of 2 \(process \d+\) exited with code 3{then}" if how == "exit" else
              fr"^sgl engine: TP rank {rank} of 2 failed: ValueError: stand-in ModelRunner: rank {rank} fails at "
              fr"{stage}{then}")
    with pytest.raises(RuntimeError, match=expect) as e:
        engine = sgl_engine.build_engine(_cfg(tiny_target_dir, tp_size=2), store, "cpu")
        try:
            engine.generate(_samples(512))
        finally:
            engine.close()
    assert "\n" not in str(e.value)
    assert time.monotonic() - t0 < 120   # no hang (the other rank waits in a collective until terminated)
    group = started[-1]
    assert group._closed and all(not p.is_alive() for p in group.procs)
    assert [ln for ln in tp_ranks() if ln[0] == "put"] == []


# -- inference.sglang.log_level / log_requests / log_requests_level on the ModelRunner path ------------------

def _install_stand_in_rank_that_logs() -> None:
    """rank_process_setup: the stand-in, whose ModelRunner logs one INFO and one DEBUG line through an sglang
    logger when it starts (as SGLang's ModelRunner logs its loading)."""
    _install_stand_in_rank()
    import logging

    runner_cls = sys.modules["sglang.srt.model_executor.model_runner"].ModelRunner
    real_init = runner_cls.__init__

    def init(self, *args, **kw):
        log = logging.getLogger("sglang.srt.model_executor.model_runner")
        log.info("stand-in runner loading")
        log.debug("stand-in runner detail")
        real_init(self, *args, **kw)
    runner_cls.__init__ = init


@pytest.mark.parametrize("level", ["info", "warning"])
def test_log_level_configures_the_tp_rank_processes(fake_sglang, tiny_target_dir, tmp_path, monkeypatch, capfd,
                                                    level):
    """tp_size 2: each rank process logs at inference.sglang.log_level, in SGLang's scheduler line
    ('[<time> TP<rank>] <message>'); at the default (warning) the ranks' INFO lines are not shown."""
    import re

    from torchspec.inference import sglang_runner

    monkeypatch.setenv("STANDIN_TP_LOG", str(tmp_path / "ranks.log"))
    monkeypatch.setattr(sglang_runner, "rank_process_setup", _install_stand_in_rank_that_logs)
    cfg = _cfg(tiny_target_dir, tp_size=2)
    cfg.inference.sglang.log_level = level
    engine = sgl_engine.build_engine(cfg, LocalStore(root=tmp_path / "store"), "cpu")
    engine.close()
    err = capfd.readouterr().err
    lines = sorted(re.findall(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (TP\d)\] (stand-in runner \w+)$", err, re.M))
    assert lines == ([("TP0", "stand-in runner loading"), ("TP1", "stand-in runner loading")]
                     if level == "info" else [])
    assert "stand-in runner detail" not in err


def test_log_level_in_the_engine_process_sets_sglang_loggers_only(fake_sglang, tiny_target_dir, tmp_path):
    """tp_size 1: the ModelRunner runs in the engine's process; its sglang loggers take the level, torchspec's
    logging there is left as it is."""
    import logging

    sglang_log, root = logging.getLogger("sglang"), logging.getLogger()
    before = (sglang_log.level, root.level, list(root.handlers))
    try:
        cfg = _cfg(tiny_target_dir)
        cfg.inference.sglang.log_level = "error"
        sgl_engine.build_engine(cfg, LocalStore(root=tmp_path / "store"), "cpu").close()
        assert sglang_log.level == logging.ERROR
        assert (root.level, list(root.handlers)) == before[1:]
    finally:
        sglang_log.setLevel(before[0])


@pytest.mark.parametrize("tp_size", [1, 2])
def test_log_requests_logs_each_forward(fake_sglang, tiny_target_dir, tmp_path, monkeypatch, caplog, tp_size):
    """log_requests: every forward the engine serves is logged at INFO (sample ids, token counts; more at
    log_requests_level 1..3); off (the default): nothing."""
    import logging

    from torchspec.inference import sglang_runner

    monkeypatch.setenv("STANDIN_TP_LOG", str(tmp_path / "ranks.log"))
    monkeypatch.setattr(sglang_runner, "rank_process_setup", _install_stand_in_rank)
    samples = _samples(512)[:2]
    logged = {}
    # tp 1 every setting; tp 2 (two rank processes per engine start) the one that logs the most
    cases = ((False, 0), (True, 0), (True, 1)) if tp_size == 1 else ((True, 1),)
    for on, level in cases:
        cfg = _cfg(tiny_target_dir, tp_size=tp_size)
        cfg.inference.sglang.log_requests, cfg.inference.sglang.log_requests_level = on, level
        engine = sgl_engine.build_engine(cfg, LocalStore(root=tmp_path / f"store{on}{level}"), "cpu")
        caplog.clear()
        try:
            with caplog.at_level(logging.INFO, logger="torchspec.inference.sglang.requests"):
                engine.generate(samples)
        finally:
            engine.close()
        logged[on, level] = [r.getMessage() for r in caplog.records
                             if r.name == "torchspec.inference.sglang.requests" and r.levelno == logging.INFO]
    first = "sgl engine: forward of 2 request(s), 42 tokens: s0 (5), s1 (37)"
    expected = {
        (False, 0): [],
        (True, 0): [first],
        (True, 1): [first, f"  s0: 5 tokens, {int(samples[0].loss_mask.sum())} loss-masked",
                    f"  s1: 37 tokens, {int(samples[1].loss_mask.sum())} loss-masked"],
    }
    assert logged == {case: expected[case] for case in cases}


def test_request_log_lines_per_level():
    from torchspec.inference.sglang_logging import HEAD_IDS, request_log_lines

    ids = list(range(100, 170))   # 70 ids: level 2 shows the first 64
    recs = [Sample("a", torch.tensor(ids[:3]), torch.tensor([0, 1, 1], dtype=torch.uint8), images=("x.png",)),
            Sample("b", torch.tensor(ids), torch.ones(70, dtype=torch.uint8))]
    reqs = [(ids[:3], object()), (ids, None)]
    head = "sgl engine: forward of 2 request(s), 73 tokens: a (3), b (70)"
    assert request_log_lines(recs, reqs, 0) == [head]
    assert request_log_lines(recs, reqs, 1) == [head, "  a: 3 tokens, 2 loss-masked, 1 image(s)",
                                                "  b: 70 tokens, 70 loss-masked"]
    assert HEAD_IDS == 64
    assert request_log_lines(recs, reqs, 2) == [
        head, f"  a: 3 tokens, 2 loss-masked, 1 image(s), input ids {ids[:3]}",
        f"  b: 70 tokens, 70 loss-masked, input ids {ids[:64]} ... (6 more)"]
    assert request_log_lines(recs, reqs, 3)[2] == f"  b: 70 tokens, 70 loss-masked, input ids {ids}"
