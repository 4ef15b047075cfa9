"""User mistakes end in one line and exit status 2, never a traceback, and nothing already written is lost.

Config and manifest files that are not what they should be, outputs on a full or read-only file
system or at a path that is a folder / device / FIFO / symlink, unusable --device values, overrides
mixed with options, resuming onto latents of another VAE.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentdit.cli import run_main
from latentdit.data.latents import MANIFEST_NAME
from latentdit.errors import LatentDiTError
from latentdit.io import atomic_write, read_json, save_safetensors, torch_save, writable_target, write_json
from test_extract import make_vae_dir
from training_helpers import PoolVAE, extract, make_cfg, write_image_folder, write_yaml_cfg
from script_helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def user_error(tool: str, argv: list[str], capsys) -> str:
    """Run ``tools/<tool>.py`` the way its ``__main__`` does; assert exit 2, no traceback and one error line on
    stderr (progress bars aside); return that line."""
    with pytest.raises(SystemExit) as e:
        run_main(load_tool(tool).main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"{Path(sys.argv[0]).name}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latents")
    return extract(write_image_folder(root / "images", n_per_class=4), root / "lat", PoolVAE())


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at ``path`` (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------------------------
# config files and overrides
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (b"- model\n- train\n", "expected a mapping of sections .* got list"),
    (b"3\n", "expected a mapping of sections .* got int"),
    (b"model:\n  name: DiT-S/2\n\xff\xfe\n", "is not UTF-8 text"),
    (b"model:\n  name: DiT-S/2\n bad: 1\n", r"c\.yaml:3:2: expected <block end>"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, content, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    line = user_error("train", ["--config", str(cfg)], capsys)
    assert str(cfg) in line
    assert re.search(expected, line), line


def test_overrides_before_and_after_options(latents, tmp_path, capsys):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents)
    missing = tmp_path / "nowhere"
    # both overrides are read: the second one decides which latents are looked for
    line = user_error("train", ["--config", str(cfg), "train.max_steps=2", "--resume", "auto",
                                f"data.latents={missing}"], capsys)
    assert f"latent directory not found: {missing}" in line
    line = user_error("train", ["train.lr=-1", "--config", str(cfg), "--resume", "auto", "train.max_steps=2"], capsys)
    assert "train.lr" in line
    line = user_error("train", ["--config", str(cfg), "trian.lr=1", "--resume", "auto"], capsys)
    assert "unknown section 'trian'" in line


# ----------------------------------------------------------------------------------------------
# manifests and other JSON the tools read
# ----------------------------------------------------------------------------------------------

def _damaged_copy(latents: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "damaged"
    shutil.copytree(latents, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).write_bytes(edit(manifest))
    return out


@pytest.mark.parametrize("edit, expected", [
    (lambda m: json.dumps([m]).encode(), "is not a latentdit latent manifest: expected a JSON object"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "latent_shape"}).encode(),
     "field 'latent_shape' is missing"),
    (lambda m: json.dumps(dict(m, num_classes="ten")).encode(), "field 'num_classes': expected a positive integer"),
    (lambda m: json.dumps(m).encode().replace(b'"ant"', b'"\xe4nt"'), "is not UTF-8 text"),
])
def test_damaged_manifest_is_one_line(latents, tmp_path, capsys, edit, expected):
    damaged = _damaged_copy(latents, tmp_path, edit)
    cfg = write_yaml_cfg(tmp_path / "c.yaml", damaged)
    line = user_error("train", ["--config", str(cfg), f"train.run_dir={tmp_path / 'run'}"], capsys)
    assert expected in line and str(damaged / MANIFEST_NAME) in line
    assert not (tmp_path / "run").exists()


def test_extracting_into_a_folder_with_a_damaged_manifest_is_one_line(latents, tmp_path, capsys):
    damaged = _damaged_copy(latents, tmp_path, lambda m: json.dumps(["not", "a", "manifest"]).encode())
    images = write_image_folder(tmp_path / "images", n_per_class=1)
    vae = make_vae_dir(tmp_path / "vae")
    line = user_error("extract", ["--data", str(images), "--out", str(damaged), "--image-size", "16",
                                  "--vae", str(vae), "--num-workers", "0", "--no-progress"], capsys)
    assert "not a latentdit latent manifest" in line


def test_json_that_is_not_utf8_is_a_user_error(tmp_path):
    path = tmp_path / ".chunks" / "settings.json"
    path.parent.mkdir()
    path.write_bytes(b'{"seed": "\xff"}')
    with pytest.raises(LatentDiTError, match=r"chunk settings .*settings\.json is not UTF-8 text \(byte 10\)"):
        read_json(path, "chunk settings")


# ----------------------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["extract", "sample", "fid"])
def test_unusable_device_is_refused_before_any_work(tmp_path, capsys, tool):
    args = {"extract": ["--out", str(tmp_path / "lat")], "sample": ["--ckpt", str(tmp_path)],
            "fid": [str(tmp_path), str(tmp_path)]}[tool]
    line = user_error(tool, [*args, "--device", "tpu9"], capsys)
    assert "unknown device 'tpu9'" in line
    if not torch.cuda.is_available():
        line = user_error(tool, [*args, "--device", "cuda"], capsys)
        assert "no usable cuda device" in line and "--device cpu" in line
    assert not (tmp_path / "lat").exists()


# ----------------------------------------------------------------------------------------------
# where outputs go
# ----------------------------------------------------------------------------------------------

def test_atomic_write_refuses_fifos_devices_and_folders(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(LatentDiTError, match="refusing to write .*pipe: it is a FIFO"):
        with atomic_write(fifo) as f:
            f.write(b"x")
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    with pytest.raises(LatentDiTError, match="refusing to write /dev/null: it is a device"):
        writable_target("/dev/null")  # checked only: nothing is written under /dev
    (tmp_path / "folder").mkdir()
    with pytest.raises(LatentDiTError, match="it is a folder; expected the path of a file"):
        write_json(tmp_path / "folder", {})
    (tmp_path / "file").write_text("keep")
    with pytest.raises(LatentDiTError, match="a part of the path is a file"):
        write_json(tmp_path / "file" / "x.json", {})
    assert (tmp_path / "file").read_text() == "keep"


def test_atomic_write_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"a": 1})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text()) == {"a": 1}
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "real" / "new.json")
    write_json(dangling, [2])
    assert dangling.is_symlink() and json.loads((tmp_path / "real" / "new.json").read_text()) == [2]


def test_full_disk_is_a_user_error_and_keeps_the_old_file(tmp_path):
    big = {"x": torch.zeros(64 * 1024)}  # 256 KiB
    with tmpfs(tmp_path / "small", "64k") as disk:
        for i, save in enumerate((lambda p: torch_save(big, p), lambda p: save_safetensors(big, p))):
            out = disk / f"out{i}"
            out.write_text("old")
            with pytest.raises(LatentDiTError, match=f"could not write {out}: .*(No space left|disk is .*full)"):
                save(out)
            assert out.read_text() == "old" and sorted(p.name for p in disk.iterdir()) == [
                f"out{k}" for k in range(i + 1)]


def test_write_failures_by_fault_injection(tmp_path, monkeypatch):
    """Without mounting anything: the errors a full disk or a read-only file system raise, injected."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", no_space)
    with pytest.raises(LatentDiTError, match="could not write .*a.json: No space left on device"):
        write_json(tmp_path / "a.json", {})

    def torch_zip_failure(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_zip_failure)
    with pytest.raises(LatentDiTError, match="could not write .*b.pt: the write stopped part-way .*disk is probably"):
        torch_save({}, tmp_path / "b.pt")
    assert list(tmp_path.iterdir()) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    import tempfile
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(LatentDiTError, match="could not write .*c.json: Read-only file system"):
        write_json(tmp_path / "c.json", {})


