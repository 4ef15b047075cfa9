"""benchmarks/bench_excess_by_time.py: real latents noised to t and sampled back from t."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdit.cli import run_main
from latentdit.diffusion.flow import FlowProcess
from latentdit.errors import LatentDiTError
from latentdit.sampling import SamplerSettings
from latentdit.sampling.noise import per_sample_noise
from script_helpers import load_script

bench = load_script("benchmarks/bench_excess_by_time.py")


class Constant(nn.Module):
    """A 'model' whose output is fixed: ``out`` for every input (the rows of a batch in order)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x, t, y):
        return self.out.clone()


def _settings(process, sampler="heun"):
    return SamplerSettings(sampler=sampler, num_steps=10, cfg_scale=1.0).resolved(process, in_channels=4)


def test_the_grid_from_t_takes_its_share_of_the_steps():
    process = FlowProcess()
    assert bench.start_grid(process, 0.4, 10).times == pytest.approx((0.4, 0.3, 0.2, 0.1, 0.0))
    assert bench.start_grid(process, 1.0, 10).times == pytest.approx(tuple(1 - i / 10 for i in range(11)))
    assert bench.start_grid(process, 0.05, 10).times == pytest.approx((0.05, 0.0))  # at least one step


@pytest.mark.parametrize("sampler", ["heun", "euler"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_a_constant_velocity_is_integrated_over_exactly_t(sampler, t):
    """With velocity c everywhere, the path from x_t ends at x_t − t·c: the grid runs from t to 0."""
    x0 = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    c = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    process = FlowProcess()
    out = bench.denoise_from(Constant(c), process, _settings(process, sampler), x0, torch.zeros(3, dtype=torch.long),
                             t, seed=5)
    x_t = (1 - t) * x0 + t * per_sample_noise(5, range(3)).draw((3, 4, 2, 2), torch.device("cpu"))
    torch.testing.assert_close(out, x_t - t * c, rtol=0, atol=1e-5)


def test_a_model_that_knows_the_clean_latents_gets_them_back():
    x0 = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    process = FlowProcess(prediction="x")
    out = bench.denoise_from(Constant(x0), process, _settings(process), x0, torch.zeros(3, dtype=torch.long), 0.6,
                             seed=5)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_results_made_with_other_settings_are_refused_naming_the_fields(tmp_path):
    record = {"checkpoint": "train/checkpoints/step-0000010/ema.safetensors", "count": 1000, "seed": 0,
              "sampling": "heun-10, cfg 1.5"}
    bench.check_record(tmp_path / "settings.json", record)
    bench.check_record(tmp_path / "settings.json", dict(record))  # the same settings: reused
    with pytest.raises(LatentDiTError, match=r"settings\.json: .*count 1000 → 300; seed 0 → 1.*another --out"):
        bench.check_record(tmp_path / "settings.json", {**record, "count": 300, "seed": 1})


def test_the_start_is_x0_noised_to_t_with_the_per_sample_noise():
    x0 = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    process = FlowProcess()  # velocity 0 everywhere: the sampler stays where it starts
    out = bench.denoise_from(Constant(torch.zeros_like(x0)), process, _settings(process), x0,
                             torch.zeros(3, dtype=torch.long), 0.3, seed=7, first_index=10)
    noise = per_sample_noise(7, range(10, 13)).draw((3, 4, 2, 2), torch.device("cpu"))
    torch.testing.assert_close(out, 0.7 * x0 + 0.3 * noise)


def test_times_outside_the_flow_interval_end_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(bench.main, ["--demo", str(tmp_path), "--times", "0", "1.5"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--times" in err
