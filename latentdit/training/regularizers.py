"""Representation regularisers added to the diffusion loss: small callables over the token
representations of chosen DiT blocks (:meth:`latentdit.models.dit.DiT.forward` with ``return_blocks``).

- :class:`LayerSync` (Haghighi et al. 2025, arXiv 2510.12581): pulls an earlier block's tokens towards
  a later block's tokens of the same sample, ``−mean_{n,k} cos(h_src[n, k], sg(h_tgt[n, k]))`` over
  samples n and tokens k; the later block is not pushed (stop-gradient). ``train.layersync_weight``,
  ``train.layersync_blocks: [source, target]``.
- :class:`Dispersive` (Wang & He 2025, "Diffuse and Disperse", arXiv 2506.09027), the InfoNCE variant
  without positive pairs: one block's tokens, flattened per sample to ``z_i``, give
  ``log( (1/B²) Σ_{i,j} exp(−D(z_i, z_j) / τ) )`` over the micro-batch's B samples (the diagonal
  included), with ``D = ‖z_i − z_j‖² / dim(z)`` (``l2``) or ``D = −cos(z_i, z_j)`` (``cosine``).
  ``train.dispersive_weight``, ``train.dispersive_block``, ``train.dispersive_tau``,
  ``train.dispersive_distance``. It couples the samples of one micro-batch, so its value (unlike the
  per-sample losses) depends on how the global batch is split into processes and accumulation steps.

- :class:`InternalLoss` (Zhou et al. 2025, Internal Guidance, arXiv 2512.24176): with ``model.internal_block``
  the DiT has a second output head after that block; its prediction gets the same diffusion loss as the
  final output (the same times, noise and dropped labels; no stop-gradient), weighted by
  ``train.internal_loss_weight`` (0.5, the paper's). The trainer computes it (it needs the process).

Each regulariser has a ``name`` (its column in ``metrics.jsonl``), a ``weight`` λ and the ``blocks``
it reads; the trainer adds ``λ · value`` to the diffusion loss. :func:`build_regularizers` turns the
``train`` section into the list (empty with every weight 0 and no internal head, so the default run is
unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from latentdit.config import TrainConfig
from latentdit.typed_config import field_error

DISPERSIVE_DISTANCES = ("l2", "cosine")


@dataclass(frozen=True)
class LayerSync:
    """Negative cosine similarity of block ``source``'s tokens to block ``target``'s (detached) tokens."""

    weight: float
    source: int
    target: int
    name: str = "layersync"

    @property
    def blocks(self) -> tuple[int, ...]:
        return (self.source, self.target)

    def __call__(self, blocks: Mapping[int, torch.Tensor]) -> torch.Tensor:
        src, tgt = blocks[self.source].float(), blocks[self.target].detach().float()
        return -F.cosine_similarity(src, tgt, dim=-1).mean()


@dataclass(frozen=True)
class Dispersive:
    """InfoNCE-style dispersion of one block's per-sample representations over the micro-batch."""

    weight: float
    block: int
    tau: float = 1.0
    distance: str = "l2"
    name: str = "dispersive"

    @property
    def blocks(self) -> tuple[int, ...]:
        return (self.block,)

    def __call__(self, blocks: Mapping[int, torch.Tensor]) -> torch.Tensor:
        z = blocks[self.block].float().flatten(1)
        n = z.shape[0]
        if self.distance == "cosine":
            z = F.normalize(z, dim=1)
            dist = -(z @ z.T).flatten()                   # every pair (i, j), the diagonal included
        else:
            pairs = F.pdist(z).square() / z.shape[1]      # the pairs i < j; D(z_i, z_i) = 0
            dist = torch.cat([pairs, pairs, pairs.new_zeros(n)])
        return torch.logsumexp(-dist / self.tau, dim=0) - 2 * math.log(n)


@dataclass(frozen=True)
class InternalLoss:
    """The internal head's diffusion loss (its value is computed by the trainer, which has the process)."""

    weight: float
    name: str = "internal"
    blocks: tuple[int, ...] = ()


Regularizer = LayerSync | Dispersive | InternalLoss


def build_regularizers(t: Any, depth: int, internal_block: int | None = None,
                       source: str = "config") -> list[Regularizer]:
    """The regularisers the ``train`` section ``t`` switches on, for a DiT of ``depth`` blocks (with an
    internal head after ``internal_block``, if not None); a field out of range raises a one-line
    :class:`LatentDiTError` naming it."""
    def fail(name: str, expected: str, got: Any):
        raise field_error(source, f"train.{name}", expected, got)

    def check_block(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < depth:
            fail(name, f"a block index in [0, {depth - 1}] (0-based; the model has {depth} blocks)", value)
        return value

    out: list[Regularizer] = []
    for name in ("layersync_weight", "dispersive_weight", "dispersive_tau", "internal_loss_weight"):
        if not (math.isfinite(getattr(t, name)) and getattr(t, name) >= 0):
            fail(name, "a finite number >= 0", getattr(t, name))
    if t.layersync_weight > 0:
        pair = t.layersync_blocks
        if len(pair) != 2:
            fail("layersync_blocks", "two block indices [source, target] with source < target", pair)
        src, tgt = check_block("layersync_blocks", pair[0]), check_block("layersync_blocks", pair[1])
        if src >= tgt:
            fail("layersync_blocks", "[source, target] with source < target (the earlier block follows the later)",
                 pair)
        out.append(LayerSync(float(t.layersync_weight), src, tgt))
    if t.dispersive_weight > 0:
        if t.dispersive_block is None:
            fail("dispersive_block", "a block index with train.dispersive_weight > 0", None)
        block = check_block("dispersive_block", t.dispersive_block)
        if t.dispersive_tau <= 0:
            fail("dispersive_tau", "a number > 0", t.dispersive_tau)
        if t.dispersive_distance not in DISPERSIVE_DISTANCES:
            fail("dispersive_distance", f"one of {', '.join(DISPERSIVE_DISTANCES)}", t.dispersive_distance)
        out.append(Dispersive(float(t.dispersive_weight), block, float(t.dispersive_tau), t.dispersive_distance))
    if internal_block is not None:
        if t.internal_loss_weight <= 0:
            fail("internal_loss_weight", "a number > 0 with model.internal_block (the head learns from it alone)",
                 t.internal_loss_weight)
        out.append(InternalLoss(float(t.internal_loss_weight)))
    elif t.internal_loss_weight != TrainConfig.internal_loss_weight:
        fail("internal_loss_weight", "its default unless model.internal_block gives the model an internal head",
             t.internal_loss_weight)
    return out
