"""The `sgl` engine: the target runs in SGLang, its aux layers captured by SGLang's ``forward_hooks`` option.

Every config runs SGLang's ``ModelRunner`` driven by this engine (inference/sglang_runner.py; text targets and
Qwen-VL image targets, whose requests are made by SGLang's own multimodal processor in this process and
checked token for token against our expansion of the sample before the forward): one extend forward per batch,
the hidden states stay a torch tensor and each record is put in the store by the process that computed it --
never a Python list. tp_size 1: in this process; tp_size N > 1: one spawned process per TP rank, the same batch
to each, global rank 0 puts the records (``SGLangTPGroup``); an engine spanning nodes (nnodes > 1): each node's
engine runs only its own ranks, all meeting at ``dist_init_addr`` (Engines spanning nodes, below). Not run
against a real SGLang, a GPU or a real second node (tested against a stand-in of the sglang.srt classes it
calls, whose TP ranks meet through torch.distributed on CPU, tests/test_sglang_engine.py,
tests/test_sglang_multinode.py). The ``sgl.Engine`` path described next (``return_hidden_states``, states as
Python float lists) is no config's any more; it stays, tested, behind ``uses_model_runner``.

Written against SGLang v0.5.10.post1 (the PyPI wheel ``sglang-0.5.10.post1-py3-none-any.whl``, the
release the original TorchSpec patches at commit 94f03a39db), UNPATCHED. Paths below are under
``python/sglang/srt/`` of that release. Never run against a real SGLang here (no GPU build of it was
available); tests/test_sglang_engine.py runs the engine against a stand-in module that follows the
behaviour cited below.

What SGLang returns (``Engine.generate(input_ids=[...], sampling_params=..., return_hidden_states=True)``):
- needs ``enable_return_hidden_states=True`` on the engine (managers/tokenizer_manager.py:849-857);
- a batch with such a request runs with ``CaptureHiddenMode.FULL`` (managers/schedule_batch.py:2372-2381),
  so ``LogitsProcessorOutput.hidden_states`` holds EVERY token of the packed extend batch
  ``[num_tokens, D]``: the model's post-final-norm state (the lm_head input), or, when the model
  captures EAGLE-3 aux layers, ONLY their concat, without the final state
  (layers/logits_processor.py:537-588, ``_get_hidden_states_to_store``);
- after a prefill each request gets its own rows, ``len(origin_input_ids)`` of them in batch order,
  as a Python list (``.cpu().clone().tolist()``), appended to ``req.hidden_states``; a decode step
  appends one row per step (managers/scheduler_output_processor_mixin.py:221-235, 523-526);
- ``out["meta_info"]["hidden_states"]`` is that list (managers/tokenizer_manager.py:1591-1592): element
  0 = the prompt's ``T x D`` rows. We ask for ``max_new_tokens=1`` (0 would make the request
  "prefill-only", managers/schedule_batch.py:884-889), so no decode step runs and element 0 is all we
  read. The one sampled token (lm_head on the last position) is discarded inside SGLang; we request no
  logprobs, so no logits leave the engine.
- chunked prefill would drop the earlier chunks' rows (only ``is_chunked <= 0`` appends) and a radix-cache
  hit would shorten the extend: hence ``chunked_prefill_size=-1`` and ``disable_radix_cache=True``.

Aux layers. Unpatched SGLang turns its own capture on only for EAGLE-3 speculative decoding
(model_executor/model_runner.py:355-379, 667-670: ``set_eagle3_layers_to_capture`` with the draft config's
``eagle_aux_hidden_state_layer_ids``), and then the returned tensor is the aux concat alone. So we do not
use it; we use the public ``forward_hooks`` server argument (server_args.py:742;
model_executor/model_runner.py:664-665 -> model_executor/hook_manager.py:11-56: for each spec, ``hook_factory``
(``module:function``) is called with ``config`` and its hook is registered with ``register_forward_hook``
on every module whose name matches ``target_modules`` (fnmatch)):
- ``model.layers.<k>`` for each aux layer k: an SGLang decoder layer returns ``(hidden_states, residual)``
  and its output on the residual stream is their sum (models/llama.py:301-323); SGLang's own capture
  takes the same sum, ``hidden_states + residual``, before running layer k + 1 (models/llama.py:385-388,
  models/qwen2.py:356-360). The sum must be taken inside the hook: the next layer's fused add-RMSNorm
  overwrites both tensors in place.
- ``logits_processor``: after it ran (FULL mode), ``output.hidden_states`` = final post-norm states;
  the hook replaces them by ``cat(aux_k1, aux_k2, aux_k3, final)`` along the last dim. The root model is no
  hook target: the model runner calls ``self.model.forward`` directly (model_runner.py:2362, 2638), so
  hooks on the root never fire.
So every returned row is ``[aux concat (3H) | final (H)]``.

Layer ids. OUR id k is the OUTPUT of decoder layer k (docs/architecture.md; transformers ``hidden_states[k + 1]``)
= SGLang's ``eagle_aux_hidden_state_layer_ids`` convention (SGLang itself adds 1, models/llama.py:783-795,
because its loop captures the state ENTERING layer i). With hooks the boundary conversion is: our k ->
the module ``<prefix>.<k>`` (``aux_hook_targets``); k = L - 1 works too (SGLang's own capture
cannot reach it). The prefix is the target's decoder-layer list, found before SGLang starts in the target's
module tree (built on the meta device from its config): the ModuleList of num_hidden_layers (text config)
entries beside the input embeddings (``decoder_layers_prefix``): ``model.layers`` for text models,
``language_model.model.layers`` for a wrapper like Kimi-K2.5's, whose logits processor is then
``language_model.logits_processor`` (``final_module``). That SGLang's module names follow that tree (they follow
the checkpoint's weight names) is an assumption, checked at the first forward: a hooked name SGLang lacks gives
"no output captured" or returned rows of the wrong width, one clear error each.

Placement. ``sgl.Engine`` starts its scheduler (one per TP rank) and detokenizer as child processes, so the
local launcher runs it in a non-daemonic engine process (``factory.engine_starts_processes``); Ray actors
are not daemonic either. Its
``shutdown()`` kills every child process of the process it runs in (entrypoints/engine.py:756-763), so it
is refused inside the trainer process (``inference.colocate``). ``base_gpu_id`` is the engine's device index (Ray: 0 of the actor's
visible GPUs), ``port``/``nccl_port`` are free ports picked here, ``dtype`` is the hf engine's compute
dtype (bf16 on GPU), ``disable_piecewise_cuda_graph`` keeps prefill eager so the hooks run
(server_args.py:637, on by default on CUDA: server_args.py:1078-1130), and the all-reduce fusions stay
off so a hooked layer output is complete on every TP rank (``ENGINE_MANAGED``).

Engines spanning nodes (``inference.sglang.nnodes`` N > 1; only under the Ray launcher, which starts one
actor per node and calls ``build_node_engine(cfg, r, dist_init_addr)`` in actor r; refused elsewhere). Node r's
engine starts the TP ranks ``r * tp_size/N + i`` on GPUs ``base_gpu_id + i`` (sglang_runner.node_ranks, the
placement sgl.Engine gives its schedulers: entrypoints/engine.py ``_calculate_rank_ranges``), each a ModelRunner
with the engine's total tp_size whose ``init_torch_distributed`` meets at ``tcp://<dist_init_addr>`` (it uses
127.0.0.1:<nccl_port> only when no dist_init_addr is set), so global rank 0, on node 0, hosts the meeting
point picked there. Every batch goes to every node's actor (pipeline/ray_engines.py ``submit``); node 0's
engine returns the records, put by rank 0; nodes r >= 1 are ``SGLangNodeEngine``s: the same forward, nothing
put, nothing returned. Image requests are made by each node's engine process from the same samples (SGLang's
processor output, pad values included, depends only on the sample), rather than shipped from node 0.
NOT run over real nodes (tests/test_sglang_multinode.py: a simulated 2-node CPU Ray cluster, the stand-in
ranks meeting over gloo at 127.0.0.1:<port>).

Images (a Qwen-VL target, inference/vlm.py). ``generate(input_ids=[...], image_data=[[uri, ...], ...])``:
one list of images per request, ``[]`` for a text request (io_struct.py:423-462, ``_normalize_image_data``;
an empty list is no multimodal input, mm_utils.py:56-61); a path is sent as a file:// URI, a data: URI as it
is (utils/common.py:809-846, ``load_image``). With input_ids and images, the tokenizer manager decodes the ids
to text (multimodal/processors/base_processor.py:718-720), finds each
``<|vision_start|><|image_pad|>+<|vision_end|>`` (qwen_vl.py, ``image_token_regex``; one pad, as our
template writes it, matches), runs the target's HF processor on text + images (each image first resized by
SGLang's own smart_resize, whose default bounds 4*28*28 .. 16384*28*28 are Qwen-VL's own) and takes ITS
input_ids, each image pad repeated t*h*w/merge^2 times (tokenizer_manager.py:706-753). The scheduler then
replaces those pads by per-image pad values of the same length (managers/mm_utils.py:315-349), so
``origin_input_ids`` -- whose length is the number of returned rows -- is the expanded sequence. The record
is built from our own expansion of the sample (the target's image processor, inference/vlm.py, the same rule
as the hf engine); a row count that differs from it (SGLang counted an image's tokens differently, e.g.
``SGLANG_IMAGE_MAX_PIXELS`` below the processor's max_pixels) is an error naming the sample, never a silent
misalignment. Other VLMs (Kimi-K2.5 included) are refused: their expansion rule is not built here.
Not run against a real SGLang: tests/test_sglang_engine.py's stand-in expands the pads as cited above.

Cost (sgl.Engine path only, which no config takes): unpatched SGLang turns the returned hidden states into
Python float lists in its scheduler (``.cpu().clone().tolist()``) and ships them through ZMQ; through that
public API the copy cannot be avoided. The ModelRunner path avoids it for every config.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any, Callable, Optional, Sequence

import torch

from torchspec.config.errors import ConfigError
from torchspec.config.topology import sglang_ports_needed
from torchspec.inference.base import StoredSample, compute_dtype, put_record
from torchspec.inference.engine_metrics import ForwardCounters
from torchspec.utils.net import free_ports

logger = logging.getLogger(__name__)

HOOK_MODULE = __name__   # the scheduler processes import the hook factories below by this path
LAYERS_PREFIX = "model.layers"   # SGLang's decoder-layer list of a text model (llama, qwen2/3, deepseek, ...)
FINAL_MODULE = "logits_processor"

# Set by this engine on every sgl.Engine, next to sglang_args.SPEC_TRAINING_INVARIANTS: key -> (value, why).
ENGINE_MANAGED: dict[str, tuple[Any, str]] = {
    "chunked_prefill_size": (-1, "a chunked prefill loses the earlier chunks' hidden states"),
    "disable_piecewise_cuda_graph": (True, "prefill CUDA graphs would replay without the capture hooks"),
    # A fused all-reduce leaves a decoder layer's output partial on each TP rank until the next layer
    # (layers/communicator.py:617-650; auto-enabled for some MoE models, server_args.py:2081-2112).
    "enforce_disable_flashinfer_allreduce_fusion": (True, "a layer's output must be complete when hooked"),
    "enable_aiter_allreduce_fusion": (False, "a layer's output must be complete when hooked"),
}


class SGLangEngineError(ConfigError):
    """A user-fixable problem starting the sgl engine (one line naming the key)."""


# -- inside SGLang's scheduler processes --------------------------------------------------------------

_captured: dict[int, torch.Tensor] = {}   # aux layer id -> its output on the residual stream, this forward


def capture_layer_output(config: dict) -> Callable:
    """hook_factory for ``model.layers.<k>``: keep the layer's residual-stream output (config["layer"] = k)."""
    k = int(config["layer"])

    def hook(module, args, output):
        if isinstance(output, (tuple, list)):
            hidden, residual = output[0], (output[1] if len(output) > 1 else None)
            # a new tensor now: the next layer's fused add-norm overwrites both in place
            _captured[k] = hidden + residual if residual is not None else hidden.clone()
        else:
            _captured[k] = output.clone()
    return hook


