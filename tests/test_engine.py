"""The shared training machinery (latentdit.engine): checkpoints, the LR schedule, the optimizer's groups,
the resume config check, the time budget, the run log and its progress bar."""

from __future__ import annotations

import copy
import io
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from latentdit.engine.budget import TimeBudget
from latentdit.engine.checkpoint import CheckpointManager, config_differences
from latentdit.engine.optim import (NS_COEFFICIENTS, NS_STEPS, MuonAdamW, build_adamw, build_muon, gram_form_pays,
                                    newton_schulz_macs, orthogonalize)
from latentdit.engine.schedule import check_schedule, lr_at, lr_scheduler
from latentdit.errors import LatentDiTError


def _fake_checkpoint(mgr: CheckpointManager, step: int) -> None:
    tmp = mgr.begin(step)
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    mgr.commit(step)


def test_checkpoint_keep_last_and_milestones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, milestone_every=4)
    for step in range(1, 10):
        _fake_checkpoint(mgr, step)
    assert [c.step for c in mgr.list()] == [4, 8, 9]
    # an unfinished checkpoint directory (killed mid-write) is never listed nor resumed from
    tmp = mgr.begin(10)
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert mgr.latest().name == "step-0000009"
    mgr.clean_temporaries()
    assert not tmp.exists()
    with pytest.raises(LatentDiTError, match="incomplete"):
        mgr.begin(11)
        mgr.commit(11)



def test_time_budget_bar_shows_minutes_and_the_eta_of_the_budget():
    from latentdit.engine.runlog import ProgressBar

    now = [0.0]
    bar = ProgressBar(0, 400_000, 5.0, clock=lambda: now[0], file=io.StringIO(), mininterval=0)
    for step in range(1, 11):  # 10 steps in 2 minutes: max_steps is hours away, the budget ends in 3 minutes
        now[0] += 12.0
        bar.update(step)
    bar.set_postfix({"loss": "0.5000"})
    assert str(bar.bar).endswith("| 2.0/5.0 min, eta 03:00, step 10, loss=0.5000")
    assert str(bar.bar).startswith("train:  40%")


def test_time_budget_bar_ends_at_max_steps_when_that_comes_first():
    from latentdit.engine.runlog import ProgressBar

    now = [0.0]
    bar = ProgressBar(20, 120, 60.0, clock=lambda: now[0], file=io.StringIO(), mininterval=0)  # resumed at 20
    for step in range(21, 31):  # 10 steps a minute: the last 90 steps take 9 more minutes, not 59
        now[0] += 6.0
        bar.update(step)
    assert str(bar.bar).endswith("| 1.0/10.0 min, eta 09:00, step 30")


def test_a_resumed_budget_bar_continues_from_the_minutes_already_spent():
    from latentdit.engine.runlog import ProgressBar

    now = [0.0]
    bar = ProgressBar(20, 400_000, 5.0, clock=lambda: now[0], file=io.StringIO(), mininterval=0, spent_s=180.0)
    for step in range(21, 31):  # 3 minutes before the resume, 1 since: 1 minute of the budget is left
        now[0] += 6.0
        bar.update(step)
    assert str(bar.bar).endswith("| 4.0/5.0 min, eta 01:00, step 30")


def test_step_bar_without_a_budget():
    from latentdit.engine.runlog import ProgressBar

    bar = ProgressBar(5, 100, 0.0, file=io.StringIO())
    bar.update(8)
    assert (bar.bar.n, bar.bar.total) == (8, 100)



def test_warmup_then_constant_and_warmup_then_cosine():
    # the DiT recipe: linear warm-up, then constant (the factor the trainer's LambdaLR applies)
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_at(s, 1.0, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    # VAE training: warm-up, then cosine from lr to lr * min_lr_ratio at total_steps (and there after)
    lr, warmup, total, floor = 1e-3, 10, 110, 0.05
    assert lr_at(4, lr, warmup, total, floor) == lr * 5 / warmup
    assert lr_at(warmup, lr, warmup, total, floor) == pytest.approx(lr)
    assert lr_at(60, lr, warmup, total, floor) == pytest.approx(lr * (floor + (1 - floor) * 0.5))
    assert lr_at(total, lr, warmup, total, floor) == pytest.approx(lr * floor)
    assert lr_at(total + 50, lr, warmup, total, floor) == lr_at(total, lr, warmup, total, floor)


def test_lr_scheduler_applies_the_schedule_as_a_factor():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = lr_scheduler(opt, 3)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.2 * (1 / 3), 0.2 * (2 / 3), 0.2 * 1.0, 0.2, 0.2]


