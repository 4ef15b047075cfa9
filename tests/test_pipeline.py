"""tools/demo.py, the end-to-end demo's orchestration: stage commands, resumability hooks, and the report."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from latentdit.errors import LatentDiTError
from latentdit.visualize import save_line_plot
from script_helpers import load_tool

demo_tool = load_tool("demo")
REPO_ROOT, Demo, DemoSettings, StageResult = (demo_tool.REPO_ROOT, demo_tool.Demo, demo_tool.DemoSettings,
                                              demo_tool.StageResult)


def test_commands_are_shown_as_a_user_types_them():
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "train.py"), f"data.latents={REPO_ROOT}/demo_output/x", "/tmp/y"]
    assert demo_tool._display(cmd) == "python tools/train.py data.latents=demo_output/x /tmp/y"


def test_train_stage_uses_accelerate_and_resumes(tmp_path, monkeypatch):
    demo = Demo(DemoSettings(out=tmp_path, train_minutes=2.5, train_overrides=["model.name=DiT-T/4"]), log=lambda s: None)
    seen = []

    def fake_run(name, cmd):
        seen.append((name, cmd))
        (demo.run_dir / "checkpoints" / "step-0000001").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(demo, "_run", fake_run)
    demo.stage_train()
    demo.stage_extract()
    (name, train_cmd), (_, extract_cmd) = seen
    assert train_cmd[1:3] == ["-m", "latentdit.launch"] and str(REPO_ROOT / "tools" / "train.py") in train_cmd
    assert train_cmd[train_cmd.index("--resume") + 1] == "auto"
    assert "train.max_minutes=2.5" in train_cmd and train_cmd[-1] == "model.name=DiT-T/4"
    assert "data.flip=false" in train_cmd and "--no-flip" in extract_cmd
    assert extract_cmd[extract_cmd.index("--limit") + 1] == str(DemoSettings.extract_limit)


def test_the_recipes_internal_head_is_sampled_with_internal_guidance(tmp_path, monkeypatch):
    """configs/fashion_mnist.yaml trains an internal head: the grid and the FID samples take the demo's Internal
    Guidance weight, and the report says so; without the head (or with weight 1) the flags are absent."""
    def commands(**settings):
        demo = Demo(DemoSettings(out=tmp_path, cfg_scales=(1.5,), **settings), log=lambda s: None)
        seen = []
        monkeypatch.setattr(demo, "_run", lambda name, cmd: seen.append(cmd))
        monkeypatch.setattr(demo, "checkpoint", lambda: tmp_path / "ema.safetensors")
        demo.stage_grid()
        demo.stage_samples()
        return demo, seen

    demo, (grid, samples) = commands()
    for cmd in (grid, samples):
        assert cmd[cmd.index("--internal-scale") + 1] == f"{DemoSettings.internal_scale:g}"
    assert demo.sampler_text() == f"heun-10 with Internal Guidance w {DemoSettings.internal_scale:g}"
    demo.check(["grid", "samples"])
    for settings in (dict(internal_scale=1.0), dict(train_overrides=["model.internal_block=null"])):
        demo, seen = commands(**settings)
        assert not any("--internal-scale" in cmd for cmd in seen) and demo.sampler_text() == "heun-10"
    # once training started, the run's saved config decides (a run trained before the recipe had the head)
    from latentdit.config import load_config, save_config

    demo.run_dir.mkdir(parents=True)
    save_config(load_config(demo_tool.DEMO_CONFIG, ["model.internal_block=null"]), demo.run_dir / "config.yaml")
    assert Demo(DemoSettings(out=tmp_path), log=lambda s: None).internal_scale == 1.0


def test_unknown_stage_and_missing_checkpoint_are_clear_errors(tmp_path):
    demo = Demo(DemoSettings(out=tmp_path), log=lambda s: None)
    with pytest.raises(LatentDiTError, match="unknown demo stage"):
        demo.run(["sample"])
    with pytest.raises(LatentDiTError, match="run the 'train' stage first"):
        demo.checkpoint()


def test_failed_stage_names_its_command(tmp_path):
    demo = Demo(DemoSettings(out=tmp_path), log=lambda s: None)
    with pytest.raises(LatentDiTError, match="demo stage 'boom' failed .*exit status 3.*finished stages are kept"):
        demo._run("boom", [sys.executable, "-c", "raise SystemExit(3)"])


def test_report_has_grid_loss_curve_metrics_and_commands(tmp_path):
    demo = Demo(DemoSettings(out=tmp_path, cfg_scales=(1.0, 3.0)), log=lambda s: None)
    run = demo.run_dir
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 30)))
    (run / "config.yaml").write_text("name: x\n")
    for scale, fid in ((1.0, 80.0), (3.0, 40.0)):
        demo.metrics_json(scale).parent.mkdir(parents=True, exist_ok=True)
        demo.metrics_json(scale).write_text(json.dumps({"fid": fid, "kid_mean": fid / 1e4, "kid_std": 1e-4,
                                                        "kid_subsets": 100, "kid_subset_size": 250,
                                                        "precision": 0.5, "recall": 0.25}))
    demo.results.append(StageResult("train", "accelerate launch tools/train.py ...", 12.5))
    report = demo.stage_report()
    text = report.read_text()
    assert "| 1 | 80.00 | 8.00 ± 0.10 | 0.500 | 0.250 |" in text
    assert "standard deviation of its estimate over 100 random subsets of 250 images of each set" in text
    assert "| 3 | 40.00 |" in text and "`accelerate launch tools/train.py ...`" in text
    assert Image.open(demo.report_dir / "loss.png").size == (640, 400)
    assert (demo.report_dir / "config.yaml").read_text() == "name: x\n"
    assert json.loads((demo.report_dir / "metrics.json").read_text())["3"]["fid"] == 40.0
    # a later partial rerun keeps the timings of stages it did not run
    demo2 = Demo(DemoSettings(out=tmp_path, cfg_scales=(1.0, 3.0)), log=lambda s: None)
    demo2.results.append(StageResult("grid", "python tools/sample.py ...", 3.0))
    demo2.stage_report()
    names = [r["name"] for r in json.loads((demo.report_dir / "timings.json").read_text())["stages"]]
    assert names == ["train", "grid"]


def test_line_plot_rejects_mismatched_data(tmp_path):
    with pytest.raises(LatentDiTError, match="matching"):
        save_line_plot([1, 2], [1.0], tmp_path / "x.png")
    save_line_plot([5], [0.5], tmp_path / "one.png")  # a single point still draws
    assert (tmp_path / "one.png").exists()


def test_a_finished_training_run_is_not_trained_again(tmp_path, monkeypatch):
    demo = Demo(DemoSettings(out=tmp_path), log=lambda s: None)
    calls = []

    def fake_run(name, cmd):  # what a successful training run leaves behind
        calls.append(name)
        (demo.run_dir / "checkpoints" / "step-0000010").mkdir(parents=True)

    monkeypatch.setattr(demo, "_run", fake_run)
    demo.stage_train()
    assert calls == ["train"] and demo.train_done_marker.exists()
    demo.stage_train()  # a second `make demo` goes straight on to sampling with the same checkpoint
    assert calls == ["train"]
    assert demo.checkpoint() == demo.run_dir / "checkpoints" / "step-0000010" / "ema.safetensors"


def _demo_user_error(argv, capsys) -> str:
    from latentdit.cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(demo_tool.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_settings_are_checked_before_the_first_stage(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(Demo, "_run", lambda self, name, cmd: ran.append(name))
    # a bad training override (given after another option) fails at once, not after the extraction
    line = _demo_user_error(["--out", str(tmp_path / "out"), "model.name=DiT-T/4", "--seed", "1",
                             "train.lr=abc"], capsys)
    assert "train.lr" in line and "expected float" in line
    line = _demo_user_error(["--out", str(tmp_path / "out"), "diffusion.process=ddpm", "model.learn_sigma=true",
                             "--sampler", "ddim", "--num-steps", "5000"], capsys)
    assert "--num-steps" in line and "between 1 and 1000" in line
    line = _demo_user_error(["--out", str(tmp_path / "out"), "diffusion.process=ddpm", "model.learn_sigma=true"],
                            capsys)
    assert "sampler 'heun' (--sampler) samples flow models" in line
    line = _demo_user_error(["--out", str(tmp_path / "out"), "--only", "train"], capsys)
    assert "nothing to train on" in line and "'extract' stage" in line
    line = _demo_user_error(["--out", str(tmp_path / "out"), "--only", "train", "train.lr=abc"], capsys)
    assert "train.lr" in line and "expected float" in line  # an override right after --only's stages
    line = _demo_user_error(["--out", str(tmp_path / "out"), "--only", "report", "trian.lr=1"], capsys)
    assert "unknown section 'trian'" in line  # checked even when no chosen stage trains
    line = _demo_user_error(["--out", str(tmp_path / "out"), "--only", "fid", "report"], capsys)
    assert "nothing to evaluate" in line and "test.npz" in line
    line = _demo_user_error(["--out", str(tmp_path / "out"), "--only", "samples"], capsys)
    assert "run the 'train' stage first" in line
    (tmp_path / "file").write_text("")
    line = _demo_user_error(["--out", str(tmp_path / "file"), "--only", "report"], capsys)
    assert f"--out {tmp_path / 'file'} exists and is not a folder" in line
    assert ran == [] and not (tmp_path / "out").exists()


def test_a_stage_that_reports_a_user_error_is_not_reported_twice(tmp_path, capsys):
    from latentdit.errors import ReportedError

    demo = Demo(DemoSettings(out=tmp_path), log=lambda s: None)
    with pytest.raises(ReportedError):
        demo._run("train", [sys.executable, "-c", "import sys; print('train.py: error: bad', file=sys.stderr); "
                                                  "sys.exit(2)"])
    from latentdit.cli import run_main

    def main(argv):
        demo._run("train", [sys.executable, "-c", "import sys; sys.exit(2)"])

    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_grid_stage_also_draws_the_denoising_trajectory_and_the_report_shows_it(tmp_path, monkeypatch):
    demo = Demo(DemoSettings(out=tmp_path), log=lambda s: None)
    (demo.run_dir / "checkpoints" / "step-0000001").mkdir(parents=True)
    seen = []
    monkeypatch.setattr(demo, "_run", lambda name, cmd: seen.append(cmd))
    demo.stage_grid()
    (cmd,) = seen
    assert cmd[cmd.index("--trajectory") + 1] == str(demo.report_dir / "trajectory.png")
    assert cmd[cmd.index("--sampler") + 1] == DemoSettings.sampler
    text = demo.stage_report().read_text()
    assert "trajectory.png" not in text  # not drawn yet: no broken image link
    Image.new("RGB", (8, 8)).save(demo.report_dir / "trajectory.png")
    text = demo.stage_report().read_text()
    assert "![trajectory](trajectory.png)" in text and "balanced labels" in text
