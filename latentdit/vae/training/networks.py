"""The networks of VAE training: the diffusers ``AutoencoderKL`` of the config and a PatchGAN discriminator."""

from __future__ import annotations

import torch
from torch import nn

from latentdit.errors import LatentDiTError
from latentdit.seeding import seed_for
from latentdit.vae.config import VAEConfig


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
        from latentdit.vae.autoencoder import VAE

        try:
            source = VAE.load(m.init_from).model
        except LatentDiTError as e:
            raise LatentDiTError(f"model.init_from: {e}") from None
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
    """The seeded discriminator of ``cfg`` (None without a GAN term)."""
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
