"""The ML core of ddpm-jobs: schedule, U-Net, data, the training loop and its live state, sampling, checkpoints.

Kept import-free on purpose: import the module you need (``worker.ddpm.checkpoint``,
``worker.ddpm.trainer``...), so reading a checkpoint's metadata does not load the trainer.
"""
