"""The `vllm` engine: the target runs in vLLM; hidden states leave it through vLLM's own mechanism.

vLLM (>= 0.32) produces EAGLE-3 training data with the ``extract_hidden_states`` speculative method:
the target returns the residual-stream states of the layers listed in
``eagle_aux_hidden_state_layer_ids``, a cache-only "draft" writes them into a KV-cache layer of
their own, and a hidden-states KV connector copies each finished request's rows to
``<dir>/<request id>.safetensors`` ({"hidden_states": [T, n_layers, H], "token_ids": [T]}),
whose path comes back in the request's ``kv_transfer_params``. We prefill every sample with
``max_tokens=1`` and turn those files into the record the hf engine writes (docs/interfaces.md,
"Hidden-state record"). The lm_head output (one sampled token) is discarded inside vLLM: no logits
leave the engine.

Layer ids. OUR id k is the OUTPUT of decoder layer k (0-based; transformers ``hidden_states[k + 1]``).
vLLM's id j is the state ENTERING decoder layer j (j = 0: the embeddings; j = L: the last layer's
output, before the final norm). So we ask vLLM for k + 1 (``to_vllm_layer_ids``).

The final hidden state is post-norm; vLLM never exposes that one, so we also ask for vLLM id L (the
last layer's pre-norm output) and apply the target's own final norm (transformers' module for the
architecture, weights read from the checkpoint) here: the same function the hf engine's model runs.

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while it starts), so with tp 1 it starts
no child process; with tp > 1 vLLM starts a worker per GPU, and the local launcher then runs the engine in a
non-daemonic process (``factory.engine_starts_processes``). The connector's write of a finished request
happens on the next engine step, which we drive ourselves (``LLM.llm_engine.step``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from torchspec.config.errors import ConfigError
from torchspec.config.target import TargetInfo, text_config_of
from torchspec.config.target import to_vllm_layer_ids  # noqa: F401  (re-exported: the engine's boundary)
from torchspec.inference.base import StoredSample, compute_dtype, put_record
from torchspec.utils.optional import install_hint

logger = logging.getLogger(__name__)

INSTALL_HINT = f"{install_hint('vllm')} (or: bash scripts/setup_vllm.sh for a CPU venv)"
CONNECTOR = "TorchSpecHiddenStatesConnector"
CONNECTOR_MODULE = "torchspec.inference.vllm_connector"

# vllm.LLM keys that inference.vllm.extra_args may not set, and where the user sets them instead.
PROTECTED_EXTRA_ARGS: dict[str, str] = {
    "model": "model.target_model_path",
    "tokenizer": "model.target_model_path",
    "trust_remote_code": "model.trust_remote_code",
    "tensor_parallel_size": "inference.vllm.tp_size",
    "gpu_memory_utilization": "inference.vllm.mem_fraction_static",
    "dtype": "the target's compute dtype, as the hf engine uses: bf16 on GPU, fp32 on CPU",
    "speculative_config": "managed by the engine (extract_hidden_states)",
    "kv_transfer_config": "managed by the engine (the hidden-states connector)",
    "enable_prefix_caching": "always false for spec training (every token's state is computed)",
}


class VLLMEngineError(ConfigError):
    """A user-fixable problem starting the vllm engine (one line naming the key)."""


def filter_extra_args(extra_args: Mapping[str, Any], warn: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """extra_args without the keys we manage; one warning naming all the dropped ones."""
    dropped = {k: v for k, v in extra_args.items() if k in PROTECTED_EXTRA_ARGS}
    if dropped:
        (warn or logger.warning)(
            "inference.vllm.extra_args: dropped " + ", ".join(
                f"{k}={v!r} (managed by TorchSpec: {PROTECTED_EXTRA_ARGS[k]})" for k, v in dropped.items()))
    return {k: v for k, v in extra_args.items() if k not in PROTECTED_EXTRA_ARGS}


def extraction_plan(aux_layers: Sequence[int], num_layers: int) -> tuple[list[int], list[int], int]:
    """(vLLM ids to extract, ascending and distinct as vLLM stores them; row of each aux layer in that
    list; row of the last layer's pre-norm output, vLLM id L). Our last layer L - 1 is vLLM's L too."""
    wanted = to_vllm_layer_ids(aux_layers)
    ids = sorted(set(wanted) | {num_layers})
    return ids, [ids.index(j) for j in wanted], ids.index(num_layers)


def build_llm_kwargs(cfg, device: torch.device | str, extract_ids: Sequence[int], storage_dir: str,
                     warn: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The `vllm.LLM(**kwargs)` of this config (pure; no vllm import). Later layers win: derived keys,
    extra_args (minus the protected keys), then the keys the engine manages."""
    device = torch.device(device)
    v = cfg.inference.vllm
    kwargs: dict[str, Any] = {
        # prompt + the one token vLLM samples (discarded)
        "max_model_len": int(cfg.training.max_seq_length) + 1,
    }
    if device.type == "cpu":
        kwargs["enforce_eager"] = True  # vLLM's CPU backend has no graph capture
    # vLLM's stat logging on (LLM turns it off by default), so LLM.get_metrics() works: its numbers go to
    # the run's logger (VLLMEngine.metrics); extra_args.disable_log_stats: true turns both off
    kwargs["disable_log_stats"] = False
    kwargs.update(filter_extra_args(v.extra_args, warn))
    kwargs.update({
        "model": str(cfg.model.target_model_path),
        "trust_remote_code": bool(cfg.model.trust_remote_code),
        "tensor_parallel_size": int(v.tp_size),
        "gpu_memory_utilization": float(v.mem_fraction_static),
        "dtype": str(compute_dtype(device)).removeprefix("torch."),
        "enable_prefix_caching": False,
        "speculative_config": {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(extract_ids)}},
        },
        "kv_transfer_config": {
            "kv_connector": CONNECTOR,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": storage_dir},
        },
    })
    return kwargs


