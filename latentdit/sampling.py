"""Guided sampling from a trained DiT: load weights, parse class labels, run a sampler, decode.

The pieces a sampling command needs, and nothing about argument parsing:

- :func:`load_model_for_sampling` reads our safetensors (``ema.safetensors`` / ``model.safetensors`` /
  a training checkpoint folder ``step-XXXXXXX``) or a released DiT ``.pt`` (raw state dict, or a dict
  holding ``ema`` / ``model``) and returns the model with what the checkpoint says about it
  (class names, VAE, noise schedule).
- :func:`parse_labels` turns ``"0,3,Trouser"`` into class ids.
- :func:`sample_latents` runs DDPM (respaced), DDIM (eta 0) or DPM-Solver++ (2nd-order multistep,
  diffusers' scheduler on our beta schedule) with classifier-free guidance computed by
  :func:`latentdit.models.guidance.guided_forward` (cond and uncond halves in one batched forward),
  optionally only inside a guidance interval of original timestep indices.
- :func:`decode_to_uint8` turns scaled latents into uint8 NHWC images with the VAE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from latentdit.errors import LatentDiTError
from latentdit.models.guidance import check_cfg_scale

SAMPLERS = ("ddpm", "ddim", "dpm-solver")
DEFAULT_NUM_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver": 25}

from latentdit.models.checkpoint import META_CLASS_NAMES, META_DIFFUSION, META_VAE
from latentdit.models.checkpoint import METADATA_KEY as META_MODEL  # noqa: F401 (the key's name here)

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
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    metadata: dict[str, str] = field(default_factory=dict)

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
                            device: str | torch.device = "cpu") -> SamplingCheckpoint:
    """Load a DiT for sampling from any checkpoint form we accept (see module docstring).

    The config comes from the safetensors metadata (``latentdit_model``) when present, else from
    ``model_name`` and the weights' shapes (see :func:`latentdit.models.checkpoint.load_dit`).
    """
    from latentdit.models.checkpoint import load_dit
    from latentdit.models.registry import find_model_name

    weights = resolve_checkpoint_path(path)
    metadata = read_safetensors_metadata(weights) if weights.suffix == ".safetensors" else {}
    model = load_dit(weights, model_name=model_name)  # explains a --model / file mismatch itself
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
    diffusion = _json_meta(metadata, META_DIFFUSION, weights)
    if vae is None or diffusion is None:
        run_vae, run_diffusion = _training_context(weights)
        vae = vae or run_vae
        diffusion = diffusion if diffusion is not None else run_diffusion
    diffusion = diffusion or {}
    return SamplingCheckpoint(
        model=model, path=weights, model_name=name, class_names=class_names,
        vae_spec=str(vae) if vae else None,
        noise_schedule=str(diffusion.get("noise_schedule", "linear")),
        diffusion_steps=int(diffusion.get("diffusion_steps", 1000)),
        metadata=metadata,
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


def parse_guidance_interval(spec: str | Sequence[int] | None, num_timesteps: int = 1000) -> tuple[int, int] | None:
    """``"LO,HI"`` → (lo, hi): original timestep indices, inclusive, 0 ≤ lo ≤ hi < num_timesteps."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 2 or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise LatentDiTError(f"guidance interval must be LO,HI (two timestep indices), got {spec!r}")
        lo, hi = int(parts[0]), int(parts[1])
    else:
        if len(spec) != 2:
            raise LatentDiTError(f"guidance interval must be (lo, hi), got {spec!r}")
        lo, hi = int(spec[0]), int(spec[1])
    if not 0 <= lo <= hi < num_timesteps:
        raise LatentDiTError(f"guidance interval ({lo}, {hi}) must satisfy 0 ≤ lo ≤ hi ≤ {num_timesteps - 1}")
    return lo, hi


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


def check_sampler(sampler: str, num_steps: int | None, diffusion_steps: int = 1000) -> int:
    """Validate the sampler name and step count; returns the step count (sampler default if None)."""
    if sampler not in SAMPLERS:
        raise LatentDiTError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = DEFAULT_NUM_STEPS[sampler] if num_steps is None else int(num_steps)
    if not 1 <= steps <= diffusion_steps:
        raise LatentDiTError(f"--num-steps must be between 1 and {diffusion_steps}, got {steps}")
    return steps


