"""Training throughput: our training step vs a plain fp32 eager loop of the same model and loss.

For each model (default DiT-S/2 and DiT-B/2 at 32×32×4 latents, 1000 classes) both steps run in the
same process, interleaved step by step so that load from other processes hits both alike, and the
best-of-N step time is reported as images/s and model-FLOPs utilisation (MFU) against the matmul
peak measured in the same run (a 4096² matmul in the compute dtype; the best of measurements before
and after each model, since the load of a shared machine changes).

* plain: ``torch.optim.AdamW`` with its defaults, random timesteps and label dropout inside the
  model, ``loss.item()`` every step, EMA as a Python loop over parameters (a textbook loop).
* ours: :func:`latentdit.training.state.build_optimizer` (fused AdamW),
  :func:`~latentdit.training.trainer.micro_batch_loss` with per-step randomness drawn as the trainer
  does, :class:`~latentdit.training.ema.EMA` (one foreach lerp), no host sync per step, accelerate's
  mixed precision, and ``torch.compile`` when enabled.

    python benchmarks/bench_train.py                       # CPU: DiT-S/2 and DiT-B/2, a few minutes
    python benchmarks/bench_train.py --device cuda --models DiT-XL/2 --batch-size 64 \\
        --mixed-precision bf16 --compile on                # one GPU

The model FLOPs of a training step are counted with ``torch.utils.flop_counter`` on one forward
(matmuls and attention) and multiplied by 3 (forward + backward). ``1 / MFU`` of the plain loop is
printed as the ceiling of any fp32 step of the same FLOPs on that device: where the plain loop
already runs near the matmul peak (DiT-S/2 and DiT-B/2 on a CPU), no fp32 step can be much faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from timing import matmul_peak, time_steps


def train_flops_per_image(model: torch.nn.Module, latent: Sequence[int], device: torch.device) -> float:
    """3 × the forward FLOPs of one image (backward ≈ 2 × forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *latent, device=device)
    t = torch.tensor([10, 500], device=device)
    y = torch.tensor([1, 2], device=device)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math backend spells attention as matmuls, which the counter sees on every device
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return 3 * counter.get_total_flops() / 2


