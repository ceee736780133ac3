"""Command line: let the target write the replies of the training data, as files.

    python -m torchspec.regenerate --config A.yaml [--config B.yaml ...] [a.b=value ...]

Writes `<output_dir>/regenerated/*.jsonl` (configs/README.md, "Regenerated replies"): the conversations of
dataset.train_data_path with every assistant turn replaced by the target's reply, with the settings of
dataset.generation and the engine of inference.inference_engine_type. Run again, it skips what is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from torchspec.config.errors import ConfigError


def main(argv: Optional[Sequence[str]] = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m torchspec.regenerate",
                                description="Replace every assistant turn of the training data by the target's reply.")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config; repeat to layer")
    p.add_argument("--device", default=None, help="where the hf engine runs (default: cuda if available, else cpu)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)
    from torchspec.data.errors import DataError

    try:
        import torch

        from torchspec.config.loader import load_config
        from torchspec.inference.regenerate_job import run_regeneration
        from torchspec.utils.paths import check_writable_dir

        cfg = load_config(args.config, args.overrides)
        check_writable_dir(cfg.output_dir)   # what a training run checks first, before anything is written
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        run_regeneration(cfg, device=device, progress=sys.stderr.isatty())
    except (ConfigError, DataError) as e:
        print(f"{type(e).__name__.replace('Error', '').lower()} error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
