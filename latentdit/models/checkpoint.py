"""Load and save DiT weights: released DiT ``.pt`` files, train checkpoints, and our safetensors.

- :func:`load_state_dict_file` reads a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or a
  safetensors file (recognised by content, not suffix), unwraps ``{"ema": ...}`` (preferred),
  ``{"model": ...}`` or ``{"state_dict": ...}`` train checkpoints (the released train.py's
  ``{"model", "ema", "opt", "args"}`` included: its ``argparse.Namespace`` is the only pickled class
  allowed), and strips ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) key prefixes.
- :func:`save_dit` writes safetensors with the model config as JSON in metadata key ``latentdit_model``.
- :func:`load_dit` rebuilds the model from that metadata, or, for files without it (the released
  checkpoints), from the tensor shapes: input size from ``pos_embed`` (tokens × patch), patch size,
  channels and hidden size from ``x_embedder.proj.weight``, depth from the block indices, classes from
  the label table (``rows − 1`` with a null row and ``class_dropout_prob`` 0.1 whenever ``rows ≥ 2``;
  pass ``class_dropout_prob=0`` or ``num_classes`` to say otherwise, see :func:`label_table_overrides`)
  and ``learn_sigma`` from
  ``final_layer.linear`` (``patch² · 2 · in_channels`` outputs). Head count cannot be read from
  shapes: it comes from ``model_name``, a ``num_heads`` override, or the registry's head count for
  that hidden size. Loading is strict; a mismatch names the missing, unexpected and wrong-shape keys.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors, save_safetensors, torch_load
from latentdit.models.dit import DiT
from latentdit.models.guidance import unwrap_model
from latentdit.models.registry import default_num_heads, get_config

# Safetensors metadata keys (JSON strings) of the weights files latentdit writes.
METADATA_KEY = "latentdit_model"              # the DiT constructor arguments (model.config)
META_CLASS_NAMES = "latentdit_class_names"    # list of class names, index = class id
META_CLASS_COUNTS = "latentdit_class_counts"  # training items per class, index = class id
META_VAE = "latentdit_vae"                    # the VAE spec the latents came from
META_DIFFUSION = "latentdit_diffusion"        # {"noise_schedule": ..., "diffusion_steps": ...}
META_LATENT_NORM = "latentdit_latent_norm"    # LatentNorm.to_dict() of the latents trained on (decoding inverts it)
_WRAPPER_KEYS = ("ema", "model", "state_dict")
#: The one class besides tensors and containers a ``.pt`` checkpoint may hold: the released DiT
#: train.py saves ``{"model", "ema", "opt", "args"}`` with ``args`` an ``argparse.Namespace``.
CHECKPOINT_GLOBALS = (argparse.Namespace,)
_PREFIXES = ("module.", "_orig_mod.")
_DIT_ARGS = [p for p in inspect.signature(DiT.__init__).parameters if p != "self"]


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len < (1 << 31)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file: returns (state dict with wrapper dicts and key prefixes removed, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise LatentDiTError(f"checkpoint file not found: {path}")
    metadata: dict[str, str] = {}
    if _is_safetensors(path):
        obj, metadata = load_safetensors(path)
    else:
        obj = torch_load(path, "checkpoint", allowed_globals=CHECKPOINT_GLOBALS)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise LatentDiTError(f"checkpoint {path} does not hold a state dict (a mapping of parameter names to tensors)")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise LatentDiTError(f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, expected a tensor; "
                                 f"train checkpoints should hold their weights under 'ema' or 'model'")
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        state[name] = value
    return state, metadata


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of a ``.pt``/``.pth``/safetensors file (``ema`` preferred over ``model``; prefixes stripped)."""
    return read_checkpoint(path)[0]


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise a :class:`LatentDiTError` naming missing, unexpected and wrong-shape keys, if any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} vs expected {list(shape)}" for k, shape in expected.items()
             if k in state and tuple(state[k].shape) != shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if wrong:
            parts.append(f"wrong-shape keys: {_describe(wrong, 3)}")
        raise LatentDiTError(f"{source} does not match the DiT architecture: " + "; ".join(parts))


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int, path: str) -> tuple[int, ...]:
    if key not in state:
        raise LatentDiTError(f"checkpoint {path} has no {key!r}; it does not look like a DiT state dict "
                             f"(pass a file saved by save_dit or a released DiT checkpoint)")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise LatentDiTError(f"checkpoint {path}: {key!r} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def infer_config(state: Mapping[str, torch.Tensor], model_name: str | None = None,
                 overrides: Mapping[str, Any] | None = None, source: str = "state dict") -> dict[str, Any]:
    """DiT constructor arguments read from state-dict shapes (see module docstring); ``overrides`` win."""
    overrides = dict(overrides or {})
    hidden, in_ch, patch, patch_w = _shape(state, "x_embedder.proj.weight", 4, source)
    if patch != patch_w:
        raise LatentDiTError(f"checkpoint {source}: non-square patch {patch}x{patch_w} in x_embedder.proj.weight")
    _, tokens, _ = _shape(state, "pos_embed", 3, source)
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise LatentDiTError(f"checkpoint {source}: pos_embed has {tokens} tokens, not a square grid")
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not block_ids:
        raise LatentDiTError(f"checkpoint {source} has no 'blocks.N.*' keys; it does not look like a DiT state dict")
    depth = max(block_ids) + 1
    rows, _ = _shape(state, "y_embedder.embedding_table.weight", 2, source)
    out_features, _ = _shape(state, "final_layer.linear.weight", 2, source)
    out_ch, rem = divmod(out_features, patch * patch)
    if rem or out_ch not in (in_ch, 2 * in_ch):
        raise LatentDiTError(f"checkpoint {source}: final_layer.linear has {out_features} outputs, expected "
                             f"patch²·C = {patch * patch * in_ch} or learned-sigma {patch * patch * 2 * in_ch}")
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * hidden

    # classes: assume a null row whenever that leaves at least one class, unless told otherwise
    if "num_classes" in overrides:
        num_classes = overrides["num_classes"]
        dropout = overrides.get("class_dropout_prob", 0.1 if rows == num_classes + 1 else 0.0)
        if rows != num_classes + int(dropout > 0):
            if "class_dropout_prob" not in overrides:
                expected = f"{num_classes} rows without a null row or {num_classes + 1} with one"
            else:
                expected = f"{num_classes + int(dropout > 0)} rows ({'with' if dropout > 0 else 'without'} a null row)"
            raise LatentDiTError(f"checkpoint {source}: its label table y_embedder.embedding_table has {rows} rows; "
                                 f"{num_classes} classes need {expected}")
    elif overrides.get("class_dropout_prob", 0.1) == 0:
        num_classes, dropout = rows, 0.0
    elif rows >= 2:
        num_classes, dropout = rows - 1, overrides.get("class_dropout_prob", 0.1)
    else:
        num_classes, dropout = rows, 0.0

    config: dict[str, Any] = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                                  depth=depth, mlp_ratio=mlp_hidden / hidden, class_dropout_prob=dropout,
                                  num_classes=num_classes, learn_sigma=out_ch == 2 * in_ch)
    if model_name is not None:
        arch = get_config(model_name)
        for key in ("depth", "hidden_size", "patch_size"):
            if arch[key] != config[key]:
                raise LatentDiTError(f"checkpoint {source} does not match model {model_name}: {key} is "
                                     f"{config[key]} in the file, {arch[key]} for {model_name}")
        config["num_heads"] = arch["num_heads"]
    elif "num_heads" not in overrides:
        heads = default_num_heads(hidden)
        if heads is None:
            raise LatentDiTError(f"checkpoint {source}: cannot tell the number of attention heads for hidden size "
                                 f"{hidden} from tensor shapes; pass model_name (e.g. 'DiT-XL/2') or num_heads")
        config["num_heads"] = heads
    config.update(overrides)
    return config


