"""The training-job spec: what a user POSTs, what the worker trains, what a checkpoint records.

Pure Pydantic (no torch, no SQL) so the API validates it and the ML core consumes it. Every
field has a default, so ``{}`` is a valid spec: a quick demo (about a minute on two CPU cores),
the ``tiny`` U-Net trained 500 steps on the ``digits`` data set at its own 8x8 size. The Ho et al.
2020 values are a preset (`ddpm-cifar10`) and the diffusion defaults.
Presets fill the model fields a user leaves out; the resolved spec (every field concrete) is
what the API returns and what each checkpoint carries in its metadata.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DatasetKind = Literal["digits", "folder", "dataset"]
ModelPreset = Literal["tiny", "ddpm-cifar10", "custom"]
BetaSchedule = Literal["linear", "cosine"]
Prediction = Literal["x0", "eps", "v"]
LossWeighting = Literal["none", "min_snr"]
EvaluationSampler = Literal["ddim", "dpm++"]
Priority = Literal["low", "normal", "high"]
# jobs.priority, the number the claim orders by (higher first).
PRIORITY_RANK: dict[str, int] = {"low": -1, "normal": 0, "high": 1}


class _Section(BaseModel):
    # extra="forbid": a misspelt field is an error, not a silently ignored default.
    # strict=True: "10" is not an int. allow_inf_nan=False: NaN/inf are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# The files a `folder` data set is made of (the worker reads them; the API checks one is there).
FOLDER_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


# The images of the built-in `digits` set (scikit-learn's 8x8 digits).
DIGITS_IMAGE_COUNT = 1797
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class DatasetSpec(_Section):
    kind: DatasetKind = Field(
        "digits",
        description="`digits` (8x8 scikit-learn digits, offline), `dataset` (one of yours: POST /v1/datasets) "
        "or `folder` (a directory on the workers, under a data root).",
    )
    path: str | None = Field(
        None, max_length=4096, description="`folder` only: a directory of PNG/JPEG images on the worker."
    )
    id: str | None = Field(
        None, pattern=UUID_PATTERN, description="`dataset` only: the id of a ready data set of yours."
    )
    image_count: int | None = Field(
        None,
        ge=1,
        description="Filled in by the service (what you send is replaced): the images in the data set, "
        "where it is known before training (`digits`, `dataset`).",
    )
    random_flip: bool = Field(
        False, description="Flip each training image horizontally with probability 1/2 (Ho et al. 2020 on CIFAR-10)."
    )
    image_size: int = Field(
        8,  # the digits' own size: no upscaling, and 4x cheaper than 16 (the {} demo's speed)
        ge=4,
        le=1024,
        description="Images are resized (shorter side) and centre-cropped to this square size.",
    )
    channels: Literal[1, 3] = Field(1, description="1 (grayscale) or 3 (RGB).")

    @model_validator(mode="after")
    def _path_matches_kind(self) -> DatasetSpec:
        if self.kind == "folder" and not self.path:
            raise ValueError("dataset.path is required when dataset.kind is 'folder'")
        if self.kind != "folder" and self.path is not None:
            raise ValueError("dataset.path is only valid when dataset.kind is 'folder'")
        if self.kind == "dataset" and not self.id:
            raise ValueError("dataset.id is required when dataset.kind is 'dataset' (an id from POST /v1/datasets)")
        if self.kind != "dataset" and self.id is not None:
            raise ValueError("dataset.id is only valid when dataset.kind is 'dataset'")
        if self.id is not None:
            object.__setattr__(self, "id", self.id.lower())  # one spelling per data set
        if self.kind == "digits":
            object.__setattr__(self, "image_count", DIGITS_IMAGE_COUNT)
        elif self.kind == "folder":
            object.__setattr__(self, "image_count", None)  # unknown until a worker reads the folder
        return self


class ModelSpec(_Section):
    """diffusers ``UNet2DModel`` hyperparameters; fields left out come from ``preset``."""

    preset: ModelPreset = Field(
        "tiny",
        description="`tiny` (CPU demos), `ddpm-cifar10` (Ho et al. 2020, 35.7M params) or `custom`.",
    )
    channels: list[int] | None = Field(
        None, min_length=1, max_length=6, description="Output channels per U-Net level (block_out_channels)."
    )
    layers_per_block: int | None = Field(None, ge=1, le=8, description="Residual blocks per level.")
    attention_resolutions: list[int] | None = Field(
        None, max_length=6, description="Feature-map sizes (pixels) whose levels use self-attention."
    )
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Dropout in the residual blocks.")
    norm_groups: int | None = Field(None, ge=1, le=64, description="GroupNorm groups; divides every level's channels.")

    @model_validator(mode="after")
    def _fill_from_preset(self) -> ModelSpec:
        if self.preset == "custom" and self.channels is None:
            raise ValueError("model.channels is required when model.preset is 'custom'")
        base = MODEL_PRESETS["tiny" if self.preset == "custom" else self.preset]
        for name, value in base.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for c in self.channels or ():
            if not 1 <= c <= 4096:
                raise ValueError(f"model.channels: each entry must be in 1..4096, got {c}")
            if c % self.norm_groups:
                raise ValueError(f"model.channels: {c} is not divisible by model.norm_groups={self.norm_groups}")
        return self


# The values each preset resolves to. `ddpm-cifar10` is the Ho et al. 2020 CIFAR-10 network
# (channels 128, multipliers 1,2,2,2, 2 res blocks, attention at 16x16, dropout 0.1).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "channels": [32, 64],
        "layers_per_block": 1,
        "attention_resolutions": [],
        "dropout": 0.0,
        "norm_groups": 8,
    },
    "ddpm-cifar10": {
        "channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "attention_resolutions": [16],
        "dropout": 0.1,
        "norm_groups": 32,
    },
}


# Our names -> diffusers' `prediction_type` and `beta_schedule`.
DIFFUSERS_PREDICTION_TYPE: dict[str, str] = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}
DIFFUSERS_BETA_SCHEDULE: dict[str, str] = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


class DiffusionSpec(_Section):
    timesteps: int = Field(1000, ge=2, le=100_000, description="T, the length of the forward chain.")
    beta_schedule: BetaSchedule = Field(
        "linear", description="`linear` (Ho et al. 2020) or `cosine` (Nichol & Dhariwal 2021)."
    )
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0, description="First beta of the linear schedule.")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="Last beta of the linear schedule.")
    prediction: Prediction = Field("x0", description="What the U-Net predicts: `x0` (clean image), `eps` or `v`.")
    loss_weighting: LossWeighting = Field(
        "none",
        description="`none` (plain MSE to the target) or `min_snr` (Hang et al. 2023: each image's loss weighted so "
        "that, counted as an error on x0, its weight is min(SNR_t, min_snr_gamma)).",
    )
    min_snr_gamma: float = Field(
        5.0, gt=0.0, le=1000.0, description="`min_snr` only: gamma, where the weight stops growing with the SNR."
    )

    def diffusers_scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.DDPMScheduler` with the same betas and parameterisation
        (what an exported pipeline's scheduler_config.json holds)."""
        return {
            "num_train_timesteps": self.timesteps,
            "beta_schedule": DIFFUSERS_BETA_SCHEDULE[self.beta_schedule],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": DIFFUSERS_PREDICTION_TYPE[self.prediction],
            "variance_type": "fixed_small",  # sigma_t^2 = beta~_t, Ho et al. 2020 §3.2
            "clip_sample": True,  # images live in [-1, 1]
        }

    @model_validator(mode="after")
    def _betas_increase(self) -> DiffusionSpec:
        if self.beta_end <= self.beta_start:
            raise ValueError(
                f"diffusion.beta_end ({self.beta_end}) must be greater than diffusion.beta_start ({self.beta_start})"
            )
        return self


