"""The configuration schema: typed dataclasses and the ONLY place where defaults live.

YAML files (configs/*.yaml) and CLI overrides (`a.b=value`) only override what is written
here; `torchspec.config.loader.load_config` merges them and `torchspec.config.validate`
checks the result. This module imports nothing beyond the standard library, so any process
(a GPU worker without omegaconf, say) can import it.

Field metadata used by the loader:
  PATH  - a filesystem path; a relative value written in a config file is resolved against
          that file's folder (values given on the command line: against the working dir).
  HUB_OR_PATH - a local path or a Hugging Face hub id ("Qwen/Qwen3-8B"); resolved like PATH
          only when it starts with "./", "../" or "~", or names something that exists there.
  SIZE  - a byte count; "16GB", "512MB", "2GiB" or a plain integer are accepted
          (K/M/G/T are binary: 1GB = 1024**3 bytes, as Mooncake counts them).
  FREE  - a free-form mapping whose keys are not checked (forwarded to a library as-is).
Conventions: `None` (YAML `null`) means "not set / derive it"; REQUIRED ("???", the
OmegaConf convention) means the run fails unless some config or the CLI sets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

REQUIRED = "???"
GiB = 1024**3

PATH = {"path": "local"}
HUB_OR_PATH = {"path": "hub_or_local"}
SIZE = {"size": True}
FREE = {"free": True}

# Allowed values of the enumerated fields (checked by torchspec.config.validate).
INFERENCE_ENGINE_TYPES = ("hf", "sgl", "vllm")
LAUNCHERS = ("local", "ray")
TRAINING_ATTENTION_BACKENDS = ("auto", "sdpa", "flex_attention")  # auto: flex_attention on CUDA, sdpa elsewhere
# Which TTT rows are supervised: "eagle" = loss_mask[t+k] (EAGLE/SpecForge); "serving" = the predicted token
# x_{t+2+k} is an assistant token (see docs/architecture.md, the Eagle3 contract).
LOSS_MASK_ALIGNMENTS = ("eagle", "serving")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
# dataset.chat_template: "tokenizer" (the tokenizer's own template) or a template of torchspec/data/templates.py
# (which checks at import that it implements exactly these)
CHAT_TEMPLATES = ("tokenizer", "qwen", "qwen3", "llama3", "kimi-k25", "kimi-k25-vlm", "plain")
# dataset.on_bad_record: "error" stops at the first bad record (one line naming file and line), "skip" leaves
# bad records out, counts them and names the first BAD_RECORDS_NAMED of them in the log and the data summary.
ON_BAD_RECORD = ("error", "skip")
BAD_RECORDS_NAMED = 10
# dataset.defer_tokenization: the draft vocabulary is counted on this many conversations spread evenly over the
# dataset (all of them when it is no larger), tokenized in dataset.num_proc workers before the first step.
DEFER_VOCAB_SAMPLE = 20_000
PARALLEL_MODES = ("ddp", "fsdp")
REPORT_TO = ("none", "wandb", "tensorboard")
# info: torchspec at INFO, Mooncake and Ray at warnings (one line each from torchspec); debug: everything
LOG_LEVELS = ("info", "debug")
MOONCAKE_PROTOCOLS = ("tcp", "rdma")
# Where hidden states go: "auto" = local unless the run spans several nodes (then mooncake).
STORE_TYPES = ("auto", "local", "mooncake", "memory")
# inference.store_capacity: null = this share of what is free when the run starts, where the store keeps records:
# the local store's filesystem (/dev/shm), or for the memory store the device's free memory (the target and the
# draft are loaded after it is measured, hence the smaller share). Mooncake: bounded by its segment instead.
STORE_CAPACITY_SHARE = {"local": 0.5, "memory": 0.25}
# model.target_model_backend is the original TorchSpec's name for the engine type.
TARGET_MODEL_BACKENDS = ("hf", "sglang", "sgl", "vllm")

# inference.sglang.log_level (any case) and log_requests_level (torchspec/inference/sglang_logging.py says what
# each request level logs)
SGLANG_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SGLANG_REQUEST_LOG_LEVELS = (0, 1, 2, 3)

# dataset.generation.on_truncated: what becomes of a regenerated reply cut at max_new_tokens.
ON_TRUNCATED = ("keep", "drop")

# Keys whose values are secrets: redacted wherever a config is printed or saved.
SECRET_KEYS = ("wandb_key",)


@dataclass
class ModelConfig:
    target_model_path: str = field(default=REQUIRED, metadata=HUB_OR_PATH)  # local dir or HF hub id
    trust_remote_code: bool = False
    draft_model_config: Optional[str] = field(default=None, metadata=PATH)  # JSON; null = derive from target
    embedding_key: str = "model.embed_tokens.weight"  # tensor name in the target checkpoint
    lm_head_key: str = "lm_head.weight"
    norm_key: str = "model.norm.weight"
    # The original TorchSpec's name for the engine; null = follow inference.inference_engine_type.
    target_model_backend: Optional[str] = None


@dataclass
class GenerationConfig:
    """How the target writes the assistant turns when dataset.regenerate is true (torchspec/data/regenerate.py)."""

    max_new_tokens: int = 512  # tokens per regenerated assistant turn
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # 0 = off
    seed: int = 0  # seeds the sampling (temperature > 0)
    on_truncated: str = "keep"  # a reply cut at max_new_tokens: keep (as cut) | drop (the conversation)
    batch_size: int = 64  # turns sent to the engine's generate at once


@dataclass
class DatasetConfig:
    train_data_path: str = field(default=REQUIRED, metadata=HUB_OR_PATH)  # jsonl/json/parquet file or dir
    eval_data_path: Optional[str] = field(default=None, metadata=HUB_OR_PATH)
    eval_interval: int = 50  # training steps between evaluations (when eval_data_path is set)
    eval_max_samples: Optional[int] = 16  # held-out samples for eval loss/acc_k (hidden states kept in RAM); null = all
    eval_tau_prompts: int = 0  # held-out prompts to measure tau on at each eval (loads the HF target); 0 = off
    eval_num_draft_steps: int = 3  # k of the chain speculative decoding that measures tau
    eval_max_new_tokens: int = 64  # tokens generated per prompt when measuring tau
    chat_template: str = "qwen"  # one of CHAT_TEMPLATES
    prompt_key: str = "conversations"  # record field holding the list of messages
    defer_tokenization: bool = False  # tokenize in the inference workers instead of up front
    last_turn_loss_only: bool = False  # supervise only the last assistant turn of each conversation
    num_proc: Optional[int] = None  # tokenization worker processes; null = all CPU cores
    on_bad_record: str = "error"  # one of ON_BAD_RECORD: stop at a bad record, or skip and count bad records
    # Replace every assistant turn by the target's own reply (written to <output_dir>/regenerated/).
    regenerate: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    lr_decay_style: str = "cosine"
    lr_total_steps: Optional[int] = None  # null = the number of optimizer steps of the run
    warmup_ratio: float = 0.015
    max_grad_norm: float = 0.5
    micro_batch_size: int = 2  # sequences per trainer rank per forward
    draft_accumulation_steps: int = 1  # gradient accumulation
    num_epochs: int = 10
    num_train_steps: Optional[int] = None  # null = run num_epochs over the data
    max_seq_length: int = 8192
    ttt_length: int = 7  # test-time-training unroll steps
    draft_vocab_size: Optional[int] = None  # null = the draft config's value (else full vocab)
    attention_backend: str = "auto"  # auto | flex_attention | sdpa (torchspec/models/attention.py)
    pack_samples: bool = True  # a micro-batch's samples in one row, attention kept per sample; false = right-pad
    gradient_checkpointing: bool = False
    gradient_checkpointing_steps: Optional[int] = None  # null = every TTT step; N = only the first N
    loss_mask_alignment: str = "eagle"  # one of LOSS_MASK_ALIGNMENTS
    seed: int = 0
    training_num_nodes: int = 1
    training_num_gpus_per_node: int = 1
    distributed_timeout_minutes: int = 10
    # read-ahead of each trainer rank (torchspec/training/prefetch.py): how many store reads run at once (reader
    # threads), and how many micro-batches are taken and read from the store (and copied to the device) while
    # the current one trains (0 = each is read when it is trained)
    max_concurrent_batches: int = 1
    prefetch_depth: int = 4
    save_interval: int = 5000  # optimizer steps between checkpoints
    save_per_epoch: bool = False
    max_checkpoints: Optional[int] = None  # null = keep every checkpoint
    load_path: Optional[str] = field(default=None, metadata=PATH)  # checkpoint dir to resume from
    continual_training: bool = False  # load weights from load_path but restart the schedule
    parallel_mode: str = "ddp"  # data parallelism of the draft when world > 1: ddp | fsdp (FSDP2)


@dataclass
class SGLangConfig:
    # The seed's essential fields, with the seed's defaults.
    tp_size: int = 8
    pp_size: int = 1
    nnodes: int = 1
    mem_fraction_static: float = 0.8
    context_length: Optional[int] = None
    attention_backend: str = "flashinfer"
    quantization: Optional[str] = None
    kv_cache_dtype: Optional[str] = None
    moe_runner_backend: Optional[str] = None
    model_loader_extra_config: Optional[dict[str, Any]] = field(default=None, metadata=FREE)
    disable_flashinfer_autotune: bool = False
    enable_multimodal: bool = False
    enable_metrics: bool = False
    dist_init_addr: Optional[str] = None  # null = auto-negotiated
    dist_timeout: int = 20  # seconds
    init_timeout: int = 300  # seconds
    log_level: str = "warning"
    log_requests: bool = False
    log_requests_level: int = 0
    # null = free ports; N = each engine's ports from its block N + slot x (1 + additional_ports) (inference/sglang.py)
    port: Optional[int] = None
    additional_ports: int = 4  # ports of a block after its first
    # Any other sgl.Engine keyword, forwarded as-is (protected keys are dropped).
    extra_args: dict[str, Any] = field(default_factory=dict, metadata=FREE)


@dataclass
class VLLMConfig:
    tp_size: int = 1
    mem_fraction_static: float = 0.8  # vLLM's gpu_memory_utilization
    extra_args: dict[str, Any] = field(default_factory=dict, metadata=FREE)


@dataclass
class InferenceConfig:
    inference_engine_type: str = "hf"
    inference_num_gpus: int = 1  # all GPUs running the target, over every engine
    inference_num_gpus_per_engine: int = 1
    inference_num_gpus_per_node: int = 8
    inference_batch_size: int = 1  # samples per engine generate() call
    inference_fetch_batch: int = 1  # prompts taken from the prompt buffer (and lazily tokenized) at a time
    inference_buffer_threshold: int = 32  # refill the prompt buffer below this many
    max_sample_pool_size: int = 64  # finished samples held before inference pauses
    aux_hidden_states_layers: Optional[list[int]] = None  # null = [1, L//2 - 1, L - 4]
    # Target inside the trainer process, on the trainer's device (the CPU quickstart, or one GPU
    # shared by target and draft); otherwise engines are processes on their own GPUs.
    colocate: bool = False
    # Who places the engines: local (processes on this machine) or ray (one Ray actor per engine;
    # always used when the run spans several nodes).
    launcher: str = "local"
    # Bytes of hidden states the store may hold; the controller stops feeding engines before the records of the
    # pool, the engines' batches and the sets taken would pass it. null = a share of the free space
    # (STORE_CAPACITY_SHARE) for local and memory; for mooncake, the segment size bounds it.
    store_capacity: Optional[int] = field(default=None, metadata=SIZE)
    # The hidden-state store: auto | local (shared memory, one node) | mooncake (any node; the `mooncake` section).
    store: str = "auto"
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class MooncakeConfig:
    master_server_address: Optional[str] = None  # host:port; null = we start a master on 127.0.0.1
    master_metrics_port: int = 9003  # HTTP admin port of a given master (its --metrics_port), for key listing
    metadata_server: Optional[str] = None
    metadata_port: Optional[int] = None
    protocol: str = "tcp"
    device_name: str = ""  # RDMA devices, e.g. "mlx5_0,mlx5_1"
    local_hostname: Optional[str] = None
    enable_gpu_direct: bool = False
    global_segment_size: int = field(default=8 * GiB, metadata=SIZE)
    local_buffer_size: int = field(default=2 * GiB, metadata=SIZE)
    gpu_buffer_size: Optional[int] = field(default=None, metadata=SIZE)
    max_batch_size: int = 32
    max_seq_len: int = 8192
    hidden_dim: Optional[int] = None  # null = the target's hidden size


@dataclass
class LoggingConfig:
    log_level: str = "info"   # info | debug (torchspec's DEBUG lines and Mooncake's / Ray's own INFO logs)
    report_to: str = "none"
    wandb_project: Optional[str] = None
    wandb_team: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_key: Optional[str] = None  # secret: redacted when printed or saved
    wandb_mode: str = "online"
    wandb_random_suffix: bool = True


@dataclass
class DebugConfig:
    debug_inference_only: bool = False
    debug_train_only: bool = False
    save_debug_train_data: Optional[str] = field(default=None, metadata=PATH)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    mooncake: MooncakeConfig = field(default_factory=MooncakeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    output_dir: Optional[str] = field(default=None, metadata=PATH)  # null = ./outputs/<config name>
    cache_dir: Optional[str] = field(default=None, metadata=PATH)  # null = <output_dir>/cache
    model_download_dir: Optional[str] = field(default=None, metadata=PATH)
