"""Training of the small KL-f8 ``AutoencoderKL`` that latentdit bundles (``tools/train_vae.py`` is its
command line).

Recipe: Fashion-MNIST train (28×28 grey → RGB, bicubic to 64×64), random crops and horizontal
flips, loss = L1 (or L2) reconstruction + ``kl_weight`` × KL (both summed per image, SD-style),
AdamW with warmup + cosine decay. At the end the latent standard deviation is measured on training
images and ``scaling_factor = 1 / std`` is written into the VAE config; the model is saved with
``save_pretrained`` to ``OUT/vae`` together with ``MODEL_CARD.md`` and ``model_card.json`` (PSNR on
held-out test images).

Checkpoints (``OUT/checkpoints``) are written atomically every ``checkpoint_every`` steps; each
step's batch and noise come from a generator seeded by ``(seed, step)``, so a resumed run is
exactly the run that was not interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentdit.cli import is_main_process
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path, atomic_write, load_safetensors, read_json, save_safetensors, torch_load, torch_save, write_json

from latentdit.autoencoder import BUNDLED_VAE_CARD_JSON as CARD_JSON


@dataclass
class VAETrainConfig:
    """Every knob of a VAE training run (the YAML config holds the same keys)."""

    # data
    data_root: str | None = None        # folder with the Fashion-MNIST IDX .gz files (None: default place)
    image_size: int = 64
    crop_size: int = 32                 # random training crops (fully convolutional model); 0 = whole image
    # model (diffusers AutoencoderKL)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = False
    # optimisation
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05          # cosine decay ends at lr * min_lr_ratio
    recon_loss: str = "l1"              # "l1" or "l2"
    kl_weight: float = 1e-6             # on the KL summed per image, relative to the summed reconstruction loss
    grad_clip: float = 1.0              # 0 disables
    seed: int = 0
    # bookkeeping
    sample_every: int = 250
    checkpoint_every: int = 250
    scale_images: int = 2048            # training images used to measure the latent std
    psnr_images: int = 1000             # held-out test images for the reported PSNR
    psnr_check_images: int = 256        # smaller subset whose PSNR the test suite re-checks


# Fields that may differ between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = {"steps", "sample_every", "checkpoint_every", "scale_images", "psnr_images",
                     "psnr_check_images", "data_root"}


def _parse_value(f: dataclasses.Field, text: Any) -> Any:
    """Convert a YAML or command-line value to the type of config field ``f``."""
    name = f.name
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    try:
        if name == "data_root":
            return None if text in (None, "", "null", "none") else str(text)
        if isinstance(default, bool):
            if isinstance(text, bool):
                return text
            if str(text).lower() in ("1", "true", "yes", "on"):
                return True
            if str(text).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, list):
            items = text if isinstance(text, (list, tuple)) else str(text).split(",")
            return [int(v) for v in items]
        if isinstance(default, int):
            if isinstance(text, float) and not text.is_integer():
                raise ValueError(text)
            return int(text)
        if isinstance(default, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        return str(text)
    except (TypeError, ValueError):
        raise LatentDiTError(f"VAE config field {name!r}: cannot use {text!r} "
                             f"(expected {type(default).__name__})") from None


def validate_config(cfg: VAETrainConfig) -> None:
    """Raise :class:`LatentDiTError` naming the first field with an impossible value."""
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    checks = [
        (cfg.image_size >= 8, "image_size", "≥ 8"),
        (cfg.crop_size == 0 or (cfg.crop_size % factor == 0 and cfg.crop_size <= cfg.image_size),
         "crop_size", f"0 or a multiple of {factor} no larger than image_size"),
        (cfg.image_size % factor == 0, "image_size", f"a multiple of the downsampling factor {factor}"),
        (len(cfg.block_out_channels) >= 1 and all(c > 0 and c % cfg.norm_num_groups == 0 for c in cfg.block_out_channels),
         "block_out_channels", f"positive multiples of norm_num_groups={cfg.norm_num_groups}"),
        (cfg.layers_per_block >= 1, "layers_per_block", "≥ 1"),
        (cfg.latent_channels >= 1, "latent_channels", "≥ 1"),
        (cfg.norm_num_groups >= 1, "norm_num_groups", "≥ 1"),
        (cfg.steps >= 1, "steps", "≥ 1"),
        (cfg.batch_size >= 1, "batch_size", "≥ 1"),
        (cfg.lr > 0, "lr", "> 0"),
        (cfg.weight_decay >= 0, "weight_decay", "≥ 0"),
        (cfg.warmup_steps >= 0, "warmup_steps", "≥ 0"),
        (0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]"),
        (cfg.recon_loss in ("l1", "l2"), "recon_loss", "'l1' or 'l2'"),
        (cfg.kl_weight >= 0, "kl_weight", "≥ 0"),
        (cfg.grad_clip >= 0, "grad_clip", "≥ 0"),
        (cfg.seed >= 0, "seed", "≥ 0"),
        (cfg.sample_every >= 0, "sample_every", "≥ 0 (0 disables)"),
        (cfg.checkpoint_every >= 1, "checkpoint_every", "≥ 1"),
        (cfg.scale_images >= 1, "scale_images", "≥ 1"),
        (cfg.psnr_images >= 1, "psnr_images", "≥ 1"),
        (1 <= cfg.psnr_check_images <= cfg.psnr_images, "psnr_check_images", "in [1, psnr_images]"),
    ]
    for ok, name, expected in checks:
        if not ok:
            raise LatentDiTError(f"VAE config field {name!r} = {getattr(cfg, name)!r}: expected {expected}")


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any]) -> VAETrainConfig:
    """Defaults, then the YAML file ``path`` (if any), then ``overrides`` (command-line flags)."""
    fields = {f.name: f for f in dataclasses.fields(VAETrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as e:
            raise LatentDiTError(f"cannot read VAE config {path}: {e}") from e
        except yaml.YAMLError as e:
            raise LatentDiTError(f"VAE config {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise LatentDiTError(f"VAE config {path} must be a mapping of field: value")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise LatentDiTError(f"VAE config {path}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
        values.update({k: _parse_value(fields[k], v) for k, v in data.items()})
    values.update({k: _parse_value(fields[k], v) for k, v in overrides.items() if v is not None})
    cfg = VAETrainConfig(**values)
    validate_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------- model


def build_autoencoder(cfg: VAETrainConfig):
    """A freshly initialised diffusers ``AutoencoderKL`` for ``cfg`` (seeded by ``cfg.seed``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size, scaling_factor=1.0,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


def lr_at(cfg: VAETrainConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------- data


def load_images(split: str, cfg: VAETrainConfig, limit: int | None = None) -> torch.Tensor:
    """The ``split`` images resized to ``image_size``, as uint8 ``[N, S, S]`` (grey)."""
    import numpy as np

    from latentdit.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(split, image_size=cfg.image_size, root=cfg.data_root)
    n = len(ds) if limit is None else min(limit, len(ds))
    return torch.from_numpy(np.stack([ds.image_uint8(i) for i in range(n)]))


def to_model_range(grey_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, S, S]`` → float32 RGB ``[B, 3, S, S]`` in ``[-1, 1]``."""
    return (grey_u8.float() / 127.5 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def batch_for_step(images: torch.Tensor, cfg: VAETrainConfig, step: int) -> tuple[torch.Tensor, torch.Generator]:
    """The training batch of ``step`` (random images, crops, flips) and the step's generator."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randint(images.shape[0], (cfg.batch_size,), generator=g)
    batch = images[idx]
    size = cfg.image_size
    if cfg.crop_size and cfg.crop_size < size:
        c = cfg.crop_size
        offsets = torch.randint(size - c + 1, (cfg.batch_size, 2), generator=g).tolist()
        batch = torch.stack([im[y:y + c, x:x + c] for im, (y, x) in zip(batch, offsets)])
    flip = torch.rand(cfg.batch_size, generator=g) < 0.5
    batch = torch.where(flip[:, None, None], batch.flip(-1), batch)
    return to_model_range(batch), g


def training_loss(model, x: torch.Tensor, cfg: VAETrainConfig, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction + KL, both summed per image, divided by the pixels per image (scale only)."""
    posterior = model.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=g)
    recon = model.decode(posterior.mean + posterior.std * eps).sample
    err = recon - x
    rec = (err.abs() if cfg.recon_loss == "l1" else err.pow(2)).flatten(1).sum(1).mean()
    kl = posterior.kl().mean()
    pixels = x[0].numel()
    loss = (rec + cfg.kl_weight * kl) / pixels
    return loss, {"rec": rec.item() / pixels, "kl": kl.item()}


# ---------------------------------------------------------------------------------------- checkpoints


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, model, optimizer, step: int, elapsed: dict[str, float]) -> None:
    """Write model + optimizer for ``step``, then point ``latest.json`` at them (atomic, crash-safe)."""
    d = _ckpt_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    model_file, optim_file = f"model-{step:07d}.safetensors", f"optimizer-{step:07d}.pt"
    save_safetensors(model.state_dict(), d / model_file, {"step": str(step)})
    torch_save(optimizer.state_dict(), d / optim_file)
    previous = read_json(d / "latest.json") if (d / "latest.json").is_file() else None
    write_json(d / "latest.json", {"step": step, "model": model_file, "optimizer": optim_file, **elapsed})
    if previous and previous.get("step") != step:
        for key in ("model", "optimizer"):
            (d / previous[key]).unlink(missing_ok=True)


def load_checkpoint(out: Path, model, optimizer) -> dict[str, Any]:
    """Restore the latest checkpoint under ``out``; returns its ``latest.json`` record."""
    d = _ckpt_dir(out)
    latest = read_json(d / "latest.json", "VAE training checkpoint index")
    try:
        tensors, _ = load_safetensors(d / latest["model"])
        model.load_state_dict(tensors)
        optimizer.load_state_dict(torch_load(d / latest["optimizer"], "optimizer state"))
    except (KeyError, RuntimeError, ValueError) as e:
        raise LatentDiTError(f"checkpoint in {d} does not fit this model/config: {e}") from e
    return latest


# ---------------------------------------------------------------------------------------- outputs


def save_grid(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
    """PNG with originals (top row) over reconstructions (bottom row)."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(torch.cat([originals, reconstructions]), nrow=originals.shape[0], padding=2, pad_value=1.0,
                     normalize=True, value_range=(-1, 1))
    array = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


@torch.no_grad()
def reconstruct_mean(model, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decode of the posterior mean, in chunks (model in eval mode by the caller)."""
    outs = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        outs.append(model.decode(model.encode(chunk).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(outs)


@torch.no_grad()
def measure_latent_std(model, images_u8: torch.Tensor, cfg: VAETrainConfig, batch_size: int = 64) -> float:
    """Standard deviation of posterior samples over the first ``scale_images`` training images."""
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    samples = []
    for start in range(0, min(cfg.scale_images, images_u8.shape[0]), batch_size):
        chunk = to_model_range(images_u8[start:min(start + batch_size, cfg.scale_images)])
        post = model.encode(chunk).latent_dist
        samples.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
    return float(torch.cat(samples).std())


def write_model_card(folder: Path, facts: dict[str, Any]) -> None:
    """``MODEL_CARD.md`` (for people) and ``model_card.json`` (the numbers, for the test suite)."""
    write_json(folder / CARD_JSON, facts)
    arch = facts["architecture"]
    lines = [
        "# latentdit/kl-f8-fashion-mnist",
        "",
        "A small KL-regularised autoencoder (diffusers `AutoencoderKL`, KL-f8: 8× spatial downsampling, "
        f"{arch['latent_channels']} latent channels) trained by latentdit's `tools/train_vae.py` so that the "
        "project works offline. It maps 64×64 RGB images in [-1, 1] to 8×8×4 latents. It is meant for "
        "Fashion-MNIST-like images (grey clothing on black); it is not a general-purpose image VAE.",
        "",
        "## Data",
        f"- Fashion-MNIST train split ({facts['train_images']} images, 28×28 grey, MIT licence), grey repeated to RGB, "
        f"resized to {facts['config']['image_size']}×{facts['config']['image_size']} with PIL bicubic; "
        f"random {facts['config']['crop_size'] or facts['config']['image_size']}-pixel crops and horizontal flips "
        "during training.",
        f"- Held-out evaluation: the first {facts['psnr_images']} images of the t10k test split (never seen in training).",
        "",
        "## Training",
        f"- Steps: {facts['steps_done']} of {facts['config']['steps']} planned"
        + (" (stopped early by --max-minutes)" if facts["stopped_early"] else "")
        + f", batch {facts['config']['batch_size']} ({facts['steps_done'] * facts['config']['batch_size']} crops seen).",
        f"- Loss: {facts['config']['recon_loss'].upper()} reconstruction + {facts['config']['kl_weight']:g} × KL "
        "(both summed per image); AdamW lr "
        f"{facts['config']['lr']:g}, weight decay {facts['config']['weight_decay']:g}, "
        f"{facts['config']['warmup_steps']} warmup steps, cosine decay to {facts['config']['min_lr_ratio']:g}× lr, "
        f"gradient clip {facts['config']['grad_clip']:g}, seed {facts['config']['seed']}.",
        f"- Wall time: {facts['train_wall_s'] / 60:.1f} min of training ({facts['train_cpu_s'] / 60:.1f} min of process "
        f"CPU time on {facts['cpu_threads']} thread(s)), on {facts['machine']}. "
        + facts.get("contention_note", ""),
        f"- Command: `{facts['command']}`",
        "",
        "## Architecture",
        f"- `AutoencoderKL`, block_out_channels {tuple(arch['block_out_channels'])}, layers_per_block "
        f"{arch['layers_per_block']}, norm_num_groups {arch['norm_num_groups']}, mid-block attention "
        f"{'on' if arch['mid_block_add_attention'] else 'off'}, latent_channels {arch['latent_channels']}.",
        f"- Parameters: {facts['parameters']:,}; weights file {facts['weights_file']} "
        f"({facts['weights_bytes'] / 1e6:.2f} MB, fp32 safetensors, sha256 {facts['weights_sha256'][:16]}…).",
        "",
        "## Scaling factor",
        f"- `scaling_factor = {facts['scaling_factor']:.6f}` = 1 / std of posterior samples over "
        f"{facts['scale_images']} training images (measured std {facts['latent_std']:.4f}). It lives in `config.json`; "
        "latentdit reads it from there only.",
        "",
        "## Reconstruction quality",
        f"- PSNR (posterior mean, decoded, clamped to [-1, 1]; peak-to-peak 2; mean of per-image PSNR): "
        f"**{facts['psnr_db']:.2f} dB** on the first {facts['psnr_images']} t10k images; "
        f"{facts['psnr_check_db']:.2f} dB on the first {facts['psnr_check_images']} (the figure the test suite re-checks).",
        "",
        "## Use",
        "```python",
        "from latentdit.autoencoder import VAE",
        "vae = VAE.load()  # == VAE.load(\"latentdit/kl-f8-fashion-mnist\")",
        "mean, std = vae.encode_moments(images)           # images: [N, 3, 64, 64] in [-1, 1]",
        "images = vae.decode(mean * vae.scaling_factor)   # decode takes scaled latents",
        "```",
        "",
    ]
    with atomic_write(folder / "MODEL_CARD.md", "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------- main


def train_vae(cfg: VAETrainConfig, out: Path, *, resume: bool = False, max_minutes: float | None = None,
              contention_note: str = "", command: str = "") -> dict[str, Any]:
    """Train (or, with ``resume``, continue) into ``out``; export ``out/vae`` with its model card.
    Returns the model card's facts."""
    out = Path(out)
    latest = _ckpt_dir(out) / "latest.json"
    config_file = out / "train_config.json"
    if resume:
        if not latest.is_file():
            raise LatentDiTError(f"--resume: no checkpoint in {out} (expected {latest})")
        saved = read_json(config_file, "VAE training config")
        mismatched = sorted(k for k, v in dataclasses.asdict(cfg).items()
                            if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if mismatched:
            raise LatentDiTError(f"--resume: config differs from the run in {out} in {mismatched}; "
                                 f"saved values {[saved.get(k) for k in mismatched]}.")
    elif latest.is_file():
        raise LatentDiTError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(config_file, dataclasses.asdict(cfg))
    main_proc = is_main_process()
    log = (lambda msg: print(msg, flush=True)) if main_proc else (lambda msg: None)

    train_u8 = load_images("train", cfg)
    test_u8 = load_images("test", cfg, limit=cfg.psnr_images)
    preview = to_model_range(test_u8[:8])

    model = build_autoencoder(cfg)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    step, elapsed = 0, {"train_wall_s": 0.0, "train_cpu_s": 0.0}
    if resume:
        record = load_checkpoint(out, model, optimizer)
        step = int(record["step"])
        elapsed = {k: float(record.get(k, 0.0)) for k in elapsed}
        log(f"resumed from step {step} ({out / 'checkpoints'})")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"AutoencoderKL {n_params:,} parameters; {train_u8.shape[0]} train images; training steps {step}..{cfg.steps}")

    from tqdm.auto import tqdm

    t0, c0 = time.time(), time.process_time()
    base = dict(elapsed)
    deadline = None if max_minutes is None else t0 + 60 * max_minutes
    stopped_early = False
    model.train()
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train_vae", disable=not main_proc,
               dynamic_ncols=True)

    def times() -> dict[str, float]:
        return {"train_wall_s": base["train_wall_s"] + time.time() - t0,
                "train_cpu_s": base["train_cpu_s"] + time.process_time() - c0}

    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        x, g = batch_for_step(train_u8, cfg, step)
        loss, parts = training_loss(model, x, cfg, g)
        if not torch.isfinite(loss):
            raise LatentDiTError(f"VAE training loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        bar.set_postfix(rec=f"{parts['rec']:.4f}", kl=f"{parts['kl']:.0f}", lr=f"{lr_at(cfg, step):.2e}")
        if main_proc and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            model.eval()
            save_grid(out / "samples" / f"step-{done:07d}.png", preview, reconstruct_mean(model, preview))
            model.train()
        out_of_time = deadline is not None and time.time() >= deadline and done < cfg.steps
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or out_of_time:
            save_checkpoint(out, model, optimizer, done, times())
        if out_of_time:
            stopped_early = True
            log(f"--max-minutes {max_minutes} reached at step {done}; exporting this state")
            break
    else:
        done = step if cfg.steps <= step else cfg.steps
    bar.close()
    elapsed = times()

    # ---- export: scaling factor, save_pretrained, PSNR, model card
    model.eval()
    latent_std = measure_latent_std(model, train_u8, cfg)
    if not (latent_std > 0 and math.isfinite(latent_std)):
        raise LatentDiTError(f"measured latent std is {latent_std}; training diverged")
    model.register_to_config(scaling_factor=1.0 / latent_std)
    vae_dir = out / "vae"
    model.save_pretrained(str(vae_dir), safe_serialization=True)

    from latentdit.autoencoder import VAE, reconstruction_psnrs
    from latentdit.io import sha256_file

    vae = VAE.load(vae_dir)
    test_images = to_model_range(test_u8)
    per_image = reconstruction_psnrs(vae, test_images)  # the check subset is its first images
    psnr_all, psnr_check = float(per_image.mean()), float(per_image[:cfg.psnr_check_images].mean())
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    facts = {
        "name": "latentdit/kl-f8-fashion-mnist",
        "psnr_db": round(psnr_all, 3), "psnr_images": int(test_images.shape[0]),
        "psnr_check_db": round(psnr_check, 3), "psnr_check_images": cfg.psnr_check_images,
        "psnr_split": "test", "psnr_subset": "first N images of t10k",
        "scaling_factor": vae.scaling_factor, "latent_std": latent_std, "scale_images": min(cfg.scale_images, train_u8.shape[0]),
        "steps_done": done, "stopped_early": stopped_early, "train_images": int(train_u8.shape[0]),
        "train_wall_s": round(elapsed["train_wall_s"], 1), "train_cpu_s": round(elapsed["train_cpu_s"], 1),
        "cpu_threads": torch.get_num_threads(), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "contention_note": contention_note,
        "command": command, "parameters": n_params,
        "weights_file": weights.name, "weights_bytes": weights.stat().st_size, "weights_sha256": sha256_file(weights),
        "architecture": {k: vae.config[k] for k in ("block_out_channels", "layers_per_block", "latent_channels",
                                                     "norm_num_groups", "mid_block_add_attention")},
        "config": dataclasses.asdict(cfg),
    }
    facts["architecture"]["block_out_channels"] = list(facts["architecture"]["block_out_channels"])
    write_model_card(vae_dir, facts)
    log(f"saved {vae_dir}: scaling_factor {vae.scaling_factor:.6f}, PSNR {psnr_all:.2f} dB on "
        f"{test_images.shape[0]} test images ({psnr_check:.2f} dB on the first {cfg.psnr_check_images}), "
        f"{weights.stat().st_size / 1e6:.2f} MB, {elapsed['train_wall_s'] / 60:.1f} min training")
    return facts
