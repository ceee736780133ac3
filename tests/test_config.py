"""The configuration system: merge order, validation messages, dry run, extra_args filtering."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from torchspec.config import Config, ConfigError, load_config
from torchspec.config.loader import all_keys, origin_of, parse_size
from torchspec.config.render import REDACTED, save_resolved_config
from torchspec.inference.sglang_args import PROTECTED_EXTRA_ARGS, build_sglang_engine_kwargs
from torchspec.train_entry import main
from torchspec.utils.optional import install_hint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SETUP_CONFIGS = ["hf_qwen3_8b", "sglang_qwen3_8b", "sglang_kimi_k25_2node", "sglang_kimi_k25_3node"]
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "python_chat_sharegpt.jsonl"
REQUIRED_SET = ["model.target_model_path=Qwen/Qwen3-8B", f"dataset.train_data_path={EXAMPLE_DATA}"]
# What the dry run of a Kimi file reports: a real start refuses a multi-node run without a reachable master.
NO_MASTER = "mooncake.master_server_address is null, but"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def dry_run(argv, capsys, caplog):
    caplog.set_level(logging.WARNING)
    rc = main(list(argv) + ["--dry-run"])
    out, err = capsys.readouterr()
    return rc, out, err + caplog.text


# ---------------------------------------------------------------- defaults and files


def test_schema_import_does_not_need_omegaconf():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['omegaconf'] = None\n"
        "import torchspec.config.schema as s, torchspec.config.render, torchspec.inference.sglang_args\n"
        "c = s.Config(); print(c.training.learning_rate, c.inference.sglang.tp_size)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.0001", "8"]


def test_seed_essential_sglang_defaults():
    sg = Config().inference.sglang
    assert (sg.tp_size, sg.pp_size, sg.nnodes, sg.mem_fraction_static) == (8, 1, 1, 0.8)
    assert sg.attention_backend == "flashinfer" and sg.log_level == "warning"
    assert (sg.dist_timeout, sg.init_timeout, sg.log_requests_level) == (20, 300, 0)
    for name in ("context_length", "quantization", "kv_cache_dtype", "moe_runner_backend",
                 "model_loader_extra_config", "dist_init_addr"):
        assert getattr(sg, name) is None, name
    for name in ("disable_flashinfer_autotune", "enable_multimodal", "enable_metrics", "log_requests"):
        assert getattr(sg, name) is False, name
    assert sg.extra_args == {}


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" in {x.rsplit(".", 1)[0] for x in all_keys()}:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_default_yaml_lists_every_schema_field_with_its_default():
    raw = _flatten(yaml.safe_load((CONFIGS / "default.yaml").read_text()))
    missing = sorted(set(all_keys()) - set(raw))
    assert not missing, f"add these schema fields to configs/default.yaml: {missing}"
    # Loading default.yaml alone must give exactly the schema's defaults.
    cfg = load_config([], REQUIRED_SET)
    ref = load_config([], REQUIRED_SET, default_file=None)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(ref)


@pytest.mark.parametrize("name", SETUP_CONFIGS)
def test_setup_configs_dry_run(name, capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / f"{name}.yaml")], capsys, caplog)
    if "kimi" in name:   # the files leave the master's address to the user: the dry run says so and fails
        assert rc == 2 and NO_MASTER in out and "dry run: 1 problem(s)" in out
    else:
        assert rc == 0 and "dry run: OK" in out, out + err
    assert "placement plan:" in out and "bytes per token crossing the store" in out
    printed = yaml.safe_load(out.split("# sgl.Engine")[0].split("placement plan:")[0])
    assert printed["model"]["draft_model_config"].startswith(str(CONFIGS / "draft_models"))


def test_default_yaml_dry_run_needs_only_the_required_values(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "default.yaml"), *REQUIRED_SET], capsys, caplog)
    assert rc == 0, err
    assert "inference: 1 hf engine(s) x 1 GPU(s) each = 1 GPUs" in out
    assert "training: world size 1" in out


def test_missing_target_model_path_names_the_key(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "default.yaml")], capsys, caplog)
    assert rc == 2
    assert "missing required value 'model.target_model_path'" in err
    assert "model.target_model_path=..." in err


def test_three_node_kimi_plan(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_kimi_k25_3node.yaml")], capsys, caplog)
    assert rc == 2 and NO_MASTER in out   # the plan is printed all the same
    assert "nodes: 3 (2 for inference, 1 for training)" in out
    assert "inference: 1 sgl engine(s) x 16 GPU(s) each, tp_size 16 over 2 nodes x 8 GPUs = 16 GPUs" in out
    assert "training: world size 8 = 1 node(s) x 8 GPU(s)" in out
    # (3 x 7168 + 7168) x 2 bytes
    assert "= 57344 B" in out


def test_hf_qwen_plan_is_one_node_three_gpus(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "hf_qwen3_8b.yaml")], capsys, caplog)
    assert rc == 0, err
    assert "nodes: 1 (inference and training share it: 3 GPUs)" in out
    assert "= 32768 B" in out  # (3 x 4096 + 4096) x 2


# ---------------------------------------------------------------- overrides


def test_cli_overrides_show_in_dry_run(capsys, caplog):
    rc, out, err = dry_run(
        ["--config", str(CONFIGS / "sglang_qwen3_8b.yaml"), "training.learning_rate=5e-5",
         "inference.sglang.extra_args.watchdog_timeout=1800"],
        capsys, caplog,
    )
    assert rc == 0, err
    printed = yaml.safe_load(out.split("# sgl.Engine")[0])
    assert printed["training"]["learning_rate"] == 5e-5
    assert printed["inference"]["sglang"]["extra_args"] == {"watchdog_timeout": 1800}
    assert "  watchdog_timeout: 1800" in out  # forwarded to sgl.Engine
    # the kwargs shown are the sgl engine's own (its managed keys included), not only the config's
    assert "  chunked_prefill_size: -1" in out and "  dtype: 'bfloat16'" in out
    assert "  forward_hooks: \"<one hook per aux layer" in out  # a hub id: the ids are resolved at launch


def test_dry_run_sgl_hooks_name_the_aux_layers_when_known(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_qwen3_8b.yaml"),
                            "inference.aux_hidden_states_layers=[2,17,32]"], capsys, caplog)
    assert rc == 0, err
    hooks = next(line for line in out.splitlines() if line.startswith("  forward_hooks:"))
    assert all(f"'layer': {k}" in hooks for k in (2, 17, 32)), hooks


def test_protected_extra_arg_dropped_with_warning(capsys, caplog):
    rc, out, err = dry_run(
        ["--config", str(CONFIGS / "sglang_qwen3_8b.yaml"), "inference.sglang.extra_args.tp_size=4"],
        capsys, caplog,
    )
    assert rc == 0
    assert "extra_args.tp_size=4 dropped: 'tp_size' is managed by TorchSpec" in err
    engine_lines = out.split("# sgl.Engine")[1].split("placement plan:")[0]
    assert "  tp_size: 1\n" in engine_lines and "tp_size: 4" not in engine_lines


def test_merge_order_and_origins(tmp_path):
    a = write(tmp_path, "a.yaml", "training:\n  learning_rate: 1.0e-3\n  seed: 7\n")
    b = write(tmp_path, "b.yaml", "training:\n  learning_rate: 2.0e-3\n")
    cfg = load_config([a, b], [*REQUIRED_SET, "training.seed=9"])
    assert cfg.training.learning_rate == 2e-3
    assert cfg.training.seed == 9
    assert origin_of(cfg, "training.learning_rate") == str(b)
    assert origin_of(cfg, "training.seed") == "command line"
    assert origin_of(cfg, "training.ttt_length") == str(CONFIGS / "default.yaml")


def test_extra_args_merge_across_layers(tmp_path):
    a = write(tmp_path, "a.yaml", "inference:\n  sglang:\n    extra_args:\n      watchdog_timeout: 600\n"
                                  "      enable_torch_compile: true\n")
    cfg = load_config([a], [*REQUIRED_SET, "inference.sglang.extra_args.watchdog_timeout=1800"])
    assert cfg.inference.sglang.extra_args == {"watchdog_timeout": 1800, "enable_torch_compile": True}


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "draft.json").write_text("{}")
    cfg_file = write(sub, "x.yaml", "model:\n  target_model_path: Qwen/Qwen3-8B\n"
                                    "  draft_model_config: draft.json\n"
                                    "dataset:\n  train_data_path: ../data/train.jsonl\n"
                                    "output_dir: out\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config([cfg_file], ["training.load_path=ckpt"])
    assert cfg.model.target_model_path == "Qwen/Qwen3-8B"  # a hub id stays as written
    assert cfg.model.draft_model_config == str(sub / "draft.json")
    assert cfg.dataset.train_data_path == str(tmp_path / "data" / "train.jsonl")
    assert cfg.output_dir == str(sub / "out")
    assert cfg.cache_dir == str(sub / "out" / "cache")
    assert cfg.training.load_path == str(tmp_path / "ckpt")  # CLI: relative to the working dir


def test_sizes():
    assert parse_size("16GB") == 16 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size(4096) == 4096
    cfg = load_config([], [*REQUIRED_SET, "mooncake.global_segment_size=3GB"])
    assert cfg.mooncake.global_segment_size == 3 * 1024**3
    with pytest.raises(ConfigError, match=r"mooncake.local_buffer_size: expected a size like 16GB.*'lots'"):
        load_config([], [*REQUIRED_SET, "mooncake.local_buffer_size=lots"])


# ---------------------------------------------------------------- validation messages


def test_unknown_key_suggests_the_right_one(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "hf_qwen3_8b.yaml"), "training.learnig_rate=1"], capsys, caplog)
    assert rc == 2
    assert "unknown key 'training.learnig_rate' (command line); did you mean 'training.learning_rate'?" in err


def test_unknown_key_in_file_names_the_file_and_other_section(tmp_path):
    f = write(tmp_path, "x.yaml", "training:\n  tp_size: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config([f], REQUIRED_SET)
    assert str(e.value) == f"unknown key 'training.tp_size' ({f}); did you mean 'inference.sglang.tp_size'?"


def test_pp_size_must_be_one(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_qwen3_8b.yaml"), "inference.sglang.pp_size=2"],
                           capsys, caplog)
    assert rc == 2
    assert "inference.sglang.pp_size=2: pipeline parallelism is not supported; it must be 1 (command line)" in err


def test_tp_nnodes_mismatch_fails(capsys, caplog):
    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_kimi_k25_3node.yaml"), "inference.sglang.tp_size=8"],
                           capsys, caplog)
    assert rc == 2
    assert ("inference.sglang.tp_size=8: must equal nnodes x gpus_per_engine = 2 x 8 = 16 "
            "(inference.sglang.nnodes=2, inference.inference_num_gpus_per_node=8) (command line)") in err

    # nnodes=1: the engine would be one process of 16 GPUs, more than a node has
    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_kimi_k25_3node.yaml"), "inference.sglang.nnodes=1"],
                           capsys, caplog)
    assert rc == 2
    assert ("inference.inference_num_gpus_per_engine=16: an engine on one node cannot use more than "
            "inference.inference_num_gpus_per_node=8 GPUs") in err

    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_kimi_k25_2node.yaml"), "inference.sglang.tp_size=16"],
                           capsys, caplog)
    assert rc == 2
    assert ("inference.sglang.tp_size=16: must equal nnodes x gpus_per_engine = 1 x 8 = 8 "
            "(inference.sglang.nnodes=1, inference.inference_num_gpus_per_engine=8) (command line)") in err


@pytest.mark.parametrize("per_engine", [3, 7, 8])
def test_per_engine_gpus_must_match_an_engine_spanning_nodes(per_engine):
    """nnodes > 1: the engine is nnodes x inference_num_gpus_per_node GPUs; any other per-engine value is refused
    (it used to be replaced silently by the per-node count)."""
    with pytest.raises(ConfigError) as e:
        load_config([CONFIGS / "sglang_kimi_k25_3node.yaml"], [f"inference.inference_num_gpus_per_engine={per_engine}"])
    assert str(e.value) == (
        f"inference.inference_num_gpus_per_engine={per_engine}: with inference.sglang.nnodes=2 one engine spans 2 "
        "nodes of inference.inference_num_gpus_per_node=8 GPUs, so it must be 2 x 8 = 16 (command line)")
    cfg = load_config([CONFIGS / "sglang_kimi_k25_3node.yaml"], [])   # as shipped (and as the original writes it)
    assert cfg.inference.inference_num_gpus_per_engine == 16


def test_gradient_checkpointing_steps_range():
    with pytest.raises(ConfigError) as e:
        load_config([], [*REQUIRED_SET, "training.gradient_checkpointing=true",
                         "training.gradient_checkpointing_steps=-1"])
    assert str(e.value) == "training.gradient_checkpointing_steps=-1: must be >= 0 (or null) (command line)"
    cfg = load_config([], [*REQUIRED_SET, "training.gradient_checkpointing=true",
                           "training.gradient_checkpointing_steps=0"])   # 0: no step recomputed, a valid choice
    assert cfg.training.gradient_checkpointing_steps == 0


def test_tp_check_only_for_the_engine_in_use():
    # hf run: the sglang defaults (tp_size 8) do not fail it
    cfg = load_config([], REQUIRED_SET)
    assert cfg.inference.inference_engine_type == "hf" and cfg.inference.sglang.tp_size == 8


def test_engines_must_divide_inference_gpus():
    with pytest.raises(ConfigError, match=r"inference.inference_num_gpus=3: not divisible into engines of 2 GPUs"):
        load_config([CONFIGS / "sglang_qwen3_8b.yaml"],
                    ["inference.inference_num_gpus=3", "inference.inference_num_gpus_per_engine=2",
                     "inference.sglang.tp_size=2"])


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys, caplog):
    f = write(tmp_path, "broken.yaml", "training:\n  learning_rate: 1e-4\n  seed: [1, 2\n")
    rc, out, err = dry_run(["--config", str(f)], capsys, caplog)
    assert rc == 2
    assert f"{f}:4:1: YAML syntax error: " in err  # the rest is PyYAML's (libyaml and pure Python word it differently)
    assert "expected ',' or ']'" in err
    assert "(while parsing a flow sequence started at line 3)" in err


@pytest.mark.parametrize("what", ["binary", "directory"])
def test_a_config_that_is_not_a_yaml_file_is_named_in_one_line(tmp_path, capsys, caplog, what):
    f = tmp_path / "model.safetensors"
    if what == "binary":   # e.g. a weights file given by mistake: its bytes are not UTF-8 text
        f.write_bytes(b'{"header": 1}' + bytes([0x94, 0xff, 0x00]) * 8)
    else:
        f.mkdir()
    rc, out, err = dry_run(["--config", str(f)], capsys, caplog)
    assert rc == 2 and "Traceback" not in err and out == ""
    assert err.strip() == {"binary": f"file error: --config {f}: not a YAML text file (byte 0x94 at offset 13 is "
                                     "not UTF-8 text)",
                           "directory": f"file error: --config {f}: is a directory; give a YAML file"}[what]


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.learning_rate=fast", "training.learning_rate: expected a number, got 'fast' (command line)"),
        ("training.micro_batch_size=0", "training.micro_batch_size=0: must be > 0 (command line)"),
        ("training.learning_rate=-1", "training.learning_rate=-1.0: must be > 0 (command line)"),
        ("dataset.num_proc=-3", "dataset.num_proc=-3: must be > 0 (or null) (command line)"),
        ("dataset.num_proc=0", "dataset.num_proc=0: must be > 0 (or null) (command line)"),
        ("training.gradient_checkpointing=3", "training.gradient_checkpointing: expected true or false, got 3"),
        ("inference.inference_engine_type=sglang",
         "inference.inference_engine_type='sglang': unknown value, expected one of hf, sgl, vllm; did you mean 'sgl'?"),
        ("training.attention_backend=flash", "training.attention_backend='flash': unknown value"),
        ("dataset.chat_template=qwen4", "dataset.chat_template='qwen4': unknown value"),
        ("model.target_model_path=null", "model.target_model_path: must be set, got null (command line)"),
        ("training", "override 'training' is not of the form section.key=value"),
        ("inference.sglang.log_level=verbose", "inference.sglang.log_level='verbose': unknown level, expected one "
         "of debug, info, warning, error, critical (command line)"),
        ("inference.sglang.log_requests_level=4", "inference.sglang.log_requests_level=4: must be 0, 1, 2 or 3 "
         "(detail of inference.sglang.log_requests' lines) (command line)"),
        # keys that depend on another one: refused when that one makes them do nothing
        ("training.gradient_checkpointing_steps=2", "training.gradient_checkpointing_steps=2: limits the "
         "checkpointing of training.gradient_checkpointing to the first N TTT steps, which is off; set "
         "training.gradient_checkpointing=true, or leave this null (command line)"),
        ("training.continual_training=true", "training.continual_training=True: starts from the weights of the "
         "checkpoint in training.load_path, which is not set; set training.load_path, or leave this false "
         "(command line)"),
        # GPU-direct Mooncake transfer is not built: the keys are refused, never silently ignored
        ("mooncake.enable_gpu_direct=true", "mooncake.enable_gpu_direct=True: GPU-direct transfer is not built in "
         "this store (records are copied to host memory before a put); set it to false (the default) (command line)"),
        ("mooncake.gpu_buffer_size=1GB", "mooncake.gpu_buffer_size=1073741824: sizes the device buffer of "
         "mooncake.enable_gpu_direct, which this store does not have; set it to null (the default) (command line)"),
    ],
)
def test_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [*REQUIRED_SET, override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_dist_init_addr_serves_one_sgl_engine():
    """inference.sglang.dist_init_addr is where one engine's TP ranks meet: with several engines they would all
    meet there (one would bind it, the others fail or join the wrong group), so it is refused then."""
    base = [*REQUIRED_SET, "inference.inference_engine_type=sgl", "inference.sglang.tp_size=1",
            "inference.sglang.dist_init_addr=10.0.0.5:29500"]
    assert load_config([], [*base, "inference.inference_num_gpus=1"]).inference.sglang.dist_init_addr
    with pytest.raises(ConfigError) as e:
        load_config([], [*base, "inference.inference_num_gpus=2"])
    assert str(e.value).startswith("inference.sglang.dist_init_addr='10.0.0.5:29500': is where the TP ranks of ONE "
                                   "engine meet, but this config starts 2 engines (inference.inference_num_gpus=2, "
                                   "1 per engine)")


# ---------------------------------------------------------------- original TorchSpec configs


ORIGINAL_STYLE = """
model:
  target_model_path: Qwen/Qwen3-8B
  trust_remote_code: true
  embedding_key: model.embed_tokens.weight
  lm_head_key: lm_head.weight
  target_model_backend: sglang
