"""Training of a small KL-f8 ``AutoencoderKL`` on any image data (``tools/train_vae.py`` is its command line).

Data: whatever ``tools/extract.py --data`` takes (``fashion-mnist``, an ImageNet-layout folder, a flat
folder), read through the same loaders (RGB conversion, alpha composited on white, centre crop to
``data.image_size``). Held-out images come from a ``val/`` split folder when the data has one (for
Fashion-MNIST: its test split), else from a fixed seeded fraction (``data.val_fraction``,
``data.split_seed``) of the training images. The images are decoded once into a uint8 cache in the run
folder.

Loss (per step, on random crops with horizontal flips):

- reconstruction (L1 or L2, mean per pixel) + ``kl_weight`` × KL (summed per image, per pixel);
- optionally ``fft_weight`` × L1 between the orthonormal 2-D spectra of reconstruction and input;
- from step ``loss.disc_start`` on, a PatchGAN discriminator with the hinge loss; its generator term is
  weighted adaptively, ``λ = disc_weight · clamp(‖∇_L rec‖ / (‖∇_L gan‖ + 1e-4), 0, disc_max_weight)``
  with ``L`` the decoder's last convolution (the weighting of the latent-diffusion autoencoders).

Every step's batch, crops, flips and posterior noise come from a generator seeded by
``seed_for(seed, step)``; checkpoints (``latentdit.training.checkpoint.CheckpointManager``) hold both
networks and both optimizers, so a run killed at any point and resumed is the uninterrupted run.
At the end the latents of training images give ``scaling_factor`` (1 / overall std) and the
per-channel ``latents_mean`` / ``latents_std`` (diffusers config fields), the model is saved with
``save_pretrained`` to ``OUT/vae`` with ``MODEL_CARD.md`` and ``model_card.json``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from latentdit.autoencoder import BUNDLED_VAE_CARD_JSON as CARD_JSON
from latentdit.cli import is_main_process
from latentdit.config import VAEConfig, vae_config_from_dict
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_path, atomic_write, load_safetensors, read_json, save_safetensors, sha256_json, \
    torch_load, torch_save, write_json
from latentdit.training.checkpoint import OPTIMIZER_FILE, STATE_FILE, CheckpointManager
from latentdit.seeding import seed_for

CONFIG_FILE = "vae_config.json"
CACHE_FILE = "images.safetensors"
VAE_FILE = "vae.safetensors"
DISC_FILE = "discriminator.safetensors"
#: Added to the GAN gradient norm in the adaptive weight (as in the latent-diffusion autoencoders).
ADAPTIVE_EPS = 1e-4
#: Fields that may differ between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = {("train", "steps"), ("train", "sample_every"), ("train", "ckpt_every"), ("train", "keep_last"),
                     ("train", "stats_images"), ("train", "eval_images"), ("train", "eval_check_images"),
                     ("data", "num_workers")}
VAL_SPLIT_NAMES = ("val", "valid", "validation")


# ---------------------------------------------------------------------------------------- data


@dataclass
class ImageSplits:
    """Decoded training and held-out images (uint8 ``[N, 3, S, S]``) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    val_names: list[str]
    facts: dict[str, Any]


def _val_split_name(source: str) -> str | None:
    from latentdit.data import SPLIT_FOLDERS, is_fashion_mnist

    if is_fashion_mnist(source):
        return "test"
    root = Path(source).expanduser()
    if not root.is_dir():
        return None
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if not subdirs or not subdirs <= SPLIT_FOLDERS:
        return None
    return next((name for name in VAL_SPLIT_NAMES if name in subdirs), None)


def _item_names(dataset: Any, split: str) -> list[str]:
    if hasattr(dataset, "relative_paths"):
        return dataset.relative_paths()
    return [f"{split}[{i}]" for i in range(len(dataset))]


