"""Checkpoint compatibility: released-DiT key layout, raw .pt / train checkpoints, safetensors, strict errors."""

from __future__ import annotations

import json

import pytest
import torch

from latentdit.errors import LatentDiTError
from latentdit.models import create_dit, load_dit, load_state_dict_file, save_dit
from latentdit.models.checkpoint import METADATA_KEY, read_checkpoint
from dit_helpers import randomize


def tiny(**kw):
    args = dict(input_size=8, num_classes=10)
    args.update(kw)
    return create_dit("DiT-T/2", **args)



def outputs(model):
    g = torch.Generator().manual_seed(3)
    size, c = model.input_size, model.in_channels
    x = torch.randn(2, c, size, size, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([5, 900]), torch.tensor([1, 0]))


def test_official_key_names_and_shapes_of_xl2():
    with torch.device("meta"):
        model = create_dit("DiT-XL/2")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "pos_embed": (1, 256, 1152),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.0.attn.qkv.weight": (3456, 1152),
        "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.linear.bias": (32,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    per_block = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"}
    official = {"pos_embed"} | {f"{m}.{leaf}" for m in ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2",
                                                        "final_layer.adaLN_modulation.1", "final_layer.linear"]
                                for leaf in ("weight", "bias")}
    official |= {"y_embedder.embedding_table.weight"}
    official |= {f"blocks.{i}.{m}.{leaf}" for i in range(28) for m in per_block for leaf in ("weight", "bias")}
    assert set(shapes) == official


def test_released_shaped_raw_pt_loads_to_the_same_function(tmp_path):
    model = randomize(tiny())
    path = tmp_path / "DiT-T-2-8x8.pt"
    torch.save(model.state_dict(), path)  # a released checkpoint is a bare state dict
    for name in ("DiT-T/2", None):  # with a model name, and from the registry's heads for hidden 128
        loaded = load_dit(path, model_name=name)
        assert loaded.config == model.config
        assert not loaded.training
        assert not loaded.pos_embed.requires_grad
        assert all(p.requires_grad and not p.is_meta for n, p in loaded.named_parameters() if n != "pos_embed")
        assert torch.equal(outputs(loaded), outputs(model))


def test_train_checkpoint_prefers_ema_and_strips_prefixes(tmp_path):
    ema = randomize(tiny(), seed=1)
    raw = randomize(tiny(), seed=2)
    ckpt = {
        "model": {f"module.{k}": v for k, v in raw.state_dict().items()},
        "ema": {f"_orig_mod.{k}": v for k, v in ema.state_dict().items()},
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "args": {"epochs": 3},
    }
    path = tmp_path / "0001000.pt"
    torch.save(ckpt, path)
    state = load_state_dict_file(path)
    assert set(state) == set(ema.state_dict())
    assert torch.equal(outputs(load_dit(path, "DiT-T/2")), outputs(ema))
    torch.save({"model": ckpt["model"]}, path)
    assert torch.equal(outputs(load_dit(path, "DiT-T/2")), outputs(raw))


def test_save_dit_round_trip_keeps_the_config_in_metadata(tmp_path):
    # no null row and no learned sigma: shape inference alone would get num_classes wrong
    model = randomize(tiny(class_dropout_prob=0.0, learn_sigma=False, num_classes=7, input_size=12))
    path = tmp_path / "model.safetensors"
    save_dit(model, path)
    state, meta = read_checkpoint(path)
    assert json.loads(meta[METADATA_KEY]) == model.config
    assert set(state) == set(model.state_dict())
    loaded = load_dit(path)
    assert loaded.config == model.config
    assert torch.equal(outputs(loaded), outputs(model))
    # a bare state dict needs the config
    save_dit(model.state_dict(), tmp_path / "sd.safetensors", model.config)
    assert load_dit(tmp_path / "sd.safetensors").config == model.config
    # overrides apply on top of the stored config
    assert load_dit(path, grad_checkpointing=True).grad_checkpointing


