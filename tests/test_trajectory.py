"""The denoising trajectory: which steps are shown, the recorded chain is the sampled one, the picture's cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdit import sampling as S
from latentdit.diffusion import FlowProcess
from latentdit.sampling import record_trajectory, trajectory_steps
from latentdit.visualize import TRAJECTORY_HEADER, save_trajectory_grid, to_uint8


def _model_and_process(request, sampler):
    if sampler in ("euler", "heun", "euler-maruyama"):
        return request.getfixturevalue("tiny_flow_model"), FlowProcess()
    return request.getfixturevalue("tiny_model"), None


def test_trajectory_steps():
    assert trajectory_steps(50, 8) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert trajectory_steps(4, 8) == [0, 1, 2, 3]
    assert trajectory_steps(10, 1) == [9]


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_trajectory_picture_has_its_cells_where_documented(request, sampler, tmp_path):
    from PIL import Image

    model, process = _model_and_process(request, sampler)
    settings = S.SamplerSettings(sampler=sampler, num_steps=10, cfg_scale=2.0)
    points, final = record_trajectory(model, [0, 3], settings, process=process, seed=5, num_points=4)
    assert [p["i"] for p in points] == [0, 3, 6, 9]
    assert points[0]["t"] == (1.0 if process else 900) and points[-1]["t"] < points[0]["t"]  # ddim10: 900, 800, …
    # the recorded chain is the one sample_seeded runs: the same final samples
    torch.testing.assert_close(final, S.sample_seeded(model, [0, 3], settings, process=process, seed=5),
                               rtol=1e-5, atol=1e-5)
    _, picked = record_trajectory(model, [3], settings, process=process, seed=5, indices=[1], num_points=2)
    torch.testing.assert_close(picked, final[1:], rtol=1e-5, atol=1e-5)

    def decode(z):  # a stand-in decoder: latent channels 0..2 as an RGB image, 2× upsampled
        return torch.tanh(z[:, :3]).repeat_interleave(2, -1).repeat_interleave(2, -2)

    path = save_trajectory_grid(points, decode, ["Shirt", "Dress"], tmp_path / "t.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    cell, pad = 16 + 2, 2
    assert img.shape[0] == TRAJECTORY_HEADER + 4 * cell + pad    # rows: Shirt x_t, Shirt x0, Dress x_t, Dress x0
    margin = img.shape[1] - (4 * cell + pad)                      # columns: the 4 points
    assert margin > 0
    for row, (sample, key) in enumerate([(0, "x"), (0, "denoised"), (1, "x"), (1, "denoised")]):
        for col, p in enumerate(points):
            top, left = TRAJECTORY_HEADER + pad + row * cell, margin + pad + col * cell
            expected = to_uint8(decode(p[key][sample:sample + 1]))[0].permute(1, 2, 0).numpy()
            assert np.array_equal(img[top:top + 16, left:left + 16], expected), (row, col)
