"""Guided sampling: determinism, cfg 1, the guidance interval and guided channels, settings checked
against the process, seeded batches, sampler callbacks, default labels, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdit import sampling as S
from latentdit.diffusion import FlowProcess, GeneratorNoise
from latentdit.diffusion.samplers import make_dpm_solver
from latentdit.errors import LatentDiTError

try:
    from sampling_helpers import counting_hook, make_tiny_vae_dir
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import counting_hook, make_tiny_vae_dir

STEPS = 4


DDPM_SAMPLERS = ("ddpm", "ddim", "dpm-solver")
FLOW_SAMPLERS = FlowProcess.samplers
FLOW = FlowProcess()


def _sample(model, sampler="ddim", seed=0, labels=(0, 1), process=None, callback=None, **kw):
    kw.setdefault("num_steps", STEPS)
    x_T = kw.pop("x_T", None)
    settings = S.SamplerSettings(sampler=sampler, **kw)
    return S.sample_latents(model, list(labels), settings, process=process, callback=callback, x_T=x_T,
                            noise=torch.Generator().manual_seed(seed))


def _model_and_process(request, sampler):
    if sampler in FLOW_SAMPLERS:
        return request.getfixturevalue("tiny_flow_model"), FLOW
    return request.getfixturevalue("tiny_model"), None


def _evaluations(sampler, steps=STEPS):
    from latentdit.diffusion.samplers import SAMPLERS

    return SAMPLERS[sampler].evaluations(steps)


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_sampler_is_deterministic_under_a_seed(request, sampler):
    model, process = _model_and_process(request, sampler)
    a = _sample(model, sampler, seed=0, cfg_scale=1.5, process=process)
    b = _sample(model, sampler, seed=0, cfg_scale=1.5, process=process)
    c = _sample(model, sampler, seed=1, cfg_scale=1.5, process=process)
    assert a.shape == (2, 4, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_cfg_one_runs_no_unconditional_pass(request, sampler):
    model, process = _model_and_process(request, sampler)
    calls, handle = counting_hook(model)
    try:
        _sample(model, sampler, cfg_scale=1.0, process=process)
    finally:
        handle.remove()
    assert len(calls) == _evaluations(sampler)
    assert all(n == 2 and labels == [0, 1] for n, labels in calls)


def test_guided_forward_doubles_the_batch_with_null_labels(tiny_model):
    calls, handle = counting_hook(tiny_model)
    try:
        _sample(tiny_model, "ddpm", cfg_scale=2.0)
    finally:
        handle.remove()
    null = tiny_model.null_class_id
    assert len(calls) == STEPS  # cond and uncond in one batched forward
    assert all(n == 4 and labels == [0, 1, null, null] for n, labels in calls)


def test_ddpm_visits_respaced_original_timesteps(tiny_model):
    from latentdit.diffusion import create_diffusion

    seen = []
    handle = tiny_model.register_forward_hook(lambda m, a, o: seen.append(int(a[1][0])))
    try:
        _sample(tiny_model, "ddpm", num_steps=5, cfg_scale=1.0)
    finally:
        handle.remove()
    expected = sorted((int(t) for t in create_diffusion("5").timestep_map), reverse=True)
    assert seen == expected == [999, 749, 500, 250, 0]


def _timesteps(model, sampler, process=None):
    """The times the sampler visits, in the process's own units (ddpm: index; flow: t in [0, 1])."""
    seen = []
    scale = 1.0 if process is None else 1000.0
    handle = model.register_forward_hook(lambda m, a, o: seen.append(float(a[1][0]) / scale))
    try:
        _sample(model, sampler, cfg_scale=1.0, process=process)
    finally:
        handle.remove()
    return seen if process is not None else [int(t) for t in seen]


@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_guidance_interval_is_honoured(request, sampler):
    model, process = _model_and_process(request, sampler)
    steps = _timesteps(model, sampler, process)
    unguided = _sample(model, sampler, cfg_scale=1.0, process=process)
    guided = _sample(model, sampler, cfg_scale=3.0, process=process)

    # an interval containing no visited step: exactly the unguided run
    if process is None:
        gaps = [(b + 1, a - 1) for a, b in zip(steps, steps[1:]) if a - b > 2]
        whole = (0, 999)
    else:
        gaps = [(b + 0.01, a - 0.01) for a, b in zip(steps, steps[1:]) if a - b > 0.03]
        whole = (0.0, 1.0)
    lo, hi = gaps[0]
    outside = _sample(model, sampler, cfg_scale=3.0, guidance_interval=(lo, hi), process=process)
    assert torch.equal(outside, unguided)

    # the whole range: exactly the guided run
    everywhere = _sample(model, sampler, cfg_scale=3.0, guidance_interval=whole, process=process)
    assert torch.equal(everywhere, guided)

    # part of the range: uncond halves only at steps inside [lo, hi]
    distinct = sorted(set(steps), reverse=True)
    lo, hi = distinct[-2], distinct[1]
    calls, handle = counting_hook(model)
    try:
        partial = _sample(model, sampler, cfg_scale=3.0, guidance_interval=(lo, hi), process=process)
    finally:
        handle.remove()
    doubled = [n == 4 for n, _ in calls]
    assert doubled == [lo <= t <= hi for t in steps]
    assert 0 < sum(doubled) < len(steps)
    assert not torch.equal(partial, unguided) and not torch.equal(partial, guided)


