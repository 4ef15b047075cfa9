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
    learn_sigma: bool = True
    grad_checkpointing: bool = False
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None


@dataclass
class DiffusionConfig:
    """Forward process used for training, and the respacing used for the periodic sample grid."""

    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    sample_steps: int = 50


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
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LatentDiTError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}, "
                             f"got {type(data).__name__}")
    unknown = [k for k in data if k not in SECTIONS and k != "name"]
    if unknown:
        raise LatentDiTError(f"{source}: unknown section '{unknown[0]}'; valid sections: "
                             f"{', '.join(SECTIONS)} (and 'name')")
    sections = {s: _build_section(cls, data.get(s), source, s) for s, cls in SECTIONS.items()}
    name = data.get("name", "")
    if not isinstance(name, str):
        raise LatentDiTError(f"{source}: field 'name': expected str, got {name!r}")
    return Config(name=name, **sections)


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``section.field=value`` into (["section", "field"], "value")."""
    if "=" not in text:
        raise LatentDiTError(f"config override {text!r}: expected section.field=value, e.g. train.lr=2e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts) or len(parts) > 2:
        raise LatentDiTError(f"config override {text!r}: expected section.field=value, e.g. train.lr=2e-4")
    return parts, raw


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides to a nested dict (values parsed with ``yaml.safe_load``;
    a field declared ``str`` takes the raw text). Unknown names raise."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for text in overrides:
        parts, raw = parse_override(text)
        if parts == ["name"]:
            data["name"] = raw
            continue
        if len(parts) != 2:
            raise LatentDiTError(f"config override {text!r}: expected section.field=value "
                                 f"(sections: {', '.join(SECTIONS)})")
        section, key = parts
        if section not in SECTIONS:
            raise LatentDiTError(f"config override {text!r}: unknown section '{section}'; valid sections: "
                                 f"{', '.join(SECTIONS)}")
        hints = _field_types(SECTIONS[section])
        if key not in hints:
            raise LatentDiTError(f"config override {text!r}: unknown field '{section}.{key}'; valid fields "
                                 f"of '{section}': {', '.join(sorted(hints))}")
        if hints[key] is str:
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as e:
                raise LatentDiTError(f"config override {text!r}: could not parse value ({e})") from e
            value = _coerce(value, hints[key], f"config override {text!r}: field '{section}.{key}'")
        sec = data.get(section)
        if not isinstance(sec, dict):
            sec = {}
        sec[key] = value
        data[section] = sec
    return data


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None), apply overrides, validate.

    ``name`` defaults to the file's stem (so the default run dir is ``results/<stem>``).
    """
    if path is None:
        data: dict[str, Any] = {}
        source = "config"
    else:
        p = Path(path).expanduser()
        source = str(p)
        if not p.is_file():
            raise LatentDiTError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise LatentDiTError(f"config file {p} is not valid YAML: {e}") from e
        if isinstance(data, dict) and "name" not in data:
            data["name"] = p.stem
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