class _Decoded(torch.utils.data.Dataset):
    """Items of an image dataset as uint8 ``3×S×S`` (None for an unreadable file)."""

    def __init__(self, dataset: Any, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> torch.Tensor | None:
        image = self.dataset[self.indices[k]][0]
        if image is None:
            return None
        return image.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def _decode_all(dataset: Any, indices: list[int], num_workers: int, desc: str) -> tuple[torch.Tensor, list[int]]:
    """``(uint8 images, positions in indices that were readable)``."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_Decoded(dataset, indices), batch_size=64, num_workers=num_workers,
                                         collate_fn=list)
    images, kept = [], []
    position = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not is_main_process() or len(indices) < 5000):
        for image in batch:
            if image is not None:
                images.append(image)
                kept.append(position)
            position += 1
    if not images:
        raise LatentDiTError(f"data.source: none of the {len(indices)} {desc} images could be read")
    return torch.stack(images), kept


def load_splits(cfg: VAEConfig, cache_dir: Path | None = None) -> ImageSplits:
    """Training and held-out images of ``cfg.data`` (decoded once; cached as ``cache_dir/images.safetensors``)."""
    from latentdit.data import build_image_dataset, is_fashion_mnist

    d = cfg.data
    val_split = _val_split_name(d.source)
    train_ds = build_image_dataset(d.source, "train", d.image_size)
    train_names = _item_names(train_ds, "train")
    if val_split is not None:
        val_ds = build_image_dataset(d.source, val_split, d.image_size)
        val_names = _item_names(val_ds, val_split)
        train_idx, val_idx = list(range(len(train_ds))), list(range(len(val_ds)))
        how = "the t10k test split" if is_fashion_mnist(d.source) else f"the {val_split}/ split folder"
    else:
        val_ds = train_ds
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(
            seed_for("latentdit-vae-holdout", d.split_seed))).tolist()
        n_val = round(len(train_ds) * d.val_fraction)
        if d.val_fraction > 0 and (n_val < 1 or n_val >= len(train_ds)):
            raise LatentDiTError(f"data.val_fraction={d.val_fraction} of {len(train_ds)} images leaves no "
                                 "held-out or no training image; change it or add a val/ split folder")
        val_idx, train_idx = sorted(order[:n_val]), order[n_val:]
        val_names = [train_names[i] for i in val_idx]
        how = f"a seeded random {d.val_fraction:g} of the training images (data.split_seed={d.split_seed})"
    if d.max_train_images:
        train_idx = train_idx[:d.max_train_images]
    train_idx = sorted(train_idx)
    key = {"source": str(Path(d.source).expanduser().resolve()) if not is_fashion_mnist(d.source) else d.source,
           "image_size": d.image_size, "train": sha256_json([train_names[i] for i in train_idx]),
           "val": sha256_json(val_names)}
    cache = None if cache_dir is None else cache_dir / CACHE_FILE
    if cache is not None and cache.is_file():
        tensors, meta = load_safetensors(cache)
        if meta.get("key") == sha256_json(key):
            facts = read_json(cache.with_suffix(".json"), "image cache facts")
            return ImageSplits(tensors["train"], tensors["val"], facts.pop("val_names"), facts)
    train, kept_train = _decode_all(train_ds, train_idx, d.num_workers, "train")
    val, kept_val = (_decode_all(val_ds, val_idx, d.num_workers, "held-out") if val_idx
                     else (torch.zeros(0, 3, d.image_size, d.image_size, dtype=torch.uint8), []))
    facts = {"data_source": d.source, "holdout": how, "train_images": int(train.shape[0]),
             "val_images": int(val.shape[0]),
             "unreadable": len(train_idx) - len(kept_train) + len(val_idx) - len(kept_val)}
    names = [val_names[p] for p in kept_val]  # val_names is aligned with val_idx
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache.with_suffix(".json"), {**facts, "val_names": names})
        save_safetensors({"train": train, "val": val}, cache, {"key": sha256_json(key)})
    return ImageSplits(train, val, names, facts)


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` → float32 in ``[-1, 1]``."""
    return images_u8.float().div(127.5).sub(1.0)


def step_generator(cfg: VAEConfig, step: int) -> torch.Generator:
    """The generator of everything random in training step ``step`` (batch, crops, flips, posterior noise)."""
    return torch.Generator().manual_seed(seed_for("latentdit-vae-step", cfg.train.seed, step))


def batch_for_step(images: torch.Tensor, cfg: VAEConfig, g: torch.Generator) -> torch.Tensor:
    """The training batch drawn from ``g``: random images, random crops, random horizontal flips."""
    b, size, crop = cfg.train.batch_size, images.shape[-1], cfg.data.crop_size
    batch = images[torch.randint(images.shape[0], (b,), generator=g)]
    if crop and crop < size:
        offsets = torch.randint(size - crop + 1, (b, 2), generator=g).tolist()
        batch = torch.stack([im[:, y:y + crop, x:x + crop] for im, (y, x) in zip(batch, offsets)])
    flip = torch.rand(b, generator=g) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return to_model_range(batch)


# ---------------------------------------------------------------------------------------- networks


def build_autoencoder(cfg: VAEConfig):
    """A freshly initialised diffusers ``AutoencoderKL`` for ``cfg`` (seeded), or ``model.init_from``'s weights."""
    from diffusers import AutoencoderKL

    m = cfg.model
    torch.manual_seed(seed_for("latentdit-vae-init", cfg.train.seed))
    n = len(m.block_out_channels)
    model = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups,
        sample_size=cfg.data.image_size, scaling_factor=1.0, mid_block_add_attention=m.mid_block_add_attention,
    )
    if m.init_from:
        from latentdit.autoencoder import VAE

        source = VAE.load(m.init_from).model
        try:
            model.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise LatentDiTError(f"model.init_from={m.init_from!r} does not fit the model fields of this "
                                 f"config: {str(e).splitlines()[0]}") from None
    return model.to(memory_format=torch.channels_last)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``layers`` stride-2 4×4 convolutions, then two stride-1 ones; one logit per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mults = [min(2 ** i, 8) for i in range(layers + 1)]
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(channels * mults[i - 1], channels * mults[i], 4, stride, 1, bias=False),
                    nn.BatchNorm2d(channels * mults[i]), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(channels * mults[layers], 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    @staticmethod
    def output_size(size: int, layers: int) -> int:
        """Side of the logit map for ``size``-pixel inputs."""
        for _ in range(layers):
            size = size // 2
        return size - 2  # two 4×4 stride-1 convolutions with padding 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_discriminator(cfg: VAEConfig) -> PatchDiscriminator | None:
    lo = cfg.loss
    if lo.disc_weight == 0:
        return None
    side = cfg.data.crop_size or cfg.data.image_size
    if PatchDiscriminator.output_size(side, lo.disc_layers) < 1:
        raise LatentDiTError(f"loss.disc_layers={lo.disc_layers} is too deep for {side}-pixel training crops "
                             "(no patch left); use fewer layers or larger data.crop_size")
    torch.manual_seed(seed_for("latentdit-vae-disc-init", cfg.train.seed))
    return PatchDiscriminator(3, lo.disc_channels, lo.disc_layers).to(memory_format=torch.channels_last)


def last_layer(model) -> torch.Tensor:
    """The weight the adaptive GAN weight is measured on: the decoder's output convolution."""
    return model.decoder.conv_out.weight


# ---------------------------------------------------------------------------------------- losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``(mean relu(1 - D(x)) + mean relu(1 + D(x̂))) / 2``."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, layer: torch.Tensor,
                        max_weight: float) -> torch.Tensor:
    """``clamp(‖∇_layer rec_loss‖ / (‖∇_layer gan_loss‖ + 1e-4), 0, max_weight)``, detached."""
    rec_grad = torch.autograd.grad(rec_loss, layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_EPS)).clamp(0.0, max_weight).detach()