def test_guided_channels_3_differs_from_all_and_4_equals_all(tiny_model):
    all_ch = _sample(tiny_model, "ddim", cfg_scale=3.0)
    three = _sample(tiny_model, "ddim", cfg_scale=3.0, guided_channels=3)
    four = _sample(tiny_model, "ddim", cfg_scale=3.0, guided_channels=4)
    assert torch.equal(four, all_ch)
    assert not torch.equal(three, all_ch)


def test_dpm_solver_scheduler_uses_our_schedule_and_learned_sigma_is_sliced(tiny_model):
    from latentdit.diffusion import get_betas

    sched = make_dpm_solver(10)
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.solver_order == 2
    assert np.allclose(sched.betas.numpy(), get_betas("linear", 1000), atol=1e-7)
    assert len(sched.timesteps) == 10 and int(sched.timesteps[0]) == 999
    assert tiny_model.learn_sigma and tiny_model.out_channels == 8
    assert _sample(tiny_model, "dpm-solver", cfg_scale=1.5).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), -float("inf")])
def test_bad_cfg_scale_is_an_error(tiny_model, bad):
    with pytest.raises(LatentDiTError, match="cfg"):
        _sample(tiny_model, cfg_scale=bad)


@pytest.mark.parametrize("kw, match", [
    (dict(sampler="plms"), r"unknown sampler 'plms' \(--sampler\)"),
    (dict(sampler="euler"), r"sampler 'euler' \(--sampler\) samples flow models.*ddpm process; choose one of "
                            r"ddpm, ddim, dpm-solver"),
    (dict(num_steps=0), r"num_steps \(--num-steps\) must be between 1 and 1000"),
    (dict(num_steps=1001), "num-steps"),
    (dict(guidance_interval=(10, 5)), "guidance interval"),
    (dict(guidance_interval=(0.5, 10)), "LO,HI"),
    (dict(guidance_interval="3"), "LO,HI"),
    (dict(guided_channels=5), "guided channels"),
    (dict(time_shift=3.0), r"time_shift \(--time-shift\) applies to flow models only"),
    (dict(ddim_map="stride"), r"ddim_map \(--ddim-map\) must be one of ddim, even"),
    (dict(sampler="ddim", num_steps=300), r"ddim300.*exactly 300 steps.*--ddim-map even"),
    (dict(labels=(0, 4)), "class ids in 0..3"),
    (dict(x_T=torch.zeros(2, 4, 7, 7)), r"initial noise has shape \(2, 4, 7, 7\), expected \(2, 4, 8, 8\)"),
])
def test_bad_sampling_arguments(tiny_model, kw, match):
    with pytest.raises(LatentDiTError, match=match):
        _sample(tiny_model, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(sampler="ddim"), r"sampler 'ddim' \(--sampler\) samples ddpm models.*flow process; choose one of "
                           + ", ".join(FlowProcess.samplers)),
    (dict(guided_channels=3), r"guided channels \(--guided-channels\) other than 'all' apply to ddpm models"),
    (dict(guidance_interval=(0.2, 1.5)), r"0 ≤ lo ≤ hi ≤ 1 \(flow times\)"),
    (dict(time_shift=0.0), r"time_shift \(--time-shift\) must be a finite number > 0"),
])
def test_bad_sampling_arguments_for_a_flow_model(tiny_flow_model, kw, match):
    kw.setdefault("sampler", "heun")
    with pytest.raises(LatentDiTError, match=match):
        _sample(tiny_flow_model, process=FLOW, **kw)


def test_a_flow_process_refuses_a_learned_sigma_model(tiny_model):
    with pytest.raises(LatentDiTError, match="learn_sigma"):
        _sample(tiny_model, "heun", process=FLOW)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler-maruyama"])
