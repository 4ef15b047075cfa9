"""The process interface: each process converts between x0, ε and v, conditions the model on its
time and samples with its default sampler; DDPM is exactly GaussianDiffusion; building processes from
config and metadata."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentdit.diffusion import (
    FLOW_MODEL_TIME_SCALE,
    PROCESS_TYPES,
    SAMPLERS,
    DDPMProcess,
    FlowProcess,
    GeneratorNoise,
    Process,
    build_process,
    create_diffusion,
    process_from_metadata,
)
from latentdit.errors import LatentDiTError

SHAPE = (6, 4, 3, 3)
PROCESSES = [DDPMProcess(), DDPMProcess("cosine", 200), FlowProcess(), FlowProcess(prediction="x", time_shift=3.0)]


def _times(process: Process) -> torch.Tensor:
    """One time per sample, spread over the process's time (clear of the ends where a conversion divides by 0)."""
    if isinstance(process, DDPMProcess):
        n = process.diffusion_steps
        return torch.tensor([0, 1, n // 4, n // 2, n - 2, n - 1])
    return torch.tensor([0.01, 0.1, 0.3, 0.5, 0.9, 0.99], dtype=torch.float64)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The interface, for every process
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_conversions_round_trip_between_x0_eps_and_v(process):
    x0, eps = _pair()
    t = _times(process)
    x_t = _state(process, x0, eps, t)
    close = dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(process.x0_from_eps(x_t, t, eps), x0, **close)
    torch.testing.assert_close(process.eps_from_x0(x_t, t, x0), eps, **close)
    v = process.v_from_x0(x_t, t, x0)
    torch.testing.assert_close(process.x0_from_v(x_t, t, v), x0, **close)
    torch.testing.assert_close(process.eps_from_v(x_t, t, v), eps, **close)


def _state(process: Process, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t written out from the process's definition."""
    if isinstance(process, DDPMProcess):
        return process.diffusion(learn_sigma=False).q_sample(x0, t, eps)
    tt = t.reshape(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * eps


def test_the_velocities_are_the_documented_ones():
    x0, eps = _pair(1)
    flow, t = FlowProcess(), _times(FlowProcess())
    torch.testing.assert_close(flow.v_from_x0(_state(flow, x0, eps, t), t, x0), eps - x0, rtol=1e-7, atol=1e-9)
    ddpm, t = DDPMProcess(), _times(DDPMProcess())
    abar = torch.from_numpy(ddpm.diffusion(False).alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    expected = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(ddpm.v_from_x0(_state(ddpm, x0, eps, t), t, x0), expected, rtol=1e-7, atol=1e-9)


def test_model_time():
    t = torch.tensor([0, 17, 999])
    assert torch.equal(DDPMProcess().model_time(t), t)  # the model sees the timestep index itself
    flow_t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(FlowProcess().model_time(flow_t), flow_t * FLOW_MODEL_TIME_SCALE)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_every_sampler_of_a_process_runs_on_its_grid(process):
    assert isinstance(process, Process) and process.default_sampler in process.samplers
    assert set(process.samplers) <= set(SAMPLERS)
    learn_sigma = isinstance(process, DDPMProcess)
    out_channels = process.out_channels(4, learn_sigma)
    seen = []

    def model_fn(x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        seen.append(float(t_model[0]))
        out = torch.tanh(x) * 0.5
        return torch.cat([out, torch.zeros_like(out)], 1)[:, :out_channels]

    for name in process.samplers:
        grid = process.sampling_grid(name, 4, learn_sigma)
        x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        seen.clear()
        out = SAMPLERS[name].fn(model_fn, x_T, grid, noise=GeneratorNoise(torch.Generator().manual_seed(1)))
        assert out.shape == x_T.shape and torch.isfinite(out).all(), name
        assert len(seen) == SAMPLERS[name].evaluations(4), name


def test_sampler_settings_checks_belong_to_the_process():
    ddpm, flow = DDPMProcess(diffusion_steps=100), FlowProcess(time_shift=2.0)
    assert ddpm.check_guidance_interval(0.0, 99.0) == (0, 99)
    assert flow.check_guidance_interval(0, 1) == (0.0, 1.0)
    with pytest.raises(LatentDiTError, match=r"0 ≤ lo ≤ hi ≤ 99"):
        ddpm.check_guidance_interval(0, 100)
    with pytest.raises(LatentDiTError, match="LO,HI"):
        ddpm.check_guidance_interval(0.5, 10)
    assert ddpm.in_guidance_interval(torch.tensor([40, 40]), (0, 40))
    assert not ddpm.in_guidance_interval(torch.tensor([41]), (0, 40))
    t_model = flow.model_time(torch.tensor([0.3], dtype=torch.float32))
    assert flow.in_guidance_interval(t_model, (0.3, 0.5)) and not flow.in_guidance_interval(t_model, (0.31, 0.5))
    assert ddpm.check_num_steps(100) == 100 and flow.check_num_steps(5000) == 5000
    with pytest.raises(LatentDiTError, match="between 1 and 100"):
        ddpm.check_num_steps(101)
    assert flow.sampling_time_shift(None) == 2.0 and flow.sampling_time_shift(1) == 1.0
    assert ddpm.sampling_time_shift(None) is None
    with pytest.raises(LatentDiTError, match="flow models only"):
        ddpm.sampling_time_shift(2.0)
    assert ddpm.partial_guidance and not flow.partial_guidance
    assert PROCESS_TYPES == {"ddpm": DDPMProcess, "flow": FlowProcess}
    assert ddpm.legacy_metadata() == {"noise_schedule": "linear", "diffusion_steps": 100}
    assert flow.legacy_metadata() is None


# ----------------------------------------------------------------------------------------------
# DDPM: the process is exactly GaussianDiffusion
# ----------------------------------------------------------------------------------------------

def test_ddpm_draw_time_is_todays_randint_draw():
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    t = DDPMProcess(diffusion_steps=1000).draw_time(64, g1)
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=g2))
    # the generator has advanced the same way, so later draws (noise, drop mask) are unchanged too
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_losses_equal_gaussian_diffusion(learn_sigma, schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=g)
    noise = torch.randn(5, 4, 3, 3, generator=g)
    t = torch.tensor([0, 1, 17, 500, 999])
    weight = torch.randn(8 if learn_sigma else 4, 4, generator=g)

    def model_fn(x, ts, y):
        return torch.einsum("oc,nchw->nohw", weight, x) * (1 + ts.view(-1, 1, 1, 1) / 1000) + y

    ref = create_diffusion("", schedule, 1000, learn_sigma).training_losses(model_fn, x0, t, noise, {"y": 0.1})
    got = DDPMProcess(schedule, 1000).training_losses(model_fn, x0, t, noise, {"y": 0.1})
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert DDPMProcess().out_channels(4, learn_sigma) == (8 if learn_sigma else 4)


# ----------------------------------------------------------------------------------------------
# Building from config and metadata
# ----------------------------------------------------------------------------------------------

def test_metadata_round_trips_through_json():
    for p in (DDPMProcess("cosine", 500),
              FlowProcess("x", "logit_normal", 0.3, 0.8, 2.0, "min_snr")):
        meta = json.loads(json.dumps(p.metadata()))
        q = process_from_metadata(meta)
        assert type(q) is type(p) and q.metadata() == p.metadata()


def test_build_process_from_config_dataclass_and_dict():
    from latentdit.config import DiffusionConfig

    p = build_process(DiffusionConfig())
    assert isinstance(p, DDPMProcess) and p.metadata() == {"process": "ddpm", "noise_schedule": "linear",
                                                           "diffusion_steps": 1000}
    f = build_process({"process": "flow", "time_shift": 2.5, "noise_schedule": "linear", "sample_steps": 50})
    assert isinstance(f, FlowProcess) and f.time_shift == 2.5 and f.default_sampler in ("euler", "heun")


@pytest.mark.parametrize("fields, match", [
    ({"process": "fl0w"}, r"diffusion.process: expected one of ddpm, flow, got 'fl0w'"),
    ({"process": "flow", "prediction": "eps"}, r"diffusion.prediction: expected one of v, x"),
    ({"process": "flow", "time_sampling": "beta"}, r"diffusion.time_sampling"),
    ({"process": "flow", "time_shift": 0}, r"diffusion.time_shift: expected a finite number > 0"),
    ({"process": "flow", "logit_std": -1.0}, r"diffusion.logit_std"),
    ({"process": "flow", "logit_mean": math.nan}, r"diffusion.logit_mean"),
    ({"process": "flow", "loss_weighting": "snr"}, r"diffusion.loss_weighting"),
    ({"process": "ddpm", "noise_schedule": "quadratic"}, r"diffusion.noise_schedule"),
    ({"process": "ddpm", "diffusion_steps": 0}, r"diffusion.diffusion_steps"),
])
def test_bad_settings_name_the_field(fields, match):
    with pytest.raises(LatentDiTError, match=match):
        build_process(fields)


def test_metadata_with_foreign_fields_is_refused():
    with pytest.raises(LatentDiTError, match="unknown field.*prediction"):
        process_from_metadata({"process": "ddpm", "prediction": "v"})
