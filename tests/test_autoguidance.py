"""Autoguidance: guide + w·(main − guide) with tiny fake models against hand-computed outputs, its
interval, its refusals (settings, process, latents, classes) and the sampling tool's --guide flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdit.diffusion import DDPMProcess, FlowProcess
from latentdit.errors import LatentDiTError
from latentdit.sampling import Guide, SamplerSettings, make_model_fn, sample_latents
from latentdit.sampling.autoguidance import check_guide_model
from script_helpers import load_script

try:
    from sampling_helpers import make_tiny_dit, make_tiny_vae_dir, run_sample_tool, save_our_checkpoint
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import make_tiny_dit, make_tiny_vae_dir, run_sample_tool, save_our_checkpoint


class Linear(nn.Module):
    """A fake DiT whose output is ``a·x`` (and ``sigma`` on learned-σ channels)."""

    def __init__(self, a: float, learn_sigma: bool = False, sigma: float = 0.0, in_channels: int = 2,
                 input_size: int = 2, num_classes: int = 3):
        super().__init__()
        self.a, self.sigma = a, sigma
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.anchor = nn.Parameter(torch.zeros(()))  # a device for the sampler
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        out = self.a * x
        return torch.cat([out, torch.full_like(x, self.sigma)], 1) if self.learn_sigma else out


FLOW = FlowProcess()


def test_autoguided_model_fn_by_hand_and_its_interval():
    main, weak = Linear(3.0, learn_sigma=True, sigma=0.7), Linear(1.0, learn_sigma=True, sigma=-5.0)
    x, y = torch.randn(2, 2, 2, 2), torch.tensor([0, 1])
    fn = make_model_fn(main, y, cfg_scale=1.0, guide_model=weak, guide_scale=2.0)
    out = fn(x, torch.tensor(500.0))
    torch.testing.assert_close(out[:, :2], 5 * x)                     # x + 2·(3x − x)
    torch.testing.assert_close(out[:, 2:], torch.full_like(x, 0.7))  # σ channels from the main model
    # w = 0 gives the guide, w = 1 (the guide unused) the main model
    torch.testing.assert_close(make_model_fn(main, y, cfg_scale=1.0, guide_model=weak, guide_scale=0.0)(
        x, torch.tensor(1.0))[:, :2], x)
    weak.calls = 0
    torch.testing.assert_close(make_model_fn(main, y, cfg_scale=1.0, guide_model=weak, guide_scale=1.0)(
        x, torch.tensor(1.0))[:, :2], 3 * x)
    assert weak.calls == 0
    # only inside the interval (on the model's time input)
    inside = make_model_fn(main, y, cfg_scale=1.0, guide_model=weak, guide_scale=2.0,
                           autoguide_at=lambda t: 100 <= float(t[0]) <= 600)
    torch.testing.assert_close(inside(x, torch.tensor(500.0))[:, :2], 5 * x)
    torch.testing.assert_close(inside(x, torch.tensor(900.0))[:, :2], 3 * x)
    with pytest.raises(LatentDiTError, match="replaces classifier-free guidance"):
        make_model_fn(main, y, cfg_scale=2.0, guide_model=weak, guide_scale=2.0)


def test_one_euler_step_of_an_autoguided_flow_model():
    main, weak = Linear(3.0), Linear(1.0)
    guide = Guide(weak, FlowProcess())
    settings = SamplerSettings(sampler="euler", num_steps=1, guide_scale=2.0).resolved(FLOW, 2, guide=guide)
    assert settings.guide is guide and settings.describe() == "euler-1, autoguidance 2"
    x1 = torch.randn(3, 2, 2, 2)
    out = sample_latents(main, [0, 1, 2], settings, x_T=x1)
    torch.testing.assert_close(out, x1 - 5 * x1)  # x0 = x1 + (0 − 1)·v with v = x1 + 2·(3·x1 − x1)
    # inside its interval only: t = 1 lies outside [0, 0.5], so the step is the main model's
    later = SamplerSettings(sampler="euler", num_steps=1, guide_scale=2.0, guide_interval=(0.0, 0.5))
    out = sample_latents(main, [0, 1, 2], later.resolved(FLOW, 2, guide=guide), x_T=x1)
    torch.testing.assert_close(out, x1 - 3 * x1)


def test_autoguided_ddim_equals_sampling_the_combined_model():
    main, weak, combined = Linear(0.6), Linear(0.2), Linear(0.2 + 2.5 * (0.6 - 0.2))
    ddpm = DDPMProcess()
    x_T = torch.randn(2, 2, 2, 2)
    guided = SamplerSettings(sampler="ddim", num_steps=4, guide_scale=2.5).resolved(ddpm, 2, guide=Guide(weak, ddpm))
    plain = SamplerSettings(sampler="ddim", num_steps=4).resolved(ddpm, 2)
    torch.testing.assert_close(sample_latents(main, [0, 1], guided, x_T=x_T),
                               sample_latents(combined, [0, 1], plain, x_T=x_T), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fields, guide, match", [
    (dict(guide_scale=2.0), None, r"--guide-scale applies to autoguidance only.*--guide"),
    (dict(guide_interval=(0.0, 0.5)), None, r"--guide-interval applies to autoguidance only"),
    (dict(), "flow", r"no effect at guide scale 1"),
    (dict(guide_scale=2.0, cfg_scale=4.0), "flow", r"cfg scale must be 1.*--cfg-scale 1"),
    (dict(guide_scale=-1.0), "flow", r"guide scale \(--guide-scale\) must be a finite number >= 0"),
    (dict(guide_scale=2.0, guide_interval=(0.0, 2.0)), "flow", r"--guide-interval: guidance interval"),
    (dict(guide_scale=2.0), "ddpm", r"trained with the ddpm process, the main model with flow"),
    (dict(guide_scale=2.0), "flow-x", r"predicts another quantity.*prediction 'x' \(main model: 'v'\)"),
])
def test_settings_refuse_autoguidance_where_it_does_not_apply(fields, guide, match):
    processes = {"flow": FLOW, "ddpm": DDPMProcess(), "flow-x": FlowProcess(prediction="x")}
    g = Guide(Linear(1.0), processes[guide]) if guide else None
    with pytest.raises(LatentDiTError, match=match):
        SamplerSettings(sampler="euler", **fields).resolved(FLOW, 2, guide=g)


def test_ddpm_guides_must_share_the_schedule():
    ddpm = DDPMProcess()
    other = DDPMProcess(noise_schedule="cosine")
    with pytest.raises(LatentDiTError, match=r"noise_schedule 'cosine' \(main model: 'linear'\)"):
        SamplerSettings(guide_scale=2.0).resolved(ddpm, 2, guide=Guide(Linear(1.0), other))


@pytest.mark.parametrize("name, value", [("in_channels", 3), ("input_size", 4), ("num_classes", 5)])
def test_guides_of_other_latents_or_classes_are_refused(name, value):
    guide = Guide(Linear(1.0, **{name: value}), FLOW)
    with pytest.raises(LatentDiTError, match=f"has {name} {value}, the main model"):
        check_guide_model(Linear(3.0), guide)
    settings = SamplerSettings(sampler="euler", num_steps=1, guide_scale=2.0).resolved(FLOW, 2, guide=guide)
    with pytest.raises(LatentDiTError, match=f"has {name} {value}"):
        sample_latents(Linear(3.0), [0], settings)


def test_sample_tool_with_a_guide_checkpoint(tmp_path, capsys):
    main, weak = make_tiny_dit(seed=0), make_tiny_dit(seed=1)
    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    ckpt = save_our_checkpoint(main, tmp_path / "ema.safetensors", vae=str(vae_dir))
    guide = save_our_checkpoint(weak, tmp_path / "early.safetensors", vae=str(vae_dir))
    common = ["--ckpt", str(ckpt), "--labels", "0", "--samples-per-label", "1", "--device", "cpu",
              "--sampler", "ddim", "--num-steps", "2"]
    code = run_sample_tool(common + ["--guide", str(guide), "--guide-scale", "2", "--cfg-scale", "1",
                                     "--guide-interval", "0,999", "--out", str(tmp_path / "g.png")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "with ddim-2, autoguidance 2" in out.out and (tmp_path / "g.png").exists()
    code = run_sample_tool(common + ["--guide", str(guide), "--guide-scale", "2", "--out", str(tmp_path / "h.png")])
    assert code == 2 and "--cfg-scale 1" in capsys.readouterr().err
    other = save_our_checkpoint(make_tiny_dit(seed=1, num_classes=5), tmp_path / "other.safetensors",
                                class_names=list("abcde"))
    code = run_sample_tool(common + ["--guide", str(other), "--guide-scale", "2", "--cfg-scale", "1",
                                     "--out", str(tmp_path / "h.png")])
    assert code == 2 and "has num_classes 5, the main model 4" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()


def test_sample_ddp_records_the_guide_in_its_chunk_settings(tmp_path):
    tool = load_script("tools/sample_ddp.py")
    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    ckpt = save_our_checkpoint(make_tiny_dit(seed=0), tmp_path / "ema.safetensors", vae=str(vae_dir))
    guide = save_our_checkpoint(make_tiny_dit(seed=1), tmp_path / "early.safetensors", vae=str(vae_dir))
    argv = ["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "out"), "--num-samples", "2", "--chunk-size", "2",
            "--batch-size", "2", "--sampler", "ddim", "--num-steps", "2", "--cfg-scale", "1", "--guide", str(guide)]
    assert tool.main(argv + ["--guide-scale", "2"]) == 0
    with pytest.raises(LatentDiTError, match=r"other settings.*guide_scale"):
        tool.main(argv + ["--guide-scale", "3"])