def test_sample_seeded_is_independent_of_batch_size_and_where_a_batch_starts(request, sampler):
    model, process = _model_and_process(request, sampler)
    settings = S.SamplerSettings(sampler=sampler, num_steps=STEPS, cfg_scale=1.5)
    labels = [0, 1, 2, 3, 1]
    whole = S.sample_seeded(model, labels, settings, process=process, seed=7, batch_size=2)
    for batch_size in (1, 3, 5):
        other = S.sample_seeded(model, labels, settings, process=process, seed=7, batch_size=batch_size)
        torch.testing.assert_close(other, whole, rtol=1e-5, atol=1e-5)  # batched matmuls round differently
    tail = S.sample_seeded(model, labels[2:], settings, process=process, seed=7, first_index=2, batch_size=2)
    torch.testing.assert_close(tail, whole[2:], rtol=1e-5, atol=1e-5)
    assert (whole[1] - whole[4]).abs().max() > 1e-2  # same label, other seed
    # the step noise matters: a stochastic sampler's result is not a function of x_T alone
    if sampler != "ddim":
        again = S.sample_seeded(model, labels[:1], settings, process=process, seed=7, batch_size=1)
        x_T = S.per_sample_noise(7, [0]).draw((1, 4, 8, 8), "cpu")
        other_steps = S.sample_latents(model, labels[:1], settings, process=process, x_T=x_T,
                                       noise=torch.Generator().manual_seed(99))
        assert (again - other_steps).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# DDIM's timestep map, sampler callbacks
# ----------------------------------------------------------------------------------------------

def test_ddim_visits_ddims_strided_timesteps_by_default(tiny_model):
    from latentdit.diffusion import space_timesteps

    seen = []
    handle = tiny_model.register_forward_hook(lambda m, a, o: seen.append(int(a[1][0])))
    try:
        _sample(tiny_model, "ddim", num_steps=50, cfg_scale=1.0, labels=(0,))
        strided = list(seen)
        seen.clear()
        _sample(tiny_model, "ddim", num_steps=50, cfg_scale=1.0, labels=(0,), ddim_map="even")
    finally:
        handle.remove()
    assert strided == sorted(space_timesteps(1000, "ddim50"), reverse=True)
    assert strided[:3] == [980, 960, 940] and strided[-1] == 0
    assert seen == sorted(space_timesteps(1000, "50"), reverse=True)
    assert sum(a != b for a, b in zip(strided, seen)) >= 40  # the two maps differ almost everywhere


@pytest.mark.parametrize("sampler", S.SAMPLERS)
def test_callback_sees_every_step_with_its_state_time_and_estimate(request, sampler):
    model, process = _model_and_process(request, sampler)
    infos = []
    out = _sample(model, sampler, cfg_scale=2.0, process=process, callback=infos.append)
    assert [info["i"] for info in infos] == list(range(STEPS))
    times = [info["t"] for info in infos]
    assert times == sorted(times, reverse=True) and len(set(times)) == STEPS
    if process is None:
        assert all(isinstance(t, int) for t in times)
    else:
        assert times[0] == 1.0 and 0 < times[-1] < 1
    x_T = GeneratorNoise(torch.Generator().manual_seed(0)).draw((2, 4, 8, 8), "cpu")
    torch.testing.assert_close(infos[0]["x"], x_T)  # the first state is the initial noise
    for info in infos:
        assert info["x"].shape == info["denoised"].shape == out.shape
        assert torch.isfinite(info["denoised"]).all()
    # the estimate at the last step is close to the result (it is the result for a deterministic last step)
    assert (infos[-1]["denoised"] - out).abs().mean() < (infos[0]["denoised"] - out).abs().mean()


# ----------------------------------------------------------------------------------------------
# Default labels, decoding
# ----------------------------------------------------------------------------------------------

def test_default_labels():
    assert S.default_labels(10) == list(range(10))
    many = S.default_labels(1000)
    assert len(many) == 16 and many[0] == 0 and many[-1] == 999


def test_decode_to_uint8_and_vae_check(tmp_path, tiny_model):
    from latentdit.vae import VAE

    vae = VAE.load(make_tiny_vae_dir(tmp_path / "vae"))
    assert vae.scaling_factor == 0.5
    latents = torch.randn(3, 4, 8, 8)
    images = S.decode_to_uint8(vae, latents, batch_size=2)
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    ref = vae.decode(latents).clamp(-1, 1)
    assert np.abs(images.astype(np.float32) - ((ref + 1) * 127.5).permute(0, 2, 3, 1).numpy()).max() <= 0.51
    with pytest.raises(LatentDiTError, match="channels"):
        S.decode_to_uint8(vae, torch.randn(1, 3, 8, 8))