dataset:
  train_data_path: ../examples/data/sample_conversations.jsonl
  eval_data_path: ../examples/data/eval_conversations.jsonl
  eval_interval: 100
  chat_template: qwen
  prompt_key: conversations
  defer_tokenization: false
training:
  attention_backend: flex_attention
  micro_batch_size: 1
  draft_accumulation_steps: 1
  learning_rate: 1e-4
  lr_total_steps: null
  max_concurrent_batches: 1
  max_grad_norm: 0.5
  max_seq_length: 16384
  num_epochs: 1
  num_train_steps: 100
  prefetch_depth: 2
  save_interval: 5000
  save_per_epoch: true
  seed: 42
  training_num_gpus_per_node: 2
  training_num_nodes: 1
  ttt_length: 7
  warmup_ratio: 0.015
  gradient_checkpointing: false
  distributed_timeout_minutes: 30
inference:
  inference_engine_type: sgl
  inference_num_gpus: 1
  inference_num_gpus_per_engine: 1
  inference_num_gpus_per_node: 1
  max_sample_pool_size: 64
  inference_buffer_threshold: 32
  inference_fetch_batch: 32
  inference_batch_size: 8
  sglang:
    tp_size: 1
    mem_fraction_static: 0.7
    port: 30000
    additional_ports: 4
    dist_init_addr: null
    init_timeout: 1800
    dist_timeout: 600
    extra_args:
      model_loader_extra_config:
        enable_multithread_load: true
        num_threads: 32
      disable_flashinfer_autotune: true
      watchdog_timeout: 1800
