"""The DiT trainer's setup: bad input gives a clear error before anything is written."""

from __future__ import annotations


import pytest

from latentdit.config import load_config
from latentdit.errors import LatentDiTError
from latentdit.training import train
from training_helpers import BASE, make_cfg


# ----------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ----------------------------------------------------------------------------------------------

def test_batch_not_divisible_fails_before_any_work(latents, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LatentDiTError, match=r"global_batch_size=9 is not divisible.*grad_accum \(2\)"):
        train(make_cfg(latents, run, "train.global_batch_size=9", "train.grad_accum=2"))
    assert not run.exists()


def test_missing_or_empty_latent_dir(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LatentDiTError, match="latent directory not found"):
        train(make_cfg(tmp_path / "nowhere", run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentDiTError, match="no manifest.json and no latent shards"):
        train(make_cfg(tmp_path / "empty", run))
    with pytest.raises(LatentDiTError, match="data.latents is not set"):
        train(load_config(None, [*BASE, f"train.run_dir={run}"]))
    assert not run.exists()


@pytest.mark.parametrize("override, field", [("model.num_classes=10", "num_classes"),
                                             ("model.input_size=32", "input_size"),
                                             ("model.in_channels=3", "in_channels")])
def test_manifest_mismatch(latents, tmp_path, override, field):
    with pytest.raises(LatentDiTError, match=rf"model.{field}=\d+ does not fit the latents.*latent shape \[4, 8, 8\], 4 classes"):
        train(make_cfg(latents, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_fsdp_needs_several_processes(latents, tmp_path):
    with pytest.raises(LatentDiTError, match=r"train\.fsdp=true.*single process.*--num_processes"):
        train(make_cfg(latents, tmp_path / "run", "train.fsdp=true"))
    assert not (tmp_path / "run").exists()


def test_dataset_smaller_than_batch(latents, tmp_path):
    with pytest.raises(LatentDiTError, match="holds 64 latents, fewer than train.global_batch_size=128"):
        train(make_cfg(latents, tmp_path / "run", "train.global_batch_size=128"))