def label_table_overrides(num_classes: int | None = None, null_class: bool = True) -> dict[str, Any]:
    """:func:`load_dit` overrides saying how to read the label table of a file without metadata.

    ``null_class=False``: the table has no unconditional row (a model trained with
    ``class_dropout_prob`` 0), so every row is a class; the default reads the last row as the null
    class. ``num_classes``: the number of real classes; the null row is then present exactly when
    the table has one row more.
    """
    overrides: dict[str, Any] = {}
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise LatentDiTError(f"num_classes must be a positive integer, got {num_classes!r}")
        overrides["num_classes"] = num_classes
    if not null_class:
        overrides["class_dropout_prob"] = 0.0
    return overrides


def _config_from_metadata(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    if METADATA_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise LatentDiTError(f"checkpoint {source}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise LatentDiTError(f"checkpoint {source}: metadata {METADATA_KEY!r} is not a JSON object")
    return config


def build_dit(config: Mapping[str, Any], source: str = "config", device: torch.device | str = "cpu") -> DiT:
    """``DiT(**config)`` with unknown keys reported as a :class:`LatentDiTError`."""
    unknown = sorted(set(config) - set(_DIT_ARGS))
    if unknown:
        raise LatentDiTError(f"{source}: unknown DiT config keys {unknown}; valid keys: {', '.join(_DIT_ARGS)}")
    with torch.device(device):
        return DiT(**config)


def load_dit(path: str | os.PathLike, model_name: str | None = None, **overrides: Any) -> DiT:
    """Rebuild a :class:`DiT` from a weights file and load it strictly (eval mode, float32, CPU).

    The config comes from the file's ``latentdit_model`` metadata, else from ``model_name`` and the
    tensor shapes; ``overrides`` (DiT constructor arguments, e.g. ``grad_checkpointing=True``) win.
    """
    source = str(path)
    state, metadata = read_checkpoint(path)
    config = _config_from_metadata(metadata, source)
    if config is None:
        config = infer_config(state, model_name, overrides, source)
    else:
        config = {**config, **overrides}
        if model_name is not None:
            arch = get_config(model_name)
            diff = {k: (config.get(k), v) for k, v in arch.items() if config.get(k) != v}
            if diff:
                raise LatentDiTError(f"checkpoint {source} does not match model {model_name}: "
                                     + ", ".join(f"{k} is {a} in the file, {b} for {model_name}"
                                                 for k, (a, b) in diff.items()))
    model = build_dit(config, f"checkpoint {source}", device="meta")
    check_state_dict(model, state, f"checkpoint {source}")
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if model.pos_embed is not None:  # absent with rotary positions (pos="rope2d")
        model.pos_embed.requires_grad_(False)
    return model.eval()


def save_dit(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
             config: Mapping[str, Any] | None = None) -> None:
    """Write weights as safetensors with ``config`` (default: ``model.config``) in metadata ``latentdit_model``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LatentDiTError(f"save_dit writes safetensors; give the file a .safetensors suffix, got {path}")
    if isinstance(model_or_state_dict, nn.Module):
        model = unwrap_model(model_or_state_dict)
        state = model.state_dict()
        if config is None:
            config = model.config
    else:
        state = dict(model_or_state_dict)
        if config is None:
            raise LatentDiTError("save_dit: pass config (model.config) when saving a bare state dict")
    config = dict(config)
    reference = build_dit(config, "save_dit config", device="meta")
    check_state_dict(reference, state, "save_dit state dict")
    save_safetensors({k: v.detach().cpu() for k, v in state.items()}, path,
                     metadata={METADATA_KEY: json.dumps(config, sort_keys=True)})
