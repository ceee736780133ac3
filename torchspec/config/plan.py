"""The placement plan a dry run prints: where things run and how much crosses the store.

Pure arithmetic over the config (plus the draft/target config.json when it is a local file);
no GPU, no network.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torchspec.config.schema import Config
from torchspec.config.target import default_aux_layers, resolve_draft_vocab_size, text_config_of
from torchspec.config.validate import gpus_per_engine

BF16_BYTES = 2
# fp32 master weights + fp32 gradients + AdamW's two fp32 moments, per trainable parameter.
TRAIN_STATE_BYTES_PER_PARAM = 4 + 4 + 4 + 4


@dataclass
class Plan:
    nodes: int
    inference_nodes: int
    training_nodes: int
    shared_node: bool  # inference and training on one machine
    num_engines: int
    gpus_per_engine: int
    inference_gpus: int
    training_world_size: int
    hidden_size: Optional[int]
    hidden_size_source: str
    bytes_per_token: Optional[int]  # aux (3H) + final (H) hidden states, bf16
    memory: Optional[dict]  # rough draft-trainer memory per rank, bytes


def read_json(path: Optional[str]) -> Optional[dict]:
    if not path or not Path(path).is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _local_target_text(cfg: Config) -> Optional[dict]:
    """The language model's part of a local target's config.json (vision-language checkpoints such as
    Kimi-K2.5 nest it); None for a hub id. Read as a plain dict: a dry run needs no transformers, and
    a partial config.json still gives what it has."""
    target = read_json(str(Path(cfg.model.target_model_path) / "config.json"))
    return text_config_of(target) if target else None


def _size(d: Optional[dict], key: str) -> Optional[int]:
    """d[key] when it is a usable size (an integer > 0), else None: the plan computes with nothing else, and a
    bad value in a draft config is the dry run's problem line (DraftConfig's check), not a crash here."""
    value = d.get(key) if isinstance(d, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def target_hidden_size(cfg: Config, draft: Optional[dict]) -> tuple[Optional[int], str]:
    text = _local_target_text(cfg)
    if _size(text, "hidden_size"):
        return text["hidden_size"], "target config.json"
    if _size(draft, "hidden_size"):
        return draft["hidden_size"], "model.draft_model_config"
    if cfg.mooncake.hidden_dim:
        return cfg.mooncake.hidden_dim, "mooncake.hidden_dim"
    return None, "unknown (target not local, no draft config, mooncake.hidden_dim unset)"


def target_aux_layers(cfg: Config) -> Optional[list[int]]:
    """inference.aux_hidden_states_layers, else the default for a local target's layer count; None when
    neither is known without loading anything (a hub id)."""
    if cfg.inference.aux_hidden_states_layers:
        return [int(k) for k in cfg.inference.aux_hidden_states_layers]
    text = _local_target_text(cfg)
    layers = text and text.get("num_hidden_layers")
    return default_aux_layers(int(layers)) if layers else None


def draft_like_target(cfg: Config) -> Optional[dict]:
    """Without a draft config the draft copies the target's layer shape (when it is local)."""
    text = _local_target_text(cfg)
    if not text:
        return None
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size")
    return {k: text[k] for k in keys if text.get(k) is not None}


def draft_memory_estimate(draft: dict, cfg: Config) -> dict:
    """Rough bytes per trainer rank for a 1-layer Eagle3 draft (see configs/README.md)."""
    h = draft["hidden_size"]
    inter = draft["intermediate_size"]
    heads = draft["num_attention_heads"]
    kv_heads = draft.get("num_key_value_heads", heads)
    head_dim = draft.get("head_dim") or h // heads
    vocab = draft["vocab_size"]
    draft_vocab = resolve_draft_vocab_size(cfg.training.draft_vocab_size, draft.get("draft_vocab_size"), vocab)
    tr = cfg.training
    world = tr.training_num_nodes * tr.training_num_gpus_per_node

    attn = 2 * h * heads * head_dim + 2 * (2 * h * kv_heads * head_dim) + heads * head_dim * h
    mlp = 3 * h * inter
    trainable = attn + mlp + 3 * h * h + h * draft_vocab + 4 * h  # + fc + lm_head + norms
    frozen = 2 * vocab * h + h  # target embeddings + target lm_head (+ final norm), bf16
    shards = world if tr.parallel_mode == "fsdp" else 1

    tokens = tr.micro_batch_size * tr.max_seq_length
    inputs = tokens * 4 * h * BF16_BYTES  # aux (3H) + final (H) hidden states of the batch
    target_probs = tokens * draft_vocab * 4 + tokens * vocab * BF16_BYTES  # p (fp32) + full logits
    per_step_logits = 3 * tokens * draft_vocab * 4  # logits, log-softmax, their grad (fp32)
    if tr.gradient_checkpointing:
        per_step_hidden = tokens * 2 * h * BF16_BYTES  # only each step's layer input is kept
    else:
        per_step_hidden = tokens * (8 * h + 2 * kv_heads * head_dim + 3 * inter) * BF16_BYTES
    activations = inputs + target_probs + tr.ttt_length * (per_step_logits + per_step_hidden)

    parts = {
        "trainable_params": trainable,
        "weights_grads_optimizer": math.ceil(trainable * TRAIN_STATE_BYTES_PER_PARAM / shards),
        "frozen_target_head": frozen * BF16_BYTES,
        "activations": activations,
    }
    parts["total"] = parts["weights_grads_optimizer"] + parts["frozen_target_head"] + activations
    return parts


