"""Command-line plumbing of the sampling tools: the sampler and label-table flags they share, and the
parsing of labels, guidance interval, guided channels, device and precision, and the loading of an
autoguidance guide model."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from latentdit.cli import existing_path, finite_float, non_negative_float, positive_int
from latentdit.diffusion import PROCESS_TYPES
from latentdit.diffusion.samplers import SAMPLERS as SAMPLER_SPECS
from latentdit.errors import LatentDiTError
from latentdit.sampling import DDIM_MAPS, DEFAULT_NUM_STEPS, SAMPLERS, Guide, SamplerSettings
from latentdit.sampling.autoguidance import check_guide_model

if TYPE_CHECKING:
    from latentdit.weights import SamplingCheckpoint

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def add_sampler_arguments(parser, cfg_scale: float) -> None:
    """The sampler flags both sampling tools share (read back with :func:`settings_from_args`)."""
    per_process = "; ".join(f"{name} models: {', '.join(kind.samplers)}" for name, kind in PROCESS_TYPES.items())
    defaults = ", ".join(f"{kind.default_sampler} for {name} models" for name, kind in PROCESS_TYPES.items())
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help=f"{per_process} (default: {defaults}). "
                             + "; ".join(f"{n}: {s.help}" for n, s in SAMPLER_SPECS.items()))
    parser.add_argument("--num-steps", type=positive_int, default=None,
                        help=f"sampling steps (default per sampler: {DEFAULT_NUM_STEPS})")
    parser.add_argument("--cfg-scale", type=non_negative_float, default=cfg_scale,
                        help="guidance scale; 1 skips the unconditional pass")
    parser.add_argument("--guidance-interval", default=None,
                        help="LO,HI: guide only at these times, inclusive (ddpm models: original timestep "
                             "indices, e.g. 0,700; flow models: flow times in [0, 1], t = 1 is noise)")
    parser.add_argument("--guided-channels", default="all",
                        help="ddpm models: 'all' or k, guide only the first k latent channels (3 = the released "
                             "DiT code's behaviour)")
    parser.add_argument("--time-shift", type=finite_float, default=None,
                        help="flow models: shift s of the step grid, t' = s·t/(1+(s−1)·t) (default: the shift "
                             "the model was trained with)")
    parser.add_argument("--ddim-map", choices=DDIM_MAPS, default="ddim",
                        help="ddim: the timesteps visited: 'ddim' = DDIM's stride (0, s, 2s, …; the ADM/DiT "
                             "'ddimN' map), 'even' = the evenly rounded respacing of ddpm")
    parser.add_argument("--guide", type=existing_path, default=None, metavar="PATH",
                        help="autoguidance: weights of a weaker model of the same task (an earlier checkpoint of "
                             "the run, or a smaller model trained the same way; any form --ckpt takes); sampled "
                             "as guide + w·(main − guide), instead of classifier-free guidance (needs --cfg-scale 1)")
    parser.add_argument("--guide-scale", type=non_negative_float, default=1.0, metavar="W",
                        help="autoguidance weight w (with --guide; 1 = the main model alone)")
    parser.add_argument("--guide-interval", default=None, metavar="LO,HI",
                        help="autoguidance only at these times, inclusive (units as --guidance-interval)")
    parser.add_argument("--internal-scale", type=non_negative_float, default=1.0, metavar="W",
                        help="Internal Guidance weight w for a model trained with an internal head "
                             "(model.internal_block): internal + w·(final − internal), before cfg; 1 = off")
    parser.add_argument("--internal-interval", default=None, metavar="LO,HI",
                        help="internal guidance only at these times, inclusive (units as --guidance-interval)")


def add_label_table_arguments(parser) -> None:
    """``--num-classes`` / ``--no-null-class``: how to read the label table of a weights file without
    metadata (released or official train.py checkpoints), passed to
    :func:`latentdit.weights.load_model_for_sampling`."""
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="real classes of a file without metadata (default: label-table rows - 1, the last "
                             "row being the null class; with N the null row exists iff the table has N+1 rows)")
    parser.add_argument("--no-null-class", action="store_true",
                        help="the model was trained with class_dropout_prob 0: every label-table row is a class "
                             "and there is no null row, so only --cfg-scale 1 is possible")


def settings_from_args(args) -> SamplerSettings:
    """The :class:`SamplerSettings` of :func:`add_sampler_arguments`' flags (not yet resolved)."""
    return SamplerSettings(sampler=args.sampler, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                           guidance_interval=parse_guidance_interval(args.guidance_interval),
                           guided_channels=parse_guided_channels(args.guided_channels),
                           time_shift=args.time_shift, ddim_map=args.ddim_map, guide_scale=args.guide_scale,
                           guide_interval=parse_guidance_interval(args.guide_interval, "--guide-interval"),
                           internal_scale=args.internal_scale,
                           internal_interval=parse_guidance_interval(args.internal_interval, "--internal-interval"))


