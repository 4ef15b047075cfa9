"""Named DiT configurations: the 12 of the DiT paper plus tiny CPU-sized ones.

Paper sizes (depth / hidden / heads): S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16, each with
patch 2, 4 and 8. ``DiT-T/2`` and ``DiT-T/4`` (depth 4, hidden 128, 4 heads; ≈ 1.3 M parameters) are this
project's own tiny size for tests and the offline Fashion-MNIST demo; they train in minutes on a CPU.
:func:`resolve_arch` changes a named size's numbers (a model sized for a compute budget); the resolved
numbers are what :attr:`DiT.config` and the weights' metadata record.
"""

from __future__ import annotations

from typing import Any

from latentdit.errors import LatentDiTError
from latentdit.models.dit import DiT

_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
_TINY: dict[str, int] = dict(depth=4, hidden_size=128, num_heads=4)

DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(arch, patch_size=patch) for size, arch in _SIZES.items() for patch in (2, 4, 8)
}
DIT_CONFIGS.update({f"DiT-T/{patch}": dict(_TINY, patch_size=patch) for patch in (2, 4)})


def model_names() -> list[str]:
    """All registered model names, paper sizes first."""
    return list(DIT_CONFIGS)


def get_config(name: str) -> dict[str, int]:
    """Architecture (depth, hidden_size, patch_size, num_heads) of a named model."""
    if name not in DIT_CONFIGS:
        raise LatentDiTError(f"unknown model name {name!r}; valid names: {', '.join(model_names())}")
    return dict(DIT_CONFIGS[name])


def resolve_arch(name: str, depth: int = 0, hidden_size: int = 0, num_heads: int = 0,
                 patch_size: int = 0) -> dict[str, int]:
    """The architecture of the named model with the non-zero numbers given in place of its own (the
    ``model.depth`` / ``hidden_size`` / ``num_heads`` / ``patch_size`` config fields; 0 keeps the name's)."""
    try:
        arch = get_config(name)
    except LatentDiTError as e:
        raise LatentDiTError(f"model.name: {e}") from None
    overrides = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
    return {**arch, **{k: v for k, v in overrides.items() if v != 0}}


def create_dit(name: str, **kwargs: Any) -> DiT:
    """Build a named DiT; ``kwargs`` are further :class:`DiT` arguments (input_size, num_classes, ...) and
    may override the named architecture too (e.g. ``depth=2`` for a quick test)."""
    return DiT(**{**get_config(name), **kwargs})


def default_num_heads(hidden_size: int) -> int | None:
    """Head count the registry uses for this hidden size (None if no registered size has it)."""
    heads = {cfg["num_heads"] for cfg in DIT_CONFIGS.values() if cfg["hidden_size"] == hidden_size}
    return heads.pop() if len(heads) == 1 else None


def find_model_name(config: dict[str, Any]) -> str | None:
    """The registered name whose architecture matches ``config`` (depth, hidden, patch, heads), if any."""
    for name, arch in DIT_CONFIGS.items():
        if all(config.get(k) == v for k, v in arch.items()):
            return name
    return None
