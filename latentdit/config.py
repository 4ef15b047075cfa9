"""Typed training configuration: dataclasses loaded from YAML plus ``section.field=value`` overrides.

A config file has up to four sections, ``model``, ``diffusion``, ``data`` and ``train``, each
mapping onto one dataclass below. Every field can be overridden from the command line, e.g.
``train.lr=2e-4 model.name=DiT-B/2``; override values are parsed with ``yaml.safe_load`` and
checked against the field's declared type. Unknown sections or fields, ill-typed or out-of-range
values and missing files raise :class:`LatentDiTError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from latentdit.errors import LatentDiTError

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
NOISE_SCHEDULE_CHOICES = ("linear", "cosine")


@dataclass
class ModelConfig:
    """Which DiT to train. Latent size, channels and number of classes come from the latent manifest;
    set ``input_size`` / ``in_channels`` / ``num_classes`` only to assert them."""

    name: str = "DiT-S/2"
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
    warmup_steps: int = 0
    grad_clip: float = 0.0
    max_steps: int = 400_000
    max_minutes: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False      # decay min(ema_decay, (1+n)/(10+n)) after n updates: for short runs
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
# type checking of single values
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` when that is lossless and unambiguous, else raise."""

    def bad() -> LatentDiTError:
        return LatentDiTError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except LatentDiTError:
                pass
        raise bad()
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(cls: type, values: Any, source: str, section: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise LatentDiTError(f"{source}: section '{section}' must be a mapping of field: value, "
                             f"got {type(values).__name__}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise LatentDiTError(f"{source}: unknown field '{section}.{key}'; valid fields of '{section}': "
                                 f"{', '.join(sorted(hints))}")
        kwargs[key] = _coerce(value, hints[key], f"{source}: field '{section}.{key}'")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config` from a nested dict (as read from YAML), checking names and types."""
    return _config_from_dict(Config, SECTIONS, data, source)


def _config_from_dict(cls: type, table: dict[str, type], data: Any, source: str) -> Any:
    """``cls(name=..., **sections)`` from a nested dict whose sections are the dataclasses in ``table``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LatentDiTError(f"{source}: expected a mapping with sections {', '.join(table)}, "
                             f"got {type(data).__name__}")
    unknown = [k for k in data if k not in table and k != "name"]
    if unknown:
        raise LatentDiTError(f"{source}: unknown section '{unknown[0]}'; valid sections: "
                             f"{', '.join(table)} (and 'name')")
    sections = {s: _build_section(sec, data.get(s), source, s) for s, sec in table.items()}
    name = data.get("name", "")
    if not isinstance(name, str):
        raise LatentDiTError(f"{source}: field 'name': expected str, got {name!r}")
    return cls(name=name, **sections)


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``section.field=value`` into (["section", "field"], "value")."""
    if "=" not in text:
        raise LatentDiTError(f"config override {text!r}: expected section.field=value, e.g. train.lr=2e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts) or len(parts) > 2:
        raise LatentDiTError(f"config override {text!r}: expected section.field=value, e.g. train.lr=2e-4")
    return parts, raw


def apply_overrides(data: dict[str, Any], overrides: Sequence[str],
                    sections: dict[str, type] | None = None) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to a nested dict (values parsed with ``yaml.safe_load``;
    a field declared ``str`` takes the raw text). Unknown names raise. ``sections`` maps section names
    to dataclasses (default: the DiT training config's :data:`SECTIONS`)."""
    table = SECTIONS if sections is None else sections
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for text in overrides:
        parts, raw = parse_override(text)
        if parts == ["name"]:
            data["name"] = raw
            continue
        if len(parts) != 2:
            raise LatentDiTError(f"config override {text!r}: expected section.field=value "
                                 f"(sections: {', '.join(table)})")
        section, key = parts
        if section not in table:
            raise LatentDiTError(f"config override {text!r}: unknown section '{section}'; valid sections: "
                                 f"{', '.join(table)}")
        hints = _field_types(table[section])
        if key not in hints:
            raise LatentDiTError(f"config override {text!r}: unknown field '{section}.{key}'; valid fields "
                                 f"of '{section}': {', '.join(sorted(hints))}")
        if hints[key] is str:
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as e:
                raise LatentDiTError(f"config override {text!r}: could not parse the value: "
                                     f"{yaml_error_text(e, 'value')}") from e
            value = _coerce(value, hints[key], f"config override {text!r}: field '{section}.{key}'")
        sec = data.get(section)
        if not isinstance(sec, dict):
            sec = {}
        sec[key] = value
        data[section] = sec
    return data


def read_config_file(path: str | os.PathLike | None) -> tuple[Any, str]:
    """``(YAML data, source name)`` of a config file; ``({}, "config")`` for None. ``name`` defaults to
    the file's stem."""
    if path is None:
        return {}, "config"
    p = Path(path).expanduser()
    if not p.is_file():
        raise LatentDiTError(f"config file not found: {p}" if not p.exists() else
                             f"config file {p} is a folder; expected a YAML file")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise LatentDiTError(f"config file {p} is not UTF-8 text (byte {e.start}); expected a YAML file") from e
    except yaml.YAMLError as e:
        raise LatentDiTError(f"{yaml_error_text(e, str(p))} (config file {p} is not valid YAML)") from e
    if not isinstance(data, dict):
        raise LatentDiTError(f"config file {p}: expected a mapping of sections (section: {{field: value}}) at "
                             f"the top level, got {type(data).__name__}")
    if "name" not in data:
        data["name"] = p.stem
    return data, str(p)


def yaml_error_text(e: Exception, source: str) -> str:
    """``source:line:column: problem`` (one line) for a YAML parse error; PyYAML's own text spans several lines."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} from line {context_mark.line + 1})"
    elif context:
        problem += f" ({context})"
    return f"{where}: {problem}"


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None), apply overrides, validate.

    ``name`` defaults to the file's stem (so the default run dir is ``results/<stem>``).
    """
    data, source = read_config_file(path)
    data = apply_overrides(data, overrides)
    cfg = config_from_dict(data, source)
    validate_config(cfg, source)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (loadable again with :func:`load_config`)."""
    from latentdit.io import atomic_write

    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# --------------------------------------------------------------------------------------------
# value checks
# --------------------------------------------------------------------------------------------

def validate_config(cfg: Config, source: str = "config") -> None:
    """Range and choice checks that do not depend on the data (those live in the trainer)."""
    from latentdit.diffusion.flow import LOSS_WEIGHTINGS, PREDICTIONS, TIME_SAMPLINGS
    from latentdit.diffusion.process import PROCESSES
    from latentdit.models.dit import MLPS, NORMS, POSITIONS

    def fail(name: str, expected: str, got: Any) -> None:
        raise LatentDiTError(f"{source}: field '{name}': expected {expected}, got {got!r}")

    m, d, t = cfg.model, cfg.diffusion, cfg.train
    if not m.name:
        fail("model.name", "a DiT name such as DiT-S/2", m.name)
    if not 0.0 <= m.class_dropout_prob < 1.0:
        fail("model.class_dropout_prob", "a probability in [0, 1)", m.class_dropout_prob)
    for name in ("input_size", "in_channels", "num_classes"):
        v = getattr(m, name)
        if v is not None and v < 1:
            fail(f"model.{name}", "a positive integer or null", v)
    if d.noise_schedule not in NOISE_SCHEDULE_CHOICES:
        fail("diffusion.noise_schedule", f"one of {', '.join(NOISE_SCHEDULE_CHOICES)}", d.noise_schedule)
    if d.diffusion_steps < 1:
        fail("diffusion.diffusion_steps", "a positive integer", d.diffusion_steps)
    if not 1 <= d.sample_steps <= d.diffusion_steps:
        fail("diffusion.sample_steps", f"an integer in [1, diffusion.diffusion_steps={d.diffusion_steps}]",
             d.sample_steps)
    for name, choices in (("process", PROCESSES), ("prediction", PREDICTIONS),
                          ("time_sampling", TIME_SAMPLINGS), ("loss_weighting", LOSS_WEIGHTINGS)):
        if getattr(d, name) not in choices:
            fail(f"diffusion.{name}", f"one of {', '.join(choices)}", getattr(d, name))
    if not math.isfinite(d.logit_mean):
        fail("diffusion.logit_mean", "a finite number", d.logit_mean)
    for name in ("logit_std", "time_shift"):
        if not (math.isfinite(getattr(d, name)) and getattr(d, name) > 0):
            fail(f"diffusion.{name}", "a finite number > 0", getattr(d, name))
    if d.process == "flow" and m.learn_sigma:
        fail("model.learn_sigma", "false with diffusion.process=flow (the flow process learns no variance)",
             m.learn_sigma)
    for name, choices in (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS)):
        if getattr(m, name) not in choices:
            fail(f"model.{name}", f"one of {', '.join(choices)}", getattr(m, name))
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
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        fail("train.betas", "two numbers in [0, 1), e.g. [0.9, 0.999]", t.betas)
    if not 0.0 <= t.ema_decay <= 1.0:
        fail("train.ema_decay", "a number in [0, 1]", t.ema_decay)
    if t.mixed_precision not in MIXED_PRECISION_CHOICES:
        fail("train.mixed_precision", f"one of {', '.join(MIXED_PRECISION_CHOICES)}", t.mixed_precision)
    if t.fsdp and t.mixed_precision == "fp16":
        fail("train.mixed_precision", "no or bf16 with train.fsdp=true (fp16 would need a gradient scaler)",
             t.mixed_precision)
    if t.keep_last < 1 and t.milestone_every == 0:
        fail("train.keep_last", "at least 1 (or set train.milestone_every)", t.keep_last)


# --------------------------------------------------------------------------------------------
# VAE training (tools/train_vae.py): the same file format and override syntax, its own sections
# --------------------------------------------------------------------------------------------

VAE_RECON_LOSSES = ("l1", "l2")


@dataclass
class VAEDataConfig:
    """Training images (what ``tools/extract.py --data`` takes) and the held-out split."""

    source: str = "fashion-mnist"   # "fashion-mnist", an ImageNet-layout folder or a flat folder
    image_size: int = 64
    crop_size: int = 32             # random training crops (the model is fully convolutional); 0 = whole image
    val_fraction: float = 0.01      # held out by a seeded permutation when the data has no val/ split
    split_seed: int = 0             # seed of that permutation (independent of train.seed)
    max_train_images: int = 0       # 0 = every training image
    num_workers: int = 0            # loader processes for the one-off decode of the images


@dataclass
class VAEModelConfig:
    """The diffusers ``AutoencoderKL`` (KL-f8 with 4 latent channels by default)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8        # 4-8 channels per group; one per group (32 on 32 channels) acts as an instance
                                    # norm: flat colour and the image's level are lost (see configs/vae_*.yaml)
    mid_block_add_attention: bool = False
    init_from: str = ""             # a VAE (bundled name, folder, hub id) whose weights start the run


@dataclass
class VAELossConfig:
    """Reconstruction + KL, an optional frequency term, and a PatchGAN hinge loss after ``disc_start``."""

    recon: str = "l1"
    kl_weight: float = 1e-6         # on the KL summed per image, relative to the summed reconstruction loss
    fft_weight: float = 0.0         # L1 between 2-D spectra (orthonormal FFT), relative to the reconstruction
    disc_start: int = 0             # first step with the GAN term and discriminator updates
    disc_weight: float = 0.0        # 0: no discriminator; else factor on the adaptive weight
    disc_max_weight: float = 1e4    # clamp of the adaptive weight
    disc_layers: int = 3            # stride-2 layers of the PatchGAN
    disc_channels: int = 64


@dataclass
class VAEOptimConfig:
    """Optimisation and bookkeeping of a VAE run. Step counts are optimizer steps."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    disc_lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05      # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0          # 0 disables
    seed: int = 0
    sample_every: int = 250         # reconstruction grid of held-out images (0 disables)
    ckpt_every: int = 250
    keep_last: int = 2
    stats_images: int = 2048        # training images whose latents give the scaling factor and per-channel stats
    eval_images: int = 1000         # held-out images for the PSNR in the model card
    eval_check_images: int = 256    # smaller subset whose PSNR the test suite re-checks


@dataclass
class VAEConfig:
    """The whole resolved VAE training configuration."""

    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: VAEOptimConfig = field(default_factory=VAEOptimConfig)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VAE_SECTIONS: dict[str, type] = {
    "data": VAEDataConfig,
    "model": VAEModelConfig,
    "loss": VAELossConfig,
    "train": VAEOptimConfig,
}


def load_vae_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> VAEConfig:
    """Load a VAE training config (YAML sections ``data``, ``model``, ``loss``, ``train``), apply
    ``section.field=value`` overrides, validate."""
    data, source = read_config_file(path)
    data = apply_overrides(data, overrides, VAE_SECTIONS)
    cfg = vae_config_from_dict(data, source)
    return cfg


def vae_config_from_dict(data: Any, source: str = "config") -> VAEConfig:
    """A validated :class:`VAEConfig` from a nested dict (as read from YAML or a run's saved config)."""
    cfg = _config_from_dict(VAEConfig, VAE_SECTIONS, data, source)
    validate_vae_config(cfg, source)
    return cfg


def validate_vae_config(cfg: VAEConfig, source: str = "config") -> None:
    """Range and choice checks of a VAE training config."""

    def fail(name: str, expected: str, got: Any) -> None:
        raise LatentDiTError(f"{source}: field '{name}': expected {expected}, got {got!r}")

    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    if not d.source:
        fail("data.source", "'fashion-mnist' or an image folder", d.source)
    if not m.block_out_channels or any(c < 1 or c % max(1, m.norm_num_groups) for c in m.block_out_channels):
        fail("model.block_out_channels", f"positive multiples of model.norm_num_groups={m.norm_num_groups}",
             m.block_out_channels)
    factor = 2 ** (len(m.block_out_channels) - 1)
    if d.image_size < factor or d.image_size % factor:
        fail("data.image_size", f"a positive multiple of the downsampling factor {factor}", d.image_size)
    if d.crop_size and (d.crop_size % factor or d.crop_size > d.image_size):
        fail("data.crop_size", f"0 or a multiple of {factor} no larger than data.image_size={d.image_size}",
             d.crop_size)
    if not 0.0 <= d.val_fraction < 1.0:
        fail("data.val_fraction", "a fraction in [0, 1)", d.val_fraction)
    for name, v in (("data.split_seed", d.split_seed), ("data.max_train_images", d.max_train_images),
                    ("data.num_workers", d.num_workers), ("loss.disc_start", lo.disc_start),
                    ("train.warmup_steps", t.warmup_steps), ("train.seed", t.seed),
                    ("train.sample_every", t.sample_every)):
        if v < 0:
            fail(name, "an integer >= 0", v)
    for name, v in (("model.layers_per_block", m.layers_per_block), ("model.latent_channels", m.latent_channels),
                    ("model.norm_num_groups", m.norm_num_groups), ("loss.disc_layers", lo.disc_layers),
                    ("loss.disc_channels", lo.disc_channels), ("train.steps", t.steps),
                    ("train.batch_size", t.batch_size), ("train.ckpt_every", t.ckpt_every),
                    ("train.keep_last", t.keep_last), ("train.stats_images", t.stats_images),
                    ("train.eval_images", t.eval_images)):
        if v < 1:
            fail(name, "a positive integer", v)
    if lo.recon not in VAE_RECON_LOSSES:
        fail("loss.recon", f"one of {', '.join(VAE_RECON_LOSSES)}", lo.recon)
    for name, v in (("loss.kl_weight", lo.kl_weight), ("loss.fft_weight", lo.fft_weight),
                    ("loss.disc_weight", lo.disc_weight), ("loss.disc_max_weight", lo.disc_max_weight),
                    ("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip)):
        if not math.isfinite(v) or v < 0:
            fail(name, "a finite number >= 0", v)
    for name, v in (("train.lr", t.lr), ("train.disc_lr", t.disc_lr)):
        if not math.isfinite(v) or v <= 0:
            fail(name, "a number > 0", v)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        fail("train.min_lr_ratio", "a number in [0, 1]", t.min_lr_ratio)
    if not 1 <= t.eval_check_images <= t.eval_images:
        fail("train.eval_check_images", f"an integer in [1, train.eval_images={t.eval_images}]", t.eval_check_images)
