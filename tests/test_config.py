"""Typed configs: YAML loading, overrides, error messages, the shipped recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from latentdit.config import Config, load_config, save_config
from latentdit.errors import LatentDiTError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  name: DiT-B/2\n", "mine.yaml"))
    assert cfg.model.name == "DiT-B/2"
    assert cfg.train.lr == 1e-4 and cfg.train.betas == [0.9, 0.999]
    assert cfg.name == "mine"
    assert cfg.resolved_run_dir() == Path("results") / "mine"


def test_overrides_parse_and_type(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-4\n")
    cfg = load_config(p, ["train.lr=2e-4", "model.name=DiT-B/2", "train.compile=true",
                          "train.betas=[0.9, 0.95]", "train.global_batch_size=64", "data.latents=123",
                          "model.input_size=null", "train.max_minutes=3"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.name == "DiT-B/2"
    assert cfg.train.compile is True
    assert cfg.train.betas == [0.9, 0.95]
    assert cfg.train.global_batch_size == 64
    assert cfg.data.latents == "123"  # a str field keeps the raw text
    assert cfg.model.input_size is None
    assert cfg.train.max_minutes == 3.0 and isinstance(cfg.train.max_minutes, float)


def test_yaml_float_without_dot_is_accepted(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field still takes it
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-4\n"))
    assert cfg.train.lr == pytest.approx(1e-4)


def test_unknown_field_names_file_field_and_valid_ones(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 1.0\n")
    with pytest.raises(LatentDiTError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.lrr" in msg and "global_batch_size" in msg and "lr" in msg


def test_unknown_section(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 1.0\n")
    with pytest.raises(LatentDiTError, match=r"unknown section 'optim'.*model, diffusion, data, train"):
        load_config(p)


def test_unknown_override():
    with pytest.raises(LatentDiTError, match=r"unknown field 'train.learning_rate'.*lr"):
        load_config(None, ["train.learning_rate=1"])
    with pytest.raises(LatentDiTError, match=r"unknown section 'trian'"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(LatentDiTError, match=r"section.field=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("override, field, expected", [
    ("train.global_batch_size=abc", "train.global_batch_size", "int"),
    ("train.global_batch_size=8.5", "train.global_batch_size", "int"),
    ("train.compile=maybe", "train.compile", "bool"),
    ("train.lr=fast", "train.lr", "float"),
    ("train.betas=0.9", "train.betas", "list of float"),
    ("train.seed=true", "train.seed", "int"),
])
def test_wrong_type_names_field_expected_and_got(override, field, expected):
    with pytest.raises(LatentDiTError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{field}'" in msg and f"expected {expected}" in msg and "got" in msg
    assert override.split("=", 1)[1].lower() in msg.lower()


def test_wrong_type_in_file(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: many\n")
    with pytest.raises(LatentDiTError, match=r"c.yaml.*'train.max_steps'.*expected int.*'many'"):
        load_config(p)


@pytest.mark.parametrize("override, field", [
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.lr=-1", "train.lr"),
    ("diffusion.noise_schedule=sqrt", "diffusion.noise_schedule"),
    ("model.class_dropout_prob=1.0", "model.class_dropout_prob"),
    ("model.depth=-1", "model.depth"),
    ("train.lr_schedule=step", "train.lr_schedule"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.decay_fraction=0", "train.decay_fraction"),
    ("train.betas=[0.9]", "train.betas"),
])
def test_out_of_range_values(override, field):
    with pytest.raises(LatentDiTError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_fsdp_refuses_fp16_but_takes_bf16():
    with pytest.raises(LatentDiTError, match=r"train\.mixed_precision.*train\.fsdp=true.*'fp16'"):
        load_config(None, ["train.fsdp=true", "train.mixed_precision=fp16"])
    assert load_config(None, ["train.fsdp=true", "train.mixed_precision=bf16"]).train.fsdp


def test_fsdp_refuses_muon():
    with pytest.raises(LatentDiTError, match=r"train\.optimizer.*adamw with train\.fsdp=true.*'muon'"):
        load_config(None, ["train.fsdp=true", "train.optimizer=muon"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(LatentDiTError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(LatentDiTError, match="not valid YAML"):
        load_config(bad)


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "model.name=DiT-S/4", "name=abc"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(again, Config)


@pytest.mark.parametrize("name", ["dit_xl2_imagenet256.yaml", "dit_b2_imagenet256.yaml",
                                  "dit_s2_imagenet256.yaml", "fashion_mnist.yaml"])
def test_shipped_recipes_load(name):
    cfg = load_config(CONFIGS / name)
    if name.startswith("dit_xl2"):  # the DiT paper's ImageNet-256 recipe
        t = cfg.train
        assert cfg.model.name == "DiT-XL/2" and cfg.model.learn_sigma and cfg.model.class_dropout_prob == 0.1
        assert (t.global_batch_size, t.lr, t.weight_decay, t.ema_decay, t.max_steps, t.ckpt_every, t.warmup_steps) \
            == (256, 1e-4, 0.0, 0.9999, 400_000, 50_000, 0)
        assert cfg.diffusion.diffusion_steps == 1000 and cfg.diffusion.noise_schedule == "linear"


# the process and block options

FLOW = ["diffusion.process=flow", "model.learn_sigma=false"]


@pytest.mark.parametrize("overrides, message", [
    (["diffusion.process=fl0w"], "config: diffusion.process: expected one of ddpm, flow, got 'fl0w'"),
    (["diffusion.process=flow"], "config: model.learn_sigma=true does not apply to diffusion.process=flow"),
    ([*FLOW, "diffusion.prediction=eps"], "config: diffusion.prediction: expected one of v, x, got 'eps'"),
    ([*FLOW, "diffusion.time_sampling=beta"], "diffusion.time_sampling: expected one of uniform, logit_normal"),
    ([*FLOW, "diffusion.time_shift=0"], "diffusion.time_shift: expected a finite number > 0, got 0.0"),
    ([*FLOW, "diffusion.logit_std=-1"], "diffusion.logit_std: expected a finite number > 0, got -1.0"),
    ([*FLOW, "diffusion.loss_weighting=snr"], "diffusion.loss_weighting: expected one of none"),
    (["diffusion.diffusion_steps=0"], "config: diffusion.diffusion_steps: expected an integer >= 1, got 0"),
    (["model.norm=batchnorm"], "config: model.norm: expected one of layernorm, rmsnorm, got 'batchnorm'"),
    (["model.mlp=relu"], "config: model.mlp: expected one of gelu, swiglu, got 'relu'"),
    (["model.pos=learned"], "config: model.pos: expected one of sincos, rope2d, got 'learned'"),
    (["model.qk_norm=maybe"], "field 'model.qk_norm': expected bool, got 'maybe'"),
    (["model.class_dropout_prob=1.0"], "config: model.class_dropout_prob: expected a probability in [0, 1), got 1.0"),
    (["model.name=DiT-Q/2"], "config: model.name: unknown model name 'DiT-Q/2'; valid names: DiT-S/2"),
    (["model.input_size=30", "model.name=DiT-S/4"], "model.patch_size: expected a divisor of the latent size"),
])
def test_process_and_model_fields_are_checked_by_their_owners_with_the_field_named(overrides, message):
    with pytest.raises(LatentDiTError, match=re.escape(message)) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_defaults_are_the_papers_process_and_blocks():
    cfg = load_config(None, [])
    assert (cfg.diffusion.process, cfg.model.learn_sigma) == ("ddpm", True)
    assert (cfg.model.norm, cfg.model.mlp, cfg.model.pos, cfg.model.qk_norm) == ("layernorm", "gelu", "sincos", False)


def test_model_size_fields_resolve_the_named_model():
    from latentdit.config import model_arguments

    cfg = load_config(None, ["model.name=DiT-S/2", "model.depth=3", "model.hidden_size=192", "model.num_heads=3"])
    arch = model_arguments(cfg.model)
    assert (arch["depth"], arch["hidden_size"], arch["num_heads"], arch["patch_size"]) == (3, 192, 3, 2)
    assert {k: model_arguments(load_config(None, []).model)[k] for k in ("depth", "hidden_size", "num_heads")} \
        == dict(depth=12, hidden_size=384, num_heads=6)  # 0 keeps the named model's numbers
    with pytest.raises(LatentDiTError, match=re.escape("model.num_heads: expected a divisor of model.hidden_size 200")):
        load_config(None, ["model.hidden_size=200"])


def test_power_ema_refuses_the_fixed_decays_settings():
    assert load_config(None, ["train.ema_sigma_rel=0.05"]).train.ema_sigma_rel == 0.05
    with pytest.raises(LatentDiTError, match=re.escape("'train.ema_warmup': expected false with train.ema_sigma_rel")):
        load_config(None, ["train.ema_sigma_rel=0.05", "train.ema_warmup=true"])
    with pytest.raises(LatentDiTError, match=re.escape("'train.ema_decay': expected the default 0.9999 (unused)")):
        load_config(None, ["train.ema_sigma_rel=0.05", "train.ema_decay=0.999"])