def load_guide(args, ckpt: SamplingCheckpoint, device: torch.device) -> Guide | None:
    """The autoguidance guide model of ``--guide`` (None without it), loaded like ``--ckpt`` and checked
    against the main model ``ckpt`` (latent shape and classes; its process when the settings resolve)."""
    if args.guide is None:
        return None
    from latentdit.weights import load_model_for_sampling

    loaded = load_model_for_sampling(args.guide, device=device)
    guide = Guide(loaded.model, loaded.process, loaded.path)
    check_guide_model(ckpt.model, guide)
    return guide


def parse_guidance_interval(spec: str | None, flag: str = "--guidance-interval") -> tuple[float, float] | None:
    """``"LO,HI"`` → (lo, hi) as numbers; their range is checked against the model's process when the
    settings are resolved (ddpm: timestep indices, flow: flow times in [0, 1])."""
    if spec is None:
        return None
    parts = [p.strip() for p in spec.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise LatentDiTError(f"guidance interval ({flag}) must be LO,HI (two numbers), got {spec!r}") from None
    return lo, hi


def parse_guided_channels(spec: str | int | None) -> int | None:
    """``"all"``/None → None (guide every channel); an integer k → k (checked against the model's latent
    channels when the settings are resolved)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    try:
        return int(spec)
    except (TypeError, ValueError):
        raise LatentDiTError(f"guided channels must be 'all' or an integer, got {spec!r}") from None


def parse_labels(spec: str | Sequence[str | int], num_classes: int,
                 class_names: Sequence[str] | None = None) -> list[int]:
    """Class ids from ids and/or names: ``"0,3,Trouser"`` or ``[0, "Trouser"]``.

    Names match exactly, else case-insensitively. Unknown names and ids outside
    ``[0, num_classes)`` raise :class:`LatentDiTError` listing what is valid.
    """
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    tokens = [t for t in tokens if not (isinstance(t, str) and t == "")]
    if not tokens:
        raise LatentDiTError("no class labels given (expected ids or class names, comma-separated)")
    lower = {}
    if class_names:
        for i, n in enumerate(class_names):
            lower.setdefault(n.lower(), i)
    out = []
    for tok in tokens:
        if isinstance(tok, (int, np.integer)) or (isinstance(tok, str) and re.fullmatch(r"[+-]?\d+", tok)):
            idx = int(tok)
            if not 0 <= idx < num_classes:
                raise LatentDiTError(f"class id {idx} out of range: the model has {num_classes} classes "
                                     f"(ids 0..{num_classes - 1})")
            out.append(idx)
            continue
        name = str(tok)
        if not class_names:
            raise LatentDiTError(f"class name {name!r} given, but the checkpoint has no class names; "
                                 f"use ids 0..{num_classes - 1}")
        if name in class_names:
            out.append(list(class_names).index(name))
        elif name.lower() in lower:
            out.append(lower[name.lower()])
        else:
            raise LatentDiTError(f"unknown class name {name!r}; valid names: {', '.join(class_names)}")
    return out


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``fp32|fp16|bf16|auto`` → autocast dtype (None = fp32). auto: bf16 on CUDA, fp32 elsewhere."""
    table = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in table:
        raise LatentDiTError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return table[precision]


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; a bad name raises LatentDiTError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LatentDiTError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatentDiTError(f"--device {device} requested but CUDA is not available")
    return dev
