"""benchmarks/bench_muon.py: a short run prints every row."""

from __future__ import annotations

from script_helpers import load_script


def test_a_short_run_prints_every_row(capsys):
    bench = load_script("benchmarks/bench_muon.py")
    assert bench.main(["--models", "DiT-T/2", "--rounds", "1", "--iters", "1", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "16 Muon matrices" in out  # DiT-T/2: 4 blocks x (qkv, proj, fc1, fc2)
    for label in ("orthogonalise, plain form", "orthogonalise, default form", "optimizer step, Muon + AdamW",
                  "optimizer step, AdamW (fused)", "forward + backward, batch 4", "a training step with Muon"):
        assert label in out