def test_cosine_and_wsd_by_steps_hand_computed():
    lr, warmup, total, floor = 2.0, 4, 104, 0.1
    cos = dict(schedule="cosine")
    assert lr_at(1, lr, warmup, total, floor, **cos) == lr * 2 / 4
    assert lr_at(4, lr, warmup, total, floor, **cos) == lr  # p = 0
    assert lr_at(54, lr, warmup, total, floor, **cos) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # p = 1/2
    assert lr_at(29, lr, warmup, total, floor, **cos) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + 2 ** -0.5)))
    assert lr_at(104, lr, warmup, total, floor, **cos) == pytest.approx(0.2)
    # wsd: lr until the last 25 % of the 104 steps (step 78), then linear to 0.1·lr at step 104
    wsd = dict(schedule="wsd", decay_fraction=0.25)
    assert lr_at(2, lr, warmup, total, floor, **wsd) == lr * 3 / 4
    assert lr_at(50, lr, warmup, total, floor, **wsd) == lr and lr_at(78, lr, warmup, total, floor, **wsd) == lr
    assert lr_at(91, lr, warmup, total, floor, **wsd) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # 13/26 left
    assert lr_at(100, lr, warmup, total, floor, **wsd) == pytest.approx(2.0 * (0.1 + 0.9 * 4 / 26))
    assert lr_at(104, lr, warmup, total, floor, **wsd) == pytest.approx(0.2) == lr_at(200, lr, warmup, total, floor, **wsd)
    # constant ignores the floor
    assert lr_at(100, lr, warmup, total, floor, schedule="constant") == lr


def test_schedules_by_time_follow_the_fraction_of_the_budget():
    lr, floor = 1.0, 0.0
    # the step count no longer matters after the warm-up: only the fraction of the budget used
    assert lr_at(0, lr, 2, 10, floor, schedule="cosine", run_fraction=0.9) == 0.5  # warm-up counts steps
    assert lr_at(5, lr, 2, 10, floor, schedule="cosine", run_fraction=0.5) == pytest.approx(0.5)
    assert lr_at(5, lr, 2, 10, floor, schedule="cosine", run_fraction=1.7) == pytest.approx(0.0)
    assert lr_at(9, lr, 2, 10, floor, schedule="wsd", decay_fraction=0.2, run_fraction=0.5) == 1.0
    assert lr_at(3, lr, 2, 10, floor, schedule="wsd", decay_fraction=0.2, run_fraction=0.9) == pytest.approx(0.5)


@pytest.mark.parametrize("args, message", [
    (("linear", 0.0, 0.2), "train.lr_schedule: expected one of constant, cosine, wsd, got 'linear'"),
    (("wsd", -0.1, 0.2), "train.min_lr_ratio: expected a number in [0, 1], got -0.1"),
    (("wsd", 0.0, 0.0), "train.decay_fraction: expected a number in (0, 1], got 0.0"),
])
def test_schedule_settings_are_checked(args, message):
    with pytest.raises(LatentDiTError, match=re.escape(message)):
        check_schedule(*args)


def test_lr_scheduler_reads_the_run_fraction_at_every_step():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    fraction = [0.0]
    sched = lr_scheduler(opt, 0, 100, 0.0, schedule="wsd", decay_fraction=0.5, run_fraction=lambda: fraction[0])
    seen = []
    for f in (0.2, 0.75, 0.9, 1.0):
        fraction[0] = f
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1.0, 0.5, 0.2, 0.0])


def test_optimizer_spares_norms_biases_and_embeddings_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_adamw(model, 1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p is model[1].weight for p in decay["params"]] == [True]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.weight", "1.bias", "2.bias", "2.weight"]
    # without weight decay: one group of every trainable parameter (the DiT default)
    model[2].weight.requires_grad_(False)
    (group,) = build_adamw(model, 1e-3).param_groups
    assert len(group["params"]) == 4 and group["weight_decay"] == 0.0


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_orthogonalize_approximates_the_polar_factor(shape):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(-0.5, 0.5, shape[1]))  # unequal scales
    o = orthogonalize(m)
    assert o.shape == m.shape
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's band around 1, not exactly 1 (by design)
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    polar = (u @ vh).float()
    cos = (o * polar).sum() / (o.norm() * polar.norm())
    assert cos > 0.9


