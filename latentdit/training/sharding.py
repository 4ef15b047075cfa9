"""Fully sharded data parallel training (PyTorch FSDP2, ``fully_shard``) for DiT-L and DiT-XL.

With ``train.fsdp=true`` every DiT block is one sharding unit and the root module holds the rest
(embedders, final layer): each process keeps 1/N of the parameters, gradients and AdamW state, and
gathers a block's weights only while that block runs. The processes are the ones accelerate
launches (``accelerate launch --multi_gpu``); accelerate's own FSDP plugin is not used, so the same
code runs on GPUs (NCCL) and on CPUs (gloo), where it is tested.

Checkpoints stay in one format whatever the sharding: whole tensors, and the optimizer state keyed
by parameter position as ``torch.optim.Optimizer.state_dict`` writes it. A run saved with FSDP can
be resumed without it (or on another number of processes), and the other way round.

Every function here that gathers is collective: all processes must call it, in the same order.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from latentdit.errors import LatentDiTError

def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded parameter (collective), on the CPU; other tensors as they are."""
    return t.full_tensor().cpu() if is_sharded(t) else t


def like_shard(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way ``reference`` is sharded (no communication: every process holds ``full``)."""
    if not is_sharded(reference):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements,
                             src_data_rank=None)


def shard_dit(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard a DiT in place: one FSDP unit per block, the root for the rest. ``compute_dtype``
    (e.g. bfloat16) is what the gathered weights are cast to for the forward and backward; the
    sharded master weights and the gradient reduction stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_model_state(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of ``model.state_dict()`` (collective); an empty dict where ``keep`` is false."""
    out = {}
    for name, value in model.state_dict().items():
        whole = full_tensor(value.detach())
        if keep:
            out[name] = whole.cpu()
    return out


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """The optimizer state of a sharded model as ``optimizer.state_dict()`` of the unsharded model
    would give it (collective); an empty dict where ``keep`` is false. The optimizer must hold the
    trainable parameters in ``model.named_parameters()`` order, in one group."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not keep:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    groups = []
    for group in state["param_groups"]:
        groups.append(dict(group, params=[index[n] for n in group["params"]]))
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                         source: str) -> None:
    """Load a state written by :func:`full_optimizer_state` (or by an unsharded run) into the optimizer
    of a sharded model; every process passes the whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(model)
    try:
        groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
        by_name = {names[int(i)]: s for i, s in state["state"].items()}
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise LatentDiTError(f"{source}: not an optimizer state of this model's {len(names)} trainable "
                             f"parameters ({type(e).__name__}: {e})") from None
    set_optimizer_state_dict(model, optimizer, {"state": by_name, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
