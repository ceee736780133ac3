"""The regeneration job: the training data's conversations, their replies written by the target, into
`<output_dir>/regenerated/` (one JSONL per source file, appended group by group and resumable).

Used by `python -m torchspec.regenerate` and by a training run with `dataset.regenerate: true`, which
trains on the folder this job fills (and finds complete in later epochs and on resume).

Files in the folder:
  <source stem>.jsonl          {<dataset.prompt_key>: [messages], "regenerated_from": id, "truncated": bool}
  <source stem>.dropped.txt    ids of conversations dropped (on_truncated: drop), one a line
  settings.yaml                target, chat template, generation settings, sources, counts
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from torchspec.config.errors import ConfigError

log = logging.getLogger("torchspec.regenerate")

FOLDER = "regenerated"
SETTINGS = "settings.yaml"
# Generation settings that change the replies (batch_size only changes how they are asked for ... and, with
# sampling, which seed a reply gets; it is recorded but not compared).
_COMPARED = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "on_truncated")


def regenerated_dir(cfg) -> Path:
    return Path(cfg.output_dir) / FOLDER


def build_generator(cfg, tokenizer, device: torch.device | str = "cpu"):
    """The generator of inference.inference_engine_type, loaded for generation alone."""
    kind = cfg.inference.inference_engine_type
    device = torch.device(device)
    from torchspec.inference import generate as G

    if kind == "hf":
        from torchspec.inference.base import compute_dtype
        from torchspec.inference.hf import load_target

        model = load_target(cfg.model.target_model_path, compute_dtype(device), device,
                            trust_remote_code=bool(cfg.model.trust_remote_code))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return G.HFGenerator(model, pad if pad is not None else 0)
    if kind == "vllm":
        from torchspec.inference.vllm import VLLMEngineError, build_llm_kwargs

        try:
            import vllm
        except ModuleNotFoundError:
            raise VLLMEngineError("inference.inference_engine_type='vllm' needs vllm installed") from None
        kwargs = build_llm_kwargs(cfg, device, [], "")
        for key in ("speculative_config", "kv_transfer_config"):   # the hidden-state capture: not for generation
            kwargs.pop(key)
        kwargs["max_model_len"] = int(cfg.training.max_seq_length) + int(cfg.dataset.generation.max_new_tokens)
        return G.VLLMGenerator(vllm.LLM(**kwargs))
    if kind == "sgl":
        from torchspec.inference.sglang import build_engine_kwargs
        from torchspec.utils.optional import require

        sgl = require("sglang", "sglang")
        kwargs = build_engine_kwargs(cfg, device, [])
        kwargs.pop("forward_hooks", None)   # the hidden-state capture: not for generation
        return G.SGLGenerator(sgl.Engine(**kwargs))
    raise ConfigError(f"inference.inference_engine_type={kind!r}: no generator for this engine")


def _settings(cfg, sources) -> dict:
    return {"target_model_path": str(cfg.model.target_model_path), "chat_template": cfg.dataset.chat_template,
            "generation": dataclasses.asdict(cfg.dataset.generation), "sources": [str(s) for s in sources]}


def _check_same_settings(path: Path, want: dict) -> None:
    import yaml

    have = yaml.safe_load(path.read_text()) or {}
    pairs = [("model.target_model_path", have.get("target_model_path"), want["target_model_path"]),
             ("dataset.chat_template", have.get("chat_template"), want["chat_template"])]
    pairs += [(f"dataset.generation.{k}", (have.get("generation") or {}).get(k), want["generation"][k])
              for k in _COMPARED]
    for key, old, new in pairs:
        if old != new:
            raise ConfigError(f"{key}={new!r}: {path.parent} holds replies generated with {key}={old!r}; "
                              "use another output_dir (or delete that folder) to generate them again")


def _done_ids(path: Path) -> set[str]:
    """Ids already written to a JSONL of this job; a last line cut by a crash is removed from the file."""
    if not path.exists():
        return set()
    done, good = set(), 0
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                done.add(json.loads(raw)["regenerated_from"])
            except (ValueError, KeyError):
                break
            good += len(raw)
    if good != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return done


def _append(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())


def run_regeneration(cfg, tokenizer=None, generator=None, device: torch.device | str = "cpu",
                     progress: bool = True) -> dict:
    """Generate what is missing in `<output_dir>/regenerated/`; returns the counts (also in settings.yaml)."""
    import yaml
    from tqdm.auto import tqdm

    from torchspec.data.dataset import load_tokenizer
    from torchspec.data.formats import load_conversations, resolve_files
    from torchspec.data.regenerate import TurnPrompter, regenerate
    from torchspec.data.templates import get_template
    from torchspec.utils.hub import resolve_hub_ids

    # hub ids -> local snapshot folders in model_download_dir, as a training run does first (already done there);
    # the generator loads the whole target
    resolve_hub_ids(cfg, full_weights=True)
    ds, gen = cfg.dataset, cfg.dataset.generation
    files = resolve_files(ds.train_data_path)
    out_dir = regenerated_dir(cfg)
    settings = _settings(cfg, files)
    if (out_dir / SETTINGS).exists():
        _check_same_settings(out_dir / SETTINGS, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SETTINGS).write_text(yaml.safe_dump(settings, sort_keys=False))

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    prompter = TurnPrompter(get_template(ds.chat_template, tokenizer), tokenizer)
    stems: dict[str, int] = {}
    todo = []
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
        stem = f.stem if stems[f.stem] == 1 else f"{f.stem}.{stems[f.stem]}"
        convs = load_conversations([f], ds.prompt_key)
        target, dropped = out_dir / f"{stem}.jsonl", out_dir / f"{stem}.dropped.txt"
        done = _done_ids(target) | (set(dropped.read_text().split()) if dropped.exists() else set())
        todo.append((target, dropped, convs, [c for c in convs if c.sample_id not in done]))

    counts = {"conversations": sum(len(c) for _, _, c, _ in todo), "already_written": 0, "written": 0,
              "dropped": 0, "truncated": 0, "cut": 0, "generated_tokens": 0, "seconds": 0.0}
    counts["already_written"] = counts["conversations"] - sum(len(t) for *_, t in todo)
    missing = counts["conversations"] - counts["already_written"]
    built = missing and generator is None
    if built:
        generator = build_generator(cfg, tokenizer, device)
    bar = tqdm(total=counts["conversations"], initial=counts["already_written"], desc="regenerating",
               unit="conv", disable=not progress)
    t0 = time.perf_counter()
    try:
        for target, dropped, _, convs in todo:
            for group in regenerate(convs, prompter, generator, gen, max_prompt_tokens=cfg.training.max_seq_length):
                lines, gone = [], []
                for r in group:
                    counts["generated_tokens"] += r.generated_tokens
                    counts["truncated"] += r.truncated
                    counts["cut"] += r.cut
                    if r.dropped:
                        gone.append(r.sample_id + "\n")
                        continue
                    rec = {ds.prompt_key: r.messages, "regenerated_from": r.sample_id, "truncated": r.truncated}
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                _append(target, lines)
                _append(dropped, gone)
                counts["written"] += len(lines)
                counts["dropped"] += len(gone)
                bar.update(len(group))
                rate = counts["generated_tokens"] / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s")
    finally:
        bar.close()
        if built:   # released here: a training run needs the device (and vLLM's / SGLang's processes gone)
            generator.close()
        counts["seconds"] = round(time.perf_counter() - t0, 3)
        (out_dir / SETTINGS).write_text(yaml.safe_dump({**settings, "counts": counts}, sort_keys=False))
    rate = counts["generated_tokens"] / counts["seconds"] if counts["seconds"] > 0 else 0.0
    log.info("regenerated %d conversations (%d already written, %d dropped as truncated, %d truncated kept) "
             "into %s: %d tokens generated, %.0f tokens/s", counts["written"], counts["already_written"],
             counts["dropped"], counts["truncated"] - counts["dropped"], out_dir, counts["generated_tokens"], rate)
    return counts


def regenerate_for_training(cfg, tokenizer, progress: bool = True):
    """dataset.regenerate: true in a training run: fill `<output_dir>/regenerated/` (only what is missing, so a
    resumed run or a later run on the same output_dir generates nothing again) and return the config whose
    dataset.train_data_path is that folder. The target is loaded for generation and released before training."""
    import gc

    from torchspec.config.origins import origin_of, set_origins

    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_regeneration(cfg, tokenizer, device=device, progress=progress)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    out = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, train_data_path=str(regenerated_dir(cfg))))
    set_origins(out, {**getattr(cfg, "_origins", {}),
                      "dataset.train_data_path": f"regenerated from {origin_of(cfg, 'dataset.train_data_path')}"})
    return out
