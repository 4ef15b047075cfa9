"""Checkpoint compatibility: released-DiT key layout, raw .pt / train checkpoints, safetensors, strict errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from latentdit.cli import run_main
from latentdit.errors import LatentDiTError
from latentdit.models import create_dit, load_dit, load_state_dict_file, save_dit
from latentdit.models.checkpoint import METADATA_KEY, read_checkpoint
from latentdit.weights import load_model_for_sampling
from dit_helpers import randomize
from script_helpers import load_script

try:
    from sampling_helpers import make_tiny_vae_dir
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import make_tiny_vae_dir


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


# ---------------------------------------------------------------------------------------------------
# checkpoints of the released train.py, and label tables without a null row
# ---------------------------------------------------------------------------------------------------

def _train_py_checkpoint(path, ema, raw, num_classes=10):
    """What the released train.py saves: {"model", "ema", "opt", "args"}, args an argparse.Namespace."""
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, weight_decay=0)
    raw.train()
    raw(torch.randn(2, 4, 8, 8), torch.tensor([3, 400]), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    raw.eval()
    args = argparse.Namespace(data_path="/data/train", results_dir="results", model="DiT-T/2", image_size=64,
                              num_classes=num_classes, epochs=1400, global_batch_size=256, global_seed=0,
                              vae="ema", num_workers=4, log_every=100, ckpt_every=50_000)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    return path


def _sample_tool_main():
    return load_script("tools/sample.py").main


def _run_sample_tool(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(_sample_tool_main(), argv + ["--device", "cpu", "--num-steps", "2", "--sampler", "ddim"])
    return e.value.code, capsys.readouterr().err


def test_train_py_checkpoint_with_namespace_loads_its_ema_weights(tmp_path, capsys):
    ema, raw = randomize(tiny(), seed=1), randomize(tiny(), seed=2)
    path = _train_py_checkpoint(tmp_path / "0050000.pt", ema, raw)
    ckpt = load_model_for_sampling(path)  # what tools/sample.py and tools/sample_ddp.py call
    assert ckpt.model.config == ema.config and ckpt.num_classes == 10
    assert torch.equal(outputs(ckpt.model), outputs(ema))
    # the Namespace was allowed for that load only, not globally
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    vae = make_tiny_vae_dir(tmp_path / "vae")
    code, err = _run_sample_tool(["--ckpt", str(path), "--vae", str(vae), "--labels", "0,9", "--samples-per-label",
                                  "1", "--cfg-scale", "1.5", "--out", str(tmp_path / "grid.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "grid.png").is_file()


_UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Exploit:
    """An object whose unpickling would run code (here: harmlessly record that it ran)."""

    def __reduce__(self):
        return _record_unpickling, ("ran",)


@pytest.mark.parametrize("args", [_Exploit(), argparse.Namespace(model="DiT-T/2", hook=_Exploit())],
                         ids=["other-class", "inside-namespace"])
def test_checkpoint_with_another_pickled_object_is_refused(tmp_path, args):
    model = tiny()
    path = tmp_path / "evil.pt"
    torch.save({"ema": model.state_dict(), "args": args}, path)
    with pytest.raises(LatentDiTError, match=r"could not read checkpoint .*evil\.pt: .*refused for safety "
                                             r"\(it pickles [\w.]*_record_unpickling\)"):
        load_model_for_sampling(path)
    assert _UNPICKLED == []


def test_label_table_without_null_row(tmp_path, capsys):
    no_null = randomize(tiny(class_dropout_prob=0.0))  # 10 classes, 10 rows, no null row
    path = _train_py_checkpoint(tmp_path / "no_null.pt", no_null, randomize(tiny(class_dropout_prob=0.0), seed=4))
    assert load_model_for_sampling(path).num_classes == 9  # the default reading: last row = null class
    for kw in ({"null_class": False}, {"num_classes": 10}, {"num_classes": 10, "null_class": False}):
        ckpt = load_model_for_sampling(path, **kw)
        assert ckpt.model.config == no_null.config, kw
        assert torch.equal(outputs(ckpt.model), outputs(no_null))
    with_null = load_model_for_sampling(path, num_classes=9)
    assert with_null.num_classes == 9 and with_null.model.null_class_id == 9
    with pytest.raises(LatentDiTError, match=r"label table y_embedder.embedding_table has 10 rows; 7 classes need "
                                             r"7 rows without a null row or 8 with one"):
        load_model_for_sampling(path, num_classes=7)
    with pytest.raises(LatentDiTError, match=r"has 10 rows; 9 classes need 9 rows \(without a null row\)"):
        load_model_for_sampling(path, num_classes=9, null_class=False)

    vae = make_tiny_vae_dir(tmp_path / "vae")
    common = ["--ckpt", str(path), "--vae", str(vae), "--samples-per-label", "1", "--out", str(tmp_path / "g.png")]
    code, err = _run_sample_tool(common + ["--no-null-class", "--labels", "9", "--cfg-scale", "4"], capsys)
    assert code == 2 and "cfg scale 4 needs the model's null (unconditional) class row" in err
    assert "--cfg-scale 1" in err and "Traceback" not in err and not (tmp_path / "g.png").exists()
    code, err = _run_sample_tool(common + ["--no-null-class", "--labels", "9", "--cfg-scale", "1"], capsys)
    assert code == 0, err  # class 9 is a real class now
    code, err = _run_sample_tool(common + ["--num-classes", "10", "--labels", "0,9", "--cfg-scale", "1"], capsys)
    assert code == 0, err
    code, err = _run_sample_tool(common + ["--num-classes", "12", "--cfg-scale", "1"], capsys)
    assert code == 2 and "has 10 rows; 12 classes need 12 rows without a null row or 13 with one" in err


def test_sample_ddp_no_null_class_samples_every_row_as_a_class(tmp_path):
    tool = load_script("tools/sample_ddp.py")
    no_null = randomize(tiny(class_dropout_prob=0.0))
    path = _train_py_checkpoint(tmp_path / "no_null.pt", no_null, randomize(tiny(class_dropout_prob=0.0), seed=4))
    vae = make_tiny_vae_dir(tmp_path / "vae")
    argv = ["--ckpt", str(path), "--vae", str(vae), "--out-dir", str(tmp_path / "out"), "--num-samples", "10",
            "--chunk-size", "10", "--batch-size", "10", "--sampler", "ddim", "--num-steps", "2", "--no-null-class"]
    with pytest.raises(LatentDiTError, match="needs the model's null"):
        tool.main(argv + ["--cfg-scale", "1.5"])
    assert tool.main(argv + ["--cfg-scale", "1"]) == 0
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        assert sorted(npz["arr_1"].tolist()) == list(range(10))
