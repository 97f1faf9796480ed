"""FID and KID of samples during training: the feature networks, the statistics and their cache.

Import-free like `worker.ddpm`: `cache` (the cache protocol and `EvaluationSetup`, no torch) is
what the worker imports to wire a run; `evaluate.Evaluator` is what the training loop runs.

- `cache.py`: where reference statistics and the digits classifier are kept (bytes by name).
- `features.py`: loading a TorchScript feature network, checked against its sha256 first.
- `digits.py`: the small classifier whose features stand in for Inception on the 8x8 digits.
- `metrics.py`: the Fréchet distance and KID, in float64.
- `evaluate.py`: one run's evaluator (reference statistics once, then samples -> FID, KID).
"""
