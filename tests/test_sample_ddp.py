"""tools/sample_ddp.py: ADM .npz layout, balanced labels, resume after a kill, progress, 1 vs 2 processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latentdit import sample_store as store
from latentdit.errors import LatentDiTError
from script_helpers import load_tool

try:
    from sampling_helpers import make_tiny_dit, make_tiny_vae_dir, save_our_checkpoint
except ImportError:  # tests/ imported as a package
    from tests.sampling_helpers import make_tiny_dit, make_tiny_vae_dir, save_our_checkpoint

TOOL = Path(__file__).parents[1] / "tools" / "sample_ddp.py"
N, CHUNK, BATCH = 10, 4, 2  # 3 chunks: 4 + 4 + 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    vae_dir = make_tiny_vae_dir(root / "vae")
    return save_our_checkpoint(make_tiny_dit(), root / "ema.safetensors", vae=str(vae_dir))


def _argv(ckpt, out_dir, *extra):
    return ["--ckpt", str(ckpt), "--out-dir", str(out_dir), "--num-samples", str(N), "--chunk-size", str(CHUNK),
            "--batch-size", str(BATCH), "--sampler", "ddpm", "--num-steps", "3", "--cfg-scale", "1.5",
            "--seed", "3", *extra]


@pytest.fixture(scope="module")
def one_process(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert load_tool("sample_ddp").main(_argv(ckpt, out)) == 0
    return out


def test_npz_has_the_adm_layout_and_balanced_distinct_samples(one_process):
    with np.load(one_process / "samples.npz") as z:
        assert z.files == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (N, 16, 16, 3)
    assert labels.tolist() == [i % 4 for i in range(N)]
    assert len({img.tobytes() for img in images}) == N
    assert sorted(p.name for p in (one_process / store.CHUNK_DIR).iterdir()) == [
        "chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz", store.CHUNK_SETTINGS]


def test_resume_after_a_kill_keeps_finished_chunks(ckpt, one_process, tmp_path, monkeypatch):
    tool = load_tool("sample_ddp")
    real_write = store.write_chunk
    written = []

    def write_then_die(path, images, labels):
        if written:
            raise KeyboardInterrupt  # killed while sampling the second chunk
        real_write(path, images, labels)
        written.append(path)

    monkeypatch.setattr(store, "write_chunk", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        tool.main(_argv(ckpt, tmp_path))
    monkeypatch.setattr(store, "write_chunk", real_write)
    chunks = tmp_path / store.CHUNK_DIR
    assert [p.name for p in written] == ["chunk-000000.npz"]
    assert store.missing_chunks(chunks, 3) == [1, 2]
    assert not (tmp_path / "samples.npz").exists()
    os.utime(written[0], ns=(1_000_000_000, 1_000_000_000))  # an old mtime: rewriting would change it

    recomputed = []
    monkeypatch.setattr(store, "write_chunk", lambda p, i, l: (recomputed.append(Path(p).name), real_write(p, i, l)))
    assert tool.main(_argv(ckpt, tmp_path)) == 0
    assert recomputed == ["chunk-000001.npz", "chunk-000002.npz"]
    assert written[0].stat().st_mtime_ns == 1_000_000_000
    with np.load(tmp_path / "samples.npz") as a, np.load(one_process / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_resume_with_other_settings_is_refused(ckpt, one_process):
    with pytest.raises(LatentDiTError, match=r"other settings.*cfg_scale"):
        load_tool("sample_ddp").main(_argv(ckpt, one_process)[:-4] + ["--cfg-scale", "2.0", "--seed", "3"])


def test_gather_refuses_missing_chunks(tmp_path):
    store.write_chunk(store.chunk_path(tmp_path, 0), np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(LatentDiTError, match="1 chunk\\(s\\) missing"):
        store.gather_chunks(tmp_path, 4, 2, tmp_path / "s.npz")


def test_balanced_labels_and_chunk_ranges():
    assert store.balanced_labels(range(5, 12), 3) == [2, 0, 1, 2, 0, 1, 2]
    assert [list(store.chunk_range(k, 10, 4)) for k in range(store.num_chunks(10, 4))] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_proportional_labels_keep_every_prefix_within_one_of_the_class_shares():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 40, size=int(rng.integers(1, 12)))
        counts[int(rng.integers(len(counts)))] += 1
        labels = np.array(store.proportional_labels(200, counts.tolist()))
        for n in range(1, 201):
            share = n * counts / counts.sum()
            assert np.abs(np.bincount(labels[:n], minlength=len(counts)) - share).max() < 1
        assert set(labels.tolist()) <= set(np.flatnonzero(counts).tolist())  # an empty class never drawn
    assert store.proportional_labels(9, [5, 5, 5]) == store.balanced_labels(range(9), 3)
    assert store.proportional_labels(8, [3, 1]) == [0, 0, 1, 0, 0, 0, 1, 0]
    assert store.proportional_labels(5, [2, 7, 1])[:3] == store.proportional_labels(3, [2, 7, 1])
    for bad in ([], [0, 0], [3, -1]):
        with pytest.raises(LatentDiTError, match="class counts"):
            store.proportional_labels(3, bad)


def test_training_labels_follow_the_recorded_class_counts(tmp_path):
    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    counts = [6, 0, 1, 3]
    weighted = save_our_checkpoint(make_tiny_dit(), tmp_path / "ema.safetensors", vae=str(vae_dir),
                                   class_counts=counts)
    assert load_tool("sample_ddp").main(_argv(weighted, tmp_path / "out", "--labels", "training")) == 0
    with np.load(tmp_path / "out" / "samples.npz") as z:
        labels = z["arr_1"]
    assert labels.tolist() == store.proportional_labels(N, counts)
    assert np.bincount(labels, minlength=4).tolist() == [6, 0, 1, 3]
    settings = (tmp_path / "out" / store.CHUNK_DIR / store.CHUNK_SETTINGS).read_text()
    assert '"labels": "training"' in settings
    # balanced chunks are not taken for training-proportion ones
    with pytest.raises(LatentDiTError, match="labels"):
        load_tool("sample_ddp").main(_argv(weighted, tmp_path / "out"))
    bare = save_our_checkpoint(make_tiny_dit(), tmp_path / "bare.safetensors", vae=str(vae_dir))
    with pytest.raises(LatentDiTError, match="--labels training: .* records no training class counts"):
        load_tool("sample_ddp").main(_argv(bare, tmp_path / "out2", "--labels", "training"))
    assert not (tmp_path / "out2").exists()


def test_progress_bar_counts_the_samples_this_process_draws(ckpt, tmp_path, monkeypatch):
    import tqdm.auto

    totals = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    assert load_tool("sample_ddp").main(_argv(ckpt, tmp_path)) == 0
    assert totals == [N]  # 3 chunks of 4, 4 and 2 samples: 10, not 12
    assert store.samples_in_chunks([1, 2], N, CHUNK) == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(ckpt, one_process, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(TOOL),
           *_argv(ckpt, tmp_path, "--batch-size", "3")]  # another batch split too: samples depend on (seed, index)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    with np.load(tmp_path / "samples.npz") as a, np.load(one_process / "samples.npz") as b:
        assert a["arr_0"].shape == (N, 16, 16, 3)
        assert len({img.tobytes() for img in a["arr_0"]}) == N
        assert np.bincount(a["arr_1"], minlength=4).tolist() == [3, 3, 2, 2]
        # the same samples; the other batch split may round a latent differently in the last bits
        diff = np.abs(a["arr_0"].astype(np.int16) - b["arr_0"].astype(np.int16))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        assert np.array_equal(a["arr_1"], b["arr_1"])


def test_a_flow_model_needs_nothing_extra(tmp_path):
    from latentdit.diffusion import FlowProcess

    vae_dir = make_tiny_vae_dir(tmp_path / "vae")
    flow_ckpt = save_our_checkpoint(make_tiny_dit(seed=3, learn_sigma=False), tmp_path / "ema.safetensors",
                                    vae=str(vae_dir), process=FlowProcess(prediction="x"))
    argv = ["--ckpt", str(flow_ckpt), "--out-dir", str(tmp_path / "out"), "--num-samples", "3", "--chunk-size", "3",
            "--batch-size", "3", "--num-steps", "2", "--cfg-scale", "1.5"]
    assert load_tool("sample_ddp").main(argv) == 0
    settings = (tmp_path / "out" / store.CHUNK_DIR / store.CHUNK_SETTINGS).read_text()
    assert '"sampler": "heun"' in settings and '"prediction": "x"' in settings
    with np.load(tmp_path / "out" / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 16, 16, 3)
    with pytest.raises(LatentDiTError, match="samples ddpm models"):
        load_tool("sample_ddp").main(argv[:2] + ["--out-dir", str(tmp_path / "o2"), "--sampler", "ddpm"])
