"""Muon's cost: the Newton–Schulz orthogonalisation in its two forms, and the optimizer step against AdamW's.

For each model the matrices ``optimizer: muon`` orthogonalises (:func:`latentdit.training.state.muon_matrices`)
get seeded random gradients; then, interleaved round by round so that load from other processes hits every
variant alike, the script times

* orthogonalising all of them in the plain form (every step on the matrix) and in the default form (the
  Gram form wherever it takes fewer multiply-adds, :func:`latentdit.engine.optim.gram_form_pays`);
* one whole optimizer step: :class:`~latentdit.engine.optim.MuonAdamW` (Muon for those matrices, fused AdamW
  for the rest) and the fused AdamW of ``optimizer: adamw`` over the same model;
* the model's forward and backward at ``--batch-size`` (a flow-matching loss), the rest of a training step.

It prints the median time of each (milliseconds per step) with the range over the rounds, the
multiply-adds of both forms, and what they make of a training step (forward + backward + Muon step, with
the plain form's time put in for the default form's: an estimate from the rows above).

    python benchmarks/bench_muon.py                       # DiT-T/2 at 8x8x4 and DiT-S/2 at 32x32x4, ~2 min
    python benchmarks/bench_muon.py --models DiT-T/2 --rounds 10 --batch-size 32
"""

from __future__ import annotations

import copy
import statistics
from typing import Callable

import torch

from latentdit.cli import make_parser, positive_int, run_main
from latentdit.engine.optim import NS_STEPS, build_adamw, build_muon, gram_form_pays, newton_schulz_macs, orthogonalize
from latentdit.models import create_dit
from latentdit.models.registry import DIT_CONFIGS
from latentdit.training.state import muon_matrices
from timing import time_steps

DEFAULT_MODELS = ("DiT-T/2", "DiT-S/2")
CPU = torch.device("cpu")


def time_rounds(fns: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function: the median of ``iters`` calls (:func:`timing.time_steps`), per
    round, the functions taking turns within every round (after one warm-up call of each)."""
    time_steps(fns, 1, CPU)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(statistics.median(time_steps({name: fn}, iters, CPU)[name]) * 1e3)
    return out


def bench_model(name: str, rounds: int, iters: int, batch: int) -> dict[str, list[float]]:
    """The rows of one model: milliseconds per round, by label."""
    torch.manual_seed(0)
    latent = 8 if name.startswith("DiT-T/") else 32  # the CPU recipe's 64x64 images; the paper's 256x256
    model = create_dit(name, input_size=latent, in_channels=4, num_classes=1000, learn_sigma=False)
    trained = copy.deepcopy(model)  # forward and backward on a twin: the timed gradients stay as drawn
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(batch, 4, latent, latent, generator=g) for _ in range(2))
    t, y = torch.rand(batch, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise

    def forward_backward():
        trained.zero_grad(set_to_none=False)
        (trained(xt, t * 1000, y) - (noise - x0)).pow(2).mean().backward()

    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    matrices = muon_matrices(model)
    grads = [p.grad for p in matrices]
    shapes = sorted({tuple(p.shape) for p in matrices})
    plain = sum(newton_schulz_macs(*p.shape, gram_form=False) for p in matrices)
    chosen = sum(newton_schulz_macs(*p.shape, gram_form=gram_form_pays(*p.shape)) for p in matrices)
    print(f"{name} (latent {latent}x{latent}x4): {len(matrices)} Muon matrices of shapes "
          f"{', '.join('x'.join(map(str, s)) for s in shapes)}; multiply-adds per step plain {plain / 1e6:.0f} M, "
          f"default form {chosen / 1e6:.0f} M ({plain / chosen:.2f}x fewer)")
    muon = build_muon(model, matrices, 1e-3)
    adamw = build_adamw(model, 1e-3)
    times = time_rounds({
        "orthogonalise, plain form": lambda: [orthogonalize(x, gram_form=False) for x in grads],
        "orthogonalise, default form": lambda: [orthogonalize(x) for x in grads],
        "optimizer step, Muon + AdamW": muon.step,
        "optimizer step, AdamW (fused)": adamw.step,
        f"forward + backward, batch {batch}": forward_backward,
    }, rounds, iters)
    return times


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(DIT_CONFIGS),
                   metavar="NAME", help="registry names; DiT-T runs at 8x8x4 latents, the others at 32x32x4")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (the spread is over them)")
    p.add_argument("--iters", type=positive_int, default=5, help="calls per variant and round (median)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per forward and backward (default: 64 for DiT-T, the CPU recipe's; 8 for the others)")
    args = p.parse_args(argv)
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; {NS_STEPS} Newton-Schulz steps; "
          f"median ms per step over {args.rounds} rounds of {args.iters} calls (range over the rounds)")
    for name in args.models:
        batch = args.batch_size or (64 if name.startswith("DiT-T/") else 8)
        rows = bench_model(name, args.rounds, args.iters, batch)
        mid = {label: statistics.median(ms) for label, ms in rows.items()}
        for label, ms in rows.items():
            print(f"  {label:<32} {mid[label]:8.2f} ms  ({min(ms):.2f}-{max(ms):.2f})")
        plain, default = mid["orthogonalise, plain form"], mid["orthogonalise, default form"]
        step = mid[f"forward + backward, batch {batch}"] + mid["optimizer step, Muon + AdamW"]
        print(f"  orthogonalisation: the default form at {plain / default:.2f}x the plain form's speed; a training "
              f"step with Muon ~{step:.1f} ms, ~{step + plain - default:.1f} ms with the plain form "
              f"(the default form: {(step + plain - default) / step:.2f}x the images/s, estimated)")
    return 0


if __name__ == "__main__":
    run_main(main)
