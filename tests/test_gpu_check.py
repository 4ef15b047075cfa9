"""benchmarks/gpu_check.sh: one table, one row per check, each with its command; --tiny runs on a CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ROWS = [
    ("CUDA tests (pytest -m cuda)", "-m pytest -q -m cuda"),
    ("train DiT-T/2 plain fp32", "benchmarks/bench_train.py --device cpu --models DiT-T/2 --latent-size 8"),
    ("train DiT-T/2 ours fp32", "--no-plain --mixed-precision no --compile off"),
    ("train DiT-T/2 ours bf16 ", "--no-plain --mixed-precision bf16 --compile off"),
    ("train DiT-T/2 ours bf16 + compile", "--no-plain --mixed-precision bf16 --compile on"),
    ("extract SD-VAE-sized 16², batch 1", "benchmarks/bench_extract.py --device cpu --skip bundled --image-size 16"),
    ("extract SD-VAE-sized 16², batch 4", "--batch-sizes 4"),
    ("sample DiT-T/2 ddpm-4", "benchmarks/bench_sample.py --device cpu --model DiT-T/2 --samplers ddpm-4"),
    ("sample DiT-T/2 ddim-2", "--samplers ddim-2"),
    ("sample DiT-T/2 dpm-solver-2", "--samplers dpm-solver-2"),
]


def _run(*args: str, hide_diffusers: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    if hide_diffusers is not None:  # a diffusers package that fails to import, as on a machine without it
        (hide_diffusers / "diffusers").mkdir(parents=True, exist_ok=True)
        (hide_diffusers / "diffusers" / "__init__.py").write_text("raise ImportError('no diffusers here')\n")
        env["PYTHONPATH"] = str(hide_diffusers)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _table(stdout: str) -> dict[str, str]:
    """Row label → its whole line, from the one table the script prints."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("row ") and line.rstrip().endswith("command"))
    assert set(lines[head + 1]) == {"-"}
    table = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        matches = [name for name, _ in ROWS if line.startswith(name)]
        assert matches, f"unexpected row: {line}"
        label = max(matches, key=len)
        table[label] = line
    return table


def test_every_row_with_its_command_and_skips_without_diffusers(tmp_path):
    proc = _run("--tiny", "--budget", "0", hide_diffusers=tmp_path / "shadow")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("GPU check (--tiny)") == 1  # one table
    table = _table(proc.stdout)
    assert list(table) == [name for name, _ in ROWS]
    for name, command in ROWS:
        line = table[name]
        assert command in line, (name, line)
        assert f"{Path(sys.executable).name} " in line  # the interpreter given as PYTHON heads the command
        if "extract" in name or "dpm-solver" in name:
            assert "skipped (diffusers missing; give --wheels DIR)" in line
        elif "compile" in name:
            assert "skipped (CPU: compiling takes minutes there)" in line
        else:
            assert "skipped (time budget of 0 s spent)" in line


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option --bogus"),
    (["--wheels"], "--wheels needs a folder"),
    (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels is not a folder"),
    (["--budget", "soon"], "--budget needs a whole number of seconds"),
    (["--rows", "two"], "--rows needs row numbers"),
])
def test_bad_options_exit_2(args, message):
    proc = _run(*args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the check targets Linux GPU machines")
def test_full_check_refuses_a_machine_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run(timeout=120)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr and "--tiny" in proc.stderr


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def test_table_reads_each_kind_of_row(tmp_path):
    from gpu_check_table import render, table_rows

    work = tmp_path
    (work / "row01.log").write_text("....\n===== 7 passed, 1 skipped in 3.2s =====\n")
    _write(work / "row02.json", {"results": [{"plain fp32 eager": {"img_per_s": 100.0, "mfu": 0.5}}]})
    _write(work / "row03.json", {"results": [{"ours": {"img_per_s": 150.0, "mfu": 0.75}}]})
    _write(work / "row04.json", {"rows": [{"method": "per-image baseline", "img_s": 2.0},
                                          {"method": "batched", "img_s": 5.0}]})
    _write(work / "row05.json", {"rows": [{"images_per_s": 12.5, "nfe_per_image": 20}]})
    for k, peak in ((2, {"gpu_bytes": 3 * 2**30, "rss_bytes": 1}), (3, {"gpu_bytes": None, "rss_bytes": 2**29})):
        _write(work / f"row{k:02d}.peak.json", peak)
    records = [
        ["row01", "pytest", "CUDA tests", "python -m pytest", "ok", "3"],
        ["row02", "train", "train plain", "python bench_train.py --plain-only", "ok", "10"],
        ["row03", "train", "train ours", "python bench_train.py --no-plain", "ok", "11"],
        ["row04", "extract", "extract batch 4", "python bench_extract.py", "ok", "5"],
        ["row05", "sample", "sample ddim-2", "python bench_sample.py", "ok", "4"],
        ["row06", "sample", "sample dpm", "python bench_sample.py --samplers dpm", "skipped (not in --rows)"],
        ["row07", "train", "train compile", "python bench_train.py --compile on", "timed out after 90 s", "90"],
    ]
    table = {r[0]: r for r in table_rows(str(work), records)}
    assert table["CUDA tests"][1] == "7 passed, 1 skipped in 3.2s"
    assert table["train plain"][1:4] == ("100.00 img/s (MFU 50.0%)", "1.00x plain", "3.00 GiB GPU")
    assert table["train ours"][1:4] == ("150.00 img/s (MFU 75.0%)", "1.50x plain", "0.50 GiB RSS")
    assert table["extract batch 4"][1:3] == ("5.00 img/s", "2.50x per-image (2.00 img/s)")
    assert table["sample ddim-2"][1:3] == ("12.50 img/s", "20 NFE/img")
    assert table["sample dpm"][1:5] == ("skipped (not in --rows)", "-", "-", "-")
    text, failed = render(list(table.values()), "CPU", "2.x", True, "123")
    assert failed == ["train compile"] and "1 row(s) failed or timed out: train compile" in text
    lines = text.splitlines()
    assert lines[1] == "GPU check (--tiny): CPU; torch 2.x; 123 s in all"
    assert lines[2].startswith("row ") and lines[2].endswith("command") and set(lines[3]) == {"-"}
    assert all(line.endswith(r[5]) for line, r in zip(lines[4:11], table.values()))  # each row ends with its command


@pytest.mark.slow
def test_tiny_run_of_one_real_row(tmp_path):
    proc = _run("--tiny", "--rows", "2", "--budget", "600", "--out", str(tmp_path / "out"), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = _table(proc.stdout)
    assert list(table) == [name for name, _ in ROWS]
    line = table["train DiT-T/2 plain fp32"]
    assert re.search(r"\d+\.\d\d img/s", line) and re.search(r"\d+\.\d\d GiB RSS", line), line
    assert "1.00x plain" in line
    assert all("skipped" in other for name, other in table.items() if name != "train DiT-T/2 plain fp32")
    assert (tmp_path / "out" / "row02.json").is_file() and (tmp_path / "out" / "row02.peak.json").is_file()
