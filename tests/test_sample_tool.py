"""tools/sample.py: the labelled grid, individual PNGs and trajectory; every input and output checked
before any sampling."""

from __future__ import annotations

import pytest

from latentdit.diffusion import FlowProcess
from latentdit.visualize import TRAJECTORY_HEADER

try:
    from sampling_helpers import make_tiny_vae_dir, run_sample_tool, save_our_checkpoint
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import make_tiny_vae_dir, run_sample_tool, save_our_checkpoint

FLOW = FlowProcess()


def test_sample_tool_writes_a_labelled_grid_and_individual_pngs(tmp_path, tiny_model, capsys):
    from PIL import Image

    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    ckpt = save_our_checkpoint(tiny_model, tmp_path / "ema.safetensors", vae=str(vae_dir))
    out = tmp_path / "grid.png"
    code = run_sample_tool(["--ckpt", str(ckpt), "--labels", "Trouser,3", "--samples-per-label", "3",
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
    code = run_sample_tool(argv + ["--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_sample_tool_samples_a_flow_model_with_its_default_sampler(tmp_path, tiny_flow_model, capsys):
    from PIL import Image

    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    ckpt = save_our_checkpoint(tiny_flow_model, tmp_path / "ema.safetensors", vae=str(vae_dir), process=FLOW)
    code = run_sample_tool(["--ckpt", str(ckpt), "--labels", "0,1", "--samples-per-label", "2", "--cfg-scale", "2",
                      "--device", "cpu", "--out", str(tmp_path / "grid.png"), "--num-steps", "3",
                      "--trajectory", str(tmp_path / "traj.png")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "(flow model) with heun-3, cfg 2" in out.out
    assert Image.open(tmp_path / "grid.png").width >= 2 * 16
    assert Image.open(tmp_path / "traj.png").height == TRAJECTORY_HEADER + 4 * 18 + 2  # 2 labels × (x_t, x0)
    code = run_sample_tool(["--ckpt", str(ckpt), "--sampler", "ddim", "--device", "cpu", "--out", str(tmp_path / "g2.png")])
    assert code == 2
    assert "sampler 'ddim' (--sampler) samples ddpm models" in capsys.readouterr().err
    assert not (tmp_path / "g2.png").exists()


@pytest.mark.parametrize("where", ["folder", "under_a_file", "device"])
def test_sample_tool_checks_the_trajectory_path_before_sampling(tmp_path, tiny_model, capsys, monkeypatch, where):
    import latentdit.sampling as S

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking --trajectory")

    monkeypatch.setattr(S, "sample_seeded", no_sampling)
    ckpt = save_our_checkpoint(tiny_model, tmp_path / "ema.safetensors")
    (tmp_path / "a_file").write_text("")
    trajectory = {"folder": tmp_path, "under_a_file": tmp_path / "a_file" / "t.png", "device": "/dev/null"}[where]
    code = run_sample_tool(["--ckpt", str(ckpt), "--labels", "0", "--samples-per-label", "1", "--num-steps", "2",
                            "--device", "cpu", "--out", str(tmp_path / "g.png"), "--trajectory", str(trajectory)])
    assert code == 2
    assert "--trajectory" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