@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (48, 64), (32, 32)])
def test_newton_schulz_multiply_adds_are_the_matmuls_of_either_form(shape):
    from torch.utils.flop_counter import FlopCounterMode

    m = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for gram_form in (False, True):
        with FlopCounterMode(display=False) as counter:
            orthogonalize(m, gram_form=gram_form)
        assert counter.get_total_flops() == 2 * newton_schulz_macs(*shape, gram_form=gram_form), gram_form
    # 128 x 512: plain 5 x (2·128²·512 + 128³), Gram form 2·128²·512 + (4·5 - 3)·128³, 1.8x fewer
    assert newton_schulz_macs(128, 512, gram_form=True) == 2 * 128 ** 2 * 512 + 17 * 128 ** 3
    assert gram_form_pays(128, 512) and gram_form_pays(512, 128) and not gram_form_pays(128, 128)


def _newton_schulz_reference(m: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The textbook iteration ``X ← aX + (bG + cG²)X``, ``G = XXᵀ``, in float64 on the wide orientation."""
    a, b, c = NS_COEFFICIENTS
    x = m.double()
    tall = x.shape[0] > x.shape[1]
    x = (x.T if tall else x) / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("steps", [1, 2, 3, NS_STEPS])
@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (24, 40), (24, 32), (24, 24)])
def test_orthogonalize_is_the_newton_schulz_iteration_in_either_form(shape, steps):
    """On the Gram matrix or on the matrix itself, the result is the float64 iteration's. By default the form
    with fewer multiply-adds runs: the Gram one from 1.5 : 1 on (from two steps on; one step costs the same
    either way), where its float32 error on these matrices is that of the plain form (~1e-6). Nearer square
    the Gram form squares a larger condition number (error ~1e-4 on 24 × 24: still far below the bfloat16
    iteration of the published Muon)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(-1, 1, shape[1]))
    ref = _newton_schulz_reference(m, steps)
    default = steps > 1 and max(shape) > 1.5 * min(shape)
    assert gram_form_pays(*shape, steps) == default
    assert torch.equal(orthogonalize(m, steps), orthogonalize(m, steps, gram_form=default))
    for gram_form in (False, True):
        ours = orthogonalize(m, steps, gram_form=gram_form).double()
        assert ours.shape == m.shape
        tolerance = 5e-3 if gram_form and not default else 1e-4
        assert (ours - ref).norm() / ref.norm() < tolerance, gram_form


def _two_layer():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(5, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                               torch.nn.GELU(), torch.nn.Linear(16, 8))


def _run(model, opt, steps=4):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = model[0](torch.randint(0, 5, (64,), generator=g)) + torch.randn(64, 8, generator=g)  # full-rank grads
        loss = model[1:](x).pow(2).mean()
        loss.backward()
        opt.step()