def test_shape_inference_without_metadata(tmp_path):
    model = randomize(tiny(learn_sigma=False, input_size=12, in_channels=3, num_classes=5))
    path = tmp_path / "plain.safetensors"
    from latentdit.io import save_safetensors

    save_safetensors(model.state_dict(), path)  # no metadata
    loaded = load_dit(path)
    assert loaded.config == model.config
    assert torch.equal(outputs(loaded), outputs(model))
    # a file without a null row: say so with class_dropout_prob=0
    no_null = randomize(tiny(class_dropout_prob=0.0))
    save_safetensors(no_null.state_dict(), path)
    assert load_dit(path).num_classes == 9  # the documented default guess: a null row
    assert load_dit(path, class_dropout_prob=0.0).config == no_null.config
    assert load_dit(path, num_classes=10).config == no_null.config


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------

def test_missing_unexpected_and_wrong_shape_keys_are_named(tmp_path):
    model = tiny()
    state = model.state_dict()
    path = tmp_path / "bad.pt"

    broken = dict(state)
    del broken["blocks.1.attn.qkv.bias"]
    torch.save(broken, path)
    with pytest.raises(LatentDiTError, match=r"missing keys: 1 \(blocks\.1\.attn\.qkv\.bias\)"):
        load_dit(path, "DiT-T/2")

    broken = dict(state, **{"blocks.0.extra.weight": torch.zeros(2), "head.bias": torch.zeros(2)})
    torch.save(broken, path)
    with pytest.raises(LatentDiTError, match=r"unexpected keys: 2 \(blocks\.0\.extra\.weight, head\.bias\)"):
        load_dit(path, "DiT-T/2")

    broken = dict(state, **{"blocks.0.mlp.fc1.weight": torch.zeros(256, 128)})
    torch.save(broken, path)
    with pytest.raises(LatentDiTError, match=r"wrong-shape keys: 1 \(blocks\.0\.mlp\.fc1\.weight \[256, 128\] "
                                             r"vs expected \[512, 128\]\)"):
        load_dit(path, "DiT-T/2", mlp_ratio=4.0)

    many = {k: v for k, v in state.items() if not k.startswith("blocks.0.")}
    torch.save(many, path)
    with pytest.raises(LatentDiTError, match=r"missing keys: 10 \(blocks\.0\.attn\.qkv\.weight, .*, \.\.\.\)"):
        load_dit(path, "DiT-T/2")


def test_model_name_must_match_the_file(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(LatentDiTError, match="does not match model DiT-S/2: depth is 4 in the file, 12 for DiT-S/2"):
        load_dit(path, "DiT-S/2")
    with pytest.raises(LatentDiTError, match="unknown model name 'DiT-Z/2'"):
        load_dit(path, "DiT-Z/2")


def test_unknown_hidden_size_needs_a_model_name(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save(create_dit("DiT-T/2", input_size=8, hidden_size=96, num_heads=3, depth=1).state_dict(), path)
    with pytest.raises(LatentDiTError, match="cannot tell the number of attention heads for hidden size 96.*model_name"):
        load_dit(path)
    assert load_dit(path, num_heads=3).num_heads == 3


def test_bad_files(tmp_path):
    with pytest.raises(LatentDiTError, match="checkpoint file not found"):
        load_dit(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(LatentDiTError, match="could not read checkpoint"):
        load_dit(junk)
    listy = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(LatentDiTError, match="does not hold a state dict"):
        load_dit(listy)
    nested = tmp_path / "nested.pt"
    torch.save({"weights": {"a": torch.zeros(1)}}, nested)
    with pytest.raises(LatentDiTError, match="entry 'weights' is a dict, expected a tensor"):
        load_dit(nested)
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(LatentDiTError, match="has no 'x_embedder.proj.weight'"):
        load_dit(other)


def test_save_dit_rejects_bad_targets(tmp_path):
    model = tiny()
    with pytest.raises(LatentDiTError, match="give the file a .safetensors suffix"):
        save_dit(model, tmp_path / "m.pt")
    with pytest.raises(LatentDiTError, match="pass config"):
        save_dit(model.state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(LatentDiTError, match="wrong-shape keys"):
        save_dit(model.state_dict(), tmp_path / "m.safetensors", dict(model.config, depth=2, hidden_size=64))
    with pytest.raises(LatentDiTError, match=r"unknown DiT config keys \['colour'\]"):
        save_dit(model, tmp_path / "m.safetensors", dict(model.config, colour="red"))
