"""Command line: train an EAGLE-3 draft model.

    python -m torchspec.train_entry --config A.yaml [--config B.yaml ...] [a.b=value ...] [--dry-run]

Configs merge as: schema defaults < configs/default.yaml < each --config in order < a.b=value.
--dry-run prints the resolved config (secrets redacted) and the placement plan, runs the checks a
real start makes (pipeline/preflight.py) and exits 0 only when they pass; it needs no GPU and
downloads nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from torchspec.config.errors import ConfigError

log = logging.getLogger("torchspec")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m torchspec.train_entry",
        description="Train an EAGLE-3 draft model. Overrides are section.key=value (OmegaConf dotlist).",
    )
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config; repeat to layer several (later files win)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and placement plan, then exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)


def _target_readable_here(cfg):
    """cfg with model.target_model_path readable without the network (a hub id: its cached snapshot), or None.
    A dry run never downloads: an uncached hub id would cost the hub client's retries and print its warnings."""
    import dataclasses

    from torchspec.utils.hub import local_copy

    path = local_copy(cfg.model.target_model_path, cfg.model_download_dir)
    if path is None:
        return None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, target_model_path=path))


def dry_run_report(cfg) -> str:
    """The text a dry run prints: redacted resolved config, engine kwargs, placement plan."""
    from torchspec.config.plan import format_plan, make_plan, target_aux_layers
    from torchspec.config.render import config_to_yaml
    from torchspec.inference.sglang import build_engine_kwargs, decoder_layers_prefix
    from torchspec.inference.sglang_args import filter_extra_args

    parts = ["# resolved config (secrets redacted)", config_to_yaml(cfg).rstrip()]
    if cfg.inference.inference_engine_type == "sgl":
        aux = target_aux_layers(cfg)
        prefix = "<the target's decoder-layer list, found at launch>"
        readable = _target_readable_here(cfg)
        if readable is not None:
            try:   # the decoder-layer list the hooks target, from the target's module tree
                prefix = decoder_layers_prefix(readable)
            except Exception:
                pass
        kwargs = build_engine_kwargs(cfg, "cuda:0", aux or [], layers_prefix=prefix,  # what engine 0 passes
                                     check_ports=False)
        if cfg.inference.sglang.port is None:
            for key in ("port", "nccl_port"):
                kwargs[key] = "<a free port, picked at launch>"
        if aux is None:
            kwargs["forward_hooks"] = ("<one hook per aux layer + the final state; ids [1, L//2-1, L-4] from the "
                                       "target's config at launch>")
        parts.append("# sgl.Engine kwargs of engine 0 (each engine gets its own base_gpu_id)")
        parts.extend(f"  {k}: {v!r}" for k, v in kwargs.items())
    else:
        filter_extra_args(cfg.inference.sglang.extra_args)  # still warn about protected keys
    parts.append(format_plan(cfg, make_plan(cfg)))
    return "\n".join(parts)


def _kind(e: Exception) -> str:
    """The first word of a user error's line: data, file (paths, permissions, disk space, corrupt files) or config."""
    from torchspec.config.errors import FileError
    from torchspec.data.errors import DataError

    return "data" if isinstance(e, DataError) else "file" if isinstance(e, FileError) else "config"


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        from torchspec.config.loader import load_config

        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from torchspec.pipeline.preflight import preflight

            print(dry_run_report(cfg))
            checks = preflight(cfg)   # the start's checks; exit 2 when a real start would refuse
            print(checks.format())
            return 0 if checks.ok else 2
        from torchspec.training.checkpoint import check_output_dir

        check_output_dir(cfg.output_dir, cfg.training.load_path)   # before anything is written
    except ConfigError as e:
        print(f"{_kind(e)} error: {e}", file=sys.stderr)
        return 2

    if cfg.logging.log_level == "debug":
        logging.getLogger("torchspec").setLevel(logging.DEBUG)
    try:
        from torchspec.pipeline.runner import run_training
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("torchspec"):
            print(f"error: the training runner is not available in this build ({e})", file=sys.stderr)
            return 1
        raise
    from torchspec.data.errors import DataError
    from torchspec.pipeline.failures import WorkerFailure
    from torchspec.transfer.base import StoreUnavailable

    try:
        run_training(cfg)
    except (ConfigError, DataError) as e:  # user-fixable: one line, no traceback
        print(f"{_kind(e)} error: {e}", file=sys.stderr)
        return 2
    except (WorkerFailure, StoreUnavailable) as e:  # a rank, engine or the store's service died: which and how
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        if "pip install" not in str(e):  # not one of our install hints: a bug, keep the traceback
            raise
        print(f"missing dependency: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