mooncake:
  master_server_address: null
  metadata_server: null
  metadata_port: null
  protocol: tcp
  device_name: ""
  local_hostname: null
  enable_gpu_direct: false
  global_segment_size: 16GB
  local_buffer_size: 4GB
  gpu_buffer_size: null
  max_batch_size: 32
  max_seq_len: 8192
  hidden_dim: 4096
output_dir: ../outputs/qwen3-8b-single-node
cache_dir: ../cache/qwen3-8b-single-node
model_download_dir: null
debug:
  save_debug_train_data: null
  debug_train_only: false
  debug_inference_only: false
logging:
  report_to: none
  wandb_key: null
  wandb_project: train_qwen
  wandb_team: null
  wandb_group: null
  wandb_mode: online
  wandb_random_suffix: true
"""


def test_original_torchspec_style_config_loads_unchanged(tmp_path):
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    f = write(conf_dir, "orig.yaml", ORIGINAL_STYLE)
    cfg = load_config([f], [])
    assert cfg.dataset.train_data_path == str(tmp_path / "examples/data/sample_conversations.jsonl")
    assert cfg.cache_dir == str(tmp_path / "cache/qwen3-8b-single-node")
    assert cfg.mooncake.global_segment_size == 16 * 1024**3
    assert cfg.training.num_train_steps == 100
    kwargs = build_sglang_engine_kwargs(cfg)
    # extra_args win over the essential field of the same name; dicts go as JSON strings
    assert kwargs["disable_flashinfer_autotune"] is True
    assert kwargs["model_loader_extra_config"] == '{"enable_multithread_load": true, "num_threads": 32}'
    assert kwargs["tp_size"] == 1 and kwargs["mem_fraction_static"] == 0.7


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_original_backend_default_with_another_engine_loads(tmp_path, caplog, engine):
    """The original TorchSpec's target_model_backend defaults to sglang, and its configs/default.yaml writes
    `sglang`, whatever engine the run uses; the config it saves for an hf or vllm run carries both. Such a file
    must load: the disagreement is logged (naming both keys), not refused; the engine is inference_engine_type."""
    f = write(tmp_path, "saved.yaml", f"model:\n  target_model_backend: sglang\n"
                                      f"inference:\n  inference_engine_type: {engine}\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config([f], REQUIRED_SET)
    assert cfg.inference.inference_engine_type == engine
    assert ("model.target_model_backend='sglang' is the original TorchSpec's field and is not used; the engine is "
            f"inference.inference_engine_type='{engine}'") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):   # agreement, under either of its names: nothing to say
        sgl = [*REQUIRED_SET, "inference.inference_engine_type=sgl", "inference.sglang.tp_size=1"]
        load_config([f], sgl)
        load_config([f], [*sgl, "model.target_model_backend=sgl"])
    assert "target_model_backend" not in caplog.text


# ---------------------------------------------------------------- sgl.Engine kwargs


def test_engine_kwargs_layers_and_every_protected_key():
    cfg = load_config([CONFIGS / "sglang_qwen3_8b.yaml"], [])
    cfg.inference.sglang.extra_args = {k: "x" for k in PROTECTED_EXTRA_ARGS} | {"watchdog_timeout": 5}
    warnings = []
    kwargs = build_sglang_engine_kwargs(cfg, managed={"base_gpu_id": 2, "port": 31000}, warn=warnings.append)
    assert len(warnings) == len(PROTECTED_EXTRA_ARGS) == 18
    for key, msg in zip(PROTECTED_EXTRA_ARGS, warnings):
        assert f"extra_args.{key}='x' dropped" in msg
    assert "x" not in kwargs.values()
    assert kwargs["watchdog_timeout"] == 5
    assert kwargs["model_path"] == "Qwen/Qwen3-8B" and kwargs["mem_fraction_static"] == 0.7
    assert kwargs["disable_radix_cache"] is True and kwargs["enable_return_hidden_states"] is True
    assert (kwargs["base_gpu_id"], kwargs["port"]) == (2, 31000)
    assert "context_length" not in kwargs  # null: SGLang's own default
    assert "init_timeout" not in kwargs  # ours, not an sgl.Engine argument


# ---------------------------------------------------------------- saving


def test_save_resolved_config_redacts_and_reloads(tmp_path):
    cfg = load_config([CONFIGS / "sglang_kimi_k25_2node.yaml"],
                      ["logging.wandb_key=s3cr3t", "inference.sglang.extra_args.api_key=s3cr3t"])
    path = save_resolved_config(cfg, tmp_path / "run")
    text = path.read_text()
    assert "s3cr3t" not in text and text.count(REDACTED) == 2
    assert "global_segment_size: 96GB" in text
    again = load_config([path], [])
    assert again.mooncake.global_segment_size == cfg.mooncake.global_segment_size
    assert again.model == cfg.model and again.training == cfg.training


def test_dry_run_of_a_local_tiny_target_reads_its_config(tiny_target_dir, capsys, caplog):
    import json

    h = json.loads((Path(tiny_target_dir) / "config.json").read_text())["hidden_size"]
    rc, out, err = dry_run(["--config", str(CONFIGS / "default.yaml"), f"model.target_model_path={tiny_target_dir}",
                            f"dataset.train_data_path={EXAMPLE_DATA}"], capsys, caplog)
    assert rc == 0, err
    assert f"with H={h} [target config.json] = {4 * h * 2} B" in out
    assert "draft trainer memory per rank (rough)" in out


def test_cli_module_entry_point_exits_zero():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "torchspec.train_entry", "--config", "configs/sglang_qwen3_8b.yaml",
         "--dry-run", "logging.wandb_key=hunter2"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "wandb_key: '***'" in out.stdout


@pytest.mark.parametrize("name", ["qwen3_8b_eagle3", "kimi_k25_eagle3"])
def test_plan_param_count_matches_the_draft_model(name):
    """The dry run's arithmetic counts exactly the trainable parameters of our draft module."""
    import json

    import torch

    from torchspec.config.plan import draft_memory_estimate
    from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3

    path = CONFIGS / "draft_models" / f"{name}.json"
    with torch.device("meta"):
        model = LlamaForCausalLMEagle3(DraftConfig.from_json(path))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_embed = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    est = draft_memory_estimate(json.loads(path.read_text()), Config())
    assert est["trainable_params"] == trainable
    # frozen: the draft's (target) embeddings + the target lm_head, both vocab x hidden, in bf16
    assert est["frozen_target_head"] == 2 * (2 * frozen_embed + model.config.hidden_size)