def spectrum_l1(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the orthonormal 2-D FFTs (per channel) of ``recon`` and ``x``."""
    return (torch.fft.fft2(recon.float(), norm="ortho") - torch.fft.fft2(x.float(), norm="ortho")).abs().mean()


def gan_active(cfg: VAEConfig, step: int) -> bool:
    return cfg.loss.disc_weight > 0 and step >= cfg.loss.disc_start


def generator_loss(model, disc: PatchDiscriminator | None, x: torch.Tensor, cfg: VAEConfig, g: torch.Generator,
                   step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(total VAE loss, reconstruction, logged parts)`` of one batch."""
    lo = cfg.loss
    posterior = model.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=g).to(memory_format=torch.channels_last)
    recon = model.decode(posterior.mean + posterior.std * eps).sample
    err = recon - x
    rec = (err.abs() if lo.recon == "l1" else err.pow(2)).mean()
    kl = posterior.kl().mean()
    nll = rec + (lo.fft_weight * spectrum_l1(recon, x) if lo.fft_weight else 0.0)
    loss = nll + lo.kl_weight * kl / x[0].numel()
    parts = {"rec": rec.item(), "kl": kl.item()}
    if disc is not None and gan_active(cfg, step):
        gan = -disc(recon).mean()
        weight = lo.disc_weight * adaptive_gan_weight(nll, gan, last_layer(model), lo.disc_max_weight)
        loss = loss + weight * gan
        parts.update(gan=gan.item(), gan_w=weight.item())
    return loss, recon, parts