def _checkpoint_tensors(path: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors checkpoint (local dir or hub id), read one by one."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = [n for n in names if n not in weight_map]
        files = {n: cached_file(path, weight_map[n]) for n in names if n in weight_map}
    else:
        single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if not single:
            raise VLLMEngineError(f"model.target_model_path={path!r}: no safetensors checkpoint "
                                  "(model.safetensors or its index) to read the final norm from")
        with safe_open(single, "pt") as f:
            present = set(f.keys())
        missing = [n for n in names if n not in present]
        files = {n: single for n in names if n in present}
    if missing:
        raise VLLMEngineError(f"model.target_model_path={path!r}: checkpoint has no {missing} "
                              "(the final norm the vllm engine applies; its name is model.norm_key)")
    out = {}
    for name, file in files.items():
        with safe_open(file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def load_final_norm(path: str, dtype: torch.dtype, trust_remote_code: bool = False,
                    norm_key: str | None = None) -> tuple[torch.nn.Module, int]:
    """(the target's final norm as transformers defines it, on CPU with the checkpoint's weights; the
    number of decoder layers). The model is built on the meta device: no other weight is read.
    norm_key (model.norm_key): the checkpoint's name of the norm's weight (its other parameters, a bias
    say, are read beside it); None: the name transformers gives the module."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from torchspec.inference.hf import TargetLoadError, _base_model

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except Exception as e:  # user-caused: wrong path / id, or a model needing trust_remote_code
        first = str(e).splitlines()[0] if str(e) else ""
        raise TargetLoadError(f"model.target_model_path={path!r} could not be loaded as a causal LM: "
                              f"{type(e).__name__}: {first}") from None
    norm = getattr(_base_model(model), "norm", None)
    if norm is None:
        raise VLLMEngineError(f"model.target_model_path={path!r}: {type(model).__name__} has no final .norm "
                              "for the vllm engine to apply")
    if norm_key is None:
        prefix = next(n for n, m in model.named_modules() if m is norm)
    elif norm_key.endswith(".weight") and "weight" in norm.state_dict():
        prefix = norm_key[: -len(".weight")]
    else:
        raise VLLMEngineError(f"model.norm_key={norm_key!r}: expected the name of the final norm's weight "
                              "tensor in the target checkpoint (ending in '.weight')")
    names = {f"{prefix}.{k}": k for k in norm.state_dict()}
    tensors = _checkpoint_tensors(str(path), list(names))
    norm = norm.to_empty(device="cpu")
    norm.load_state_dict({names[n]: t.to(dtype) for n, t in tensors.items()})
    return norm.eval().requires_grad_(False), int(text_config_of(model.config).num_hidden_layers)


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _visible_devices(device: torch.device, tp_size: int) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for an engine placed on cuda:i (vLLM always starts at its device 0)."""
    if device.type != "cuda" or not device.index:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[device.index:device.index + tp_size])}