def test_train_onto_read_only_or_full_file_systems(latents, tmp_path, capsys):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents, max_steps=2)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        line = user_error("train", ["--config", str(cfg), f"train.run_dir={ro / 'run'}"], capsys)
        assert "Read-only file system" in line and str(ro / "run") in line
    with tmpfs(tmp_path / "full", "160k") as full:  # room for the config and metrics, not for a checkpoint
        line = user_error("train", ["--config", str(cfg), f"train.run_dir={full / 'run'}"], capsys)
        assert "No space left on device" in line or "disk is probably full" in line
        assert (full / "run" / "config.yaml").is_file()


def test_run_dir_that_is_a_file(latents, tmp_path, capsys):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents)
    (tmp_path / "run").write_text("mine")
    line = user_error("train", ["--config", str(cfg), f"train.run_dir={tmp_path / 'run'}"], capsys)
    assert f"run folder {tmp_path / 'run'} exists and is not a folder" in line
    line = user_error("train", ["--config", str(cfg), f"train.run_dir={tmp_path / 'run' / 'sub'}"], capsys)
    assert f"run folder {tmp_path / 'run' / 'sub'}: {tmp_path / 'run'} is a file, not a folder" in line
    assert (tmp_path / "run").read_text() == "mine"
    line = user_error("train", ["--config", str(cfg), "--resume", str(tmp_path / "run")], capsys)
    assert "expected a checkpoint folder (step-XXXXXXX) or a run folder, got a file" in line
    line = user_error("extract", ["--out", str(tmp_path / "run" / "lat"), "--image-size", "16"], capsys)
    assert f"--out {tmp_path / 'run' / 'lat'}: {tmp_path / 'run'} is a file" in line