def test_muon_adamw_without_matrices_is_torch_adamw():
    ours, theirs = _two_layer(), _two_layer()
    opt = build_muon(ours, [], 1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    decayed = [theirs[1].weight, theirs[4].weight]
    ref = torch.optim.AdamW([{"params": decayed},
                             {"params": [p for p in theirs.parameters() if all(p is not q for q in decayed)],
                              "weight_decay": 0.0}], lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, fused=True)
    _run(ours, opt)
    _run(theirs, ref)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name  # the same fused kernel
    # decay spares the embedding, the biases and the norm
    assert sorted((g["muon"], g["weight_decay"], len(g["params"])) for g in opt.param_groups) == [
        (False, 0.0, 5), (False, 0.1, 2)]


def test_muon_half_matches_torch_muon():
    """Muon's matrices against torch's Muon with the AdamW-matched scale, which orthogonalises in bfloat16
    (ours: float32), so the updates agree to a few per cent. (The gradients are full-rank: bfloat16's
    rounding in a gradient's null space is what the iteration would amplify.)"""
    ours, theirs = _two_layer(), _two_layer()
    for model in (ours, theirs):
        for p in (*model[0].parameters(), model[1].bias, *model[2].parameters(), model[4].bias):
            p.requires_grad_(False)
    before = [p.detach().clone() for p in theirs.parameters()]
    opt = build_muon(ours, [ours[1].weight, ours[4].weight], 1e-2, weight_decay=0.1, momentum=0.9)
    assert [(g["muon"], len(g["params"])) for g in opt.param_groups] == [(True, 2)]
    ref = torch.optim.Muon([theirs[1].weight, theirs[4].weight], lr=1e-2, weight_decay=0.1, momentum=0.9,
                           nesterov=True, adjust_lr_fn="match_rms_adamw")
    _run(ours, opt)
    _run(theirs, ref)
    for (name, p), q, p0 in zip(ours.named_parameters(), theirs.parameters(), before):
        delta, expected = p.detach() - p0, q.detach() - p0
        if name in ("1.weight", "4.weight"):
            assert expected.norm() > 0 and (delta - expected).norm() / expected.norm() < 0.05, name
        else:
            assert not delta.any() and not expected.any(), name


def test_muon_groups_take_matrices_only_and_resume_from_the_state_dict():
    model = _two_layer()
    with pytest.raises(LatentDiTError, match="2-D weight matrices only"):
        MuonAdamW([{"params": [model[1].bias], "muon": True}], 1e-3)
    a = build_muon(model, [model[1].weight, model[4].weight], 1e-3)
    _run(model, a, steps=2)
    twin = _two_layer()
    twin.load_state_dict(model.state_dict())
    b = build_muon(twin, [twin[1].weight, twin[4].weight], 1e-3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a file: no shared buffers
    _run(model, a, steps=2)
    _run(twin, b, steps=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_config_differences_leave_out_the_resumable_fields():
    saved = {"train": {"lr": 1.0, "steps": 10}, "data": {"source": "a"}, "name": "x"}
    now = {"train": {"lr": 2.0, "steps": 20, "new": 1}, "data": {"source": "a"}, "name": "y"}
    assert config_differences(saved, now, {("train", "steps")}) == ["train.lr", "train.new"]
    assert config_differences(saved, saved, set()) == []


def test_time_budget_of_one_process_asks_every_step():
    now = [0.0]
    one = SimpleNamespace(num_processes=1)
    budget = TimeBudget(2.0, one, clock=lambda: now[0])
    now[0] = 119.0
    assert not budget.spent(False)
    now[0] = 120.0
    assert budget.spent(False) and budget.spent(True)
    assert not TimeBudget(0.0, one, clock=lambda: now[0]).spent(True)  # 0 = no budget
    # several processes: only a step they all reach may answer (a collective)
    assert not TimeBudget(1e-9, SimpleNamespace(num_processes=2), clock=lambda: now[0]).spent(False)


def test_time_budget_fraction_and_a_resumed_budget():
    now = [10.0]
    one = SimpleNamespace(num_processes=1)
    budget = TimeBudget(2.0, one, clock=lambda: now[0])
    assert budget.fraction() == 0.0
    now[0] = 40.0
    assert budget.fraction() == 0.0  # the fraction moves when measured
    assert not budget.spent(False) and budget.fraction() == 0.25 and budget.agreed_elapsed_s == 30.0
    # a resumed run continues the budget from the training time its checkpoint had used
    resumed = TimeBudget(2.0, one, clock=lambda: now[0], elapsed_s=budget.agreed_elapsed_s)
    assert resumed.fraction() == 0.25
    now[0] = 100.0
    assert not resumed.spent(False) and resumed.fraction() == 0.75
    now[0] = 130.0
    assert resumed.spent(False)


def test_run_log_averages_named_values_and_records_throughput(tmp_path):
    from accelerate import Accelerator

    from latentdit.engine.runlog import RunLog, truncate_metrics

    log = RunLog(Accelerator(cpu=True), tmp_path, start_step=0, max_steps=4, max_minutes=0.0, batch_size=8,
                 tensorboard=False, steps_per_epoch=3)
    log.add(1, {"loss": torch.tensor(1.0), "rec": torch.tensor(0.5)})
    log.add(2, {"loss": torch.tensor(3.0), "rec": torch.tensor(0.5), "gan": torch.tensor(-1.0)})
    row = log.log(2, 1e-3, grad_norm=torch.tensor(2.0))
    log.add(3, {"loss": torch.tensor(5.0)})
    log.log(3, 1e-3)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == row and (row["step"], row["epoch"], row["loss"], row["rec"], row["gan"]) == (2, 0, 2.0, 0.5, -1.0)
    assert row["grad_norm"] == 2.0 and row["threads"] == torch.get_num_threads()
    assert math.isclose(row["img_per_sec"], 8 * row["steps_per_sec"])
    assert (rows[1]["step"], rows[1]["epoch"], rows[1]["loss"], rows[1]["grad_norm"]) == (3, 1, 5.0, None)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a kill
    truncate_metrics(tmp_path / "metrics.jsonl", 2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]
