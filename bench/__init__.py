"""Benchmarks of ddpm-jobs against its anchors; each prints ratios measured side by side.

    python -m bench [train|service|api|capacity|ddp|gpu] [--short]
    make bench BENCH_ARGS="train --short"

See BENCHMARKS.md for the figures and the machine they were measured on.
"""