# ----------------------------------------------------------------------------------------------
# resuming onto other latents
# ----------------------------------------------------------------------------------------------

class OtherVAE(PoolVAE):
    """Same latent shape as PoolVAE, other weights and scaling factor."""

    scaling_factor = 0.25
    spec = "other-pool-vae"

    def identity(self) -> dict:
        return {"spec": self.spec, "config_sha256": "0" * 64, "weights_sha256": "2" * 64}


def test_resume_onto_latents_of_another_vae_is_refused(latents, tmp_path):
    from latentdit.training import train

    images = tmp_path / "images"
    write_image_folder(images, n_per_class=4)
    other = extract(images, tmp_path / "other", OtherVAE())
    run = tmp_path / "run"
    train(make_cfg(latents, run, "train.max_steps=1"))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(LatentDiTError, match=r"cannot resume from .*step-0000001: it was trained on latents of "
                                             r"VAE 'test-pool-vae' \(weights sha256 111111111111\.\.\., scaling "
                                             r"factor 0\.5\), but data\.latents=.*other holds latents of VAE "
                                             r"'other-pool-vae' \(weights sha256 222222222222\.\.\., scaling factor "
                                             r"0\.25\)"):
        train(make_cfg(other, run, "train.max_steps=2"), resume="auto")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # the same VAE at another image size (same latent shape through another crop) or preprocessing
    for field, value in (("image_size", 99), ("preprocessing", "something else")):
        moved = tmp_path / f"moved-{field}"
        shutil.copytree(latents, moved)
        manifest = json.loads((moved / MANIFEST_NAME).read_text())
        manifest[field] = value
        (moved / MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(LatentDiTError, match=f"it was trained on latents with {field} .* has {field} "):
            train(make_cfg(moved, run, "train.max_steps=2"), resume="auto")
    train(make_cfg(latents, run, "train.max_steps=2"), resume="auto")  # the same latents resume


# ----------------------------------------------------------------------------------------------
# the top-level handler itself
# ----------------------------------------------------------------------------------------------

def _exit_code(main, argv=()) -> int:
    with pytest.raises(SystemExit) as e:
        run_main(main, list(argv))
    return e.value.code


def test_messages_are_one_line_and_only_rank_zero_prints(monkeypatch, capsys, tmp_path):
    prog = Path(sys.argv[0]).name

    def user_mistake(argv):
        raise LatentDiTError("first line\n   second line\n")

    assert _exit_code(user_mistake) == 2
    assert capsys.readouterr().err == f"{prog}: error: first line second line\n"
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert _exit_code(user_mistake) == 2
    assert capsys.readouterr().err == ""  # rank 1 is silent; its launcher reads the error file
    assert json.loads(error_file.read_text())["message"] == f"{prog}: error: first line second line"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")  # a launcher without error files: no rank stays silent
    assert _exit_code(user_mistake) == 2
    assert capsys.readouterr().err == f"{prog}: error: first line second line\n"


def test_fixable_file_system_errors_are_user_errors_and_others_are_not(capsys):
    def full(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out.bin")

    assert _exit_code(full) == 2
    assert capsys.readouterr().err.endswith("error: /data/out.bin: No space left on device (free some space or "
                                            "choose another location)\n")

    def bug(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/internal/file")

    with pytest.raises(FileNotFoundError):  # not a user error: the traceback stays
        run_main(bug, [])


def test_argparse_errors_are_one_line(capsys):
    from latentdit.cli import make_parser, positive_int

    def main(argv):
        p = make_parser("test")
        p.add_argument("--n", type=positive_int, required=True)
        p.parse_args(argv)

    assert _exit_code(main, ["--n", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --n: expected a positive integer (≥ 1), got 0" in err
    assert "usage:" not in err and "--help" in err


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep")
    os.mkfifo(tmp_path / "pipe")
    line = user_error("sample", ["--ckpt", str(tmp_path), "--out", "/dev/full"], capsys)
    assert "refusing to write /dev/full: it is a device" in line  # and /dev/full is only looked at
    line = user_error("sample", ["--ckpt", str(tmp_path), "--out", str(tmp_path / "folder")], capsys)
    assert "it is a folder; expected the path of a file" in line
    line = user_error("sample", ["--ckpt", str(tmp_path), "--save-individual", str(tmp_path / "file")], capsys)
    assert f"output folder {tmp_path / 'file'} exists and is not a folder" in line
    line = user_error("sample_ddp", ["--ckpt", "x", "--out-dir", str(tmp_path / "file" / "sub")], capsys)
    assert f"{tmp_path / 'file'} is a file, not a folder" in line
    line = user_error("fid", [str(tmp_path), "--save-stats", str(tmp_path / "pipe")], capsys)
    assert "it is a FIFO" in line
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "pipe").is_fifo()