def append_final_state(config: dict) -> Callable:
    """hook_factory for ``logits_processor``: returned rows become [aux layers in config["layers"] order | final]."""
    layers = [int(k) for k in config["layers"]]

    def hook(module, args, output):
        try:
            final = getattr(output, "hidden_states", None)
            if final is None:   # no request of this batch asked for hidden states
                return
            missing = [k for k in layers if k not in _captured]
            if missing:
                where = config.get("prefix", LAYERS_PREFIX)
                raise RuntimeError(f"torchspec sgl engine: no output captured for aux layer(s) {missing}: this "
                                   f"SGLang model has no module {where}.{missing[0]!r} (the decoder-layer list "
                                   "found in the target's module tree)")
            aux = [_captured[k] for k in layers]
            if any(a.shape[0] != final.shape[0] for a in aux):
                raise RuntimeError(f"torchspec sgl engine: aux rows {[a.shape[0] for a in aux]} != returned rows "
                                   f"{final.shape[0]} (dp attention / speculative decoding are not supported)")
            output.hidden_states = torch.cat([*aux, final], dim=-1)
        finally:
            _captured.clear()
    return hook


def aux_hook_targets(aux_layers: Sequence[int], prefix: str = LAYERS_PREFIX) -> list[str]:
    """Our aux id k (output of decoder layer k) -> the SGLang module whose output that is, in the decoder-layer
    list named `prefix` (``decoder_layers_prefix``)."""
    return [f"{prefix}.{int(k)}" for k in aux_layers]