def make_plan(cfg: Config) -> Plan:
    inf, tr = cfg.inference, cfg.training
    per_engine = gpus_per_engine(cfg)
    engines = inf.inference_num_gpus // per_engine
    world = tr.training_num_nodes * tr.training_num_gpus_per_node
    node_gpus = inf.inference_num_gpus_per_node  # GPUs of one machine
    inference_nodes = math.ceil(inf.inference_num_gpus / node_gpus)
    if inf.colocate:  # the target runs inside the trainer processes, on their devices
        engines, per_engine, inference_gpus, inference_nodes = 0, 0, 0, 0
    else:
        inference_gpus = inf.inference_num_gpus
    shared = inf.colocate or (
        tr.training_num_nodes == 1
        and inference_nodes == 1
        and inference_gpus + world <= node_gpus
    )
    nodes = tr.training_num_nodes if inf.colocate else 1 if shared else inference_nodes + tr.training_num_nodes

    draft = read_json(cfg.model.draft_model_config) or draft_like_target(cfg)
    hidden, source = target_hidden_size(cfg, draft)
    per_token = (3 * hidden + hidden) * BF16_BYTES if hidden else None
    needed = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    optional = ("num_key_value_heads", "head_dim", "draft_vocab_size")
    usable = draft and all(_size(draft, k) for k in needed) and all(
        draft.get(k) in (None, 0) or _size(draft, k) for k in optional)
    memory = draft_memory_estimate(draft, cfg) if usable else None
    return Plan(
        nodes=nodes,
        inference_nodes=inference_nodes,
        training_nodes=tr.training_num_nodes,
        shared_node=shared,
        num_engines=engines,
        gpus_per_engine=per_engine,
        inference_gpus=inference_gpus,
        training_world_size=world,
        hidden_size=hidden,
        hidden_size_source=source,
        bytes_per_token=per_token,
        memory=memory,
    )


def _span(first: int, last: int, what: str) -> str:
    return f"{what} {first}" if first == last else f"{what}s {first}-{last}"


