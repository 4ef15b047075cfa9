"""Guided sampling: determinism, guidance interval, cfg 1, labels, checkpoint forms, tools/sample.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdit import sampling as S
from latentdit.diffusion import FlowProcess
from latentdit.diffusion.samplers import make_dpm_solver
from latentdit.errors import LatentDiTError
from latentdit.io import save_safetensors
from latentdit.visualize import TRAJECTORY_HEADER, record_trajectory, save_trajectory_grid, to_uint8, trajectory_steps

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress"]
STEPS = 4


# ----------------------------------------------------------------------------------------------
# Fixtures (also imported by test_sample_ddp.py)
# ----------------------------------------------------------------------------------------------

def make_tiny_dit(seed: int = 0, num_classes: int = len(CLASS_NAMES), learn_sigma: bool = True):
    """DiT-T/2 on 8×8×4 latents with every parameter perturbed, so outputs are non-trivial."""
    from latentdit.models.registry import create_dit

    torch.manual_seed(seed)
    model = create_dit("DiT-T/2", input_size=8, num_classes=num_classes, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def save_our_checkpoint(model, path: Path, class_names=CLASS_NAMES, vae: str | None = None,
                        process=None) -> Path:
    """Weights as the trainer writes them: safetensors + model config + class names (+ VAE, + process)
    metadata."""
    meta = {S.META_MODEL: json.dumps(model.config), S.META_CLASS_NAMES: json.dumps(list(class_names))}
    if vae is not None:
        meta[S.META_VAE] = json.dumps(vae)
    if process is not None:
        meta[S.META_PROCESS] = json.dumps(process.metadata())
    save_safetensors(model.state_dict(), path, meta)
    return path


def make_tiny_vae_dir(path: Path) -> Path:
    """A random 2-level AutoencoderKL (latent 4 ch, ×2 downsampling) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_dit()


@pytest.fixture(scope="module")
def tiny_flow_model():
    return make_tiny_dit(seed=2, learn_sigma=False)


def _counting_hook(model):
    """Record (batch size, labels) of every forward of ``model``; returns (calls, handle)."""
    calls = []

    def hook(module, args, output):
        calls.append((args[0].shape[0], args[2].tolist()))

    return calls, model.register_forward_hook(hook)


DDPM_SAMPLERS = ("ddpm", "ddim", "dpm-solver")
FLOW_SAMPLERS = ("euler", "heun", "euler-maruyama")
FLOW = FlowProcess()


def _sample(model, sampler="ddim", seed=0, labels=(0, 1), process=None, callback=None, **kw):
    kw.setdefault("num_steps", STEPS)
    settings = S.SamplerSettings(sampler=sampler, **kw)
    return S.sample_latents(model, list(labels), settings, process=process, callback=callback,
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
    calls, handle = _counting_hook(model)
    try:
        _sample(model, sampler, cfg_scale=1.0, process=process)
    finally:
        handle.remove()
    assert len(calls) == _evaluations(sampler)
    assert all(n == 2 and labels == [0, 1] for n, labels in calls)


def test_guided_forward_doubles_the_batch_with_null_labels(tiny_model):
    calls, handle = _counting_hook(tiny_model)
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
    calls, handle = _counting_hook(model)
    try:
        partial = _sample(model, sampler, cfg_scale=3.0, guidance_interval=f"{lo},{hi}", process=process)
    finally:
        handle.remove()
    doubled = [n == 4 for n, _ in calls]
    assert doubled == [lo <= t <= hi for t in steps]
    assert 0 < sum(doubled) < len(steps)
    assert not torch.equal(partial, unguided) and not torch.equal(partial, guided)


def test_guided_channels_3_differs_from_all_and_4_equals_all(tiny_model):
    all_ch = _sample(tiny_model, "ddim", cfg_scale=3.0)
    three = _sample(tiny_model, "ddim", cfg_scale=3.0, guided_channels=3)
    four = _sample(tiny_model, "ddim", cfg_scale=3.0, guided_channels="4")
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
])
def test_bad_sampling_arguments(tiny_model, kw, match):
    with pytest.raises(LatentDiTError, match=match):
        _sample(tiny_model, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(sampler="ddim"), r"sampler 'ddim' \(--sampler\) samples ddpm models.*flow process; choose one of "
                           r"euler, heun, euler-maruyama"),
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
# Labels
# ----------------------------------------------------------------------------------------------

