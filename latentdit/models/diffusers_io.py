"""Export to and import from diffusers' ``DiTTransformer2DModel`` (so ``DiTPipeline`` can run our weights).

Weight map (ours → diffusers): ``x_embedder.proj`` → ``pos_embed.proj``; ``t_embedder.mlp.0/2`` and
``y_embedder.embedding_table`` → ``transformer_blocks.i.norm1.emb.{timestep_embedder.linear_1/2,
class_embedder.embedding_table}`` (diffusers keeps one copy of the embedders per block; the final layer
uses block 0's); ``blocks.i.adaLN_modulation.1`` → ``transformer_blocks.i.norm1.linear``;
``blocks.i.attn.qkv`` split into ``attn1.to_q/to_k/to_v``; ``attn.proj`` → ``attn1.to_out.0``;
``mlp.fc1/fc2`` → ``ff.net.0.proj`` / ``ff.net.2``; ``final_layer.adaLN_modulation.1`` → ``proj_out_1``;
``final_layer.linear`` → ``proj_out_2``. diffusers recomputes the sin-cos position table itself.
Only models with the paper's blocks convert: :func:`to_diffusers` refuses the block options
(``norm``, ``mlp``, ``pos``, ``qk_norm``; see :mod:`latentdit.models.dit`), which diffusers' DiT lacks.

Two numerical details differ between the two implementations, and :func:`to_diffusers` aligns them:

- diffusers' DiT timestep features use ``downscale_freq_shift=1`` (frequencies ``10000^(-i/127)``),
  the DiT release uses ``10000^(-i/128)``. The exported model's ``time_proj`` modules are set to shift 0.
  That attribute is not part of the diffusers config: after ``save_pretrained``/``from_pretrained`` it
  is back to 1 and outputs differ slightly (as for diffusers' own hub conversions of the DiT release).
- The MLP LayerNorm eps is a config field (``norm_eps``; diffusers' default 1e-5); it is exported as 1e-6.

:func:`from_diffusers` refuses a model whose function differs from any :class:`DiT` (shift ≠ 0,
eps ≠ 1e-6) unless ``allow_inexact=True`` — right for hub conversions of the released checkpoints,
whose weights were trained with the DiT-release features. Structural differences always raise.

Note: diffusers' ``DiTPipeline`` uses the literal null class id 1000 when ``guidance_scale > 1``, so it
can guide only models with 1000 classes; with other class counts run it with ``guidance_scale=1`` or
sample with :func:`latentdit.models.guided_forward`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from latentdit.errors import LatentDiTError
from latentdit.models.dit import DiT
from latentdit.models.embeddings import sincos_2d
from latentdit.models.guidance import unwrap_model

if TYPE_CHECKING:  # diffusers is slow to import; load it only when converting
    from diffusers import DiTTransformer2DModel

_EMB = "transformer_blocks.{i}.norm1.emb."


def _block_map(i: int) -> dict[str, str]:
    """Our block-i parameter prefix → diffusers' (qkv handled separately)."""
    return {
        f"blocks.{i}.adaLN_modulation.1.": f"transformer_blocks.{i}.norm1.linear.",
        f"blocks.{i}.attn.proj.": f"transformer_blocks.{i}.attn1.to_out.0.",
        f"blocks.{i}.mlp.fc1.": f"transformer_blocks.{i}.ff.net.0.proj.",
        f"blocks.{i}.mlp.fc2.": f"transformer_blocks.{i}.ff.net.2.",
    }


_EMBEDDER_MAP = {
    "t_embedder.mlp.0.": "timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "timestep_embedder.linear_2.",
    "y_embedder.embedding_table.": "class_embedder.embedding_table.",
}
_TOP_MAP = {
    "x_embedder.proj.": "pos_embed.proj.",
    "final_layer.adaLN_modulation.1.": "proj_out_1.",
    "final_layer.linear.": "proj_out_2.",
}