def test_run_calls_the_runner_with_the_merged_config(tmp_path, monkeypatch):
    """train_entry writes nothing itself: the runner saves resolved_config.yaml once its start's checks passed
    (tests/test_output_dir.py), redacted (test_save_resolved_config_redacts_and_reloads)."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("torchspec.pipeline.runner")
    fake.run_training = calls.append
    monkeypatch.setitem(sys.modules, "torchspec.pipeline.runner", fake)
    second = write(tmp_path, "more.yaml", "training:\n  seed: 123\n")
    rc = main(["--config", str(CONFIGS / "hf_qwen3_8b.yaml"), "--config", str(second),
               f"output_dir={tmp_path / 'run'}", "logging.wandb_key=s3cr3t"])
    assert rc == 0
    (cfg,) = calls
    assert cfg.training.seed == 123 and cfg.training.micro_batch_size == 2  # both files applied
    assert cfg.logging.wandb_key == "s3cr3t"  # the runner gets the real key
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("hint", [True, False])
def test_missing_optional_dependency_is_one_line(tmp_path, monkeypatch, capsys, hint):
    """An install hint from a lazy import (e.g. inference.store=mooncake without mooncake) is one line and
    exit 2; any other ImportError is a bug and keeps its traceback."""
    import sys
    import types

    from torchspec.utils.optional import require

    def run_training(cfg):
        if hint:
            require("torchspec_no_such_module", "mooncake")
        raise ImportError("cannot import name 'x' from 'y'")

    fake = types.ModuleType("torchspec.pipeline.runner")
    fake.run_training = run_training
    monkeypatch.setitem(sys.modules, "torchspec.pipeline.runner", fake)
    argv = ["--config", str(CONFIGS / "hf_qwen3_8b.yaml"), f"output_dir={tmp_path / 'run'}"]
    if not hint:
        with pytest.raises(ImportError, match="cannot import name"):
            main(argv)
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["missing dependency: torchspec_no_such_module is needed here but is not installed (No module "
                   f"named 'torchspec_no_such_module'); install it with: {install_hint('mooncake')}"]


def test_require_names_the_extra_to_install():
    from torchspec.utils.optional import require

    assert require("json", "dev").dumps([1]) == "[1]"
    with pytest.raises(ImportError) as e:
        require("torchspec_no_such_module", "ray")
    root = Path(__file__).resolve().parents[1]
    assert f"pip install -e '{root}[ray]'" in str(e.value) and "torchspec_no_such_module" in str(e.value)


def test_interpolation_after_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("TS_TEST_DATA", str(tmp_path / "d.jsonl"))
    f = write(tmp_path, "x.yaml", "dataset:\n  train_data_path: ${oc.env:TS_TEST_DATA}\n"
                                  "  eval_data_path: ${output_dir}/eval.jsonl\n")
    cfg = load_config([f], ["model.target_model_path=m", f"output_dir={tmp_path / 'o'}"])
    assert cfg.dataset.train_data_path == str(tmp_path / "d.jsonl")
    assert cfg.dataset.eval_data_path == str(tmp_path / "o" / "eval.jsonl")


def test_loading_without_omegaconf_gives_the_same_config():
    """The GPU machine may lack omegaconf: files and overrides then go through plain PyYAML."""
    import subprocess
    import sys

    code = (
        "import sys, dataclasses, json\n"
        "{block}"
        "from torchspec.config import load_config\n"
        "c = load_config(['configs/sglang_kimi_k25_3node.yaml'], ['training.learning_rate=5e-5', "
        "'inference.sglang.extra_args.watchdog_timeout=1800', 'dataset.eval_data_path='])\n"
        "print(json.dumps(dataclasses.asdict(c)))\n"
    )
    outs = []
    for block in ("", "sys.modules['omegaconf'] = None\n"):
        r = subprocess.run([sys.executable, "-c", code.format(block=block)], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert '"learning_rate": 5e-05' in outs[1]


@pytest.mark.parametrize("name", ["default", "hf_qwen3_8b", "quickstart", *SETUP_CONFIGS])
def test_launcher_and_store_agree_with_the_dry_run_plan(name):
    """The run picks Ray and (store: auto) Mooncake exactly when the dry-run plan says several nodes; e.g.
    sglang_kimi_k25_2node: 8 inference + 8 training GPUs do not fit one 8-GPU machine."""
    from torchspec.config.plan import make_plan
    from torchspec.config.topology import multi_node_reason
    from torchspec.transfer.factory import store_type

    cfg = load_config([CONFIGS / f"{name}.yaml"], REQUIRED_SET)
    several = make_plan(cfg).nodes > 1
    assert (multi_node_reason(cfg) is not None) == several
    assert store_type(cfg) == ("mooncake" if several else "memory" if cfg.inference.colocate else "local")
    assert several == (name in ("sglang_kimi_k25_2node", "sglang_kimi_k25_3node"))


def test_dry_run_never_contacts_the_hub_for_an_uncached_hub_id(capsys, caplog, monkeypatch, tmp_path):
    """An sgl config naming a hub id that is not cached: the dry run says the prefix is found at launch and
    makes no hub request (it once spent ~23 s in the hub client's retries offline, printing its warnings)."""
    import huggingface_hub.file_download as fd

    asked = []

    def no_network(*a, **k):   # recorded (a raise here could be caught along the way)
        asked.append(a)
        raise OSError("no network in this test")

    monkeypatch.setattr(fd, "get_hf_file_metadata", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_qwen3_8b.yaml"), f"model_download_dir={tmp_path}",
                            "inference.aux_hidden_states_layers=[2,17,32]"], capsys, caplog)
    assert rc == 0, err
    hooks = next(line for line in out.splitlines() if line.startswith("  forward_hooks:"))
    assert "<the target's decoder-layer list, found at launch>.2" in hooks
    assert asked == [] and "huggingface.co" not in err


def test_dry_run_reads_a_cached_hub_snapshot_for_the_hook_names(capsys, caplog, monkeypatch, tmp_path,
                                                                tiny_target_dir):
    """A hub id already in model_download_dir: the dry run reads the snapshot's config (no network) and names
    the real decoder-layer modules."""
    import shutil

    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd, "get_hf_file_metadata", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    repo = tmp_path / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(tiny_target_dir, repo / "snapshots" / "abc123")
    rc, out, err = dry_run(["--config", str(CONFIGS / "sglang_qwen3_8b.yaml"), "model.target_model_path=acme/tiny",
                            f"model_download_dir={tmp_path}", "inference.aux_hidden_states_layers=[0,1,2]"],
                           capsys, caplog)
    hooks = next(line for line in out.splitlines() if line.startswith("  forward_hooks:"))
    assert "'model.layers.1'" in hooks and "found at launch" not in hooks, hooks