def test_labels_by_id_and_by_name():
    assert S.parse_labels("0,3,Trouser", 4, CLASS_NAMES) == [0, 3, 1]
    assert S.parse_labels("t-shirt/top, dress", 4, CLASS_NAMES) == [0, 3]
    assert S.parse_labels([2, "Pullover"], 4, CLASS_NAMES) == [2, 2]
    assert S.parse_labels("1,2", 4, None) == [1, 2]


def test_unknown_class_name_lists_valid_names():
    with pytest.raises(LatentDiTError) as e:
        S.parse_labels("Trouser,Sock", 4, CLASS_NAMES)
    assert "'Sock'" in str(e.value) and "T-shirt/top, Trouser, Pullover, Dress" in str(e.value)


@pytest.mark.parametrize("spec", ["4", "-1", "0,10"])
def test_out_of_range_class_id(spec):
    with pytest.raises(LatentDiTError, match=r"out of range.*0\.\.3"):
        S.parse_labels(spec, 4, CLASS_NAMES)


def test_class_name_without_names_in_checkpoint_and_empty_labels():
    with pytest.raises(LatentDiTError, match="no class names"):
        S.parse_labels("Trouser", 1000, None)
    with pytest.raises(LatentDiTError, match="no class labels"):
        S.parse_labels(" , ", 4, CLASS_NAMES)


def test_default_labels():
    assert S.default_labels(10) == list(range(10))
    many = S.default_labels(1000)
    assert len(many) == 16 and many[0] == 0 and many[-1] == 999


# ----------------------------------------------------------------------------------------------
# Checkpoint forms
# ----------------------------------------------------------------------------------------------

def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_safetensors_with_metadata(tmp_path, tiny_model):
    path = save_our_checkpoint(tiny_model, tmp_path / "ema.safetensors", vae="some/vae")
    ck = S.load_model_for_sampling(path)
    assert _same_weights(ck.model, tiny_model)
    assert ck.class_names == CLASS_NAMES and ck.vae_spec == "some/vae" and ck.model_name == "DiT-T/2"
    assert not ck.model.training
    # the folder resolves to it too, and --model agreeing with the architecture is accepted
    assert S.load_model_for_sampling(tmp_path).path == path


def test_model_flag_mismatching_the_file_is_explained(tmp_path, tiny_model):
    path = save_our_checkpoint(tiny_model, tmp_path / "model.safetensors")
    with pytest.raises(LatentDiTError, match=r"does not match model DiT-S/2.*depth"):
        S.load_model_for_sampling(path, "DiT-S/2")
    torch.save(tiny_model.state_dict(), tmp_path / "released.pt")
    with pytest.raises(LatentDiTError, match=r"does not match model DiT-B/4"):
        S.load_model_for_sampling(tmp_path / "released.pt", "DiT-B/4")


def test_training_checkpoint_folders_prefer_ema_and_the_newest_step(tmp_path, tiny_model):
    other = make_tiny_dit(seed=1)
    run = tmp_path / "run"
    for step, (ema, raw) in {10: (other, other), 20: (tiny_model, other)}.items():
        d = run / "checkpoints" / f"step-{step:07d}"
        d.mkdir(parents=True)
        save_our_checkpoint(ema, d / "ema.safetensors")
        save_our_checkpoint(raw, d / "model.safetensors")
    step20 = run / "checkpoints" / "step-0000020"
    assert S.resolve_checkpoint_path(step20) == step20 / "ema.safetensors"
    assert S.resolve_checkpoint_path(run) == step20 / "ema.safetensors"
    assert _same_weights(S.load_model_for_sampling(run).model, tiny_model)
    (step20 / "ema.safetensors").unlink()
    assert S.resolve_checkpoint_path(step20) == step20 / "model.safetensors"


