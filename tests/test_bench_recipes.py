"""benchmarks/bench_recipes.py: a run already in --out is reused or continued only under the config its
row resolves to now."""

from __future__ import annotations

import argparse
import sys

import pytest

from latentdit.config import load_config, save_config
from latentdit.errors import LatentDiTError
from script_helpers import load_script


@pytest.fixture()
def bench_module():
    before = list(sys.path)
    yield load_script("benchmarks/bench_recipes.py")
    sys.path[:] = before  # the benchmark puts tools/ on the path to import the demo's stages
    sys.modules.pop("benchmarks_bench_recipes", None)


def _bench(module, out):
    args = argparse.Namespace(out=out, minutes=5.0, steps=None, fid_samples=1000, reference_samples=500,
                              extract_limit=10000, cfg_scale=1.5, seed=0, data=None, repeats=1)
    return module.Bench(args)


def _started(bench, recipe, overrides=()):
    """Write the config a run of ``recipe`` saves when it starts, with ``overrides`` on top."""
    run = bench.run_dir(recipe, 0)
    run.mkdir(parents=True)
    save_config(load_config(bench.config(recipe), [*bench.overrides(recipe, 0), *overrides]), run / "config.yaml")


def test_a_run_started_with_the_rows_config_is_reused(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path)
    recipe = next(r for r in bench_module.RECIPES if r.name == "best+adamw")
    bench.check_run(recipe, 0)  # nothing there yet
    _started(bench, recipe)
    bench.check_run(recipe, 0)
    # the same benchmark moved elsewhere: its paths differ, its meaning does not
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    _bench(bench_module, moved).check_run(recipe, 0)


def test_a_run_whose_row_changed_meaning_is_refused_naming_the_fields(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path)
    recipe = next(r for r in bench_module.RECIPES if r.name == "best+muon")
    _started(bench, recipe, ("train.optimizer=adamw", "train.max_minutes=10"))
    with pytest.raises(LatentDiTError, match=r"config\.yaml: run best\+muon-r0 was started with another config") as e:
        bench.check_run(recipe, 0)
    message = str(e.value)
    assert "train.optimizer 'adamw' → 'muon'" in message and "train.max_minutes 10.0 → 5.0" in message
    assert "train.lr" not in message and "another --out" in message