class InitFromSpec(_Section):
    """Start from another job's weights (and its EMA weights), with a fresh optimizer: a fine-tune."""

    job: str = Field(pattern=UUID_PATTERN, description="The id of one of your jobs whose checkpoint to start from.")
    checkpoint: int | Literal["latest", "best"] = Field(
        "latest", description="Its checkpoint: a step, `latest` (the newest) or `best` (the lowest FID)."
    )
    step: int | None = Field(
        None,
        ge=0,
        description="Filled in by the service (what you send is replaced): the step `checkpoint` named at submit.",
    )

    @model_validator(mode="after")
    def _lower_case_id(self) -> InitFromSpec:
        object.__setattr__(self, "job", self.job.lower())  # one spelling per job
        if isinstance(self.checkpoint, int) and not 0 <= self.checkpoint <= 2**31 - 1:
            raise ValueError(f"training.init_from.checkpoint: {self.checkpoint} is not a step (0..2147483647)")
        return self


class TrainingSpec(_Section):
    # 500 steps at batch 64 draw recognisable digits with `tiny` at 8x8 (the {} demo: about a minute).
    steps: int = Field(500, ge=1, le=10_000_000, description="Optimizer steps to train for.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per step.")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="AdamW peak learning rate.")
    warmup_steps: int = Field(100, ge=0, le=10_000_000, description="Linear warm-up from 0 to learning_rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay.")
    grad_clip: float = Field(1.0, gt=0.0, le=1e6, description="Maximum global gradient norm.")
    ema_decay: float = Field(
        0.999, ge=0.0, lt=1.0, description="EMA decay of the served weights (warmed up over early steps)."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seeds weights, batches, timesteps and noise.")
    log_every: int = Field(10, ge=1, le=1_000_000, description="Steps between metric points (mean loss).")
    checkpoint_every: int = Field(
        500, ge=1, le=10_000_000, description="Steps between checkpoints; the last step always saves one."
    )
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="How many of the newest checkpoints to keep.")
    sample_every: int = Field(
        250,  # the {} demo draws one halfway and one at the end; each is 50 DDIM steps of 16 images
        ge=0,
        le=10_000_000,
        description="Steps between sample grids drawn from the EMA weights (and one at the end); 0 = none.",
    )
    sample_count: int = Field(16, ge=1, le=64, description="Images per sample grid.")
    keep_best: bool = Field(
        False,
        description="Keep the checkpoint with the best (lowest) FID besides the newest keep_checkpoints; every "
        "evaluation step then also saves a checkpoint. Needs evaluation.every > 0.",
    )
    init_from: InitFromSpec | None = Field(
        None,
        description="Fine-tune: start from the weights and EMA weights of a checkpoint of another job of yours "
        "(same model and image shape), with a fresh optimizer and step 0.",
    )
    compile: Literal["auto", "on", "off", "graphs"] = Field(
        "auto",
        description="`auto` = `graphs` for a single-GPU CUDA job, `on` for a multi-GPU one, `off` on the CPU "
        "(compiling takes minutes there). `on` = torch.compile the forward pass and loss; `graphs` = compiled, and "
        "the whole step (forward, backward, clipping, AdamW, EMA) captured once and replayed as one CUDA graph "
        "(single-GPU CUDA jobs, otherwise as `on`); `off` = eager. What fails to compile or capture falls back "
        "(graphs -> on -> off), recorded as an event on the job.",
    )
    micro_batch: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Images per forward/backward pass. Each step's batch (each GPU's share of it) is split into "
        "micro-batches whose gradients add up to the whole batch's (gradient accumulation): a batch too large for "
        "memory trains with the same maths. Default: the whole share at once.",
    )
    on_oom: Literal["halve", "fail"] = Field(
        "halve",
        description="A step that runs out of GPU memory: `halve` redoes it with the micro-batch halved (the batch, "
        "so the run's maths, unchanged), recorded as an event on the job, down to 1 image, then fails naming the "
        "sizes tried; `fail` fails at once. Single-GPU jobs: a multi-GPU job fails (set micro_batch instead).",
    )


