"""benchmarks/gpu_check.sh: one table, one row per check, each with its command; --tiny runs on a CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.slow
def test_tiny_run_measures_every_row(tmp_path):
    proc = _run("--tiny", "--budget", "3000", "--out", str(tmp_path / "out"), timeout=3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = _table(proc.stdout)
    assert list(table) == [name for name, _ in ROWS]
    assert re.search(r"\d+ (skipped|passed)", table["CUDA tests (pytest -m cuda)"])
    for name, line in table.items():
        if name.startswith(("train", "extract", "sample")) and "skipped" not in line:
            assert re.search(r"\d+\.\d\d img/s", line), line
            assert re.search(r"\d+\.\d\d GiB (RSS|GPU)", line), line  # the row's own peak memory
    assert "1.00x plain" in table["train DiT-T/2 plain fp32"]
    assert re.search(r"\d+\.\d\dx plain", table["train DiT-T/2 ours bf16 "])
    assert re.search(r"\d+\.\d\dx per-image", table["extract SD-VAE-sized 16², batch 4"]) or "skipped" in \
        table["extract SD-VAE-sized 16², batch 4"]
    assert (tmp_path / "out" / "row02.json").is_file() and (tmp_path / "out" / "row02.peak.json").is_file()