def lr_at(cfg: VAEConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Trainer:
    """The VAE, its discriminator and their optimizers; :meth:`step` runs one training step."""

    cfg: VAEConfig
    model: Any
    disc: PatchDiscriminator | None
    opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None

    @classmethod
    def create(cls, cfg: VAEConfig) -> "Trainer":
        model = build_autoencoder(cfg).train()
        decay, no_decay = [], []
        for param in model.parameters():
            (no_decay if param.ndim <= 1 else decay).append(param)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr)
        disc = build_discriminator(cfg)
        disc_opt = None
        if disc is not None:
            disc.train()
            disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.train.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
        return cls(cfg, model, disc, opt, disc_opt)

    def step(self, images_u8: torch.Tensor, step: int) -> dict[str, float]:
        """One optimizer step of the VAE (and, once the GAN is active, of the discriminator)."""
        cfg = self.cfg
        g = step_generator(cfg, step)
        x = batch_for_step(images_u8, cfg, g).contiguous(memory_format=torch.channels_last)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        if self.disc is not None:
            self.disc.requires_grad_(False)
        loss, recon, parts = generator_loss(self.model, self.disc, x, cfg, g, step)
        if not torch.isfinite(loss):
            raise LatentDiTError(f"VAE training loss became {loss.item()} at step {step}; lower train.lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.opt.step()
        if self.disc is not None and gan_active(cfg, step):
            self.disc.requires_grad_(True)
            d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            parts["d"] = d_loss.item()
        return parts

    # ---- checkpoints
    def save(self, manager: CheckpointManager, step: int, record: dict[str, Any]) -> Path:
        tmp = manager.begin(step)
        save_safetensors(self.model.state_dict(), tmp / VAE_FILE)
        optim = {"vae": self.opt.state_dict()}
        if self.disc is not None:
            save_safetensors(self.disc.state_dict(), tmp / DISC_FILE)
            optim["disc"] = self.disc_opt.state_dict()
        torch_save(optim, tmp / OPTIMIZER_FILE)
        write_json(tmp / STATE_FILE, {"step": step, "model_config": dict(self.model.config),
                                      "vae_config": self.cfg.to_dict(), **record})
        return manager.commit(step)

    def load(self, ckpt: Path) -> dict[str, Any]:
        state = read_json(ckpt / STATE_FILE, "VAE training checkpoint state")
        try:
            self.model.load_state_dict(load_safetensors(ckpt / VAE_FILE)[0])
            optim = torch_load(ckpt / OPTIMIZER_FILE, "optimizer state")
            self.opt.load_state_dict(optim["vae"])
            if self.disc is not None:
                self.disc.load_state_dict(load_safetensors(ckpt / DISC_FILE)[0])
                self.disc_opt.load_state_dict(optim["disc"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise LatentDiTError(f"checkpoint {ckpt} does not fit this model/config: {e}") from e
        return state


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
    for chunk in x.split(batch_size):
        outs.append(model.decode(model.encode(chunk).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(outs)


@torch.no_grad()
def latent_statistics(model, images_u8: torch.Tensor, cfg: VAEConfig, batch_size: int = 64) -> dict[str, Any]:
    """Overall and per-channel mean/std of posterior samples of the first ``stats_images`` training images."""
    g = torch.Generator().manual_seed(seed_for("latentdit-vae-stats", cfg.train.seed))
    samples = []
    for chunk in images_u8[:cfg.train.stats_images].split(batch_size):
        post = model.encode(to_model_range(chunk)).latent_dist
        samples.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
    z = torch.cat(samples).double()
    per_channel = z.transpose(0, 1).flatten(1)
    std = float(z.std())
    if not (std > 0 and math.isfinite(std)):
        raise LatentDiTError(f"measured latent std is {std}; training diverged")
    return {"latent_std": std, "latents_mean": [float(v) for v in per_channel.mean(1)],
            "latents_std": [float(v) for v in per_channel.std(1)], "stats_images": int(z.shape[0])}


def write_model_card(folder: Path, facts: dict[str, Any]) -> None:
    """``MODEL_CARD.md`` (for people) and ``model_card.json`` (the numbers, for tests and benchmarks)."""
    write_json(folder / CARD_JSON, facts)
    with atomic_write(folder / "MODEL_CARD.md", "w") as f:
        f.write(render_model_card(facts))


def render_model_card(facts: dict[str, Any]) -> str:
    c = facts["config"]
    d, m, lo, t = c["data"], c["model"], c["loss"], c["train"]
    arch = facts["architecture"]
    size, f = d["image_size"], 2 ** (len(arch["block_out_channels"]) - 1)
    # how much of the machine the run got: well below 100% means other work shared the cores
    cpu_share = facts["train_cpu_s"] / max(1e-9, facts["train_wall_s"] * facts["cpu_threads"])
    loss = f"{lo['recon'].upper()} reconstruction + {lo['kl_weight']:g} × KL (per pixel)"
    if lo["fft_weight"]:
        loss += f" + {lo['fft_weight']:g} × L1 between orthonormal 2-D spectra"
    if lo["disc_weight"]:
        loss += (f"; from step {lo['disc_start']} a PatchGAN ({lo['disc_layers']} stride-2 layers, "
                 f"{lo['disc_channels']} channels) with hinge loss, generator term weighted "
                 f"{lo['disc_weight']:g} × ‖∇rec‖/(‖∇gan‖+1e-4) at the decoder's last layer (clamped to "
                 f"{lo['disc_max_weight']:g}), discriminator AdamW lr {t['disc_lr']:g}")
    lines = [
        f"# {facts['name']}",
        "",
        f"A small KL-regularised autoencoder (diffusers `AutoencoderKL`, KL-f{f}: {f}× spatial downsampling, "
        f"{arch['latent_channels']} latent channels) trained by latentdit's `tools/train_vae.py`, so that the "
        f"project works offline. It maps {size}×{size} RGB images in [-1, 1] to "
        f"{size // f}×{size // f}×{arch['latent_channels']} latents.",
        "",
    ]
    if facts.get("intended_use"):
        lines += ["## Intended use", facts["intended_use"], ""]
    from latentdit.data import is_fashion_mnist

    reading = ("28×28 grey repeated to RGB, PIL bicubic resize" if is_fashion_mnist(facts["data_source"]) else
               "RGB, alpha composited on white, short side resized, centre crop")
    seen = "whole images" if d["crop_size"] in (0, size) else "crops"
    lines += [
        "## Data",
        f"- `{facts['data_source']}`: {facts['train_images']} training images, read by latentdit's extraction "
        f"loaders ({reading} to {size}×{size}); "
        + (seen if seen == "whole images" else f"random {d['crop_size']}-pixel crops")
        + " and horizontal flips during training."
        + (f" {facts['unreadable']} unreadable file(s) skipped." if facts.get("unreadable") else ""),
        f"- Held out (never trained on): {facts['val_images']} images, {facts['holdout']}.",
        "",
        "## Training",
        f"- Steps: {facts['steps_done']} of {t['steps']} planned"
        + (" (stopped early by --max-minutes)" if facts["stopped_early"] else "")
        + f", batch {t['batch_size']} ({facts['steps_done'] * t['batch_size']:,} {seen} seen)"
        + (f"; weights initialised from `{m['init_from']}`" if m["init_from"] else "") + ".",
        f"- Loss: {loss}.",
        f"- AdamW lr {t['lr']:g}, weight decay {t['weight_decay']:g}, {t['warmup_steps']} warmup steps, cosine "
        f"decay to {t['min_lr_ratio']:g}× lr, gradient clip {t['grad_clip']:g}, seed {t['seed']}.",
        f"- Wall time: {facts['train_wall_s'] / 60:.1f} min of training ({facts['train_cpu_s'] / 60:.1f} min of "
        f"process CPU time on {facts['cpu_threads']} thread(s): {cpu_share:.0%} of those threads' wall time), on "
        f"{facts['machine']}." + (f" {facts['contention_note']}" if facts.get("contention_note") else ""),
        f"- Command: `{facts['command']}`",
    ]
    if facts.get("history"):
        lines += [f"- {facts['history']}"]
    lines += [
        "",
        "## Architecture",
        f"- `AutoencoderKL`, block_out_channels {tuple(arch['block_out_channels'])}, layers_per_block "
        f"{arch['layers_per_block']}, norm_num_groups {arch['norm_num_groups']}, mid-block attention "
        f"{'on' if arch['mid_block_add_attention'] else 'off'}, latent_channels {arch['latent_channels']}.",
        f"- Parameters: {facts['parameters']:,}; weights file {facts['weights_file']} "
        f"({facts['weights_bytes'] / 1e6:.2f} MB, fp32 safetensors, sha256 {facts['weights_sha256'][:16]}…).",
        "",
        "## Latent statistics",
        f"- `scaling_factor = {facts['scaling_factor']:.6f}` = 1 / std of posterior samples of "
        f"{facts['stats_images']} training images (std {facts['latent_std']:.4f}).",
        f"- Per channel (config `latents_mean` / `latents_std`, used when latents are normalised per channel): "
        f"mean {[round(v, 4) for v in facts['latents_mean']]}, std {[round(v, 4) for v in facts['latents_std']]}.",
        "",
        "## Reconstruction quality",
        f"- PSNR (posterior mean, decoded, clamped to [-1, 1]; peak-to-peak 2; mean of per-image PSNR): "
        f"**{facts['psnr_db']:.2f} dB** on {facts['psnr_images']} held-out images; "
        f"{facts['psnr_check_db']:.2f} dB on the first {facts['psnr_check_images']} of them (the figure the test "
        "suite re-checks).",
    ]
    if "tests_sample_psnr_db" in facts:
        lines.append(f"- {facts['tests_sample_psnr_db']:.2f} dB on the {facts['tests_sample_images']} held-out images "
                     f"shipped in `{facts['tests_sample_path']}` (the figure the test suite re-checks without the "
                     "collection installed).")
    for entry in facts.get("benchmarks", []):
        lines.append(f"- {entry['text']} (`{entry['command']}`)")
    lines += [
        "",
        "## Use",
        "```python",
        "from latentdit.autoencoder import VAE",
        f"vae = VAE.load({facts['name']!r})",
        f"mean, std = vae.encode_moments(images)           # images: [N, 3, {size}, {size}] in [-1, 1]",
        "images = vae.decode(mean * vae.scaling_factor)   # decode takes scaled latents",
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


def _config_differences(saved: dict[str, Any], cfg: VAEConfig) -> list[str]:
    now = cfg.to_dict()
    out = []
    for section, fields in now.items():
        if not isinstance(fields, dict):
            continue
        for key, value in fields.items():
            if (section, key) not in RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value:
                out.append(f"{section}.{key}")
    return out


def train_vae(cfg: VAEConfig, out: Path, *, resume: bool = False, max_minutes: float | None = None,
              contention_note: str = "", command: str = "", intended_use: str = "", history: str = "",
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) into ``out``; export ``out/vae`` with its model card.
    Returns the model card's facts."""
    out = Path(out)
    manager = CheckpointManager(out, keep_last=cfg.train.keep_last)
    config_file = out / CONFIG_FILE
    latest = manager.latest()
    if resume:
        if latest is None:
            raise LatentDiTError(f"--resume: no checkpoint in {manager.dir}")
        saved = read_json(config_file, "VAE training config")
        vae_config_from_dict(saved, str(config_file))
        mismatched = _config_differences(saved, cfg)
        if mismatched:
            raise LatentDiTError(f"--resume: config differs from the run in {out} in {mismatched}")
    elif latest is not None:
        raise LatentDiTError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    main_proc = is_main_process()
    if log is None:
        log = (lambda msg: print(msg, flush=True)) if main_proc else (lambda msg: None)
    out.mkdir(parents=True, exist_ok=True)
    manager.clean_temporaries()
    write_json(config_file, cfg.to_dict())

    splits = load_splits(cfg, out)
    if splits.val.shape[0] == 0:
        raise LatentDiTError("no held-out images: set data.val_fraction > 0 or add a val/ split folder")
    preview = to_model_range(splits.val[:8])
    trainer = Trainer.create(cfg)
    step, elapsed = 0, {"train_wall_s": 0.0, "train_cpu_s": 0.0}
    if resume:
        state = trainer.load(latest)
        step = int(state["step"])
        elapsed = {k: float(state.get(k, 0.0)) for k in elapsed}
        log(f"resumed from {latest}")
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"AutoencoderKL {n_params:,} parameters; {splits.train.shape[0]} training / {splits.val.shape[0]} held-out "
        f"images; steps {step}..{cfg.train.steps}")

    from tqdm.auto import tqdm

    t0, c0 = time.time(), time.process_time()
    base = dict(elapsed)
    deadline = None if max_minutes is None else t0 + 60 * max_minutes

    def times() -> dict[str, float]:
        return {"train_wall_s": base["train_wall_s"] + time.time() - t0,
                "train_cpu_s": base["train_cpu_s"] + time.process_time() - c0}

    stopped_early, done = False, step
    bar = tqdm(range(step, cfg.train.steps), initial=step, total=cfg.train.steps, desc="train_vae",
               disable=not main_proc, dynamic_ncols=True)
    for step in bar:
        parts = trainer.step(splits.train, step)
        done = step + 1
        bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items()})
        if main_proc and cfg.train.sample_every and (done % cfg.train.sample_every == 0 or done == cfg.train.steps):
            trainer.model.eval()
            save_grid(out / "samples" / f"step-{done:07d}.png", preview, reconstruct_mean(trainer.model, preview))
            trainer.model.train()
        out_of_time = deadline is not None and time.time() >= deadline and done < cfg.train.steps
        if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps or out_of_time:
            trainer.save(manager, done, times())
        if out_of_time:
            stopped_early = True
            log(f"--max-minutes {max_minutes} reached at step {done}; exporting this state")
            break
    bar.close()
    elapsed = times()
    return export(trainer, splits, out / "vae", done=done, stopped_early=stopped_early, elapsed=elapsed,
                  contention_note=contention_note, command=command, intended_use=intended_use, history=history,
                  log=log)


def export(trainer: Trainer, splits: ImageSplits, vae_dir: Path, *, done: int, stopped_early: bool,
           elapsed: dict[str, float], contention_note: str, command: str, intended_use: str, history: str,
           log: Callable[[str], None]) -> dict[str, Any]:
    """Latent statistics into the config, ``save_pretrained``, held-out PSNR, model card."""
    from latentdit.autoencoder import VAE, reconstruction_psnrs
    from latentdit.io import sha256_file

    cfg, model = trainer.cfg, trainer.model
    model.eval()
    stats = latent_statistics(model, splits.train, cfg)
    model.register_to_config(scaling_factor=1.0 / stats["latent_std"], latents_mean=stats["latents_mean"],
                             latents_std=stats["latents_std"])
    model.save_pretrained(str(vae_dir), safe_serialization=True)
    vae = VAE.load(vae_dir)
    held_out = to_model_range(splits.val[:cfg.train.eval_images])
    per_image = reconstruction_psnrs(vae, held_out)
    n_check = min(cfg.train.eval_check_images, held_out.shape[0])
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    facts = {
        "name": cfg.name or "a latentdit VAE",
        "intended_use": intended_use,
        "psnr_db": round(float(per_image.mean()), 3), "psnr_images": int(held_out.shape[0]),
        "psnr_check_db": round(float(per_image[:n_check].mean()), 3), "psnr_check_images": n_check,
        "psnr_subset": "the first N held-out images",
        "held_out_names": splits.val_names[:held_out.shape[0]],
        "scaling_factor": vae.scaling_factor, **stats,
        "steps_done": done, "stopped_early": stopped_early,
        **splits.facts,
        "train_wall_s": round(elapsed["train_wall_s"], 1), "train_cpu_s": round(elapsed["train_cpu_s"], 1),
        "cpu_threads": torch.get_num_threads(), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "contention_note": contention_note, "command": command, "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_file": weights.name, "weights_bytes": weights.stat().st_size, "weights_sha256": sha256_file(weights),
        "architecture": {k: (list(vae.config[k]) if k == "block_out_channels" else vae.config[k])
                         for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                                   "mid_block_add_attention")},
        "config": cfg.to_dict(),
    }
    write_model_card(vae_dir, facts)
    log(f"saved {vae_dir}: scaling_factor {vae.scaling_factor:.6f}, PSNR {facts['psnr_db']:.2f} dB on "
        f"{facts['psnr_images']} held-out images ({facts['psnr_check_db']:.2f} dB on the first {n_check}), "
        f"{weights.stat().st_size / 1e6:.2f} MB, {elapsed['train_wall_s'] / 60:.1f} min training")
    return facts
