"""Accelerator construction (devices, processes, mixed precision) and what several processes share.

One process, or several under a launcher (``python -m latentdit.launch --num_processes N``,
``accelerate launch``, ``torchrun``): on a machine without CUDA several processes run on the CPU
with gloo (accelerate's MULTI_CPU), on GPUs with NCCL (MULTI_GPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from latentdit.errors import LatentDiTError


def enable_tf32() -> None:
    """TF32 matmuls/convolutions on Ampere+ GPUs (call from an entry point, never at import)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def make_accelerator(project_dir: str | os.PathLike, *, mixed_precision: str = "no", tensorboard: bool = False,
                     hint: str = ""):
    """An ``Accelerator`` for this process: DDP-style data parallelism (or one process), the given mixed
    precision, accelerate's TensorBoard tracker under ``project_dir`` when asked. Other distributed types
    (DeepSpeed, accelerate's FSDP...) are refused; ``hint`` is added to that message."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # Several processes without CUDA: accelerate sets up gloo (MULTI_CPU) only when asked for the CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=multi_cpu, mixed_precision=mixed_precision,
                              log_with="tensorboard" if tensorboard else None, project_dir=str(Path(project_dir)),
                              step_scheduler_with_optimizer=False)
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                            DistributedType.MULTI_GPU):
        raise LatentDiTError(f"accelerate distributed type {accelerator.distributed_type.value} is not supported: "
                             "launch with `accelerate launch --multi_gpu` (DDP)" + (f"; {hint}" if hint else ""))
    return accelerator


def average_gradients(accelerator, parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the processes (one collective for all of them)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
