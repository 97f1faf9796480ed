"""python -m bench [train|service|api|capacity|ddp|upload|prepare_images|stream|recipes|gpu] [--short]: one
benchmark, or all but gpu in turn. On a lent GPU: python -m bench gpu --quick (5 minutes)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("train", "service", "api", "capacity", "ddp", "upload", "prepare_images", "stream", "recipes")
GPU_ONLY = ("gpu",)  # the lent-GPU checks (bench/gpu.py): only when asked for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", nargs="?", choices=BENCHMARKS + GPU_ONLY, help="one benchmark (default: all but gpu)")
    parser.add_argument("--short", action="store_true", help="a few steps: proves the benchmarks run (CI)")
    parser.add_argument("--device", default=None, help="train/service/recipes: cpu, cuda ... (default: cuda if any)")
    parser.add_argument("--threads", type=int, default=None, help="train/service/recipes: torch threads (1 on CPU)")
    parser.add_argument("--api-key", default=None, help="api: Bearer key (default: $DDPM_API_KEY, else a new one)")
    parser.add_argument(
        "--json",
        default=None,
        help="gpu, recipes: write the results to this file as they come (gpu: default bench-gpu.json)",
    )
    parser.add_argument("--quick", action="store_true", help="gpu: the 5-minute check (a 270 s budget)")
    parser.add_argument("--budget", type=float, default=None, help="gpu: seconds after which no section starts")
    parser.add_argument("--steps", type=int, default=None, help="recipes: training steps per run (default 400)")
    parser.add_argument("--samples", type=int, default=None, help="recipes: images drawn per FID (default 1000)")
    parser.add_argument("--seeds", type=int, default=1, help="recipes: seeds 0..N-1 per recipe, figures averaged")
    parser.add_argument("--only", default=None, help="recipes: a subset, e.g. x0/linear/none,v/cosine/none")
    parser.add_argument("--cache", default=None, help="recipes: evaluation cache folder to keep (default: temporary)")
    args = parser.parse_args(argv)
    for name in [args.which] if args.which else BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        if name == "api":
            module.run(short=args.short, api_key=args.api_key)
        elif name == "recipes":
            only = args.only.split(",") if args.only else None
            try:
                module.select(only)
            except ValueError as e:
                parser.error(str(e))
            module.run(
                args.short,
                args.device,
                args.threads,
                steps=args.steps,
                samples=args.samples,
                seeds=args.seeds,
                only=only,
                json_path=args.json,
                cache_dir=args.cache,
            )
        elif name in ("capacity", "ddp", "upload", "prepare_images"):
            module.run(short=args.short)
        elif name == "gpu":
            json_path = args.json or module.DEFAULT_JSON
            module.run(args.short, args.device, quick=args.quick, json_path=json_path, budget_s=args.budget)
        else:
            module.run(short=args.short, device=args.device, threads=args.threads)


if __name__ == "__main__":
    main()