def forward_hook_specs(aux_layers: Sequence[int], prefix: str = LAYERS_PREFIX) -> list[dict]:
    """SGLang ``forward_hooks`` entries: one per aux layer, then the one that appends the final state.

    Each hook names the decoder-layer list found in the target's transformers tree AND SGLang's text-model
    name ``model.layers``: SGLang's own classes do not always keep transformers' names (its Qwen2-VL holds
    the language model as ``model``, where transformers 5 has ``model.language_model``), and only the names
    that exist in the loaded model are hooked."""
    prefixes = list(dict.fromkeys([prefix, LAYERS_PREFIX]))
    specs = [{"name": f"torchspec_aux_{k}", "target_modules": [t for p in prefixes for t in aux_hook_targets([k], p)],
              "hook_factory": f"{HOOK_MODULE}:capture_layer_output", "config": {"layer": int(k)}}
             for k in aux_layers]
    specs.append({"name": "torchspec_final", "target_modules": list(dict.fromkeys(map(final_module, prefixes))),
                  "hook_factory": f"{HOOK_MODULE}:append_final_state",
                  "config": {"layers": [int(k) for k in aux_layers], "prefix": prefix}})
    return specs


def final_module(prefix: str) -> str:
    """The logits processor of the causal LM whose decoder layers are `prefix`: SGLang's causal LMs hold
    ``model.layers`` and ``logits_processor`` side by side, and a multimodal wrapper holds such an LM as a
    submodule (Kimi-K2.5: ``language_model.model.layers`` -> ``language_model.logits_processor``)."""
    owner = prefix[: -len("model.layers")] if prefix.endswith("model.layers") else ""
    return owner + FINAL_MODULE


