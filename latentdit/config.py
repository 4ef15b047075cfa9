"""The DiT run's configuration: its schema (dataclasses) and value checks.

A config file has up to four sections, ``model``, ``diffusion``, ``data`` and ``train``, each
mapping onto one dataclass below. Every field can be overridden from the command line, e.g.
``train.lr=2e-4 model.name=DiT-B/2`` (loading, overrides and type checks: :mod:`latentdit.typed_config`).
Unknown sections or fields, ill-typed or out-of-range values and missing files raise
:class:`LatentDiTError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from latentdit import typed_config
from latentdit.errors import LatentDiTError

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class ModelConfig:
    """Which DiT to train. Latent size, channels and number of classes come from the latent manifest;
    set ``input_size`` / ``in_channels`` / ``num_classes`` only to assert them."""

    name: str = "DiT-S/2"
    # the named size's numbers, changed (a model sized for a compute budget): 0 keeps the name's value;
    # the weights record the resolved numbers
    depth: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    patch_size: int = 0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True      # must be false with diffusion.process=flow (no variance to learn)
    grad_checkpointing: bool = False
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    # block options; the defaults are the DiT paper's blocks (released checkpoints load bit-exactly)
    norm: str = "layernorm"       # layernorm | rmsnorm (block and final norms, no affine in either)
    mlp: str = "gelu"             # gelu (tanh GELU MLP) | swiglu (SwiGLU, 2/3 of the hidden width)
    pos: str = "sincos"           # sincos (absolute 2-D table) | rope2d (2-D rotary on q/k, no table)
    qk_norm: bool = False         # RMSNorm with a learned scale on queries and keys, per head
    internal_block: int | None = None   # Internal Guidance: a second output head after this block (0-based)


@dataclass
class DiffusionConfig:
    """Forward process used for training, and the step count of the periodic sample grid.

    ``process: ddpm`` is the DiT paper's Gaussian diffusion (``noise_schedule``, ``diffusion_steps``);
    ``process: flow`` is the linear interpolant ``x_t = (1 − t)·x0 + t·ε``, t ∈ [0, 1], trained with the
    velocity loss (the other fields below apply to it only)."""

    process: str = "ddpm"             # ddpm | flow
    noise_schedule: str = "linear"    # ddpm: beta schedule
    diffusion_steps: int = 1000       # ddpm: number of training timesteps
    sample_steps: int = 50
    prediction: str = "v"             # flow: v (velocity ε − x0) | x (the model predicts x0)
    time_sampling: str = "uniform"    # flow: uniform | logit_normal training times
    logit_mean: float = 0.0           # flow, logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0            # flow, logit_normal: its standard deviation
    time_shift: float = 1.0           # flow: t' = s·t / (1 + (s − 1)·t); 1 = no shift
    loss_weighting: str = "none"      # flow: none | min_snr (weight on the per-sample velocity loss)


@dataclass
class DataConfig:
    """Latent shards written by ``tools/extract.py`` (a folder with ``manifest.json``)."""

    latents: str = ""
    num_workers: int = 0
    flip: bool = True


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging. Step counts are optimizer steps."""

    global_batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    # adamw | muon: Muon (orthogonalised momentum, muon_momentum) for the attention and MLP matrices of the
    # transformer blocks, AdamW (betas, adam_eps) for the rest; lr means the same for both
    optimizer: str = "adamw"
    muon_momentum: float = 0.95
    warmup_steps: int = 0
    # after the warm-up: constant | cosine (to min_lr_ratio·lr at the end of the run) | wsd (constant, then
    # linear to min_lr_ratio·lr over the last decay_fraction of the run). The run's length is max_steps, or
    # its max_minutes budget when it has one (then the schedule follows the fraction of the budget used)
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2
    grad_clip: float = 0.0
    max_steps: int = 400_000
    max_minutes: float = 0.0      # time budget; a resumed run continues it
    ema_decay: float = 0.9999
    ema_warmup: bool = False      # decay min(ema_decay, (1+n)/(10+n)) after n updates: for short runs
    # > 0: a power-function EMA (EDM2) whose average spans this relative std of the run so far, in place
    # of ema_decay / ema_warmup (leave those at their defaults); 0 = off
    ema_sigma_rel: float = 0.0
    mixed_precision: str = "no"
    compile: bool = False
    fsdp: bool = False            # shard params, grads and AdamW state across processes (FSDP2), for L/XL
    tf32: bool = True
    seed: int = 0
    ckpt_every: int = 50_000
    keep_last: int = 2
    milestone_every: int = 0
    log_every: int = 100
    tensorboard: bool = True
    sample_every: int = 0
    sample_cfg_scale: float = 4.0
    sample_num_classes: int = 4
    sample_num_seeds: int = 4
    results_dir: str = "results"
    run_dir: str = ""
    # representation regularisers (latentdit.training.regularizers); weight 0 = off
    layersync_weight: float = 0.0         # LayerSync: λ · −cos(tokens of block source, sg(tokens of block target))
    layersync_blocks: list[int] = field(default_factory=list)   # [source, target], 0-based, source < target
    dispersive_weight: float = 0.0        # dispersive loss (InfoNCE without positives) on one block's tokens
    dispersive_block: int | None = None   # 0-based block index
    dispersive_tau: float = 1.0           # temperature τ
    dispersive_distance: str = "l2"       # l2 (squared distance / dimension) | cosine (−cosine similarity)
    internal_loss_weight: float = 0.5     # λ of the internal head's diffusion loss (with model.internal_block)


