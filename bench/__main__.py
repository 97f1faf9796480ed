"""python -m bench [train|service|api|capacity|ddp|upload|prepare_images|stream|gpu] [--short]: one benchmark,
or all but gpu in turn."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

BENCHMARKS = ("train", "service", "api", "capacity", "ddp", "upload", "prepare_images", "stream")
GPU_ONLY = ("gpu",)  # the lent-GPU checks (bench/gpu.py): only when asked for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="?", choices=BENCHMARKS + GPU_ONLY, help="one benchmark (default: all but gpu)")
    parser.add_argument("--short", action="store_true", help="a few steps: proves the benchmarks run (CI)")
    parser.add_argument("--device", default=None, help="train/service: cpu, cuda ... (default: cuda if any)")
    parser.add_argument("--threads", type=int, default=None, help="train/service: torch threads (default: 1 on CPU)")
    parser.add_argument("--api-key", default=None, help="api: Bearer key (default: $DDPM_API_KEY, else a new one)")
    parser.add_argument("--json", default=None, help="gpu: also write the results to this file")
    args = parser.parse_args(argv)
    for name in [args.which] if args.which else BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        if name == "api":
            module.run(short=args.short, api_key=args.api_key)
        elif name in ("capacity", "ddp", "upload", "prepare_images"):
            module.run(short=args.short)
        else:
            results = module.run(short=args.short, device=args.device, threads=args.threads)
            if args.json and name == "gpu":
                Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
