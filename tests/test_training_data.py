"""The DiT trainer's data order and per-step randomness (latentdit.training.data)."""

from __future__ import annotations


import torch

from latentdit.training.data import BatchLayout, StepBatchSampler, StepRandomness


# ----------------------------------------------------------------------------------------------
# data order and per-step randomness
# ----------------------------------------------------------------------------------------------

def test_two_ranks_slice_the_one_rank_batch_and_cover_each_epoch_once():
    n, G = 40, 8
    one = list(StepBatchSampler(n, BatchLayout(G, 1, 1, 0), seed=3, start_step=0, end_step=10))
    r0 = list(StepBatchSampler(n, BatchLayout(G, 2, 1, 0), seed=3, start_step=0, end_step=10))
    r1 = list(StepBatchSampler(n, BatchLayout(G, 2, 1, 1), seed=3, start_step=0, end_step=10))
    assert [a + b for a, b in zip(r0, r1)] == one
    # grad accumulation over 2 micro-steps lays out the same global batch
    acc = list(StepBatchSampler(n, BatchLayout(G, 1, 2, 0), seed=3, start_step=0, end_step=10))
    assert [acc[2 * i] + acc[2 * i + 1] for i in range(10)] == one
    for epoch in (0, 1):
        items = [k for batch in one[epoch * 5:(epoch + 1) * 5] for k in batch]
        assert sorted(i for _, i in items) == list(range(n)) and {e for e, _ in items} == {epoch}
    assert one[:5] != one[5:10]  # a fresh permutation each epoch
    # resuming at step 7 continues the very same order
    assert list(StepBatchSampler(n, BatchLayout(G, 1, 1, 0), 3, 7, 10)) == one[7:]


def test_step_randomness_depends_on_seed_and_step_only():
    from latentdit.diffusion import DDPMProcess, FlowProcess

    ddpm = DDPMProcess(diffusion_steps=1000)
    a = StepRandomness.draw(0, 5, 8, (4, 2, 2), ddpm, 0.5)
    b = StepRandomness.draw(0, 5, 8, (4, 2, 2), ddpm, 0.5)
    c = StepRandomness.draw(0, 6, 8, (4, 2, 2), ddpm, 0.5)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.t, b.t) and torch.equal(a.drop, b.drop)
    assert not torch.equal(a.noise, c.noise)
    assert a.t.min() >= 0 and a.t.max() < 1000 and set(a.drop.tolist()) <= {0, 1}
    # ddpm draws exactly what the trainer drew before the process object: randint, then noise, then the mask
    from latentdit.seeding import seed_for

    g = torch.Generator().manual_seed(seed_for("latentdit-step", 0, 5))
    assert torch.equal(a.t, torch.randint(0, 1000, (8,), generator=g))
    assert torch.equal(a.noise, torch.randn((8, 4, 2, 2), generator=g))
    # flow: float times in [0, 1], from the same generator
    f = StepRandomness.draw(0, 5, 8, (4, 2, 2), FlowProcess(time_sampling="logit_normal"), 0.5)
    assert f.t.dtype == torch.float32 and 0 < f.t.min() and f.t.max() < 1 and f.noise.shape == a.noise.shape