def _check_pos_embed(model: DiT) -> None:
    expected = sincos_2d(model.hidden_size, model.grid_size).float().unsqueeze(0)
    if not torch.allclose(model.pos_embed.detach().float().cpu(), expected, atol=1e-6, rtol=0):
        raise LatentDiTError("this DiT's pos_embed differs from the fixed 2D sin-cos table; diffusers' "
                             "DiTTransformer2DModel recomputes that table, so it cannot represent these weights")


def to_diffusers(model: DiT) -> "DiTTransformer2DModel":
    """A ``DiTTransformer2DModel`` computing the same function as ``model`` (float32, CPU, eval mode).

    An internal head (``internal_block``, for Internal Guidance) has no diffusers counterpart: it is left
    out, and the exported model computes the final output only."""
    from diffusers import DiTTransformer2DModel

    model = unwrap_model(model)
    if not isinstance(model, DiT):
        raise LatentDiTError(f"to_diffusers expects a latentdit DiT, got {type(model).__name__}")
    cfg = model.config
    if model.block_options:
        options = ", ".join(f"{k}={v!r}" for k, v in model.block_options.items())
        raise LatentDiTError(f"to_diffusers: diffusers' DiTTransformer2DModel has only the DiT paper's blocks; this "
                             f"model uses {options} (LayerNorm, GELU MLP, sin-cos positions, no qk-norm needed)")
    if not model.y_embedder.has_null:
        raise LatentDiTError("to_diffusers: diffusers' DiTTransformer2DModel always has a null class row; "
                             "a DiT with class_dropout_prob=0 (no null row) cannot be represented")
    if cfg["mlp_ratio"] != 4.0:
        raise LatentDiTError(f"to_diffusers: diffusers' DiT uses MLP ratio 4, this model has {cfg['mlp_ratio']}")
    _check_pos_embed(model)
    target = DiTTransformer2DModel(
        num_attention_heads=model.num_heads, attention_head_dim=model.hidden_size // model.num_heads,
        in_channels=model.in_channels, out_channels=model.out_channels, num_layers=cfg["depth"],
        sample_size=model.input_size, patch_size=model.patch_size, activation_fn="gelu-approximate",
        num_embeds_ada_norm=model.num_classes, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        norm_eps=1e-6, attention_bias=True, dropout=0.0)
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    theirs: dict[str, torch.Tensor] = {}
    for src, dst in _TOP_MAP.items():
        for leaf in ("weight", "bias"):
            theirs[dst + leaf] = ours[src + leaf]
    for i in range(cfg["depth"]):
        for src, dst in _block_map(i).items():
            for leaf in ("weight", "bias"):
                theirs[dst + leaf] = ours[src + leaf]
        for leaf in ("weight", "bias"):
            q, k, v = ours[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3, dim=0)
            for name, part in (("to_q", q), ("to_k", k), ("to_v", v)):
                theirs[f"transformer_blocks.{i}.attn1.{name}.{leaf}"] = part.clone()
        for src, dst in _EMBEDDER_MAP.items():
            for leaf in ("weight", "bias"):
                if src + leaf in ours:
                    theirs[_EMB.format(i=i) + dst + leaf] = ours[src + leaf]
    target.load_state_dict(theirs, strict=True)
    for block in target.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm1.emb.class_embedder.dropout_prob = cfg["class_dropout_prob"]
    return target.eval()


