"""CUDA paths against the CPU: diffusion tables and losses, the DiT forward, loading and guided
sampling, the FID detector. Marked ``cuda`` (``pytest -m cuda``; benchmarks/gpu_check.sh runs them)
and skipped without a CUDA device.

Only packages present on a bare GPU machine are needed (no diffusers): the samplers used here are ours.
"""

from __future__ import annotations

import pytest
import torch

from dit_helpers import randomize
from latentdit import sampling as S
from latentdit.diffusion import create_diffusion
from latentdit.errors import LatentDiTError
from latentdit.models import create_dit
from latentdit.weights import load_model_for_sampling

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 off, so CUDA float32 results are comparable with the CPU at float32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _tiny_dit(**kw) -> torch.nn.Module:
    return randomize(create_dit("DiT-T/2", input_size=8, num_classes=10, **kw))


@pytest.mark.parametrize("spec", ["", "ddim50", "10,15,20"])
def test_training_losses_on_cuda_match_cpu(spec: str) -> None:
    diffusion = create_diffusion(spec, learn_sigma=True)
    x0, noise = _randn(4, 4, 6, 6, seed=0).clamp(-1, 1), _randn(4, 4, 6, 6, seed=1)
    output = torch.cat([_randn(4, 4, 6, 6, seed=2), torch.tanh(_randn(4, 4, 6, 6, seed=3))], 1)
    t = torch.tensor([0, 1, diffusion.num_timesteps // 2, diffusion.num_timesteps - 1])  # t = 0: decoder NLL
    seen = {}

    def model_fn(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        seen[x.device.type] = t_model.tolist()
        return output.to(x.device)

    cpu = diffusion.training_losses(model_fn, x0, t, noise=noise)
    gpu = diffusion.training_losses(model_fn, x0.to(CUDA), t.to(CUDA), noise=noise.to(CUDA))
    assert seen["cuda"] == seen["cpu"]
    for key in ("loss", "mse", "vb"):
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-5, atol=1e-6)


def test_dit_forward_on_cuda_matches_cpu() -> None:
    model = _tiny_dit()
    x, t, y = _randn(3, 4, 8, 8, seed=4), torch.tensor([0, 500, 999]), torch.tensor([1, 9, 10])  # 10: null row
    with torch.no_grad():
        cpu = model(x, t, y)
        model = model.to(CUDA)
        gpu = model(x.to(CUDA), t.to(CUDA), y.to(CUDA))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(x.to(CUDA), t.to(CUDA), y.to(CUDA))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(half.float().cpu(), cpu, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("ddpm", 4)])
def test_released_checkpoint_loads_and_samples_on_cuda_like_cpu(tmp_path, sampler: str, steps: int) -> None:
    model = _tiny_dit()
    path = tmp_path / "released.pt"
    torch.save(model.state_dict(), path)
    cpu_ckpt = load_model_for_sampling(path, device="cpu")
    gpu_ckpt = load_model_for_sampling(path, device="cuda")
    assert next(gpu_ckpt.model.parameters()).device.type == "cuda"
    settings = S.SamplerSettings(sampler=sampler, num_steps=steps, cfg_scale=2.0, guided_channels=3)
    x_T = _randn(4, 4, 8, 8, seed=5)
    labels = [0, 3, 7, 9]
    if sampler == "ddim":  # deterministic given x_T: the two devices agree
        cpu = S.sample_latents(cpu_ckpt.model, labels, settings, x_T=x_T, device="cpu")
        gpu = S.sample_latents(gpu_ckpt.model, labels, settings, x_T=x_T.to(CUDA), device="cuda")
        assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    else:  # stochastic: the same generator seed twice on the GPU gives the same samples
        runs = [S.sample_latents(gpu_ckpt.model, labels, settings, x_T=x_T.to(CUDA), device="cuda",
                                 noise=torch.Generator(device=CUDA).manual_seed(7)) for _ in range(2)]
        assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()
    bf16 = S.sample_latents(gpu_ckpt.model, labels, settings, x_T=x_T.to(CUDA), device="cuda", dtype=torch.bfloat16,
                            noise=torch.Generator(device=CUDA).manual_seed(7))
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()


def test_inception_features_on_cuda_match_cpu() -> None:
    from latentdit.metrics.inception import InceptionDetector, default_detector_path

    try:
        path = default_detector_path()
    except LatentDiTError as e:
        pytest.skip(f"FID detector not installed here: {e}")
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    cpu = InceptionDetector(path, device="cpu")(images)
    gpu = InceptionDetector(path, device="cuda")(images)
    assert gpu.shape == (6, 2048) and gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
