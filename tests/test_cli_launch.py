"""Tools under a launcher: a user error is shown once (exit status 2 through ``python -m latentdit.launch``),
and no worker outlives its launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentdit.distributed import _report_failures
from training_helpers import PoolVAE, extract, free_port, subprocess_env, write_image_folder, write_yaml_cfg

REPO = Path(__file__).resolve().parents[1]
TRAIN_TOOL = REPO / "tools" / "train.py"
PY = sys.executable
TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]


def test_launcher_exit_status_and_what_it_prints(capsys):
    # user errors: the first failed rank's message (from its error file), once, and status 2
    assert _report_failures({1: (2, "train.py: error: x"), 0: (2, "train.py: error: x")}) == 2
    assert capsys.readouterr().err == "train.py: error: x\n"
    assert _report_failures({1: (2, "train.py: error: only on rank 1")}) == 2
    assert capsys.readouterr().err == "train.py: error: only on rank 1\n"
    # not a user error: the worker's own status (128 + signal for a signal), and which process it was
    assert _report_failures({1: (-9, "Signal 9")}) == 128 + 9
    assert "process 1 failed (signal 9)" in capsys.readouterr().err
    assert _report_failures({0: (1, "")}) == 1


_WORKER = """
import sys, time
from latentdit.cli import run_main
def main(argv):
    print("ready", flush=True)
    time.sleep(120)
run_main(main)
"""

_LAUNCHER = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(worker.pid, flush=True)
worker.wait()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_launched_tool_stops_when_its_launcher_dies(tmp_path):
    """Any tool under ``run_main`` with a launcher's environment: SIGKILL the parent, the tool exits with a line."""
    env = dict(subprocess_env(), TORCHELASTIC_RUN_ID="test")
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen([PY, "-c", _LAUNCHER, _WORKER], env=env, stdout=subprocess.PIPE, stderr=log,
                                    text=True)
        worker = int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == "ready"  # the worker is inside run_main
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            state = _state(worker)
            if state in (None, "Z"):
                break
            time.sleep(0.05)
        state = _state(worker)
        if state not in (None, "Z"):
            os.kill(worker, signal.SIGKILL)
    assert state in (None, "Z"), "the worker outlived its launcher by 10 s"
    assert f"its launcher (process {launcher.pid}) has gone away" in log_path.read_text()


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latents")
    return extract(write_image_folder(root / "images", n_per_class=4), root / "lat", PoolVAE())


def _launch(launcher: list[str], args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [PY, *launcher, *TWO_CPU_PROCESSES, "--main_process_port", str(free_port()), str(TRAIN_TOOL), *args]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_user_error_in_two_processes_is_shown_once(tmp_path):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", tmp_path / "missing")
    message = f"train.py: error: data.latents: latent directory not found: {tmp_path / 'missing'}"
    ours = _launch(["-m", "latentdit.launch"], ["--config", str(cfg)])
    out = ours.stdout + ours.stderr
    assert ours.returncode == 2, out
    assert [line for line in out.splitlines() if line.strip()] == [f"{message} (run tools/extract.py first)"], out
    # plain accelerate launch: rank 0 alone prints the line; accelerate adds its own report (status 1 today)
    plain = _launch(["-m", "accelerate.commands.launch"], ["--config", str(cfg)])
    lines = (plain.stdout + plain.stderr).splitlines()
    assert plain.returncode != 0
    assert sum(line.startswith(message) for line in lines) == 1, lines


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process of this test's tool."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return state != "Z" and str(TRAIN_TOOL).encode() in cmdline


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun starts each worker in a session of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_stop_when_the_launcher_is_killed(latents, tmp_path):
    cfg = write_yaml_cfg(tmp_path / "c.yaml", latents, max_steps=1_000_000, log_every=1, ckpt_every=1_000_000)
    run = tmp_path / "run"
    log_path = tmp_path / "log.txt"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [PY, "-m", "accelerate.commands.launch", *TWO_CPU_PROCESSES, "--main_process_port", str(free_port()),
             str(TRAIN_TOOL), "--config", str(cfg), f"train.run_dir={run}"],
            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file():  # both workers are in the training loop
            assert launcher.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        workers = [p for p in _children(launcher.pid) if _alive(p)]
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)  # the launcher alone: its workers are not told
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in workers if _alive(p)]
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert left == [], f"still running 30 s after the launcher was killed: {left}"
    text = log_path.read_text()
    assert "its launcher (process " in text and "has gone away" in text, text[-3000:]


# one os.write per line: the workers share the pipe, and a single short write is never interleaved
# (print may write the text and its newline separately)
_THREADS = """
import os, torch
os.write(1, f"threads {torch.get_num_threads()} omp {os.environ.get('OMP_NUM_THREADS')}\\n".encode())
"""


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_launched_cpu_workers_share_every_core(tmp_path, processes):
    script = tmp_path / "threads.py"
    script.write_text(_THREADS)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    launch = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if processes > 1:
        launch.insert(0, "--multi_gpu")
    run = subprocess.run([PY, "-m", "latentdit.launch", *launch, str(script)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    expected = max(1, len(os.sched_getaffinity(0)) // processes)
    lines = [line for line in run.stdout.splitlines() if line.startswith("threads")]
    assert lines == [f"threads {expected} omp {expected}"] * processes
    # a thread count the user chose is kept
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([PY, "-m", "latentdit.launch", *launch, str(script)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stdout.splitlines() if line.startswith("threads")] == ["threads 1 omp 1"] * processes