def from_diffusers(dit2d: "DiTTransformer2DModel", allow_inexact: bool = False) -> DiT:
    """A :class:`DiT` with the weights of a diffusers ``DiTTransformer2DModel`` (float32, CPU, eval mode).

    Raises :class:`LatentDiTError` when the diffusers model's function cannot be represented exactly
    (see the module docstring); ``allow_inexact=True`` accepts the timestep-frequency shift and
    LayerNorm eps differences of stock diffusers models.
    """
    cfg = dit2d.config
    problems = []
    if cfg.norm_type != "ada_norm_zero":
        problems.append(f"norm_type is {cfg.norm_type!r}, expected 'ada_norm_zero'")
    if cfg.activation_fn != "gelu-approximate":
        problems.append(f"activation_fn is {cfg.activation_fn!r}, expected 'gelu-approximate'")
    if not cfg.attention_bias:
        problems.append("attention_bias is False, DiT attention has biases")
    if cfg.norm_elementwise_affine:
        problems.append("norm_elementwise_affine is True, DiT LayerNorms have no affine parameters")
    if cfg.upcast_attention:
        problems.append("upcast_attention is True")
    out_channels = dit2d.out_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        problems.append(f"out_channels {out_channels} is neither in_channels {cfg.in_channels} nor twice it")
    if problems:
        raise LatentDiTError("from_diffusers: this DiTTransformer2DModel cannot be represented as a latentdit DiT: "
                             + "; ".join(problems))
    emb0 = dit2d.transformer_blocks[0].norm1.emb
    inexact = []
    shifts = {float(b.norm1.emb.time_proj.downscale_freq_shift) for b in dit2d.transformer_blocks}
    if shifts != {0.0}:
        inexact.append(f"timestep features use downscale_freq_shift {sorted(shifts)} (DiT uses 0)")
    if not math.isclose(cfg.norm_eps, 1e-6):
        inexact.append(f"norm_eps is {cfg.norm_eps} (DiT uses 1e-6)")
    if inexact and not allow_inexact:
        raise LatentDiTError("from_diffusers: the diffusers model computes a slightly different function than any "
                             "latentdit DiT: " + "; ".join(inexact) + ". Pass allow_inexact=True to import the "
                             "weights anyway (right for conversions of the released DiT checkpoints).")
    theirs = {k: v.detach().float().cpu() for k, v in dit2d.state_dict().items()}
    depth = cfg.num_layers
    for i in range(1, depth):
        for dst in _EMBEDDER_MAP.values():
            for leaf in ("weight", "bias"):
                key0, key = _EMB.format(i=0) + dst + leaf, _EMB.format(i=i) + dst + leaf
                if key0 in theirs and not torch.equal(theirs[key0], theirs[key]):
                    raise LatentDiTError(f"from_diffusers: block {i} has its own timestep/label embedder weights "
                                         f"({key} differs from block 0); a DiT shares one embedder across blocks")
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    with torch.device("meta"):  # weights come from dit2d; skip the random init
        model = DiT(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                    hidden_size=hidden, depth=depth, num_heads=cfg.num_attention_heads, mlp_ratio=4.0,
                    class_dropout_prob=float(emb0.class_embedder.dropout_prob) or 0.1,
                    num_classes=cfg.num_embeds_ada_norm, learn_sigma=out_channels == 2 * cfg.in_channels)
    ours: dict[str, torch.Tensor] = {"pos_embed": sincos_2d(hidden, model.grid_size).float().unsqueeze(0)}
    for src, dst in _TOP_MAP.items():
        for leaf in ("weight", "bias"):
            ours[src + leaf] = theirs[dst + leaf]
    for src, dst in _EMBEDDER_MAP.items():
        for leaf in ("weight", "bias"):
            if _EMB.format(i=0) + dst + leaf in theirs:
                ours[src + leaf] = theirs[_EMB.format(i=0) + dst + leaf]
    for i in range(depth):
        for src, dst in _block_map(i).items():
            for leaf in ("weight", "bias"):
                ours[src + leaf] = theirs[dst + leaf]
        for leaf in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(
                [theirs[f"transformer_blocks.{i}.attn1.{name}.{leaf}"] for name in ("to_q", "to_k", "to_v")])
    model.load_state_dict(ours, strict=True, assign=True)
    model.pos_embed.requires_grad_(False)
    return model.eval()
