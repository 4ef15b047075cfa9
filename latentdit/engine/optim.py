"""The optimizers: AdamW for both trainers, with no weight decay on norms, biases and embeddings; and Muon
for the weight matrices of a DiT's blocks beside AdamW for its other parameters (:class:`MuonAdamW`)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.optim.adamw import adamw

from latentdit.errors import LatentDiTError


def no_decay_parameters(model: nn.Module) -> set[int]:
    """``id``s of the parameters weight decay must not touch: every 1-D parameter (biases, norm scales
    and shifts) and the tables of ``nn.Embedding`` modules."""
    out = {id(p) for p in model.parameters() if p.ndim <= 1}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            out.add(id(module.weight))
    return out


def decay_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """``params`` (parameters of ``model``) as optimizer groups: with ``weight_decay > 0`` two, those of
    :func:`no_decay_parameters` (decay 0) after the others; without weight decay one."""
    if weight_decay <= 0:
        return [{"params": params, "weight_decay": 0.0}]
    exempt = no_decay_parameters(model)
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, *, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999),
                eps: float = 1e-8, device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` in the groups of :func:`decay_groups`, the fused
    kernel on CPU and CUDA (one pass over all parameters instead of a Python loop per tensor)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(decay_groups(model, trainable, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=weight_decay, fused=torch.device(device).type in ("cpu", "cuda"))


# Newton–Schulz quintic coefficients of Muon (Jordan et al. 2024): five steps take every singular value of
# the normalised momentum to roughly [0.7, 1.2], fast, instead of exactly to 1
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# Muon's orthogonal update has an RMS of 1/sqrt(max(rows, cols)); scaling it to 0.2·sqrt(max) gives AdamW's
# typical update RMS of about 0.2·lr, so one learning rate serves both halves (Liu et al. 2025, "Muon is
# scalable for LLM training")
MUON_RMS = 0.2


def newton_schulz_macs(rows: int, cols: int, gram_form: bool, steps: int = NS_STEPS) -> int:
    """Multiply-adds of :func:`orthogonalize` on a ``rows × cols`` matrix (``r × c`` in its wide orientation):
    a plain step costs ``2·r²c + r³`` (the Gram matrix, its square, the product with the matrix); the Gram
    form ``2·r²c`` once (the first Gram matrix and the final product) and ``4·r³`` a step, less at the ends."""
    r, c = min(rows, cols), max(rows, cols)
    return 2 * r * r * c + (4 * steps - 3) * r ** 3 if gram_form else steps * (2 * r * r * c + r ** 3)


def gram_form_pays(rows: int, cols: int, steps: int = NS_STEPS) -> bool:
    """Whether :func:`orthogonalize` takes fewer multiply-adds on the Gram matrix than on the matrix itself:
    from ``cols > 1.5·rows`` on (wide orientation)."""
    return newton_schulz_macs(rows, cols, True, steps) < newton_schulz_macs(rows, cols, False, steps)


def orthogonalize(m: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7, *, gram_form: bool | None = None
                  ) -> torch.Tensor:
    """The matrix nearest to ``m``'s polar factor ``U Vᵀ`` that ``steps`` Newton–Schulz iterations reach
    (float32; the iteration works on the wide orientation, so the Gram matrix is the small one).

    Each step is ``X ← p(G) X`` with ``G = X Xᵀ`` and ``p(G) = aI + bG + cG²``. As ``p(G)`` commutes with
    ``G``, the next Gram matrix is ``p(G)² G``, so for a wide enough matrix the steps run on the small Gram
    matrix alone, the polynomials are multiplied up, and ``X`` is touched once at the end: the same
    iteration in exact arithmetic, about 1.8x fewer multiply-adds for a 128 × 512 matrix. ``gram_form``
    picks the form (default: the one with fewer multiply-adds, :func:`gram_form_pays`)."""
    a, b, c = NS_COEFFICIENTS
    x = m.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    rows, cols = x.shape
    gram = x @ x.T
    if steps > 0 and (gram_form_pays(rows, cols, steps) if gram_form is None else gram_form):
        eye = torch.eye(rows, dtype=x.dtype, device=x.device)
        product = None
        for i in range(steps):
            poly = a * eye + (b * gram + c * gram @ gram)
            product = poly if product is None else poly @ product
            if i + 1 < steps:
                gram = poly @ gram @ poly
        x = product @ x
    else:
        for i in range(steps):
            if i:
                gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden weight matrices and AdamW for every other parameter, as one optimizer (one
    schedule, one state dict, one ``step``).

    A group with ``muon=True`` holds 2-D parameters; each step keeps a momentum buffer ``B ← μB + g`` and
    moves the weight along the orthogonalised Nesterov direction ``g + μB`` (:func:`orthogonalize`), scaled
    by ``0.2·sqrt(max(rows, cols))`` so that the learning rate means what it means for AdamW; weight decay is
    decoupled and scaled by the learning rate. The other groups take torch's AdamW step.
    """

    def __init__(self, params, lr: float, *, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.95) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise LatentDiTError("MuonAdamW: a muon group may hold 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        for p, buf in zip(params, bufs):  # one Nesterov direction at a time: no second copy of every gradient
            update = orthogonalize(p.grad.add(buf, alpha=mu)).to(p.dtype)
            p.add_(update, alpha=-lr * MUON_RMS * math.sqrt(max(p.shape)))

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch's own AdamW step (its functional form, the fused kernel on CPU and CUDA), on the state keys
        of ``torch.optim.AdamW``."""
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif fused and state["step"].device != p.device:  # a state dict saved from another device
                state["step"] = state["step"].to(p.device)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=fused, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def build_muon(model: nn.Module, muon_params: Iterable[nn.Parameter], lr: float, *, weight_decay: float = 0.0,
               betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.95) -> MuonAdamW:
    """:class:`MuonAdamW` over the trainable parameters of ``model``: Muon for ``muon_params`` (2-D
    weights), AdamW for the rest in the groups of :func:`decay_groups`."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    muon = {id(p) for p in muon_params}
    groups = [{"params": [p for p in trainable if id(p) in muon], "muon": True, "weight_decay": weight_decay},
              *decay_groups(model, [p for p in trainable if id(p) not in muon], weight_decay)]
    return MuonAdamW([g for g in groups if g["params"]], lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     momentum=momentum)