def _ready(path: str) -> bool:
    """The connector has finished writing `path` (it holds an exclusive flock on path + '.lock' until then)."""
    if not os.path.exists(path):
        return False
    try:
        fd = os.open(path + ".lock", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class VLLMEngine:
    READ_TIMEOUT_S = 600  # wait for a finished request's file at most this long

    def __init__(self, llm, store, aux_layers: Sequence[int], num_layers: int, final_norm: torch.nn.Module,
                 storage_dir: str, device: torch.device | str = "cpu"):
        self.llm = llm
        self.store = store
        self.aux_layers = list(aux_layers)
        self.extract_ids, self._aux_rows, self._final_row = extraction_plan(self.aux_layers, num_layers)
        self.final_norm = final_norm
        self.device = torch.device(device)
        self.storage_dir = storage_dir

    @classmethod
    def from_config(cls, cfg, store, device: torch.device | str = "cpu"):
        tp = int(cfg.inference.vllm.tp_size)
        if tp > 1 and multiprocessing.current_process().daemon:
            raise VLLMEngineError(
                f"inference.vllm.tp_size={tp}: vLLM starts a worker process per GPU, which a daemonic process "
                "may not do (the launchers start such engines in non-daemonic processes; a custom engine_factory "
                "must too)")
        try:
            import vllm
        except ModuleNotFoundError as e:
            if e.name != "vllm":
                raise
            raise VLLMEngineError(f"inference.inference_engine_type='vllm' needs vllm: {INSTALL_HINT}") from None
        device = torch.device(device)
        path = str(cfg.model.target_model_path)
        final_norm, num_layers = load_final_norm(path, compute_dtype(device), bool(cfg.model.trust_remote_code),
                                                cfg.model.norm_key)
        aux_layers = list(TargetInfo.from_config(cfg).aux_layers)
        extract_ids = extraction_plan(aux_layers, num_layers)[0]
        storage_dir = tempfile.mkdtemp(prefix="torchspec-vllm-hs-")
        try:
            kwargs = build_llm_kwargs(cfg, device, extract_ids, storage_dir)
            # In-process engine core: no child process (engines may run as daemonic processes) and we
            # drive the steps that flush the connector's writes.
            with _env(VLLM_ENABLE_V1_MULTIPROCESSING="0", **_visible_devices(device, tp)):
                llm = vllm.LLM(**kwargs)
        except BaseException:
            shutil.rmtree(storage_dir, ignore_errors=True)
            raise
        logger.info("vllm engine: aux layers %s (vLLM ids %s), final = norm(vLLM id %d)",
                    aux_layers, to_vllm_layer_ids(aux_layers), num_layers)
        return cls(llm, store, aux_layers, num_layers, final_norm.to(device), storage_dir, device)

    def _read(self, path: str) -> dict[str, torch.Tensor]:
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states, load_hidden_states)

        deadline = time.monotonic() + self.READ_TIMEOUT_S
        while not _ready(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm engine: hidden states {path} not written in {self.READ_TIMEOUT_S} s")
            # The connector writes a finished request's file on the next engine step (on CUDA from a
            # thread, after that step); idle steps return at once.
            self.llm.llm_engine.step()
            time.sleep(0.001)
        data = load_hidden_states(path)
        cleanup_hidden_states(path)
        return data

    @torch.inference_mode()
    def generate(self, samples: Sequence) -> list[StoredSample]:
        from torchspec.inference.vlm import refuse_images_in

        refuse_images_in(samples, "vllm")
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        prompts = [{"prompt_token_ids": s.input_ids.tolist()} for s in samples]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        stored = []
        for s, out in zip(samples, outs):
            n = int(s.input_ids.numel())
            data = self._read((out.kv_transfer_params or {})["hidden_states_path"])
            hs, ids = data["hidden_states"], data["token_ids"]   # [T, len(extract_ids), H], [T]
            if not torch.equal(ids.to(torch.long), s.input_ids.to(torch.long)):
                raise RuntimeError(f"vllm engine: hidden states of sample {s.sample_id} are for other tokens")
            hs = hs.to(self.device)
            stored.append(put_record(self.store, s, hs[:, self._aux_rows].reshape(n, -1),
                                     self.final_norm(hs[:, self._final_row])))
        return stored

    def metrics(self) -> dict[str, float]:
        """vLLM's own Prometheus metrics (``LLM.get_metrics()``, vllm/v1/metrics/reader.py), flattened
        (engine_metrics.flatten_vllm): e.g. ``vllm:num_requests_running``, ``vllm:prompt_tokens``,
        ``vllm:kv_cache_usage_perc``, ``vllm:e2e_request_latency_seconds_count``/``_sum``. {} when stat logging is
        off (inference.vllm.extra_args.disable_log_stats: true: get_metrics() would assert)."""
        from torchspec.inference.engine_metrics import flatten_vllm

        if self.llm is None or not getattr(self.llm.llm_engine, "log_stats", False):
            return {}
        return flatten_vllm(self.llm.get_metrics())

    def close(self) -> None:
        llm, self.llm = self.llm, None
        try:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
        finally:   # the hidden-state files go even when vLLM's shutdown fails
            shutil.rmtree(self.storage_dir, ignore_errors=True)


def build_engine(cfg, store, device: str | torch.device = "cpu") -> VLLMEngine:
    return VLLMEngine.from_config(cfg, store, device=device)
