"""A tiny DiT trained with the hybrid diffusion loss memorises a handful of fixed latents."""

from __future__ import annotations

import torch

from latentdit.diffusion import create_diffusion
from latentdit.models.registry import create_dit

STEPS = 120
BATCH = 8  # the 4 latents twice
T_RANGE = (200, 1000)  # trained on, and evaluated at fixed timesteps of, this range


def _eval_losses(diffusion, model, x0, y, t, noise) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        losses = diffusion.training_losses(model, x0, t, noise=noise, model_kwargs={"y": y})
    model.train()
    return {k: v.mean().item() for k, v in losses.items()}



def test_tiny_dit_overfits_fixed_latents() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = create_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=4)
        diffusion = create_diffusion(learn_sigma=model.learn_sigma)
        assert diffusion.model_var_type == "learned_range"
        latents = torch.randn(4, 4, 8, 8, generator=gen)
        labels = torch.arange(4)

        eval_x0, eval_y = latents.repeat(4, 1, 1, 1), labels.repeat(4)
        eval_t = torch.linspace(T_RANGE[0], T_RANGE[1] - 1, eval_x0.shape[0]).round().long()
        eval_noise = torch.randn(eval_x0.shape, generator=gen)
        before = _eval_losses(diffusion, model, eval_x0, eval_y, eval_t, eval_noise)

        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        batch_x0, batch_y = latents.repeat(BATCH // 4, 1, 1, 1), labels.repeat(BATCH // 4)
        for _ in range(STEPS):
            t = torch.randint(T_RANGE[0], T_RANGE[1], (batch_x0.shape[0],), generator=gen)
            noise = torch.randn(batch_x0.shape, generator=gen)
            loss = diffusion.training_losses(model, batch_x0, t, noise=noise, model_kwargs={"y": batch_y})["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            optimizer.step()
        after = _eval_losses(diffusion, model, eval_x0, eval_y, eval_t, eval_noise)

    # A fresh DiT outputs exactly zero: mse starts at E[noise²] ≈ 1.
    assert 0.8 < before["mse"] < 1.2
    assert after["loss"] < 0.3 * before["loss"], (before, after)
    assert after["mse"] < 0.3 * before["mse"], (before, after)
    assert after["vb"] < before["vb"], (before, after)
