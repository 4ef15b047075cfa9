"""latentdit.colour: mean CIEDE2000 ΔE per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdit.colour import delta_e_2000, reconstruction_delta_e, srgb_to_lab, to_srgb_uint8
from latentdit.errors import LatentDiTError


def _flat(rgb: tuple[int, int, int], n: int = 1, size: int = 4) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (n, size, size, 3)).copy()


def test_white_against_black_is_100_and_identical_images_0():
    # sRGB white is L* 100, black L* 0, both with a* = b* = 0; at mean lightness 50 CIEDE2000's lightness
    # weight S_L is 1, so the difference is exactly the lightness difference.
    white, black = _flat((255, 255, 255)), _flat((0, 0, 0))
    np.testing.assert_allclose(delta_e_2000(white, black), [100.0], rtol=1e-6)
    assert delta_e_2000(white, white.copy()).tolist() == [0.0]


def test_per_image_mean_over_pixels_and_order_kept():
    white, black = _flat((255, 255, 255), 1), _flat((0, 0, 0), 1)
    half = white.copy()
    half[:, :, :2] = 0                               # half of the pixels black
    ref = np.concatenate([white, white, white])
    got = delta_e_2000(ref, np.concatenate([white, half, black]), batch_size=2)
    np.testing.assert_allclose(got, [0.0, 50.0, 100.0], rtol=1e-6, atol=1e-7)


def test_a_hue_shift_costs_more_than_a_step_of_lightness():
    green, olive = _flat((40, 160, 40)), _flat((110, 120, 30))   # a saturated green gone olive
    brighter = _flat((41, 161, 41))                               # one 8-bit step in each channel
    assert delta_e_2000(green, olive)[0] > 10
    assert delta_e_2000(green, brighter)[0] < 1


def test_tensors_in_model_range_are_quantised_like_saved_pngs():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    u8 = to_srgb_uint8(x)
    assert u8.shape == (3, 8, 8, 3) and u8.dtype == np.uint8
    # differences far below one 8-bit step round away, as they would in a saved PNG
    assert reconstruction_delta_e(x, x + 1e-4).max() < 0.8
    assert np.all(reconstruction_delta_e(x, x) == 0)


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((1, 4, 4, 3), np.uint8), np.zeros((2, 4, 4, 3), np.uint8), "of one shape"),
    (np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4), np.uint8), "[N, H, W, 3]"),
    (np.zeros((1, 4, 4, 3), np.float32), np.zeros((1, 4, 4, 3), np.float32), "uint8"),
])
def test_bad_batches_are_refused(a, b, message):
    with pytest.raises(LatentDiTError, match=message.replace("[", r"\[").replace("]", r"\]")):
        delta_e_2000(a, b)


def test_grey_tensors_are_refused():
    with pytest.raises(LatentDiTError, match="RGB images"):
        to_srgb_uint8(torch.zeros(1, 1, 4, 4))


# ------------------------------------------------------------------------------------------ sRGB -> CIELAB


def test_srgb_to_lab_agrees_with_scikit_image():
    from skimage.color import rgb2lab

    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    images[0, :, 0, :4] = torch.tensor([[-1.0, 1.0, -1.0, -0.999]] * 3)   # black, white, one primary, near-black
    images[0, 0, 0, 2] = 1.0
    ours = srgb_to_lab(images).permute(0, 2, 3, 1).numpy()
    theirs = rgb2lab(((images + 1) / 2).permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(ours, theirs, atol=2e-3)     # Lab units: L runs 0..100
    np.testing.assert_allclose(ours[0, 0, 1], [100.0, 0.0, 0.0], atol=1e-2)   # white (the D65 matrix rounds)


def test_srgb_to_lab_has_finite_gradients_at_black_white_and_beyond():
    x = torch.tensor([-1.2, -1.0, -0.9999, 0.0, 1.0, 1.3]).repeat(3, 1).T.reshape(6, 3, 1, 1).clone()
    x.requires_grad_(True)
    srgb_to_lab(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0].abs().sum() == 0 and x.grad[-1].abs().sum() == 0   # clamped outside [-1, 1]
    assert x.grad[2].abs().sum() > 0                                      # dark colours still learn


def test_srgb_to_lab_refuses_non_rgb_shapes():
    with pytest.raises(LatentDiTError, match=r"CIELAB needs RGB images \[N, 3, H, W\]; got shape \(2, 1, 4, 4\)"):
        srgb_to_lab(torch.zeros(2, 1, 4, 4))
