"""Guided sampling from a trained DiT: load weights, parse class labels, run a sampler, decode.

The pieces a sampling command needs (of argument parsing only the sampler flags both tools share):

- :func:`load_model_for_sampling` reads our safetensors (``ema.safetensors`` / ``model.safetensors`` /
  a training checkpoint folder ``step-XXXXXXX``) or a released DiT ``.pt`` (raw state dict, or a dict
  holding ``ema`` / ``model``) and returns the model with what the checkpoint says about it
  (class names, VAE, and the training process: DDPM or flow, see :mod:`latentdit.diffusion.process`).
- :func:`parse_labels` turns ``"0,3,Trouser"`` into class ids.
- :class:`SamplerSettings` holds the sampler choice, steps and guidance, validated against the process.
- :func:`sample_latents` runs a sampler of :mod:`latentdit.diffusion.samplers` (DDPM, DDIM, DPM-Solver++
  for DDPM models; Euler, Heun, Euler–Maruyama for flow models) with classifier-free guidance computed
  by :func:`latentdit.models.guidance.guided_forward` (cond and uncond halves in one batched forward),
  optionally only inside a guidance interval. :func:`sample_seeded` samples in batches with per-sample
  noise, so the result does not depend on the batch split or the number of processes.
- :func:`decode_to_uint8` turns scaled latents into uint8 NHWC images with the VAE.

Many-sample bookkeeping (chunk files, the ``.npz``) lives in :mod:`latentdit.sample_store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from latentdit.diffusion import META_PROCESS, DDPMProcess, Process, build_process, process_from_metadata
from latentdit.diffusion.samplers import SAMPLERS as SAMPLER_SPECS
from latentdit.diffusion.samplers import Callback, GeneratorNoise, NoiseSource, PerSampleNoise
from latentdit.errors import LatentDiTError
from latentdit.models.checkpoint import META_CLASS_NAMES, META_DIFFUSION, META_LATENT_NORM, META_VAE
from latentdit.models.checkpoint import METADATA_KEY as META_MODEL  # noqa: F401 (the key's name here)
from latentdit.models.guidance import check_cfg_scale, check_guidance_possible
from latentdit.seeding import seed_for

if TYPE_CHECKING:  # the autoencoder module (diffusers) is imported only when a VAE is used
    from latentdit.data.latent_norm import LatentNorm

SAMPLERS = tuple(SAMPLER_SPECS)
DEFAULT_NUM_STEPS = {name: spec.default_steps for name, spec in SAMPLER_SPECS.items()}
DDIM_MAPS = ("ddim", "even")

_PREFERRED_WEIGHTS = ("ema.safetensors", "model.safetensors")
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@dataclass
class SamplingCheckpoint:
    """A model ready for sampling and what its checkpoint says about it."""

    model: torch.nn.Module
    path: Path                       # the weights file actually read
    model_name: str | None           # registry name (from --model or inferred), None if unknown
    class_names: list[str] | None    # None when the checkpoint carries no names (released DiT)
    vae_spec: str | None             # VAE named in the checkpoint metadata, if any
    process: Process = field(default_factory=DDPMProcess)   # the training process (ddpm for released DiT)
    metadata: dict[str, str] = field(default_factory=dict)
    latent_norm: LatentNorm | None = None   # of the training latents; None: the VAE's scaling_factor

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """The weights file behind ``path``.

    A file is returned as is. A folder holding ``ema.safetensors`` (preferred) or
    ``model.safetensors`` gives that file; a run folder holding ``step-XXXXXXX`` checkpoint folders
    (directly or under ``checkpoints/``) gives the newest step's weights.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise LatentDiTError(f"checkpoint not found: {path}")
    if path.is_file():
        return path
    for name in _PREFERRED_WEIGHTS:
        if (path / name).is_file():
            return path / name
    steps = []
    for parent in (path, path / "checkpoints"):
        if parent.is_dir():
            for child in parent.iterdir():
                m = _STEP_DIR.match(child.name)
                if m and child.is_dir():
                    steps.append((int(m.group(1)), child))
    for _, step_dir in sorted(steps, key=lambda s: s[0], reverse=True):
        for name in _PREFERRED_WEIGHTS:
            if (step_dir / name).is_file():
                return step_dir / name
    raise LatentDiTError(
        f"no weights found in folder {path}: expected ema.safetensors or model.safetensors, or "
        "step-XXXXXXX checkpoint folders holding them (pass a weights file directly otherwise)"
    )


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata header of a safetensors file (no tensors are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # corrupt header, not a safetensors file
        raise LatentDiTError(f"could not read safetensors file {path}: {e}") from e


def _json_meta(metadata: dict[str, str], key: str, path: Path) -> Any:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        if key == META_VAE:  # a plain spec string is fine too
            return metadata[key]
        raise LatentDiTError(f"checkpoint {path}: metadata field {key!r} is not valid JSON") from None


def _training_context(weights: Path) -> tuple[str | None, dict | None]:
    """VAE spec and diffusion settings of the training run, when ``weights`` sits in a training
    checkpoint folder (its ``state.json`` holds the resolved config; the latent manifest names the VAE)."""
    state_path = weights.parent / "state.json"
    if not state_path.is_file():
        return None, None
    try:
        config = json.loads(state_path.read_text()).get("config") or {}
        diffusion = config.get("diffusion")
        vae = None
        latents = (config.get("data") or {}).get("latents")
        if latents and (Path(latents) / "manifest.json").is_file():
            manifest = json.loads((Path(latents) / "manifest.json").read_text())
            vae = (manifest.get("vae") or {}).get("spec")
        return vae, diffusion if isinstance(diffusion, dict) else None
    except (OSError, ValueError, AttributeError):
        return None, None  # a damaged state.json only costs the defaults


def load_model_for_sampling(path: str | Path, model_name: str | None = None,
                            device: str | torch.device = "cpu", num_classes: int | None = None,
                            null_class: bool = True) -> SamplingCheckpoint:
    """Load a DiT for sampling from any checkpoint form we accept (see module docstring).

    The config comes from the safetensors metadata (``latentdit_model``) when present, else from
    ``model_name`` and the weights' shapes (see :func:`latentdit.models.checkpoint.load_dit`);
    ``num_classes`` / ``null_class=False`` say how to read a label table without a null row
    (:func:`latentdit.models.checkpoint.label_table_overrides`).
    """
    from latentdit.models.checkpoint import label_table_overrides, load_dit
    from latentdit.models.registry import find_model_name

    weights = resolve_checkpoint_path(path)
    metadata = read_safetensors_metadata(weights) if weights.suffix == ".safetensors" else {}
    model = load_dit(weights, model_name=model_name,  # explains a --model / file mismatch itself
                     **label_table_overrides(num_classes, null_class))
    name = model_name or find_model_name(model.config)
    model = model.to(device).eval()

    class_names = _json_meta(metadata, META_CLASS_NAMES, weights)
    if class_names is not None:
        if not isinstance(class_names, list) or len(class_names) != model.num_classes:
            raise LatentDiTError(
                f"checkpoint {weights}: metadata {META_CLASS_NAMES!r} should list {model.num_classes} "
                f"class names, found {len(class_names) if isinstance(class_names, list) else class_names!r}"
            )
        class_names = [str(c) for c in class_names]
    vae = _json_meta(metadata, META_VAE, weights)
    if isinstance(vae, dict):
        vae = vae.get("spec")
    diffusion = _json_meta(metadata, META_PROCESS, weights)
    if diffusion is None:
        diffusion = _json_meta(metadata, META_DIFFUSION, weights)  # older weights: ddpm settings only
    if vae is None or diffusion is None:
        run_vae, run_diffusion = _training_context(weights)
        vae = vae or run_vae
        diffusion = diffusion if diffusion is not None else run_diffusion
    try:
        process = process_from_metadata(diffusion) if META_PROCESS in metadata else build_process(diffusion or {})
        expected = process.out_channels(model.in_channels, bool(model.learn_sigma))
        if expected != model.out_channels:
            raise LatentDiTError(f"the model has {model.out_channels} output channels, but its {process.name} "
                                 f"process expects {expected}")
    except LatentDiTError as e:
        raise LatentDiTError(f"checkpoint {weights}: {e}") from None
    latent_norm = _json_meta(metadata, META_LATENT_NORM, weights)
    if latent_norm is not None:
        from latentdit.data.latent_norm import LatentNorm

        latent_norm = LatentNorm.from_dict(latent_norm, f"checkpoint {weights}: metadata {META_LATENT_NORM!r}")
    return SamplingCheckpoint(
        model=model, path=weights, model_name=name, class_names=class_names,
        vae_spec=str(vae) if vae else None, process=process,
        metadata=metadata, latent_norm=latent_norm,
    )


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def parse_labels(spec: str | Sequence[str | int], num_classes: int,
                 class_names: Sequence[str] | None = None) -> list[int]:
    """Class ids from ids and/or names: ``"0,3,Trouser"`` or ``[0, "Trouser"]``.

    Names match exactly, else case-insensitively. Unknown names and ids outside
    ``[0, num_classes)`` raise :class:`LatentDiTError` listing what is valid.
    """
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    tokens = [t for t in tokens if not (isinstance(t, str) and t == "")]
    if not tokens:
        raise LatentDiTError("no class labels given (expected ids or class names, comma-separated)")
    lower = {}
    if class_names:
        for i, n in enumerate(class_names):
            lower.setdefault(n.lower(), i)
    out = []
    for tok in tokens:
        if isinstance(tok, (int, np.integer)) or (isinstance(tok, str) and re.fullmatch(r"[+-]?\d+", tok)):
            idx = int(tok)
            if not 0 <= idx < num_classes:
                raise LatentDiTError(f"class id {idx} out of range: the model has {num_classes} classes "
                                     f"(ids 0..{num_classes - 1})")
            out.append(idx)
            continue
        name = str(tok)
        if not class_names:
            raise LatentDiTError(f"class name {name!r} given, but the checkpoint has no class names; "
                                 f"use ids 0..{num_classes - 1}")
        if name in class_names:
            out.append(list(class_names).index(name))
        elif name.lower() in lower:
            out.append(lower[name.lower()])
        else:
            raise LatentDiTError(f"unknown class name {name!r}; valid names: {', '.join(class_names)}")
    return out


def default_labels(num_classes: int, max_classes: int = 16) -> list[int]:
    """Every class when there are few (≤ ``max_classes``), else ``max_classes`` evenly spaced ids."""
    if num_classes <= max_classes:
        return list(range(num_classes))
    return sorted({int(round(x)) for x in np.linspace(0, num_classes - 1, max_classes)})


def parse_guidance_interval(spec: str | Sequence[float] | None,
                            process: Process | None = None) -> tuple[float, float] | None:
    """``"LO,HI"`` → (lo, hi), inclusive, in the process's own time.

    DDPM: original timestep indices, integers with 0 ≤ lo ≤ hi < diffusion_steps. Flow: flow times
    with 0 ≤ lo ≤ hi ≤ 1 (t = 1 is pure noise).
    """
    if spec is None:
        return None
    process = process if process is not None else DDPMProcess()
    flow = process.name == "flow"
    what = "two flow times in [0, 1]" if flow else "two timestep indices"
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(parts) != 2:
        raise LatentDiTError(f"guidance interval must be LO,HI ({what}), got {spec!r}")
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise LatentDiTError(f"guidance interval must be LO,HI ({what}), got {spec!r}") from None
    if flow:
        if not 0.0 <= lo <= hi <= 1.0:
            raise LatentDiTError(f"guidance interval ({lo:g}, {hi:g}) must satisfy 0 ≤ lo ≤ hi ≤ 1 (flow times)")
        return lo, hi
    last = process.diffusion_steps - 1
    if not (lo.is_integer() and hi.is_integer()):
        raise LatentDiTError(f"guidance interval must be LO,HI ({what}), got {spec!r}")
    if not 0 <= lo <= hi <= last:
        raise LatentDiTError(f"guidance interval ({lo:g}, {hi:g}) must satisfy 0 ≤ lo ≤ hi ≤ {last}")
    return int(lo), int(hi)


def parse_guided_channels(spec: str | int | None, in_channels: int) -> int | None:
    """``"all"``/None → None (guide every eps channel); an integer k → guide the first k channels."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise LatentDiTError(f"guided channels must be 'all' or an integer, got {spec!r}") from None
    if not 1 <= k <= in_channels:
        raise LatentDiTError(f"guided channels must be between 1 and {in_channels} (the model's latent "
                             f"channels), got {k}")
    return None if k == in_channels else k


# ----------------------------------------------------------------------------------------------
# Sampler settings
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSettings:
    """How to sample, independent of the model and the noise. :meth:`resolved` fills the defaults for
    a process and validates every field (a :class:`LatentDiTError` names the field and its flag).

    ``sampler``: a name of :data:`SAMPLERS`; None → the process's default (ddpm: ``ddpm``, flow: ``heun``).
    ``num_steps``: None → the sampler's default (:data:`DEFAULT_NUM_STEPS`).
    ``guidance_interval``: guide only at times LO..HI (see :func:`parse_guidance_interval`; ddpm:
    original timestep indices, flow: flow times); None → every step.
    ``guided_channels``: ddpm only, guide the first k latent channels (3: the released DiT sampling code).
    ``time_shift``: flow only, shift of the step grid (t' = s·t/(1 + (s − 1)·t)); None → the shift the
    model was trained with. ``ddim_map``: ``"ddim"`` (DDIM's strided timesteps 0, s, 2s, …, as the
    ADM / DiT code samples with ``ddimN``) or ``"even"`` (the evenly rounded respacing DDPM uses).
    """

    sampler: str | None = None
    num_steps: int | None = None
    cfg_scale: float = 1.0
    guidance_interval: str | tuple[float, float] | None = None
    guided_channels: str | int | None = None
    time_shift: float | None = None
    ddim_map: str = "ddim"

    def resolved(self, process: Process, in_channels: int) -> "SamplerSettings":
        """A copy with defaults filled in for ``process``, after validating every field."""
        sampler = self.sampler if self.sampler is not None else process.default_sampler
        if sampler not in SAMPLER_SPECS:
            raise LatentDiTError(f"unknown sampler {sampler!r} (--sampler); choose one of {', '.join(SAMPLERS)}")
        spec = SAMPLER_SPECS[sampler]
        if spec.process != process.name:
            fitting = [n for n, s in SAMPLER_SPECS.items() if s.process == process.name]
            raise LatentDiTError(f"sampler {sampler!r} (--sampler) samples {spec.process} models, but this model "
                                 f"was trained with the {process.name} process; choose one of {', '.join(fitting)}")
        steps = spec.default_steps if self.num_steps is None else self.num_steps
        most = process.diffusion_steps if process.name == "ddpm" else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or (most is not None and steps > most):
            bound = f"between 1 and {most}" if most is not None else "an integer >= 1"
            raise LatentDiTError(f"num_steps (--num-steps) must be {bound}, got {steps!r}")
        cfg_scale = check_cfg_scale(self.cfg_scale)
        interval = parse_guidance_interval(self.guidance_interval, process)
        guided = parse_guided_channels(self.guided_channels, in_channels)
        if guided is not None and process.name != "ddpm":
            raise LatentDiTError("guided channels (--guided-channels) other than 'all' apply to ddpm models only "
                                 "(the released DiT's behaviour); flow models are guided on every channel")
        time_shift = self.time_shift
        if process.name == "flow":
            time_shift = process.time_shift if time_shift is None else time_shift
            if isinstance(time_shift, bool) or not isinstance(time_shift, (int, float)) \
                    or not math.isfinite(time_shift) or time_shift <= 0:
                raise LatentDiTError(f"time_shift (--time-shift) must be a finite number > 0, got {time_shift!r}")
            time_shift = float(time_shift)
        elif time_shift is not None:
            raise LatentDiTError("time_shift (--time-shift) applies to flow models only")
        if self.ddim_map not in DDIM_MAPS:
            raise LatentDiTError(f"ddim_map (--ddim-map) must be one of {', '.join(DDIM_MAPS)}, got {self.ddim_map!r}")
        return dataclasses.replace(self, sampler=sampler, num_steps=steps, cfg_scale=cfg_scale,
                                   guidance_interval=interval, guided_channels=guided, time_shift=time_shift)

    def describe(self) -> str:
        """A short label, e.g. ``heun-20, cfg 4``."""
        return f"{self.sampler}-{self.num_steps}, cfg {self.cfg_scale:g}"


def add_sampler_arguments(parser, cfg_scale: float) -> None:
    """The sampler flags both sampling tools share (read back with :func:`settings_from_args`)."""
    from latentdit.cli import finite_float, non_negative_float, positive_int

    ddpm = [n for n, s in SAMPLER_SPECS.items() if s.process == "ddpm"]
    flow = [n for n, s in SAMPLER_SPECS.items() if s.process == "flow"]
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help=f"ddpm models: {', '.join(ddpm)}; flow models: {', '.join(flow)} "
                             "(default: ddpm for ddpm models, heun for flow models). "
                             + "; ".join(f"{n}: {s.help}" for n, s in SAMPLER_SPECS.items()))
    parser.add_argument("--num-steps", type=positive_int, default=None,
                        help=f"sampling steps (default per sampler: {DEFAULT_NUM_STEPS})")
    parser.add_argument("--cfg-scale", type=non_negative_float, default=cfg_scale,
                        help="guidance scale; 1 skips the unconditional pass")
    parser.add_argument("--guidance-interval", default=None,
                        help="LO,HI: guide only at these times, inclusive (ddpm models: original timestep "
                             "indices, e.g. 0,700; flow models: flow times in [0, 1], t = 1 is noise)")
    parser.add_argument("--guided-channels", default="all",
                        help="ddpm models: 'all' or k, guide only the first k latent channels (3 = the released "
                             "DiT code's behaviour)")
    parser.add_argument("--time-shift", type=finite_float, default=None,
                        help="flow models: shift s of the step grid, t' = s·t/(1+(s−1)·t) (default: the shift "
                             "the model was trained with)")
    parser.add_argument("--ddim-map", choices=DDIM_MAPS, default="ddim",
                        help="ddim: the timesteps visited: 'ddim' = DDIM's stride (0, s, 2s, …; the ADM/DiT "
                             "'ddimN' map), 'even' = the evenly rounded respacing of ddpm")


def add_label_table_arguments(parser) -> None:
    """``--num-classes`` / ``--no-null-class``: how to read the label table of a weights file without
    metadata (released or official train.py checkpoints), passed to :func:`load_model_for_sampling`."""
    from latentdit.cli import positive_int

    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="real classes of a file without metadata (default: label-table rows - 1, the last "
                             "row being the null class; with N the null row exists iff the table has N+1 rows)")
    parser.add_argument("--no-null-class", action="store_true",
                        help="the model was trained with class_dropout_prob 0: every label-table row is a class "
                             "and there is no null row, so only --cfg-scale 1 is possible")


def settings_from_args(args) -> SamplerSettings:
    """The :class:`SamplerSettings` of :func:`add_sampler_arguments`' flags (not yet resolved)."""
    return SamplerSettings(sampler=args.sampler, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                           guidance_interval=args.guidance_interval, guided_channels=args.guided_channels,
                           time_shift=args.time_shift, ddim_map=args.ddim_map)


def sampling_grid(process: Process, settings: SamplerSettings, learn_sigma: bool):
    """The ``grid`` argument of the chosen sampler (see :mod:`latentdit.diffusion.samplers`) for
    resolved ``settings``."""
    from latentdit.diffusion.samplers import flow_grid, make_dpm_solver

    n = settings.num_steps
    if settings.sampler == "dpm-solver":
        return make_dpm_solver(n, process.noise_schedule, process.diffusion_steps)
    if settings.sampler in ("ddpm", "ddim"):
        strided = settings.sampler == "ddim" and settings.ddim_map == "ddim"
        try:
            return process.diffusion(learn_sigma, f"ddim{n}" if strided else str(n))
        except LatentDiTError as e:
            if not strided:
                raise
            raise LatentDiTError(f"{e}; choose another --num-steps or pass --ddim-map even") from None
    return flow_grid(process, n, settings.time_shift)


# ----------------------------------------------------------------------------------------------
# Noise and seeds
# ----------------------------------------------------------------------------------------------

def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of global sample ``index`` under ``seed``: its initial noise, then its step noise."""
    return torch.Generator().manual_seed(seed_for("latentdit-sample", seed, index))


def per_sample_noise(seed: int, indices: Sequence[int]) -> PerSampleNoise:
    """Noise for the samples ``indices``: row j from :func:`sample_generator` ``(seed, indices[j])``."""
    return PerSampleNoise([sample_generator(seed, i) for i in indices])


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def _autocast(device: torch.device, dtype: torch.dtype | None):
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def make_model_fn(model: torch.nn.Module, y: torch.Tensor, *, cfg_scale: float,
                  guided_channels: int | None = None, guide_at: Callable[[torch.Tensor], bool] | None = None,
                  dtype: torch.dtype | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x, t_model)`` for the samplers: guided where ``guide_at(t_model)`` holds (everywhere
    when None), plain conditional elsewhere. cfg_scale 1 never runs the unconditional half. Output in
    float32."""
    from latentdit.models.guidance import guided_forward

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        guide = cfg_scale != 1.0 and (guide_at is None or guide_at(t))
        with _autocast(x.device, dtype):
            if guide:
                out = guided_forward(model, x, t, y, cfg_scale, guided_channels=guided_channels)
            else:
                out = model(x, t, y)
        return out.float()

    return model_fn


def _guide_at(process: Process, interval: tuple[float, float] | None) -> Callable[[torch.Tensor], bool] | None:
    """The guidance-interval test on the model's timestep input (same for the whole batch)."""
    if interval is None:
        return None
    lo, hi = interval
    if process.name == "ddpm":
        return lambda t_model: lo <= int(t_model[0]) <= hi
    # flow times reach the model as float32 t · scale: compare in flow time with float32 slack
    scale = float(process.model_time(torch.ones(())))
    slack = 1e-6
    return lambda t_model: lo - slack <= float(t_model[0]) / scale <= hi + slack


@torch.no_grad()
def sample_latents(model: torch.nn.Module, labels: Sequence[int] | torch.Tensor,
                   settings: SamplerSettings | None = None, *, process: Process | None = None,
                   noise: NoiseSource | torch.Generator | None = None, x_T: torch.Tensor | None = None,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   progress: bool = False, callback: Callback | None = None) -> torch.Tensor:
    """Sample latents for ``labels`` (scaled, as the model sees them), float32 [N, C, H, W] on ``device``.

    ``process``: the model's training process (default: DDPM, 1000 linear steps — released DiT).
    ``noise``: where the initial x_T (unless ``x_T`` is given) and the step noise of stochastic samplers
    come from — a :class:`NoiseSource` (e.g. :func:`per_sample_noise`) or a generator for the whole
    batch (None: torch's global generator). ``dtype`` fp16/bf16 enables autocast on CUDA (ignored on
    CPU). ``callback`` goes to the sampler (see :mod:`latentdit.diffusion.samplers`).
    """
    process = process if process is not None else DDPMProcess()
    in_ch = int(model.in_channels)
    settings = (settings or SamplerSettings()).resolved(process, in_ch)
    expected = process.out_channels(in_ch, bool(model.learn_sigma))
    if expected != int(model.out_channels):
        raise LatentDiTError(f"the model has {model.out_channels} output channels, but the {process.name} process "
                             f"expects {expected}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    y = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long).reshape(-1)
    if y.numel() == 0:
        raise LatentDiTError("no labels to sample")
    if int(y.min()) < 0 or int(y.max()) >= model.num_classes:
        raise LatentDiTError(f"labels must be class ids in 0..{model.num_classes - 1}, got {y.tolist()}")
    check_guidance_possible(model, settings.cfg_scale)
    y = y.to(device)
    shape = (y.numel(), in_ch, int(model.input_size), int(model.input_size))
    if not isinstance(noise, NoiseSource):
        noise = GeneratorNoise(noise)
    if x_T is None:
        x_T = noise.draw(shape, device)
    elif tuple(x_T.shape) != shape:
        raise LatentDiTError(f"initial noise has shape {tuple(x_T.shape)}, expected {shape}")
    x_T = x_T.to(device=device, dtype=torch.float32)

    grid = sampling_grid(process, settings, bool(model.learn_sigma))
    was_training = model.training
    model.eval()
    model_fn = make_model_fn(model, y, cfg_scale=settings.cfg_scale, guided_channels=settings.guided_channels,
                             guide_at=_guide_at(process, settings.guidance_interval), dtype=dtype)
    try:
        out = SAMPLER_SPECS[settings.sampler].fn(model_fn, x_T, grid, noise=noise, callback=callback,
                                                 progress=progress)
    finally:
        model.train(was_training)
    return out.float()


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] NCHW → uint8 NHWC numpy with 3 channels (grey is repeated)."""
    from latentdit.visualize import to_uint8

    return to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor, batch_size: int = 32, norm=None) -> torch.Tensor:
    """Normalised latents → images in [-1, 1] (float32 NCHW, CPU) via ``vae.decode``, which undoes ``norm``
    (a :class:`latentdit.data.latent_norm.LatentNorm`, e.g. a checkpoint's ``latent_norm``; None: the VAE's
    scaling factor)."""
    if latents.shape[1] != vae.latent_channels:
        raise LatentDiTError(f"latents have {latents.shape[1]} channels but the VAE expects {vae.latent_channels}")
    if latents.shape[0] == 0:
        raise LatentDiTError("no latents to decode")
    return vae.decode_batched(latents, batch_size, norm=norm)


def decode_to_uint8(vae, latents: torch.Tensor, batch_size: int = 32, norm=None) -> np.ndarray:
    """Normalised latents → uint8 N×H×W×3 images (ADM layout); ``norm`` as in :func:`decode_images`."""
    return images_to_uint8(decode_images(vae, latents, batch_size, norm))


def label_text(label: int, class_names: Sequence[str] | None = None) -> str:
    """Human-readable label: the class name when known, else ``class N``."""
    return class_names[label] if class_names else f"class {label}"


def save_individual_pngs(images: torch.Tensor, labels: Sequence[int], out_dir: str | Path,
                         class_names: Sequence[str] | None = None) -> list[Path]:
    """Write each image in [-1, 1] as ``OUT/000000-<label>.png`` (atomically); returns the paths."""
    from PIL import Image

    from latentdit.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = images_to_uint8(images)
    paths = []
    for i, (img, lab) in enumerate(zip(arr, labels)):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label_text(int(lab), class_names)).strip("_") or "label"
        path = out_dir / f"{i:06d}-{slug}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        paths.append(path)
    return paths


def load_vae_for(ckpt: SamplingCheckpoint, spec: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """The VAE to decode ``ckpt``'s latents: ``spec``, else the checkpoint's, else the bundled one.

    Checks that its latent channels match the model's input channels.
    """
    from latentdit.vae import BUNDLED_VAE, VAE

    vae = VAE.load(spec or ckpt.vae_spec or BUNDLED_VAE, device=device, dtype=dtype)
    if vae.latent_channels != ckpt.model.in_channels:
        raise LatentDiTError(
            f"VAE {vae.spec} has {vae.latent_channels} latent channels but the model expects "
            f"{ckpt.model.in_channels}; pass the VAE the model was trained with (--vae)"
        )
    return vae


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``fp32|fp16|bf16|auto`` → autocast dtype (None = fp32). auto: bf16 on CUDA, fp32 elsewhere."""
    table = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in table:
        raise LatentDiTError(f"precision must be one of auto, fp32, fp16, bf16; got {precision!r}")
    return table[precision]


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; a bad name raises LatentDiTError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LatentDiTError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatentDiTError(f"--device {device} requested but CUDA is not available")
    return dev


# ----------------------------------------------------------------------------------------------
# Seeded batches (the same samples whatever the batch split across processes)
# ----------------------------------------------------------------------------------------------

def sample_seeded(model: torch.nn.Module, labels: Sequence[int], settings: SamplerSettings | None = None, *,
                  seed: int, first_index: int = 0, batch_size: int = 32, progress: bool = False,
                  **sampling_kwargs: Any) -> torch.Tensor:
    """Sample ``labels`` in batches; sample ``first_index + j`` takes its initial and step noise from
    :func:`sample_generator` ``(seed, first_index + j)``, so each sample depends only on ``seed`` and its
    index — not on ``batch_size`` nor on which process runs it. Extra keyword arguments (``process``,
    ``device``, ``dtype``, ``callback``) go to :func:`sample_latents`. Returns latents on CPU.
    """
    if batch_size < 1:
        raise LatentDiTError(f"batch size must be ≥ 1, got {batch_size}")
    labels = [int(v) for v in labels]
    out = []
    starts = range(0, len(labels), batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="batches", leave=False)
    for s in starts:
        idx = list(range(first_index + s, first_index + min(s + batch_size, len(labels))))
        lat = sample_latents(model, labels[s:s + len(idx)], settings, noise=per_sample_noise(seed, idx),
                             **sampling_kwargs)
        out.append(lat.cpu())
    return torch.cat(out)