class EvaluationSpec(_Section):
    """FID and KID of samples drawn from the EMA weights, against the training set, during training."""

    every: int | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="Steps between evaluations (and one at the end); 0 = none. Default: 0 for the `tiny` and "
        "`custom` presets, 10000 for `ddpm-cifar10`.",
    )
    samples: int | None = Field(
        None,
        ge=2,
        le=50_000,
        description="Images drawn per evaluation (FID is biased upwards at small counts: compare equal counts). "
        "Default: 1000; 5000 for `ddpm-cifar10`.",
    )
    sampler: EvaluationSampler = Field(
        "dpm++", description="`dpm++` (DPM-Solver++ 2M, Lu et al. 2022) or `ddim` (eta = 0), via diffusers."
    )
    steps: int = Field(20, ge=1, le=1000, description="Network calls per drawn image (at most diffusion.timesteps).")


# What `evaluation` resolves to per model preset: off for the CPU-sized presets (a user's images
# would need Inception features, which are slow on a CPU); on for the GPU preset.
EVALUATION_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"every": 0, "samples": 1000},
    "custom": {"every": 0, "samples": 1000},
    "ddpm-cifar10": {"every": 10_000, "samples": 5000},
}


class ResourcesSpec(_Section):
    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs the job trains on, one process each (DistributedDataParallel); training.batch_size "
        "is the global batch, split evenly across them. On a CPU worker each 'GPU' is a CPU process.",
    )
    priority: Priority = Field(
        "normal",
        description="Among waiting jobs, `high` starts before `normal` before `low`; within one priority, users "
        "take turns (the user with the fewest running jobs, then the one who started a job least recently).",
    )