# ----------------------------------------------------------------------------------------------
# Noise and seeds
# ----------------------------------------------------------------------------------------------

def derive_seed(*values: int) -> int:
    """A 63-bit seed that is a pure function of the given integers (e.g. global seed, sample index)."""
    h = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def per_sample_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Initial noise [len(indices), *shape], sample i drawn from a generator seeded by (seed, i)."""
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        g = torch.Generator().manual_seed(derive_seed(seed, i))
        out[row] = torch.randn(*shape, generator=g)
    return out


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def _autocast(device: torch.device, dtype: torch.dtype | None):
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def make_model_fn(model: torch.nn.Module, y: torch.Tensor, *, cfg_scale: float,
                  guided_channels: int | None = None, guidance_interval: tuple[int, int] | None = None,
                  dtype: torch.dtype | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x, t_original)`` for the samplers: guided inside the interval, plain cond outside.

    cfg_scale 1 never runs the unconditional half. Output in float32.
    """
    from latentdit.models.guidance import guided_forward

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        guide = cfg_scale != 1.0
        if guide and guidance_interval is not None:
            step = int(t[0])
            guide = guidance_interval[0] <= step <= guidance_interval[1]
        with _autocast(x.device, dtype):
            if guide:
                out = guided_forward(model, x, t, y, cfg_scale, guided_channels=guided_channels)
            else:
                out = model(x, t, y)
        return out.float()

    return model_fn


@torch.no_grad()
def sample_latents(model: torch.nn.Module, labels: Sequence[int] | torch.Tensor, *, cfg_scale: float = 1.0,
                   sampler: str = "ddpm", num_steps: int | None = None, guided_channels: int | None = None,
                   guidance_interval: tuple[int, int] | None = None, generator: torch.Generator | None = None,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   noise: torch.Tensor | None = None, noise_schedule: str = "linear",
                   diffusion_steps: int = 1000, progress: bool = False) -> torch.Tensor:
    """Sample latents for ``labels`` (scaled, as the model sees them), float32 [N, C, H, W] on ``device``.

    ``noise`` (optional) is the initial x_T; otherwise it is drawn from ``generator``. DDPM's per-step
    noise also comes from ``generator`` (a CPU generator on a CUDA device seeds a CUDA one).
    ``dtype`` fp16/bf16 enables autocast on CUDA (ignored on CPU).
    """
    from latentdit.diffusion import create_diffusion, ddim_sample, ddpm_sample

    cfg_scale = check_cfg_scale(cfg_scale)
    num_steps = check_sampler(sampler, num_steps, diffusion_steps)
    if guidance_interval is not None:
        guidance_interval = parse_guidance_interval(guidance_interval, diffusion_steps)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    in_ch = int(model.in_channels)
    if guided_channels is not None:
        guided_channels = parse_guided_channels(guided_channels, in_ch)
    y = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long).reshape(-1)
    if y.numel() == 0:
        raise LatentDiTError("no labels to sample")
    if int(y.min()) < 0 or int(y.max()) >= model.num_classes:
        raise LatentDiTError(f"labels must be class ids in 0..{model.num_classes - 1}, got {y.tolist()}")
    if cfg_scale != 1.0:
        _ = model.null_class_id  # raises a LatentDiTError when the model has no unconditional row
    y = y.to(device)
    shape = (y.numel(), in_ch, int(model.input_size), int(model.input_size))
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
    elif tuple(noise.shape) != shape:
        raise LatentDiTError(f"initial noise has shape {tuple(noise.shape)}, expected {shape}")
    noise = noise.to(device=device, dtype=torch.float32)
    if generator is not None and generator.device.type != device.type:
        # the samplers draw step noise on ``device``: continue with a generator there, seeded from this one
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    model_fn = make_model_fn(model, y, cfg_scale=cfg_scale, guided_channels=guided_channels,
                             guidance_interval=guidance_interval, dtype=dtype)
    try:
        if sampler in ("ddpm", "ddim"):
            diffusion = create_diffusion(timestep_respacing=str(num_steps), noise_schedule=noise_schedule,
                                         diffusion_steps=diffusion_steps, learn_sigma=bool(model.learn_sigma))
            fn = ddpm_sample if sampler == "ddpm" else ddim_sample
            out = fn(diffusion, model_fn, shape, generator=generator, device=device, noise=noise,
                     progress=progress)
        else:
            out = _dpm_solver_sample(model_fn, noise, in_ch, num_steps=num_steps, noise_schedule=noise_schedule,
                                     diffusion_steps=diffusion_steps, progress=progress)
    finally:
        model.train(was_training)
    return out.float()