def node_layout(cfg: Config, plan: Plan) -> list[str]:
    """Which node each engine and trainer rank goes to. Node 0 is the driver's (trainer rank 0 runs
    in the driver process); under Ray the placement groups decide, and the run logs where each
    actor landed."""
    inf, tr = cfg.inference, cfg.training
    per_node = tr.training_num_gpus_per_node
    ray = inf.launcher == "ray" or plan.nodes > 1

    def ranks(node: int) -> str:
        first, last = node * per_node, (node + 1) * per_node - 1
        text = _span(first, last, "trainer rank")
        others = "Ray actors" if ray else "spawned processes"
        if node == 0:
            text += " (rank 0 in the driver process" + (f", the others {others})" if last else ")")
        else:
            text += f" ({others})"
        return text

    if inf.colocate:
        return [f"node 0 (driver): {ranks(0)}, the target inside each"]
    engines = _span(0, plan.num_engines - 1, "engine") + f" ({plan.gpus_per_engine} GPU(s) each)"
    if plan.shared_node:
        return [f"node 0 (driver): {engines}; {ranks(0)}"]
    lines = [f"node {n}{' (driver)' if n == 0 else ''}: {ranks(n)}" for n in range(tr.training_num_nodes)]
    base, node_gpus = tr.training_num_nodes, inf.inference_num_gpus_per_node
    if plan.gpus_per_engine > node_gpus:   # one engine spans several nodes
        span = plan.gpus_per_engine // node_gpus
        for e in range(plan.num_engines):
            first = base + e * span
            lines.append(f"nodes {first}-{first + span - 1}: engine {e} ({node_gpus} GPUs on each node)")
        return lines
    per = max(node_gpus // plan.gpus_per_engine, 1)
    for n in range(plan.inference_nodes):
        first, last = n * per, min((n + 1) * per, plan.num_engines) - 1
        if first <= last:
            lines.append(f"node {base + n}: {_span(first, last, 'engine')} ({plan.gpus_per_engine} GPU(s) each)")
    return lines


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


_STORES = {
    "memory": "memory (records stay on the device inside each trainer process: colocated)",
    "local": "local (shared memory of the driver's machine: every engine and rank must run on it)",
    "mooncake": "mooncake (records go through a Mooncake master: engines and ranks may run on any node)",
}


def store_line(cfg: Config) -> str:
    """The store the run will use (inference.store, `auto` resolved as the run resolves it)."""
    from torchspec.config.topology import resolved_store

    kind = resolved_store(cfg)
    how = "" if cfg.inference.store == kind else " [inference.store=auto]"
    return _STORES.get(kind, kind) + how


def port_lines(cfg: Config) -> list[str]:
    """The network ports the run will use, as far as the config and the environment (RAY_ADDRESS) fix them;
    the others are free ports picked at start."""
    from torchspec.config.topology import resolved_store, uses_ray

    ray = uses_ray(cfg)
    lines = []
    if ray:
        addr = os.environ.get("RAY_ADDRESS")
        lines.append(f"Ray: the cluster at RAY_ADDRESS={addr}" if addr else
                     "Ray: none given (RAY_ADDRESS unset): a Ray of this machine alone is started for the run")
    if resolved_store(cfg) == "mooncake":
        mc = cfg.mooncake
        if mc.master_server_address:
            host = mc.master_server_address.rsplit(":", 1)[0]
            lines.append(f"Mooncake master: {mc.master_server_address} (mooncake.master_server_address), admin http "
                         f"{host}:{mc.master_metrics_port} (mooncake.master_metrics_port)")
        else:
            lines.append("Mooncake master: started by the run on 127.0.0.1, two free ports (one machine only)")
        meta = (f"metadata server {mc.metadata_server}" if mc.metadata_server
                else "peer-to-peer handshake, no metadata server")
        lines.append(f"Mooncake transfer engine: one port per process, picked by Mooncake at start "
                     f"({mc.protocol}; {meta})")
    world = cfg.training.training_num_nodes * cfg.training.training_num_gpus_per_node
    if world > 1:
        lines.append("trainer rendezvous: tcp://<driver's IP>:<a free port picked at start>" if ray else
                     "trainer rendezvous: a file:// store in the run's directory (no port)")
    return lines or ["none (one machine, no network service)"]


def format_plan(cfg: Config, plan: Plan) -> str:
    inf, tr = cfg.inference, cfg.training
    engine = inf.inference_engine_type
    lines = ["placement plan:"]
    if inf.colocate:
        lines.append(f"  nodes: {plan.nodes}")
    elif plan.shared_node:
        lines.append(
            f"  nodes: 1 (inference and training share it: "
            f"{plan.inference_gpus + plan.training_world_size} GPUs)"
        )
    else:
        lines.append(
            f"  nodes: {plan.nodes} ({plan.inference_nodes} for inference, "
            f"{plan.training_nodes} for training)"
        )
    span = ""
    if engine == "sgl":
        sg = inf.sglang
        span = f", tp_size {sg.tp_size}"
        if sg.nnodes > 1:
            span += f" over {sg.nnodes} nodes x {inf.inference_num_gpus_per_node} GPUs"
    elif engine == "vllm":
        span = f", tp_size {inf.vllm.tp_size}"
    if inf.colocate:
        lines.append(f"  inference: colocated, the {engine} target runs inside each trainer process")
    else:
        lines.append(
            f"  inference: {plan.num_engines} {engine} engine(s) x {plan.gpus_per_engine} GPU(s) each"
            f"{span} = {plan.inference_gpus} GPUs"
        )
    lines.append(
        f"  training: world size {plan.training_world_size} = {tr.training_num_nodes} node(s) x "
        f"{tr.training_num_gpus_per_node} GPU(s) ({tr.parallel_mode})"
    )
    lines.append("  layout:")
    lines.extend(f"    {line}" for line in node_layout(cfg, plan))
    lines.append(f"  hidden-state store: {store_line(cfg)}")
    lines.append("  ports:")
    lines.extend(f"    {line}" for line in port_lines(cfg))
    if plan.bytes_per_token:
        h = plan.hidden_size
        per_seq = plan.bytes_per_token * tr.max_seq_length
        lines.append(
            f"  bytes per token crossing the store: (3H + H) x 2 (bf16) with H={h} "
            f"[{plan.hidden_size_source}] = {plan.bytes_per_token} B "
            f"({plan.bytes_per_token / 1024:.1f} KiB; {_gib(per_seq)} per {tr.max_seq_length}-token sample)"
        )
    else:
        lines.append(f"  bytes per token crossing the store: H {plan.hidden_size_source}")
    m = plan.memory
    if m:
        lines.append(
            f"  draft trainer memory per rank (rough): {_gib(m['total'])} = "
            f"weights+grads+AdamW {_gib(m['weights_grads_optimizer'])} "
            f"({m['trainable_params'] / 1e6:.0f}M trainable params) + frozen target embed/lm_head "
            f"{_gib(m['frozen_target_head'])} + activations {_gib(m['activations'])} "
            f"(micro_batch_size {tr.micro_batch_size} x {tr.max_seq_length} tokens, ttt_length "
            f"{tr.ttt_length}, gradient_checkpointing {str(tr.gradient_checkpointing).lower()})"
        )
    else:
        lines.append(
            "  draft trainer memory: unknown (needs hidden_size, intermediate_size, num_attention_heads "
            "and vocab_size, positive integers, from model.draft_model_config or a local target's config.json)"
        )
    return "\n".join(lines)
