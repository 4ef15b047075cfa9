"""The weights file and loading a model for sampling: our safetensors, training folders, released
checkpoints, the process and VAE from metadata or the training run."""

from __future__ import annotations

import json

import pytest
import torch

from latentdit import sampling as S
from latentdit.diffusion import DDPMProcess, FlowProcess
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors
from latentdit.weights import load_model_for_sampling, resolve_checkpoint_path, save_weights

try:
    from sampling_helpers import CLASS_NAMES, make_tiny_dit, save_our_checkpoint
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import CLASS_NAMES, make_tiny_dit, save_our_checkpoint


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_safetensors_with_metadata(tmp_path, tiny_model):
    path = save_our_checkpoint(tiny_model, tmp_path / "ema.safetensors", vae="some/vae")
    ck = load_model_for_sampling(path)
    assert _same_weights(ck.model, tiny_model)
    assert ck.class_names == CLASS_NAMES and ck.vae_spec == "some/vae" and ck.model_name == "DiT-T/2"
    assert not ck.model.training
    # the folder resolves to it too, and --model agreeing with the architecture is accepted
    assert load_model_for_sampling(tmp_path).path == path


def test_class_counts_are_read_back_and_checked(tmp_path, tiny_model):
    path = save_our_checkpoint(tiny_model, tmp_path / "ema.safetensors", class_counts=[3, 0, 2, 1])
    assert load_model_for_sampling(path).class_counts == [3, 0, 2, 1]
    assert load_model_for_sampling(save_our_checkpoint(tiny_model, tmp_path / "b.safetensors")).class_counts is None
    for bad in ([3, 0, 2], [3, 0, 2, -1], [0, 0, 0, 0], [1.5, 1, 1, 1], "many"):
        path = save_our_checkpoint(tiny_model, tmp_path / "bad.safetensors", class_counts=bad)
        with pytest.raises(LatentDiTError, match="latentdit_class_counts.* 4 non-negative counts"):
            load_model_for_sampling(path)


def test_model_flag_mismatching_the_file_is_explained(tmp_path, tiny_model):
    path = save_our_checkpoint(tiny_model, tmp_path / "model.safetensors")
    with pytest.raises(LatentDiTError, match=r"does not match model DiT-S/2.*depth"):
        load_model_for_sampling(path, "DiT-S/2")
    torch.save(tiny_model.state_dict(), tmp_path / "released.pt")
    with pytest.raises(LatentDiTError, match=r"does not match model DiT-B/4"):
        load_model_for_sampling(tmp_path / "released.pt", "DiT-B/4")


def test_training_checkpoint_folders_prefer_ema_and_the_newest_step(tmp_path, tiny_model):
    other = make_tiny_dit(seed=1)
    run = tmp_path / "run"
    for step, (ema, raw) in {10: (other, other), 20: (tiny_model, other)}.items():
        d = run / "checkpoints" / f"step-{step:07d}"
        d.mkdir(parents=True)
        save_our_checkpoint(ema, d / "ema.safetensors")
        save_our_checkpoint(raw, d / "model.safetensors")
    step20 = run / "checkpoints" / "step-0000020"
    assert resolve_checkpoint_path(step20) == step20 / "ema.safetensors"
    assert resolve_checkpoint_path(run) == step20 / "ema.safetensors"
    assert _same_weights(load_model_for_sampling(run).model, tiny_model)
    (step20 / "ema.safetensors").unlink()
    assert resolve_checkpoint_path(step20) == step20 / "model.safetensors"


def test_vae_and_schedule_come_from_the_training_run_when_metadata_lacks_them(tmp_path, tiny_model):
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "manifest.json").write_text(json.dumps({"vae": {"spec": "my/vae-dir"}}))
    step = tmp_path / "run" / "checkpoints" / "step-0000005"
    step.mkdir(parents=True)
    save_our_checkpoint(tiny_model, step / "ema.safetensors")
    (step / "state.json").write_text(json.dumps({"step": 5, "config": {
        "diffusion": {"noise_schedule": "cosine", "diffusion_steps": 500}, "data": {"latents": str(latents)}}}))
    ck = load_model_for_sampling(tmp_path / "run")
    assert ck.vae_spec == "my/vae-dir"
    assert ck.process.metadata() == {"process": "ddpm", "noise_schedule": "cosine", "diffusion_steps": 500}
    # metadata wins over the run's state
    save_our_checkpoint(tiny_model, step / "ema.safetensors", vae="other/vae")
    assert load_model_for_sampling(step).vae_spec == "other/vae"


def test_missing_or_empty_checkpoint_path(tmp_path):
    with pytest.raises(LatentDiTError, match="checkpoint not found"):
        load_model_for_sampling(tmp_path / "nope.pt")
    with pytest.raises(LatentDiTError, match="no weights found"):
        load_model_for_sampling(tmp_path)


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
        ck = load_model_for_sampling(path, name)
        assert _same_weights(ck.model, tiny_model)
        assert ck.class_names is None and ck.num_classes == 4 and ck.model.input_size == 8
        assert ck.model_name == "DiT-T/2"
    settings = S.SamplerSettings(sampler="ddim", num_steps=4, cfg_scale=1.5)
    ours = S.sample_latents(tiny_model, [0, 1], settings, noise=torch.Generator().manual_seed(0))
    theirs = S.sample_latents(ck.model, [0, 1], settings, noise=torch.Generator().manual_seed(0))
    assert torch.equal(ours, theirs)


def test_flow_process_travels_in_the_weights_metadata(tmp_path, tiny_flow_model, tiny_model):
    process = FlowProcess(prediction="x", time_shift=2.0)
    ck = load_model_for_sampling(save_our_checkpoint(tiny_flow_model, tmp_path / "a.safetensors", process=process))
    assert isinstance(ck.process, FlowProcess) and ck.process.metadata() == process.metadata()
    # weights without the key are ddpm (released DiT, older runs)
    assert load_model_for_sampling(save_our_checkpoint(tiny_model, tmp_path / "b.safetensors")).process.name == "ddpm"
    with pytest.raises(LatentDiTError, match=r"b2.safetensors: model.learn_sigma=true does not apply"):
        load_model_for_sampling(save_our_checkpoint(tiny_model, tmp_path / "b2.safetensors", process=process))


def test_save_weights_writes_what_the_loader_reads(tmp_path, tiny_model, tiny_flow_model):
    path = tmp_path / "w.safetensors"
    save_weights(tiny_model.state_dict(), path, tiny_model.config, CLASS_NAMES, vae="my/vae",
                 process=DDPMProcess().metadata(), diffusion=DDPMProcess().legacy_metadata())
    _, meta = load_safetensors(path)
    assert json.loads(meta["latentdit_diffusion"]) == {"noise_schedule": "linear", "diffusion_steps": 1000}
    ck = load_model_for_sampling(path)
    assert _same_weights(ck.model, tiny_model) and ck.class_names == CLASS_NAMES and ck.vae_spec == "my/vae"
    flow = FlowProcess(prediction="x")
    save_weights(tiny_flow_model.state_dict(), path, tiny_flow_model.config, process=flow.metadata())
    assert load_model_for_sampling(path).process.metadata() == flow.metadata()