def find_decoder_layers(model: torch.nn.Module, num_layers: int) -> str:
    """The name of `model`'s decoder-layer list: the ModuleList of `num_layers` entries (the text config's
    num_hidden_layers) that sits beside the input embeddings (``get_input_embeddings()``), so that a vision
    tower of the same depth is not taken; when no embeddings are known, the only such list."""
    lists = {name: m for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    modules = dict(model.named_modules())
    beside = [name for name in lists
              if embed is not None and any(c is embed for c in modules[name.rpartition(".")[0]].children())]
    found = beside or (list(lists) if len(lists) == 1 else [])
    if len(found) != 1:
        raise ConfigError(f"{type(model).__name__}: cannot tell its decoder-layer list: ModuleLists of "
                          f"{num_layers} (num_hidden_layers) entries: {sorted(lists) or 'none'}")
    return found[0]


def decoder_layers_prefix(cfg) -> str:
    """The decoder-layer list of the target (text model or a multimodal wrapper such as Kimi-K2.5's
    ``language_model.model.layers``): its module tree built on the meta device from its config (no weight
    read), searched by ``find_decoder_layers``. SGLang names its modules after the checkpoint's weights,
    which follow this tree."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from torchspec.config.target import TargetInfo

    path, remote = str(cfg.model.target_model_path), bool(cfg.model.trust_remote_code)
    num_layers = TargetInfo.from_config(cfg).num_hidden_layers
    config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    errors = []
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                model = auto.from_config(config, trust_remote_code=remote)
        except Exception as e:   # not this auto class: the next one
            errors.append(f"{auto.__name__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        try:
            return find_decoder_layers(model, num_layers)
        except ConfigError as e:
            raise ConfigError(f"model.target_model_path={path!r}: {e}") from None
    raise ConfigError(f"model.target_model_path={path!r}: its module tree could not be built to find the "
                      f"decoder layers the sgl engine hooks ({'; '.join(errors)})")


# -- in the engine's process --------------------------------------------------------------------------

def build_engine_kwargs(cfg, device: torch.device | str, aux_layers: Sequence[int],
                        warn: Optional[Callable[[str], None]] = None, node_rank: int = 0,
                        dist_init_addr: Optional[str] = None, layers_prefix: Optional[str] = None,
                        check_ports: bool = True) -> dict[str, Any]:
    """`sgl.Engine(**kwargs)` for one engine on `device` (no sglang import); for an engine spanning
    nodes, its part on node `node_rank`, all parts meeting at `dist_init_addr` ("ip:port" on node 0).
    layers_prefix: the decoder-layer list the aux hooks target (None: ``decoder_layers_prefix(cfg)``).
    check_ports: with inference.sglang.port set, refuse a port of the engine's block that is in use here
    (``engine_ports``; off for the dry run, which only shows them)."""
    if layers_prefix is None:
        layers_prefix = decoder_layers_prefix(cfg)
    from torchspec.inference.sglang_args import PROTECTED_EXTRA_ARGS, build_sglang_engine_kwargs

    device = torch.device(device)
    extra = cfg.inference.sglang.extra_args
    dtype = str(compute_dtype(device)).removeprefix("torch.")
    ours = {**ENGINE_MANAGED, "dtype": (dtype, "the target's compute dtype, as the hf engine's (bf16 on GPU)")}
    for key, (value, why) in ours.items():
        if key in extra and key not in PROTECTED_EXTRA_ARGS and extra[key] != value:   # (those warn there)
            (warn or logger.warning)(f"inference.sglang.extra_args.{key}={extra[key]!r} dropped: the sgl engine "
                                     f"sets {key}={value!r} ({why})")
    managed = {
        **{key: value for key, (value, _) in ours.items()},
        "base_gpu_id": device.index or 0,
        "node_rank": int(node_rank),
        **({"dist_init_addr": dist_init_addr} if dist_init_addr else {}),
        **engine_ports(cfg, device, check=check_ports),
        "forward_hooks": list(extra.get("forward_hooks") or []) + forward_hook_specs(aux_layers, layers_prefix),
    }
    return build_sglang_engine_kwargs(cfg, managed=managed, warn=warn)


# The ports of one engine's block (inference.sglang.port): ServerArgs.port, then nccl_port (where its TP ranks meet),
# then, for an engine spanning nodes, the dist_init_addr port on node 0 (pipeline/ray_engines.py).
PORT_NAMES = ("port", "nccl_port", "dist_init_addr")


def engine_slot(cfg, device: torch.device | str) -> int:
    """Which block of inference.sglang.port an engine on `device` takes: the index of its first GPU among this
    machine's GPUs (the physical one: CUDA_VISIBLE_DEVICES maps a Ray actor's cuda:0 to it), so engines of one
    machine never share a block; 0 on CPU and for an engine spanning nodes (the only engine on each of them)."""
    import os

    device = torch.device(device)
    if device.type != "cuda" or cfg.inference.sglang.nnodes > 1:
        return 0
    index = device.index or 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


def port_block(cfg, slot: int) -> list[int]:
    """The ports of block `slot`: port + slot x (1 + additional_ports), the first sglang_ports_needed(cfg) of them."""
    sg = cfg.inference.sglang
    first = int(sg.port) + int(slot) * (1 + int(sg.additional_ports))
    return [first + i for i in range(sglang_ports_needed(cfg))]


def check_port_block(cfg, ports: Sequence[int], owner: str, host: str = "127.0.0.1") -> None:
    """One SGLangEngineError line when a port of `ports` (a block of inference.sglang.port) is in use on `host`."""
    from torchspec.utils.net import taken_ports

    taken = taken_ports(ports, host)
    if taken:
        sg = cfg.inference.sglang
        what = ", ".join(f"{p} ({PORT_NAMES[ports.index(p)]})" for p in taken)
        raise SGLangEngineError(
            f"inference.sglang.port={sg.port}: {owner} takes ports {ports[0]}-{ports[-1]} of its block "
            f"(port + slot x (1 + inference.sglang.additional_ports={sg.additional_ports})), but {what} "
            f"{'is' if len(taken) == 1 else 'are'} in use on {host}; choose another inference.sglang.port, or null "
            "for free ports")


def engine_ports(cfg, device: torch.device | str, check: bool = True) -> dict[str, int]:
    """{"port", "nccl_port"} of one engine: free ports (inference.sglang.port null), else the engine's block
    (``port_block`` at ``engine_slot``), refused in one line when one of it is in use here."""
    if cfg.inference.sglang.port is None:
        return dict(zip(PORT_NAMES[:2], free_ports(2)))
    slot = engine_slot(cfg, device)
    ports = port_block(cfg, slot)
    if check:
        check_port_block(cfg, ports, f"the engine on {torch.device(device)} (block {slot})")
    return dict(zip(PORT_NAMES[:2], ports))


def check_placement(cfg, dist_init_addr: Optional[str] = None) -> None:
    """Refuse, in one line, the placements the sgl engine cannot run in (module docstring, Placement)."""
    inf = cfg.inference
    if inf.sglang.nnodes > 1 and not dist_init_addr:
        raise SGLangEngineError(
            f"inference.sglang.nnodes={inf.sglang.nnodes}: an sgl engine spanning nodes needs its TP ranks started "
            "on every node, one engine actor per node, which only the Ray launcher does (inference.launcher=ray)")
    if inf.colocate:
        raise SGLangEngineError(
            "inference.colocate=true: sgl.Engine.shutdown() kills every child process of the trainer process it "
            "would run in; use inference.colocate=false with inference.launcher: ray")
    if (int(inf.sglang.tp_size) > 1 or not uses_model_runner(cfg)) and multiprocessing.current_process().daemon:
        raise SGLangEngineError(
            f"inference.sglang.tp_size={inf.sglang.tp_size}: the sgl engine starts child processes (one per TP "
            "rank, or sgl.Engine's scheduler/detokenizer), which a daemonic process may not do (the launchers start "
            "sgl engines in non-daemonic processes; a custom engine_factory must too)")


def uses_model_runner(cfg) -> bool:
    """Whether the engine runs SGLang's ModelRunner itself (inference/sglang_runner.py: states stay tensors,
    records are put where they are computed; tp_size 1 in the engine's process, else one process per TP rank of
    this node, text and Qwen-VL image targets alike) rather than sgl.Engine (states come back as Python lists):
    every config, on one node or several. The sgl.Engine path stays for its tests (tests monkeypatch this)."""
    return True


class SGLangEngine:
    def __init__(self, llm, store, aux_layers: Sequence[int], hidden_size: int, device: torch.device | str = "cpu",
                 enable_metrics: bool = False,
                 vision=None, target_config=None, runner=None, image_inputs=None,
                 log_requests: bool = False, log_requests_level: int = 0):
        self.runner = runner                 # SGLangModelRunnerTarget (tp 1) or SGLangTPGroup; None: llm is sgl.Engine
        self.image_inputs = image_inputs     # SGLangImageInputs of an image target on the ModelRunner path
        self.vision = vision                 # a VLM target's expansion rule (inference/vlm.py); None: text only
        self.target_config = target_config   # names the target when a text target refuses images
        self.llm = llm
        self.store = store
        self.aux_layers = [int(k) for k in aux_layers]
        self.hidden_size = int(hidden_size)
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.device)
        self.enable_metrics = bool(enable_metrics)
        self._registry = None   # prometheus_client registry over SGLang's multiprocess metric files
        self.counts = ForwardCounters("sgl")   # the ModelRunner path's own forwards (metrics() with enable_metrics)
        # inference.sglang.log_requests on the ModelRunner path (sgl.Engine logs its requests itself)
        self.log_requests, self.log_requests_level = bool(log_requests), int(log_requests_level)

    def metrics(self) -> dict[str, float]:
        """With enable_metrics: on the ModelRunner path (every config) the engine's own forward counters
        (``sgl:forward_batches``, ``sgl:forward_tokens``, ``sgl:forward_s``, ``sgl:forward_tokens_per_s``: no
        SGLang scheduler runs there to keep ``sglang:*`` metrics); on the sgl.Engine path SGLang's Prometheus
        metrics (``sglang:*``). Without enable_metrics: {}.

        With enable_metrics, sgl.Engine points PROMETHEUS_MULTIPROC_DIR of its process at a temporary directory
        before starting its scheduler processes (``set_prometheus_multiproc_dir``, called from the engine's
        ``_set_envs_and_config``); the schedulers (``SchedulerMetricsCollector``: sglang:num_running_reqs,
        sglang:token_usage, sglang:gen_throughput, sglang:num_queue_reqs, ...) and the tokenizer manager in this
        process (``TokenizerMetricsCollector``: sglang:prompt_tokens, sglang:num_requests, latency histograms)
        write their values there. The offline Engine serves no /metrics endpoint, so we read those files as
        that endpoint does: a prometheus_client ``CollectorRegistry`` with a ``multiprocess.MultiProcessCollector``
        (engine_metrics.flatten_prometheus names them)."""
        from torchspec.inference.engine_metrics import flatten_prometheus

        if not self.enable_metrics:
            return {}
        if self.llm is None:
            return self.counts.metrics()
        if self._registry is None:
            try:
                from prometheus_client import CollectorRegistry, multiprocess

                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)   # reads PROMETHEUS_MULTIPROC_DIR, set by sgl.Engine
            except (ImportError, ValueError) as e:
                logger.warning("inference.sglang.enable_metrics: SGLang's metrics cannot be read (%s: %s); none "
                               "are logged", type(e).__name__, e)
                self.enable_metrics = False
                return {}
            self._registry = registry
        return flatten_prometheus(self._registry.collect(), "sglang:")

    @classmethod
    def from_config(cls, cfg, store, device: torch.device | str = "cpu", node_rank: int = 0,
                    dist_init_addr: Optional[str] = None):
        """The engine (node_rank 0), or for node_rank >= 1 of an engine spanning nodes an `SGLangNodeEngine`."""
        from torchspec.config.target import TargetInfo
        from torchspec.utils.optional import require

        check_placement(cfg, dist_init_addr)
        sgl = require("sglang", "sglang")
        device = torch.device(device)
        target = TargetInfo.from_config(cfg)   # the target's config alone (TargetLoadError naming the key)
        hidden, aux_layers = target.hidden_size, list(target.aux_layers)
        prefix = decoder_layers_prefix(cfg)
        kwargs = build_engine_kwargs(cfg, device, aux_layers, node_rank=node_rank, dist_init_addr=dist_init_addr,
                                     layers_prefix=prefix)
        from torchspec.inference.vlm import vision_expansion

        vision = vision_expansion(target.config, cfg.model.target_model_path, bool(cfg.model.trust_remote_code))
        llm = runner = image_inputs = None
        metrics_on = bool(kwargs.get("enable_metrics"))
        if uses_model_runner(cfg):
            from torchspec.inference.sglang_runner import SGLangImageInputs, SGLangModelRunnerTarget, SGLangTPGroup

            if metrics_on:
                logger.warning("inference.sglang.enable_metrics: the ModelRunner path runs no SGLang scheduler or "
                               "tokenizer manager (what keeps sglang:* metrics); the engine logs its own forward "
                               "counters, engine<i>/sgl:forward_*, instead")
                kwargs["enable_metrics"] = False   # SGLang's own switch: nothing of SGLang's would serve it here
            if int(kwargs["tp_size"]) == 1:   # SGLang's loggers in this process at inference.sglang.log_level
                from torchspec.inference.sglang_logging import set_sglang_log_level

                set_sglang_log_level(str(kwargs.get("log_level") or "warning"))
                runner = SGLangModelRunnerTarget.start(kwargs, gpu_id=kwargs["base_gpu_id"])
                if vision is not None:   # the runner's ModelConfig; the processor also serves M-RoPE positions
                    image_inputs = SGLangImageInputs.start(kwargs, model_config=runner.runner.model_config)
                    runner.mm_processor = image_inputs.processor
            else:   # this node's TP ranks (all of them on one node); the store only reaches global rank 0
                runner = SGLangTPGroup.start(kwargs, store if node_rank == 0 else None, len(aux_layers), hidden,
                                             device, start_timeout=float(cfg.inference.sglang.init_timeout),
                                             timeout_key="inference.sglang.init_timeout", images=vision is not None)
                if vision is not None:   # the tokenizer manager's half, in this process (no model loaded here)
                    try:
                        image_inputs = SGLangImageInputs.start(kwargs)
                    except BaseException:
                        runner.close()
                        raise
        else:   # sgl.Engine (one node; kept for tests of that API, no config takes it: uses_model_runner)
            llm = sgl.Engine(**kwargs)
        logger.info("sgl engine (%s): aux layers %s (hooks on %s), final = %s output",
                    "sgl.Engine" if llm is not None else "ModelRunner in this process" if kwargs["tp_size"] == 1
                    else f"ModelRunner in TP rank processes {runner.ranks} of {kwargs['tp_size']}"
                    + (f", node {node_rank} of {kwargs.get('nnodes')}" if node_rank else ""), aux_layers,
                    aux_hook_targets(aux_layers, prefix), FINAL_MODULE)
        sg = cfg.inference.sglang
        engine = cls(llm, store if node_rank == 0 else None, aux_layers, hidden, device,
                     enable_metrics=metrics_on, vision=vision, target_config=target.config,
                     runner=runner, image_inputs=image_inputs,
                     log_requests=bool(sg.log_requests) and llm is None and node_rank == 0,
                     log_requests_level=int(sg.log_requests_level))
        return SGLangNodeEngine(engine, node_rank) if node_rank >= 1 else engine

    def _rows(self, out: dict, n: int, sample_id: str) -> torch.Tensor:
        """The prompt's [n, (len(aux) + 1) * H] rows of one `generate` output."""
        states = out.get("meta_info", {}).get("hidden_states")
        if not states:
            raise RuntimeError(f"sgl engine: sample {sample_id}: SGLang returned no hidden states (meta_info keys: "
                               f"{sorted(out.get('meta_info', {}))}); the engine must run with "
                               "enable_return_hidden_states=True and generate(return_hidden_states=True)")
        rows = states[0]
        hs = torch.tensor(rows, dtype=torch.float32)
        width = (len(self.aux_layers) + 1) * self.hidden_size
        if hs.shape != (n, width):
            raise RuntimeError(f"sgl engine: sample {sample_id}: SGLang returned hidden states of shape "
                               f"{tuple(hs.shape)}, expected ({n}, {width}) = (prompt tokens, image placeholders expanded, "
                               f"{len(self.aux_layers)} aux layers + final, x H {self.hidden_size})")
        return hs

    def generate(self, samples: Sequence) -> list[StoredSample]:
        from torchspec.inference.vlm import expand_for_engine

        if not samples:
            return []
        if self.runner is not None:
            return self._generate_in_process(samples)
        # the records: placeholders expanded as SGLang expands them; the request: the ids as tokenized + images
        records, images = expand_for_engine(samples, self.vision, self.target_config)
        outs = self.llm.generate(input_ids=[s.input_ids.tolist() for s in samples],
                                 sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                                 return_hidden_states=True, **({"image_data": images} if images else {}))
        split = len(self.aux_layers) * self.hidden_size
        stored = []
        for s, out in zip(records, outs):
            n = int(s.input_ids.numel())
            hs = self._rows(out, n, s.sample_id).to(device=self.device, dtype=self.dtype)
            stored.append(put_record(self.store, s, hs[:, :split].contiguous(), hs[:, split:].contiguous()))
        return stored

    def _generate_in_process(self, samples: Sequence) -> list[StoredSample]:
        """One ModelRunner extend forward; each sample's rows cut from the packed tensor and put where they were
        computed: in this process (tp 1), or in TP rank 0's process (SGLangTPGroup). An image request's inputs
        are made here, once (SGLang's processor), and the same go to every rank."""
        from torchspec.inference.sglang_runner import SGLangTPGroup, put_packed_rows, text_requests
        from torchspec.inference.vlm import expand_for_engine

        # the records: placeholders expanded by the target's image processor, as the hf engine expands them
        records, images = expand_for_engine(samples, self.vision, self.target_config)
        prompts = [s.input_ids.tolist() for s in samples]
        if images is None:
            requests = text_requests(prompts)
        else:
            requests = self.image_inputs.requests(prompts, images)
            for r, (ids, _) in zip(records, requests):
                want = r.input_ids.tolist()
                if ids != want:
                    raise RuntimeError(f"sgl engine: sample {r.sample_id}: SGLang's multimodal processor expanded "
                                       f"the image placeholders to {len(ids)} tokens, the target's image processor "
                                       f"(the hf engine's expansion, which the record holds) to {len(want)}"
                                       + ("" if len(ids) != len(want) else " with other token ids")
                                       + ": the hidden states would not match the record's tokens")
        if self.log_requests:
            from torchspec.inference.sglang_logging import request_log_lines, request_logger

            log = request_logger()
            for line in request_log_lines(records, requests, self.log_requests_level):
                log.info("%s", line)
        t0 = time.perf_counter()
        if isinstance(self.runner, SGLangTPGroup):
            stored = self.runner.generate(records, requests)
        else:
            states = self.runner.forward(requests)
            stored = put_packed_rows(self.store, records, states, len(self.aux_layers), self.hidden_size, self.device)
        self.counts.add(sum(len(ids) for ids, _ in requests), time.perf_counter() - t0)   # the forward + its puts
        return stored

    def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()
        image_inputs, self.image_inputs = self.image_inputs, None
        if image_inputs is not None:
            image_inputs.close()
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()