def make_dpm_solver(num_steps: int, noise_schedule: str = "linear", diffusion_steps: int = 1000):
    """diffusers' DPM-Solver++ (2nd-order multistep, eps prediction) on our beta schedule."""
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError as e:
        raise LatentDiTError("the dpm-solver sampler needs diffusers: pip install diffusers") from e
    from latentdit.diffusion import get_betas

    betas = np.asarray(get_betas(noise_schedule, diffusion_steps), dtype=np.float64)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion_steps, trained_betas=betas, algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="epsilon", lower_order_final=True,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def _dpm_solver_sample(model_fn, noise: torch.Tensor, in_channels: int, *, num_steps: int,
                       noise_schedule: str, diffusion_steps: int, progress: bool) -> torch.Tensor:
    scheduler = make_dpm_solver(num_steps, noise_schedule, diffusion_steps)
    x = noise * scheduler.init_noise_sigma
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="dpm-solver", leave=False)
    for t in steps:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = model_fn(x, t_batch)[:, :in_channels]  # learned-σ channels are not used by the ODE solver
        x = scheduler.step(eps, t, x).prev_sample
    return x


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] NCHW → uint8 NHWC numpy with 3 channels (grey is repeated)."""
    from latentdit.visualize import to_uint8

    return to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Scaled latents → images in [-1, 1] (float32 NCHW, CPU) via ``vae.decode`` (which undoes the scaling)."""
    if latents.shape[1] != vae.latent_channels:
        raise LatentDiTError(f"latents have {latents.shape[1]} channels but the VAE expects {vae.latent_channels}")
    if latents.shape[0] == 0:
        raise LatentDiTError("no latents to decode")
    return vae.decode_batched(latents, batch_size)