class JobSpec(_Section):
    name: str | None = Field(None, max_length=200, description="A label for people; not unique.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _image_fits_network(self) -> JobSpec:
        assert self.model.channels is not None  # filled from the preset
        halvings = len(self.model.channels) - 1
        if self.dataset.image_size % (2**halvings):
            raise ValueError(
                f"dataset.image_size ({self.dataset.image_size}) must be divisible by {2**halvings}: "
                f"model.channels has {halvings + 1} levels and each level after the first halves the image"
            )
        if self.training.batch_size % self.resources.gpus:
            raise ValueError(
                f"training.batch_size ({self.training.batch_size}) must be divisible by resources.gpus "
                f"({self.resources.gpus}): each GPU takes an equal share of the global batch"
            )
        share = self.training.batch_size // self.resources.gpus
        if self.training.micro_batch is not None and self.training.micro_batch > share:
            raise ValueError(
                f"training.micro_batch ({self.training.micro_batch}) must be at most the images each GPU takes per "
                f"step (training.batch_size / resources.gpus = {share})"
            )
        self._resolve_evaluation()
        levels = [self.dataset.image_size // 2**i for i in range(halvings + 1)]
        for r in self.model.attention_resolutions or ():
            if r not in levels:
                raise ValueError(
                    f"model.attention_resolutions: {r} is not the size of any level "
                    f"(the levels are {levels} pixels for dataset.image_size={self.dataset.image_size})"
                )
        return self

    def _resolve_evaluation(self) -> None:
        evaluation, preset = self.evaluation, EVALUATION_PRESETS[self.model.preset]
        for name, value in preset.items():
            if getattr(evaluation, name) is None:
                object.__setattr__(evaluation, name, value)
        if evaluation.every and evaluation.steps > self.diffusion.timesteps:  # off: the steps are never run
            raise ValueError(
                f"evaluation.steps ({evaluation.steps}) must be at most "
                f"diffusion.timesteps ({self.diffusion.timesteps})"
            )
        if self.training.keep_best and not evaluation.every:
            raise ValueError(
                "training.keep_best needs evaluation.every > 0: the best checkpoint is the one with the best FID"
            )