@dataclass
class Config:
    """The whole resolved training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def resolved_run_dir(self) -> Path:
        """``train.run_dir`` if set, else ``<train.results_dir>/<name>``."""
        if self.train.run_dir:
            return Path(self.train.run_dir).expanduser()
        return Path(self.train.results_dir).expanduser() / (self.name or "run")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "data": DataConfig,
    "train": TrainConfig,
}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None), apply overrides, validate.

    ``name`` defaults to the file's stem (so the default run dir is ``results/<stem>``).
    """
    return typed_config.load(Config, SECTIONS, path, overrides, validate_config)


def config_from_dict(data: Any, source: str = "config") -> Config:
    """Build a :class:`Config` from a nested dict (as read from YAML), checking names and types."""
    return typed_config.config_from_dict(Config, SECTIONS, data, source)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (loadable again with :func:`load_config`)."""
    from latentdit.io import atomic_write

    with atomic_write(path, "w") as f:
        f.write(typed_config.to_yaml(cfg))


# --------------------------------------------------------------------------------------------
# value checks
# --------------------------------------------------------------------------------------------

def model_arguments(m: ModelConfig) -> dict[str, Any]:
    """The model section as :class:`~latentdit.models.dit.DiT` arguments, the named architecture resolved
    (those from the data, ``input_size`` / ``in_channels`` / ``num_classes``, only where the section states them)."""
    from latentdit.models.registry import resolve_arch

    stated = {k: getattr(m, k) for k in ("input_size", "in_channels", "num_classes") if getattr(m, k) is not None}
    return dict(resolve_arch(m.name, m.depth, m.hidden_size, m.num_heads, m.patch_size), **stated,
                class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma,
                grad_checkpointing=m.grad_checkpointing, norm=m.norm, mlp=m.mlp, pos=m.pos, qk_norm=m.qk_norm,
                internal_block=m.internal_block)


def validate_config(cfg: Config, source: str = "config") -> None:
    """Check every setting that does not depend on the data (those the trainer checks against the latents).

    The model, the diffusion process and the LR schedule check their own settings (their messages name the
    field); they are asked here, so a bad value stops a run before any work. What is left here belongs to
    the config: ranges of the trainer's own fields and rules that join fields of different parts (the EMA
    settings are checked by :mod:`latentdit.training.ema` when the trainer starts, before it reads data)."""
    from latentdit.diffusion import build_process
    from latentdit.engine.schedule import check_schedule
    from latentdit.models.dit import check_arguments

    def fail(name: str, expected: str, got: Any) -> None:
        raise typed_config.field_error(source, name, expected, got)

    m, d, t = cfg.model, cfg.diffusion, cfg.train
    for name in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(m, name) < 0:
            fail(f"model.{name}", "an integer >= 1, or 0 for the value of model.name", getattr(m, name))
    try:
        not_checked = ("learn_sigma", "grad_checkpointing")
        check_arguments(**{k: v for k, v in model_arguments(m).items() if k not in not_checked})
        build_process(d).out_channels(1, m.learn_sigma)  # the flow process refuses a learned σ
        check_schedule(t.lr_schedule, t.min_lr_ratio, t.decay_fraction)
    except LatentDiTError as e:
        raise LatentDiTError(f"{source}: {e}") from None
    if d.process == "ddpm" and not 1 <= d.sample_steps <= d.diffusion_steps:
        fail("diffusion.sample_steps", f"an integer in [1, diffusion.diffusion_steps={d.diffusion_steps}]",
             d.sample_steps)
    if d.sample_steps < 1:
        fail("diffusion.sample_steps", "a positive integer", d.sample_steps)
    if cfg.data.num_workers < 0:
        fail("data.num_workers", "an integer >= 0", cfg.data.num_workers)
    for name in ("global_batch_size", "grad_accum", "max_steps", "ckpt_every", "log_every",
                 "sample_num_classes", "sample_num_seeds"):
        if getattr(t, name) < 1:
            fail(f"train.{name}", "a positive integer", getattr(t, name))
    for name in ("warmup_steps", "keep_last", "milestone_every", "sample_every", "seed"):
        if getattr(t, name) < 0:
            fail(f"train.{name}", "an integer >= 0", getattr(t, name))
    for name in ("lr", "weight_decay", "adam_eps", "grad_clip", "max_minutes", "sample_cfg_scale"):
        v = getattr(t, name)
        if not math.isfinite(v) or v < 0:
            fail(f"train.{name}", "a finite number >= 0", v)
    if t.lr <= 0:
        fail("train.lr", "a number > 0", t.lr)
    if t.optimizer not in OPTIMIZERS:
        fail("train.optimizer", f"one of {', '.join(OPTIMIZERS)}", t.optimizer)
    if t.optimizer == "muon" and t.fsdp:
        fail("train.optimizer", "adamw with train.fsdp=true (Muon orthogonalises whole matrices, FSDP shards them)",
             t.optimizer)
    if not 0.0 <= t.muon_momentum < 1.0:
        fail("train.muon_momentum", "a number in [0, 1)", t.muon_momentum)
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        fail("train.betas", "two numbers in [0, 1), e.g. [0.9, 0.999]", t.betas)
    if t.ema_sigma_rel != 0 and t.ema_warmup:
        fail("train.ema_warmup", "false with train.ema_sigma_rel > 0 (the power EMA sets every decay)", t.ema_warmup)
    if t.ema_sigma_rel != 0 and t.ema_decay != TrainConfig.ema_decay:
        fail("train.ema_decay", f"the default {TrainConfig.ema_decay} (unused) with train.ema_sigma_rel > 0",
             t.ema_decay)
    if t.mixed_precision not in MIXED_PRECISION_CHOICES:
        fail("train.mixed_precision", f"one of {', '.join(MIXED_PRECISION_CHOICES)}", t.mixed_precision)
    if t.fsdp and t.mixed_precision == "fp16":
        fail("train.mixed_precision", "no or bf16 with train.fsdp=true (fp16 would need a gradient scaler)",
             t.mixed_precision)
    if t.keep_last < 1 and t.milestone_every == 0:
        fail("train.keep_last", "at least 1 (or set train.milestone_every)", t.keep_last)