def decode_to_uint8(vae, latents: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Scaled latents → uint8 N×H×W×3 images (ADM layout)."""
    return images_to_uint8(decode_images(vae, latents, batch_size))


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
    from latentdit.autoencoder import BUNDLED_VAE, VAE

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

def sample_seeded(model: torch.nn.Module, labels: Sequence[int], *, seed: int, first_index: int = 0,
                  batch_size: int = 32, progress: bool = False, **sampling_kwargs: Any) -> torch.Tensor:
    """Sample ``labels`` in batches; sample ``first_index + j`` starts from noise seeded by (seed, index).

    DDPM's per-step noise comes from a generator seeded by (seed, index of the batch's first sample),
    so the result depends only on ``seed``, the indices and ``batch_size`` — not on which process
    runs it. Extra keyword arguments go to :func:`sample_latents`. Returns latents on CPU.
    """
    if batch_size < 1:
        raise LatentDiTError(f"batch size must be ≥ 1, got {batch_size}")
    labels = [int(v) for v in labels]
    shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    out = []
    starts = range(0, len(labels), batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="batches", leave=False)
    for s in starts:
        idx = list(range(first_index + s, first_index + min(s + batch_size, len(labels))))
        noise = per_sample_noise(seed, idx, shape)
        gen = torch.Generator().manual_seed(derive_seed(seed, idx[0], len(idx), 1))
        lat = sample_latents(model, labels[s:s + len(idx)], noise=noise, generator=gen, **sampling_kwargs)
        out.append(lat.cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Many samples in chunks (tools/sample_ddp.py)
# ----------------------------------------------------------------------------------------------

CHUNK_DIR = ".chunks"
CHUNK_SETTINGS = "settings.json"


def balanced_labels(indices: Sequence[int] | range, num_classes: int) -> list[int]:
    """Label of global sample i is ``i % num_classes``: every class equally often (±1)."""
    return [int(i) % num_classes for i in indices]


def num_chunks(num_samples: int, chunk_size: int) -> int:
    return (num_samples + chunk_size - 1) // chunk_size


def chunk_range(k: int, num_samples: int, chunk_size: int) -> range:
    """Global sample indices of chunk ``k``."""
    return range(k * chunk_size, min((k + 1) * chunk_size, num_samples))


def chunk_path(chunk_dir: str | Path, k: int) -> Path:
    return Path(chunk_dir) / f"chunk-{k:06d}.npz"


def missing_chunks(chunk_dir: str | Path, total_chunks: int) -> list[int]:
    """Chunks whose file is absent (files are written atomically, so a present file is complete)."""
    return [k for k in range(total_chunks) if not chunk_path(chunk_dir, k).is_file()]


def write_chunk(path: str | Path, images: np.ndarray, labels: Sequence[int]) -> None:
    """Write one chunk (uint8 N×H×W×3 images + int64 labels) atomically."""
    from latentdit.io import atomic_write

    with atomic_write(path, "wb") as f:
        np.savez(f, images=np.ascontiguousarray(images, dtype=np.uint8),
                 labels=np.asarray(labels, dtype=np.int64))


def read_chunk(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            return z["images"], z["labels"]
    except Exception as e:
        raise LatentDiTError(f"chunk file {path} is unreadable ({e}); delete it to have it sampled again") from e


def prepare_chunk_dir(chunk_dir: str | Path, settings: dict, create: bool = True) -> None:
    """Create the chunk folder with its settings, or check that a resumed run uses the same settings.

    With ``create=False`` (non-main processes, after the main one created it) only the check is done.
    """
    from latentdit.io import read_json, write_json

    chunk_dir = Path(chunk_dir)
    path = chunk_dir / CHUNK_SETTINGS
    if create:
        chunk_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file() or not create:
        old = read_json(path, "chunk settings")
        diffs = [f"{k}: {old.get(k)!r} (earlier run) vs {v!r} (now)"
                 for k, v in settings.items() if old.get(k) != v]
        if diffs:
            raise LatentDiTError(
                f"{chunk_dir} holds chunks from a run with other settings ({'; '.join(diffs)}); "
                "use another output folder or delete that one to start over"
            )
    else:
        write_json(path, settings)


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def gather_chunks(chunk_dir: str | Path, num_samples: int, chunk_size: int, out_path: str | Path) -> Path:
    """Write the ADM-style ``.npz`` (``arr_0``: uint8 N×H×W×3 images, ``arr_1``: int64 labels), atomically.

    Chunks are streamed into the archive one at a time, so memory stays at one chunk.
    """
    import zipfile

    from latentdit.io import atomic_path

    total = num_chunks(num_samples, chunk_size)
    missing = missing_chunks(chunk_dir, total)
    if missing:
        raise LatentDiTError(f"cannot gather: {len(missing)} chunk(s) missing in {chunk_dir} (first: {missing[0]})")
    first, _ = read_chunk(chunk_path(chunk_dir, 0))
    image_shape = tuple(first.shape[1:])
    with atomic_path(out_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                f.write(_npy_header((num_samples, *image_shape), np.uint8))
                chunk_labels = []
                for k in range(total):
                    images, labels = read_chunk(chunk_path(chunk_dir, k))
                    expect = len(chunk_range(k, num_samples, chunk_size))
                    if images.shape != (expect, *image_shape) or images.dtype != np.uint8:
                        raise LatentDiTError(f"chunk {chunk_path(chunk_dir, k)} holds {images.shape} {images.dtype}, "
                                             f"expected {(expect, *image_shape)} uint8")
                    f.write(np.ascontiguousarray(images).tobytes())
                    chunk_labels.append(labels)
            all_labels = np.concatenate(chunk_labels)
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                f.write(_npy_header(all_labels.shape, np.int64))
                f.write(all_labels.astype(np.int64).tobytes())
    return Path(out_path)
