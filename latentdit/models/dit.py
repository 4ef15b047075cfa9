"""The DiT model: a transformer over latent patches, conditioned on timestep and class by adaLN-Zero.

Layout and parameter names follow the released DiT checkpoints (``DiT-XL-2-256x256.pt`` etc.), so
their state dicts load strictly into :class:`DiT`:

- ``x_embedder.proj``: patchifying convolution (kernel = stride = patch size);
- ``pos_embed``: fixed 2D sin-cos position table, a frozen ``nn.Parameter`` (it sits in the state dict);
- ``t_embedder.mlp.0/2``: MLP over 256-d sinusoidal timestep features (max period 10000);
- ``y_embedder.embedding_table``: class table, with one extra "null" row when ``class_dropout_prob > 0``;
- ``blocks.N``: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``;
- ``final_layer``: ``adaLN_modulation.1`` and ``linear``.

Forward: ``tokens = patchify(x) + pos_embed``, ``c = t_emb + y_emb``; every block applies
``x += gate * f(LN(x) * (1 + scale) + shift)`` for attention and for the MLP, with shift/scale/gate
regressed from ``c``; the final layer modulates, projects to ``patch² · out_channels`` and unpatchifies.

Block options (constructor arguments, stored in :attr:`DiT.config`; the defaults are the paper's blocks,
so the released checkpoints load and compute bit-exactly):

- ``norm="rmsnorm"``: RMSNorm instead of LayerNorm in the blocks and the final layer (neither has an
  affine part: adaLN supplies scale and shift);
- ``mlp="swiglu"``: SwiGLU MLP (``fc1_g``, ``fc1_x``, ``fc2``) with ⅔ of the GELU MLP's hidden width, so
  the parameter count stays about the same;
- ``pos="rope2d"``: 2-D rotary embedding of queries and keys (half of each head's channels rotate with
  the token's row, half with its column; frequencies ``10000^(-i/(head_dim/4))``). There is then no
  absolute table (``pos_embed`` is absent from the state dict), so attention scores depend on the
  tokens' relative offsets only;
- ``qk_norm=True``: RMSNorm with a learned scale on each head's queries and keys (``attn.q_norm``,
  ``attn.k_norm``), applied before the rotary embedding.

``internal_block=k`` adds an internal head (``internal_layer``, a final layer of its own, zero-initialised)
that reads block k's output (0-based) and predicts what the final layer predicts: a weaker model inside the
same forward pass, for Internal Guidance (Zhou et al. 2025, arXiv 2512.24176; the loss in
:mod:`latentdit.training.regularizers`, the guidance in :mod:`latentdit.sampling.internal`). It is stored in
:attr:`DiT.config` only when set.

The attention, MLP and norm layers are timm's (``AttentionRope``, ``Mlp``, ``SwiGLU``, ``RmsNorm``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple, Sequence

import torch
from einops import rearrange
from timm.layers import AttentionRope, Mlp, RmsNorm, SwiGLU
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentdit.errors import LatentDiTError
from latentdit.models.embeddings import TIMESTEP_FREQ_DIM, rope_2d, sincos_2d, timestep_embedding

NORM_EPS = 1e-6

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("sincos", "rope2d")
# The DiT paper's blocks: the default block options (configs written before the options existed mean these).
PAPER_BLOCKS: dict[str, Any] = dict(norm="layernorm", mlp="gelu", pos="sincos", qk_norm=False)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens ``x [N, T, D]`` by per-sample ``shift``/``scale [N, D]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens ``[N, (H/p)·(W/p), D]`` through a strided conv named ``proj``."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Timestep → ``hidden_size`` vector: sinusoidal features through ``Linear–SiLU–Linear``."""

    def __init__(self, hidden_size: int, frequency_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with an extra null row (id ``num_classes``) when ``dropout_prob > 0``.

    Labels are replaced by the null id with probability ``dropout_prob`` in training mode, or where
    ``force_drop_ids == 1`` whenever that is given.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = torch.as_tensor(force_drop_ids, device=labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.has_null) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------

def make_norm(kind: str, dim: int) -> nn.Module:
    """The block/final-layer norm: no affine part (adaLN modulates), eps 1e-6."""
    if kind == "rmsnorm":
        return RmsNorm(dim, eps=NORM_EPS, affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)


def make_mlp(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    """tanh-GELU MLP (``fc1``, ``fc2``) or SwiGLU (``fc1_g``, ``fc1_x``, ``fc2``) at ⅔ of the hidden width."""
    hidden = int(dim * mlp_ratio)
    if kind == "swiglu":
        return SwiGLU(dim, int(2 * hidden / 3), act_layer=nn.SiLU)
    return Mlp(dim, hidden, act_layer=partial(nn.GELU, approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: shift/scale/gate for attention and for the MLP, regressed from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = AttentionRope(hidden_size, num_heads, qkv_bias=True, num_prefix_tokens=0, qk_norm=qk_norm,
                                  norm_layer=partial(RmsNorm, eps=NORM_EPS))
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) → linear to ``patch² · out_channels`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

class Extras(NamedTuple):
    """What :meth:`DiT.forward` returns beside its output when asked: block outputs (tokens
    ``[N, T, hidden_size]`` by 0-based block index) and the internal head's output (or None)."""

    blocks: dict[int, torch.Tensor]
    internal: torch.Tensor | None


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LatentDiTError(f"model.{name}: expected an integer >= {minimum}, got {value!r}")


def check_arguments(*, patch_size: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                    class_dropout_prob: float = 0.1, norm: str = PAPER_BLOCKS["norm"], mlp: str = PAPER_BLOCKS["mlp"],
                    pos: str = PAPER_BLOCKS["pos"], qk_norm: bool = PAPER_BLOCKS["qk_norm"],
                    input_size: int | None = None, in_channels: int | None = None,
                    num_classes: int | None = None, internal_block: int | None = None) -> None:
    """Refuse :class:`DiT` arguments it cannot be built with; each message names the config field
    (``model.<argument>``). The sizes that come from the data (``input_size``, ``in_channels``,
    ``num_classes``) are checked when given, so a config can be checked before its latents are read."""
    from_data = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    sizes = dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                 **{k: v for k, v in from_data.items() if v is not None})
    for name, value in sizes.items():
        _check_int(name, value, 4 if name == "hidden_size" else 1)
    if input_size is not None and input_size % patch_size:
        raise LatentDiTError(f"model.patch_size: expected a divisor of the latent size (input_size) {input_size}, "
                             f"got {patch_size}")
    if hidden_size % num_heads:
        raise LatentDiTError(f"model.num_heads: expected a divisor of model.hidden_size {hidden_size}, got {num_heads}")
    for name, value, choices in (("norm", norm, NORMS), ("mlp", mlp, MLPS), ("pos", pos, POSITIONS)):
        if value not in choices:
            raise LatentDiTError(f"model.{name}: expected one of {', '.join(choices)}, got {value!r}")
    if not isinstance(qk_norm, bool):
        raise LatentDiTError(f"model.qk_norm: expected true or false, got {qk_norm!r}")
    if pos == "sincos" and hidden_size % 4:
        raise LatentDiTError(f"model.hidden_size: expected a multiple of 4 with model.pos=sincos (2D sin-cos "
                             f"position table), got {hidden_size}")
    if pos == "rope2d" and (hidden_size // num_heads) % 4:
        raise LatentDiTError(f"model.pos: rope2d needs a head size (hidden_size / num_heads = "
                             f"{hidden_size // num_heads}) divisible by 4")
    if not (isinstance(mlp_ratio, (int, float)) and math.isfinite(mlp_ratio) and mlp_ratio > 0):
        raise LatentDiTError(f"model.mlp_ratio: expected a positive number, got {mlp_ratio!r}")
    if not (isinstance(class_dropout_prob, (int, float)) and 0.0 <= class_dropout_prob < 1.0):
        raise LatentDiTError(f"model.class_dropout_prob: expected a probability in [0, 1), got {class_dropout_prob!r}")
    if internal_block is not None and (isinstance(internal_block, bool) or not isinstance(internal_block, int)
                                       or not 0 <= internal_block < depth - 1):
        raise LatentDiTError(f"model.internal_block: expected a block index in [0, {depth - 2}] (0-based, before the "
                             f"last of the {depth} blocks) or null, got {internal_block!r}")


class DiT(nn.Module):
    """Diffusion transformer over ``[N, in_channels, input_size, input_size]`` latents.

    ``forward(x, t, y)`` returns ``[N, out_channels, input_size, input_size]`` where ``out_channels``
    is ``2 · in_channels`` with ``learn_sigma`` (eps then the variance interpolation values) and
    ``in_channels`` otherwise. ``t`` holds timestep indices (float or long, shape ``[N]`` or a scalar);
    ``y`` holds class ids in ``[0, num_classes)``, or ``null_class_id`` when the null row exists.
    ``norm``, ``mlp``, ``pos`` and ``qk_norm`` choose the block options (see the module docstring).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, grad_checkpointing: bool = False,
                 norm: str = PAPER_BLOCKS["norm"], mlp: str = PAPER_BLOCKS["mlp"], pos: str = PAPER_BLOCKS["pos"],
                 qk_norm: bool = PAPER_BLOCKS["qk_norm"], internal_block: int | None = None):
        super().__init__()
        check_arguments(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                        hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                        class_dropout_prob=class_dropout_prob, num_classes=num_classes, norm=norm, mlp=mlp,
                        pos=pos, qk_norm=qk_norm, internal_block=internal_block)

        self._config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=float(mlp_ratio),
                            class_dropout_prob=float(class_dropout_prob), num_classes=num_classes,
                            learn_sigma=bool(learn_sigma), grad_checkpointing=bool(grad_checkpointing),
                            norm=norm, mlp=mlp, pos=pos, qk_norm=qk_norm)
        if internal_block is not None:
            self._config["internal_block"] = internal_block
        self.internal_block = internal_block
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = bool(learn_sigma)
        self.grad_checkpointing = bool(grad_checkpointing)
        self.grid_size = input_size // patch_size
        self.pos = pos

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if pos == "sincos":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        else:  # rotary: positions enter through q/k only
            self.register_parameter("pos_embed", None)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm, mlp, qk_norm)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm)
        self.internal_layer = (FinalLayer(hidden_size, patch_size, self.out_channels, norm)
                               if internal_block is not None else None)
        self.initialize_weights()

    # -- construction -------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """DiT-paper init: xavier linears / patch conv with zero bias, N(0, 0.02) label table and t-MLP,
        zero adaLN outputs and final linear (a fresh model outputs exactly zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.pos_embed is not None:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.hidden_size, self.grid_size, self.pos_embed.device)
                                     .to(self.pos_embed.dtype).unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for head in (self.final_layer, self.internal_layer):
            if head is not None:
                for layer in (head.adaLN_modulation[-1], head.linear):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable); ``DiT(**model.config)`` rebuilds the architecture."""
        return dict(self._config)

    @property
    def block_options(self) -> dict[str, Any]:
        """The block options that differ from the DiT paper's (empty for a paper DiT)."""
        return {k: self._config[k] for k, v in PAPER_BLOCKS.items() if self._config[k] != v}

    @property
    def null_class_id(self) -> int:
        """The label id of the unconditional ("null") row, ``num_classes``; only with class_dropout_prob > 0."""
        if not self.y_embedder.has_null:
            raise LatentDiTError(
                "this DiT has no null class row (class_dropout_prob was 0), so it cannot run unconditionally "
                "or with classifier-free guidance")
        return self.num_classes

    # -- forward ------------------------------------------------------------------------------------

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[N, T, p²·C]`` (row-major tokens, channels fastest within a patch) → ``[N, C, H, W]``."""
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=self.grid_size, p=self.patch_size,
                         q=self.patch_size)

    def rope(self, device: torch.device) -> torch.Tensor | None:
        """The rotary table of this model's token grid (``pos="rope2d"``), else None. Computed per call:
        it is tiny, and so it never needs to be saved, moved or materialised after a meta-device build."""
        if self.pos != "rope2d":
            return None
        return rope_2d(self.grid_size, self.hidden_size // self.num_heads, device)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise LatentDiTError(
                f"DiT input x must have shape [N, {self.in_channels}, {self.input_size}, {self.input_size}], "
                f"got {list(x.shape)}")
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise LatentDiTError(f"DiT timesteps t must be a scalar or have shape [{n}], got {list(t.shape)}")
        y = torch.as_tensor(y)
        if y.shape != (n,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise LatentDiTError(f"DiT class labels y must be an integer tensor of shape [{n}], "
                                 f"got {y.dtype} {list(y.shape)}")
        # Range check only where it costs no device sync: labels still on the CPU. (Labels already on a
        # GPU come from the trainer, whose latents hold the extraction's class indices, below the
        # manifest's class count, or from the sampling tools, which validate them before moving them.)
        if y.device.type == "cpu" and not torch.compiler.is_compiling():
            max_id = self.num_classes if self.y_embedder.has_null else self.num_classes - 1
            bad = (y < 0) | (y > max_id)
            if bool(bad.any()):
                bad_ids = sorted(set(y[bad].tolist()))
                allowed = (f"[0, {self.num_classes - 1}] or the null id {self.num_classes}" if self.y_embedder.has_null
                           else f"[0, {self.num_classes - 1}] (this model has no null class row)")
                raise LatentDiTError(f"DiT class ids out of range: {bad_ids[:10]}; expected ids in {allowed}")
        return t, y.to(x.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None,
                return_blocks: Sequence[int] = (), return_internal: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, Extras]:
        """Predict ``[N, out_channels, H, W]`` from latents x, timesteps t and labels y.

        Label dropout happens in training mode (probability ``class_dropout_prob``), or exactly where
        ``force_drop_ids == 1`` when given (the trainer passes it for reproducible multi-process runs).
        With ``return_blocks`` (0-based block indices; what representation regularisers read) or
        ``return_internal`` (the internal head's prediction, shaped like the output) the result is
        ``(output, Extras(blocks, internal))``.
        """
        t, y = self._check_inputs(x, t, y)
        if force_drop_ids is not None and not self.y_embedder.has_null:
            raise LatentDiTError("force_drop_ids given but this DiT has no null class row (class_dropout_prob is 0)")
        wanted = frozenset(return_blocks)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.blocks) for i in wanted):
            raise LatentDiTError(f"DiT return_blocks must be block indices in [0, {len(self.blocks) - 1}], "
                                 f"got {list(return_blocks)}")
        if return_internal and self.internal_layer is None:
            raise LatentDiTError("this DiT has no internal head (model.internal_block was not set)")
        h = self.x_embedder(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        rope = self.rope(x.device)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        blocks: dict[int, torch.Tensor] = {}
        internal = None
        for i, block in enumerate(self.blocks):
            h = checkpoint(block, h, c, rope, use_reentrant=False) if use_ckpt else block(h, c, rope)
            if i in wanted:
                blocks[i] = h
            if return_internal and i == self.internal_block:
                internal = self.unpatchify(self.internal_layer(h, c))
        out = self.unpatchify(self.final_layer(h, c))
        return (out, Extras(blocks, internal)) if wanted or return_internal else out