def make_plain(model_name: str, latent: Sequence[int], batch: int, device: torch.device) -> Callable[[], Any]:
    """A textbook fp32 eager training step of the same model and loss."""
    from latentdit.diffusion import create_diffusion
    from latentdit.models import create_dit

    torch.manual_seed(0)
    model = create_dit(model_name, input_size=latent[1], in_channels=latent[0], num_classes=1000).to(device)
    model.train()
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(batch, *latent, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> float:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        loss = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                ema[n].mul_(0.9999).add_(p, alpha=1 - 0.9999)
        return loss.item()

    step.model = model  # type: ignore[attr-defined]
    return step


def make_ours(model_name: str, latent: Sequence[int], batch: int, device: torch.device, mixed_precision: str,
              compile_model: bool) -> Callable[[], Any]:
    """The trainer's step: fused AdamW, trainer-style randomness and loss, foreach EMA, no host sync."""
    from accelerate import Accelerator

    from latentdit.config import TrainConfig
    from latentdit.diffusion import build_process
    from latentdit.models import create_dit
    from latentdit.training.data import StepRandomness
    from latentdit.training.ema import EMA
    from latentdit.training.state import build_optimizer
    from latentdit.training.trainer import micro_batch_loss

    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    model = create_dit(model_name, input_size=latent[1], in_channels=latent[0], num_classes=1000).to(device)
    model.train()
    process = build_process({"process": "ddpm"})
    opt = build_optimizer(model, TrainConfig(lr=1e-4), device)
    ema = EMA(model, 0.9999)
    prepared, opt = accelerator.prepare(model, opt)
    forward = torch.compile(prepared) if compile_model else prepared
    x = torch.randn(batch, *latent, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    counter = [0]

    def step() -> torch.Tensor:
        rand = StepRandomness.draw(0, counter[0], batch, tuple(latent), process, 0.1)
        counter[0] += 1
        loss = micro_batch_loss(process, forward, x, y, rand, label_dropout=True)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        return loss.detach()

    return step


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default=None, help="comma-separated (default: DiT-S/2,DiT-B/2 on cpu; DiT-XL/2 on cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="per step (default: 8 on cpu, 64 on cuda)")
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 3 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default: 1 cpu, 5 cuda)")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="for our step (default: no on cpu — bf16 is slower there — and bf16 on cuda)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile our step (auto: on for cuda, off for cpu)")
    p.add_argument("--no-plain", action="store_true", help="time only our step")
    p.add_argument("--plain-only", action="store_true", help="time only the plain loop (e.g. to see its own memory)")
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n×n matmul that measures the peak")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda, but no CUDA device is available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gpu = device.type == "cuda"
    models = (args.models or ("DiT-XL/2" if gpu else "DiT-S/2,DiT-B/2")).split(",")
    batch = args.batch_size or (64 if gpu else 8)
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    mp = args.mixed_precision or ("bf16" if gpu else "no")
    compile_model = args.compile == "on" or (args.compile == "auto" and gpu)
    latent = (4, args.latent_size, args.latent_size)

    if args.no_plain and args.plain_only:
        p.error("--no-plain and --plain-only exclude each other")
    peak_fp32 = matmul_peak(device, torch.float32, n=args.matmul_size)
    peak_ours = peak_fp32 if mp == "no" else matmul_peak(device, torch.bfloat16 if mp == "bf16" else torch.float16,
                                                         n=args.matmul_size)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; matmul peak fp32 {peak_fp32 / 1e12:.3f} TFLOP/s"
          + (f", {mp} {peak_ours / 1e12:.3f} TFLOP/s" if mp != "no" else ""))
    print(f"batch {batch}, latents {latent}, {steps} timed steps after {warmup} warm-up; ours: fused AdamW, "
          f"mixed_precision={mp}, compile={'on' if compile_model else 'off'}")
    results = []
    for model_name in models:
        fns: dict[str, Callable[[], Any]] = {}
        if not args.no_plain:
            fns["plain fp32 eager"] = make_plain(model_name, latent, batch, device)
        if not args.plain_only:
            fns["ours"] = make_ours(model_name, latent, batch, device, mp, compile_model)
        from latentdit.models import create_dit

        flop_model = create_dit(model_name, input_size=latent[1], in_channels=latent[0], num_classes=1000).to(device)
        flops = train_flops_per_image(flop_model, latent, device)
        del flop_model
        t0 = time.perf_counter()
        time_steps(fns, warmup, device)
        warm_s = time.perf_counter() - t0
        times = time_steps(fns, steps, device)
        # the machine may be shared: the peak is the best of measurements before and after each model
        peak_fp32 = max(peak_fp32, matmul_peak(device, torch.float32, n=args.matmul_size))
        peak_ours = peak_fp32 if mp == "no" else max(
            peak_ours, matmul_peak(device, torch.bfloat16 if mp == "bf16" else torch.float16, n=args.matmul_size))
        row: dict[str, Any] = {"model": model_name, "batch": batch, "train_gflop_per_image": flops / 1e9,
                               "warmup_s": warm_s}
        for label, ts in times.items():
            best = min(ts)
            ips = batch / best
            peak = peak_fp32 if label.startswith("plain") else peak_ours
            row[label] = {"img_per_s": ips, "mfu": ips * flops / peak, "step_s_best": best,
                          "step_s_median": statistics.median(ts)}
            print(f"{model_name:9s} {label:17s} {ips:9.2f} img/s  MFU {100 * ips * flops / peak:5.1f}%  "
                  f"(step best {best:.3f} s, median {statistics.median(ts):.3f} s)")
        row["peak_fp32_tflops"] = peak_fp32 / 1e12
        if "plain fp32 eager" in row and "ours" in row:
            row["speedup"] = row["ours"]["img_per_s"] / row["plain fp32 eager"]["img_per_s"]
            # no step doing the same FLOPs in fp32 can beat the matmul peak
            row["fp32_ceiling"] = 1.0 / row["plain fp32 eager"]["mfu"]
            print(f"{model_name:9s} speed-up of ours over plain: {row['speedup']:.2f}x "
                  f"(matmul peak so far {peak_fp32 / 1e12:.3f} TFLOP/s fp32; an fp32 step of these FLOPs "
                  f"can be at most {row['fp32_ceiling']:.2f}x the plain loop here)")
        results.append(row)
        del fns
        if gpu:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_fp32_flops": peak_fp32, "peak_flops": peak_ours,
                       "mixed_precision": mp, "compile": compile_model, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