def test_vae_and_schedule_come_from_the_training_run_when_metadata_lacks_them(tmp_path, tiny_model):
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "manifest.json").write_text(json.dumps({"vae": {"spec": "my/vae-dir"}}))
    step = tmp_path / "run" / "checkpoints" / "step-0000005"
    step.mkdir(parents=True)
    save_our_checkpoint(tiny_model, step / "ema.safetensors")
    (step / "state.json").write_text(json.dumps({"step": 5, "config": {
        "diffusion": {"noise_schedule": "cosine", "diffusion_steps": 500}, "data": {"latents": str(latents)}}}))
    ck = S.load_model_for_sampling(tmp_path / "run")
    assert ck.vae_spec == "my/vae-dir"
    assert ck.process.metadata() == {"process": "ddpm", "noise_schedule": "cosine", "diffusion_steps": 500}
    # metadata wins over the run's state
    save_our_checkpoint(tiny_model, step / "ema.safetensors", vae="other/vae")
    assert S.load_model_for_sampling(step).vae_spec == "other/vae"


def test_missing_or_empty_checkpoint_path(tmp_path):
    with pytest.raises(LatentDiTError, match="checkpoint not found"):
        S.load_model_for_sampling(tmp_path / "nope.pt")
    with pytest.raises(LatentDiTError, match="no weights found"):
        S.load_model_for_sampling(tmp_path)


@pytest.mark.parametrize("wrap", ["raw", "ema"])
def test_released_checkpoint_shaped_state_dict_loads_and_samples(tmp_path, tiny_model, wrap):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    # the official key layout
    for key in ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight",
                "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert key in state
    path = tmp_path / "DiT-T-2-tiny.pt"
    torch.save(state if wrap == "raw" else {"ema": state, "model": {}, "opt": {}}, path)
    for name in (None, "DiT-T/2"):
        ck = S.load_model_for_sampling(path, name)
        assert _same_weights(ck.model, tiny_model)
        assert ck.class_names is None and ck.num_classes == 4 and ck.model.input_size == 8
        assert ck.model_name == "DiT-T/2"
    ours = _sample(tiny_model, "ddim", cfg_scale=1.5)
    theirs = _sample(ck.model, "ddim", cfg_scale=1.5)
    assert torch.equal(ours, theirs)


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


# ----------------------------------------------------------------------------------------------
# tools/sample.py
# ----------------------------------------------------------------------------------------------

def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_tool", Path(__file__).parents[1] / "tools" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(argv):
    from latentdit.cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(_tool().main, argv)
    return e.value.code


