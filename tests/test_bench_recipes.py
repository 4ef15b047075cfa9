"""benchmarks/bench_recipes.py: rows compose a base recipe with options; a run already in --out is reused or
continued only under the config its row resolves to now."""

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
    recipe = bench_module.recipe("best+adamw")
    bench.check_run(recipe, 0)  # nothing there yet
    _started(bench, recipe)
    bench.check_run(recipe, 0)
    # the same benchmark moved elsewhere: its paths differ, its meaning does not
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    _bench(bench_module, moved).check_run(recipe, 0)


def test_a_run_whose_row_changed_meaning_is_refused_naming_the_fields(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path)
    recipe = bench_module.recipe("best+muon")
    _started(bench, recipe, ("train.optimizer=adamw", "train.max_minutes=10"))
    with pytest.raises(LatentDiTError, match=r"config\.yaml: run best\+muon-r0 was started with another config") as e:
        bench.check_run(recipe, 0)
    message = str(e.value)
    assert "train.optimizer 'adamw' → 'muon'" in message and "train.max_minutes 10.0 → 5.0" in message
    assert "train.lr" not in message and "another --out" in message


def test_a_row_is_its_base_with_each_options_overrides_in_order(bench_module, tmp_path):
    row = bench_module.recipe("best+adamw+lr2e-3+constant-lr")
    assert row.config == "configs/fashion_mnist.yaml"
    assert row.overrides == ("train.optimizer=adamw", "train.lr=2e-3", "train.lr_schedule=constant")
    config = load_config(_bench(bench_module, tmp_path).config(row), list(row.overrides))
    assert (config.train.optimizer, config.train.lr, config.train.lr_schedule) == ("adamw", 2e-3, "constant")
    flow = bench_module.recipe("flow-lognorm+rmsnorm")
    assert flow.overrides[-1] == "model.norm=rmsnorm" and flow.samplers == bench_module.FLOW_SAMPLERS


def test_two_options_that_set_the_same_field_are_refused(bench_module):
    with pytest.raises(LatentDiTError, match=r"options lr1e-3 and lr2e-3 both set train\.lr"):
        bench_module.recipe("best+lr1e-3+lr2e-3")
    with pytest.raises(LatentDiTError, match=r"options internal and no-internal both set model\.internal_block"):
        bench_module.recipe("best+internal+no-internal")


@pytest.mark.parametrize("name", ["best+nope", "nope", "best+wsd+wsd", "best+"])
def test_a_row_that_is_not_base_plus_options_is_refused_in_one_line(bench_module, name):
    with pytest.raises(LatentDiTError, match=r"--recipes: .* is not BASE\[\+OPTION\.\.\.\]") as e:
        bench_module.recipe(name)
    assert "\n" not in str(e.value) and "best" in str(e.value) and "adamw" in str(e.value)


def test_rows_with_an_internal_head_are_also_scored_with_internal_guidance(bench_module, tmp_path):
    bench = _bench(bench_module, tmp_path)
    plain = (("", ()),)
    assert bench.variants(bench_module.recipe("flow-lognorm+internal")) == bench_module.INTERNAL_VARIANTS
    assert bench.variants(bench_module.recipe("best+no-internal")) == plain
    assert bench.variants(bench_module.recipe("flow")) == plain
    for name in bench_module.DEFAULT_ROWS:  # every default row resolves to a config the trainer accepts
        bench.variants(bench_module.recipe(name))
    with pytest.raises(LatentDiTError, match=r"^--recipes best\+depth2: .*internal_block"):
        bench.variants(bench_module.recipe("best+depth2"))  # the internal head needs a deeper model