class SGLangNodeEngine:
    """Node `node_rank` >= 1 of an sgl engine spanning nodes: an SGLangEngine whose TP rank processes are this
    node's (global rank 0 is on node 0). Every batch must reach every node (each rank's forward joins the TP
    collectives); here it runs the same forward -- image requests made by this node's engine process, as node
    0's makes them -- and puts nothing: node 0's rank 0 puts every record."""

    def __init__(self, engine: SGLangEngine, node_rank: int):
        self.engine, self.node_rank = engine, int(node_rank)

    def generate(self, samples: Sequence) -> list[StoredSample]:
        stored = self.engine.generate(samples)
        if stored:
            raise RuntimeError(f"sgl engine node_rank {self.node_rank}: its TP ranks put records (only global TP "
                               "rank 0, on node 0, may)")
        return []

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()


def build_engine(cfg, store, device: str | torch.device = "cpu") -> SGLangEngine:
    return SGLangEngine.from_config(cfg, store, device=device)


def build_node_engine(cfg, node_rank: int, dist_init_addr: str, store,
                      device: str | torch.device = "cpu") -> SGLangEngine | SGLangNodeEngine:
    """Node `node_rank`'s part of an engine spanning `inference.sglang.nnodes` nodes, all meeting at
    `dist_init_addr` ("ip:port", a free port on node 0); node 0's part is the engine that serves."""
    return SGLangEngine.from_config(cfg, store, device=device, node_rank=node_rank, dist_init_addr=dist_init_addr)