def test_sample_tool_writes_a_labelled_grid_and_individual_pngs(tmp_path, tiny_model, capsys):
    from PIL import Image

    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    ckpt = save_our_checkpoint(tiny_model, tmp_path / "ema.safetensors", vae=str(vae_dir))
    out = tmp_path / "grid.png"
    code = _run_tool(["--ckpt", str(ckpt), "--labels", "Trouser,3", "--samples-per-label", "3",
                      "--sampler", "dpm-solver", "--num-steps", "3", "--cfg-scale", "2", "--device", "cpu",
                      "--out", str(out), "--save-individual", str(tmp_path / "ind"), "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    grid = Image.open(out)
    assert grid.width >= 3 * 16 and grid.height >= 2 * 16  # 2 rows × 3 columns of 16² images (+ label margin)
    names = sorted(p.name for p in (tmp_path / "ind").iterdir())
    assert names == ["000000-Trouser.png", "000001-Trouser.png", "000002-Trouser.png",
                     "000003-Dress.png", "000004-Dress.png", "000005-Dress.png"]
    assert Image.open(tmp_path / "ind" / names[0]).size == (16, 16)


@pytest.mark.parametrize("argv, match", [
    (["--ckpt", "MISSING"], "no such file"),
    (["--cfg-scale", "-1"], "--cfg-scale"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--sampler", "euler"], "--sampler"),
    (["--labels", "Sock"], "unknown class name 'Sock'"),
    (["--labels", "9"], "out of range"),
    (["--guidance-interval", "5"], "LO,HI"),
    (["--guided-channels", "two"], "guided channels"),
    (["--num-steps", "0"], "--num-steps"),
    (["--model", "DiT-XL/2"], "does not match model DiT-XL/2"),
])
def test_sample_tool_bad_input_exits_2_with_a_message(tmp_path, tiny_model, capsys, argv, match):
    ckpt = save_our_checkpoint(tiny_model, tmp_path / "ema.safetensors")
    argv = [a.replace("MISSING", str(tmp_path / "missing.pt")) for a in argv]
    if "--ckpt" not in argv:
        argv = ["--ckpt", str(ckpt)] + argv
    code = _run_tool(argv + ["--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


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
    x_T = S.GeneratorNoise(torch.Generator().manual_seed(0)).draw((2, 4, 8, 8), "cpu")
    torch.testing.assert_close(infos[0]["x"], x_T)  # the first state is the initial noise
    for info in infos:
        assert info["x"].shape == info["denoised"].shape == out.shape
        assert torch.isfinite(info["denoised"]).all()
    # the estimate at the last step is close to the result (it is the result for a deterministic last step)
    assert (infos[-1]["denoised"] - out).abs().mean() < (infos[0]["denoised"] - out).abs().mean()


# ----------------------------------------------------------------------------------------------
# Flow models through the loader and tools/sample.py; the trajectory picture
# ----------------------------------------------------------------------------------------------

def test_flow_process_travels_in_the_weights_metadata(tmp_path, tiny_flow_model, tiny_model):
    process = FlowProcess(prediction="x", time_shift=2.0)
    ck = S.load_model_for_sampling(save_our_checkpoint(tiny_flow_model, tmp_path / "a.safetensors", process=process))
    assert isinstance(ck.process, FlowProcess) and ck.process.metadata() == process.metadata()
    # weights without the key are ddpm (released DiT, older runs)
    assert S.load_model_for_sampling(save_our_checkpoint(tiny_model, tmp_path / "b.safetensors")).process.name == "ddpm"
    with pytest.raises(LatentDiTError, match=r"b2.safetensors: model.learn_sigma=true does not apply"):
        S.load_model_for_sampling(save_our_checkpoint(tiny_model, tmp_path / "b2.safetensors", process=process))


def test_sample_tool_samples_a_flow_model_with_its_default_sampler(tmp_path, tiny_flow_model, capsys):
    from PIL import Image

    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    ckpt = save_our_checkpoint(tiny_flow_model, tmp_path / "ema.safetensors", vae=str(vae_dir), process=FLOW)
    code = _run_tool(["--ckpt", str(ckpt), "--labels", "0,1", "--samples-per-label", "2", "--cfg-scale", "2",
                      "--device", "cpu", "--out", str(tmp_path / "grid.png"), "--num-steps", "3",
                      "--trajectory", str(tmp_path / "traj.png")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "(flow model) with heun-3, cfg 2" in out.out
    assert Image.open(tmp_path / "grid.png").width >= 2 * 16
    assert Image.open(tmp_path / "traj.png").height == TRAJECTORY_HEADER + 4 * 18 + 2  # 2 labels × (x_t, x0)
    code = _run_tool(["--ckpt", str(ckpt), "--sampler", "ddim", "--device", "cpu", "--out", str(tmp_path / "g2.png")])
    assert code == 2
    assert "sampler 'ddim' (--sampler) samples ddpm models" in capsys.readouterr().err
    assert not (tmp_path / "g2.png").exists()


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
