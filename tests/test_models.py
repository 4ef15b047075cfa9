"""DiT model family: registry, shapes, init, conditioning, label dropout, guidance, bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from latentdit.errors import LatentDiTError
from latentdit.models import DIT_CONFIGS, DiT, create_dit, guided_forward, model_names
from latentdit.models.embeddings import sincos_2d, timestep_embedding

PAPER = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def tiny(**kw) -> DiT:
    args = dict(input_size=8, num_classes=10, depth=2)
    args.update(kw)
    return create_dit("DiT-T/2", **args)


def randomize(model: DiT, std: float = 0.05, seed: int = 0) -> DiT:
    """Perturb every trainable weight so adaLN/final layers are non-zero and the output depends on t, y."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(n: int = 3, c: int = 4, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.tensor([0, 500, 999][:n] + [7] * max(0, n - 3))


# ---------------------------------------------------------------------------------------------------
# registry and shapes
# ---------------------------------------------------------------------------------------------------

def test_registry_has_the_twelve_paper_configs_and_tiny_ones():
    names = model_names()
    for size, (depth, hidden, heads) in PAPER.items():
        for patch in (2, 4, 8):
            assert DIT_CONFIGS[f"DiT-{size}/{patch}"] == dict(depth=depth, hidden_size=hidden, num_heads=heads,
                                                             patch_size=patch)
    assert {"DiT-T/2", "DiT-T/4"} <= set(names)
    assert len(names) == 14


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_shapes_for_every_named_config(name):
    # depth reduced to 1: shapes do not depend on depth and the full XL is slow to build on CPU
    torch.manual_seed(0)
    model = create_dit(name, input_size=16, num_classes=5, depth=1).eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 999]), torch.tensor([0, 5]))
    assert out.shape == (2, 8, 16, 16)
    assert model.hidden_size == DIT_CONFIGS[name]["hidden_size"]
    assert model.x_embedder.proj.kernel_size == (DIT_CONFIGS[name]["patch_size"],) * 2
    assert model.pos_embed.shape == (1, (16 // DIT_CONFIGS[name]["patch_size"]) ** 2, model.hidden_size)


def test_other_channels_sizes_and_no_learned_sigma():
    model = create_dit("DiT-T/4", input_size=12, in_channels=3, num_classes=2, learn_sigma=False, depth=1)
    out = model(torch.randn(2, 3, 12, 12), torch.tensor([1.5, 2.0]), torch.tensor([0, 1]))
    assert out.shape == (2, 3, 12, 12)
    assert model.out_channels == 3 and not model.learn_sigma


def test_xl2_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = create_dit("DiT-XL/2")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert model.y_embedder.embedding_table.weight.shape == (1001, 1152)
    assert not model.pos_embed.requires_grad
    assert model.null_class_id == 1000


def test_config_is_json_and_rebuilds_the_same_architecture():
    model = tiny(class_dropout_prob=0.0, learn_sigma=False)
    cfg = json.loads(json.dumps(model.config))
    rebuilt = DiT(**cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert cfg["num_heads"] == 4 and cfg["class_dropout_prob"] == 0.0


# ---------------------------------------------------------------------------------------------------
# embeddings and init
# ---------------------------------------------------------------------------------------------------

def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 2.5]), dim=4, max_period=10000)
    freqs = torch.tensor([1.0, 0.01])  # 10000^(-i/2)
    for row, t in zip(emb, [0.0, 1.0, 2.5]):
        expected = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
        torch.testing.assert_close(row, expected)
    assert timestep_embedding(torch.tensor([3])).shape == (1, 256)


def test_pos_embed_is_fixed_2d_sincos():
    model = tiny(input_size=8)  # 4x4 grid, hidden 128
    table = model.pos_embed[0]
    assert not model.pos_embed.requires_grad
    d4 = 128 // 4
    # token (row 1, col 2): first half encodes the column, second half the row
    tok = table[1 * 4 + 2]
    omega = 1.0 / 10000 ** (torch.arange(d4, dtype=torch.float64) / d4)
    torch.testing.assert_close(tok[:d4].double(), torch.sin(2 * omega), atol=1e-6, rtol=0)
    torch.testing.assert_close(tok[d4:2 * d4].double(), torch.cos(2 * omega), atol=1e-6, rtol=0)
    torch.testing.assert_close(tok[2 * d4:3 * d4].double(), torch.sin(1 * omega), atol=1e-6, rtol=0)
    torch.testing.assert_close(table, sincos_2d(128, 4).float())


def test_init_follows_the_paper():
    torch.manual_seed(0)
    model = create_dit("DiT-T/2", input_size=8, num_classes=1000, depth=2)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
        w = block.attn.qkv.weight
        bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert torch.count_nonzero(block.attn.qkv.bias) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.final_layer.adaLN_modulation[1].weight) == 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    proj = model.x_embedder.proj.weight
    bound = math.sqrt(6 / (proj.shape[0] + proj[0].numel()))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.9 * bound


def test_fresh_model_outputs_exactly_zero():
    torch.manual_seed(0)
    model = tiny()
    x, t = inputs()
    out = model(x, t, torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_gradients_reach_adaln_layers_after_one_step():
    torch.manual_seed(0)
    model = tiny().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = inputs()
    y = torch.tensor([1, 2, 3])
    target = torch.randn(3, 8, 8, 8)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, t, y, force_drop_ids=torch.zeros(3)), target).backward()

    step()
    # adaLN-Zero: at init only the final linear receives a gradient
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert model.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() == 0
    opt.step()
    step()
    for name in ["blocks.0.adaLN_modulation.1.weight", "blocks.1.adaLN_modulation.1.weight",
                 "final_layer.adaLN_modulation.1.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.pos_embed.grad is None


@pytest.mark.parametrize("options", [{}, dict(norm="rmsnorm", mlp="swiglu", pos="rope2d", qk_norm=True)],
                         ids=["paper", "all-options"])
def test_grad_checkpointing_gives_same_outputs_and_gradients(options):
    a = randomize(tiny(**options))
    b = DiT(**{**a.config, "grad_checkpointing": True})
    b.load_state_dict(a.state_dict())
    x, t = inputs()
    y = torch.tensor([1, 2, 3])
    losses = []
    for model in (a, b):
        model.eval()
        loss = model(x, t, y).square().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_output_depends_on_timestep_and_label():
    model = randomize(tiny()).eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        base = model(x, torch.tensor([10]), torch.tensor([3]))
        assert not torch.allclose(base, model(x, torch.tensor([10.5]), torch.tensor([3])))
        assert not torch.allclose(base, model(x, torch.tensor([10]), torch.tensor([4])))
        torch.testing.assert_close(base, model(x, 10, torch.tensor([3])))  # scalar t broadcasts


# ---------------------------------------------------------------------------------------------------
# label dropout
# ---------------------------------------------------------------------------------------------------

def test_label_dropout_rate_and_modes():
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=0.25)
    emb = model.y_embedder
    labels = torch.randint(0, 10, (40_000,))
    dropped = emb.token_drop(labels)
    rate = (dropped == model.null_class_id).float().mean().item()
    assert abs(rate - 0.25) < 0.01
    kept = dropped != model.null_class_id
    assert torch.equal(dropped[kept], labels[kept])
    table = emb.embedding_table.weight
    # eval mode: never dropped; training mode: dropped at the rate
    assert torch.equal(emb(labels[:100], train=False), table[labels[:100]])
    out = emb(labels, train=True)
    null_rows = (out == table[10]).all(dim=1).float().mean().item()
    assert abs(null_rows - 0.25) < 0.01


def test_force_drop_ids_replaces_exactly_those_labels():
    model = randomize(tiny()).eval()
    x, t = inputs(2)
    y = torch.tensor([3, 4])
    with torch.no_grad():
        forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
        explicit = model(x, t, torch.tensor([model.null_class_id, 4]))
    torch.testing.assert_close(forced, explicit)


def test_no_null_row_without_label_dropout():
    model = tiny(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape[0] == 10
    with pytest.raises(LatentDiTError, match="no null class row"):
        model.null_class_id
    x, t = inputs(2)
    with pytest.raises(LatentDiTError, match="no null class row"):
        model(x, t, torch.tensor([0, 1]), force_drop_ids=torch.tensor([1, 0]))


# ---------------------------------------------------------------------------------------------------
# guidance
# ---------------------------------------------------------------------------------------------------

def _cond_uncond(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y), model(x, t, torch.full_like(y, model.null_class_id))


def test_guidance_formula_on_all_latent_channels():
    model = randomize(tiny()).eval()
    x, t = inputs()
    y = torch.tensor([1, 5, 9])
    cond, uncond = _cond_uncond(model, x, t, y)
    assert (cond - uncond).abs().max() > 1e-3  # the test can fail
    with torch.no_grad():
        out = guided_forward(model, x, t, y, cfg_scale=4.0)
    assert out.shape == cond.shape
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)  # learned sigma from cond


def test_guidance_three_channel_legacy_option():
    model = randomize(tiny()).eval()
    x, t = inputs()
    y = torch.tensor([1, 5, 9])
    cond, uncond = _cond_uncond(model, x, t, y)
    with torch.no_grad():
        out = guided_forward(model, x, t, y, cfg_scale=1.5, guided_channels=3)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)
    assert (out[:, 3] - (uncond[:, 3] + 1.5 * (cond[:, 3] - uncond[:, 3]))).abs().max() > 1e-4


def test_guidance_uses_one_batched_forward_and_scale_one_is_conditional_only():
    model = randomize(tiny()).eval()
    batches = []
    model.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    x, t = inputs()
    y = torch.tensor([1, 5, 9])
    with torch.no_grad():
        guided_forward(model, x, t, y, cfg_scale=3.0)
        assert batches == [6]
        out = guided_forward(model, x, t, y, cfg_scale=1.0)
        assert batches == [6, 3]
        torch.testing.assert_close(out, model(x, t, y))


def test_guidance_no_learned_sigma_model():
    model = randomize(tiny(learn_sigma=False)).eval()
    x, t = inputs()
    y = torch.tensor([0, 1, 2])
    cond, uncond = _cond_uncond(model, x, t, y)
    with torch.no_grad():
        out = guided_forward(model, x, t, y, cfg_scale=2.0)
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.5, "abc", None])
def test_guidance_rejects_bad_scale(scale):
    model = tiny().eval()
    x, t = inputs()
    with pytest.raises(LatentDiTError, match="cfg_scale must be a finite number >= 0"):
        guided_forward(model, x, t, torch.tensor([0, 1, 2]), cfg_scale=scale)


@pytest.mark.parametrize("channels", [0, 5, 2.5])
def test_guidance_rejects_bad_guided_channels(channels):
    model = tiny().eval()
    x, t = inputs()
    with pytest.raises(LatentDiTError, match=r"guided_channels must be an integer in \[1, 4\]"):
        guided_forward(model, x, t, torch.tensor([0, 1, 2]), cfg_scale=2.0, guided_channels=channels)


def test_guidance_needs_a_null_row():
    model = tiny(class_dropout_prob=0.0).eval()
    x, t = inputs()
    with pytest.raises(LatentDiTError, match="no null class row"):
        guided_forward(model, x, t, torch.tensor([0, 1, 2]), cfg_scale=2.0)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------

def test_unknown_model_name_lists_valid_names():
    with pytest.raises(LatentDiTError, match=r"unknown model name 'DiT-Q/2'.*DiT-S/2.*DiT-XL/8.*DiT-T/2"):
        create_dit("DiT-Q/2")


def test_input_size_not_divisible_by_patch():
    with pytest.raises(LatentDiTError, match=re.escape("model.patch_size: expected a divisor of the latent size (input_size) 30, got 4")):
        create_dit("DiT-T/4", input_size=30)


def test_bad_architecture_numbers():
    with pytest.raises(LatentDiTError, match="model.num_heads: expected a divisor of model.hidden_size 130, got 4"):
        create_dit("DiT-T/2", hidden_size=130)
    with pytest.raises(LatentDiTError, match=re.escape("model.class_dropout_prob: expected a probability in [0, 1), got 1.5")):
        create_dit("DiT-T/2", class_dropout_prob=1.5)
    with pytest.raises(LatentDiTError, match="model.num_classes: expected an integer >= 1, got 0"):
        create_dit("DiT-T/2", num_classes=0)


def test_class_ids_out_of_range_are_named():
    model = tiny()
    x, t = inputs()
    with pytest.raises(LatentDiTError, match=r"class ids out of range: \[-1, 11\].*null id 10"):
        model(x, t, torch.tensor([-1, 11, 3]))
    no_null = tiny(class_dropout_prob=0.0)
    with pytest.raises(LatentDiTError, match=r"class ids out of range: \[10\].*no null class row"):
        no_null(x, t, torch.tensor([10, 1, 2]))


def test_wrong_input_shapes_are_named():
    model = tiny()
    with pytest.raises(LatentDiTError, match=r"input x must have shape \[N, 4, 8, 8\], got \[2, 4, 16, 16\]"):
        model(torch.zeros(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(LatentDiTError, match=r"timesteps t must be a scalar or have shape \[2\]"):
        model(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    with pytest.raises(LatentDiTError, match="class labels y must be an integer tensor"):
        model(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------------
# block options: rmsnorm, swiglu, rope2d, qk_norm
# ---------------------------------------------------------------------------------------------------

ALL_OPTIONS = dict(norm="rmsnorm", mlp="swiglu", pos="rope2d", qk_norm=True)
OPTION_SETS = [{}, dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(pos="rope2d"), dict(qk_norm=True), ALL_OPTIONS]


def rotate_2d(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Rotary embedding written out with complex numbers: heads ``x [N, H, T, d]`` of row-major tokens on a
    grid×grid; channel pairs (2j, 2j+1) turn by row·f_j for j < d/4 and by col·f_(j−d/4) after, f_j = 10000^(−j/(d/4))."""
    d = x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    rows = torch.arange(grid * grid) // grid
    cols = torch.arange(grid * grid) % grid
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # [T, d/2]
    turned = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous()) * torch.polar(
        torch.ones_like(angles), angles)
    return torch.view_as_real(turned).reshape(x.shape).to(x.dtype)


def reference_forward(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The DiT forward (paper blocks and every option) written out with plain torch ops from the state dict."""
    F = torch.nn.functional
    sd, opts = model.state_dict(), model.config
    n, p, g, dim, heads = x.shape[0], model.patch_size, model.grid_size, model.hidden_size, model.num_heads

    def lin(z, name):
        return F.linear(z, sd[name + ".weight"], sd[name + ".bias"])

    def norm(z):
        if opts["norm"] == "rmsnorm":
            return z * torch.rsqrt(z.square().mean(-1, keepdim=True) + 1e-6)
        return F.layer_norm(z, (dim,), eps=1e-6)

    def head_norm(z, name):
        return z * torch.rsqrt(z.square().mean(-1, keepdim=True) + 1e-6) * sd[name]

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    if opts["pos"] == "sincos":
        h = h + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    temb = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    for i in range(opts["depth"]):
        b = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = norm(h) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(n, g * g, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        if opts["qk_norm"]:
            q, k = head_norm(q, b + "attn.q_norm.weight"), head_norm(k, b + "attn.k_norm.weight")
        if opts["pos"] == "rope2d":
            q, k = rotate_2d(q, g), rotate_2d(k, g)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(dim // heads)).softmax(-1) @ v
        h = h + gate1[:, None] * lin(att.transpose(1, 2).reshape(n, g * g, dim), b + "attn.proj")
        a = norm(h) * (1 + scale2[:, None]) + shift2[:, None]
        if opts["mlp"] == "swiglu":
            m = lin(F.silu(lin(a, b + "mlp.fc1_g")) * lin(a, b + "mlp.fc1_x"), b + "mlp.fc2")
        else:
            m = lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + gate2[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(norm(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    cout = model.out_channels
    out = out.reshape(n, g, g, p, p, cout).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, cout, g * p, g * p)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()) or "paper")
def test_forward_matches_the_written_out_reference(options):
    model = randomize(tiny(**options)).eval()
    x, t = inputs()
    y = torch.tensor([1, 2, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(model, x, t, y), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("options", OPTION_SETS[1:], ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_each_option_changes_the_forward(options):
    paper = randomize(tiny()).eval()
    model = randomize(tiny(**options), seed=1).eval()
    own = model.state_dict()
    shared = {k: v for k, v in paper.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)  # same weights wherever the architectures agree
    assert model.block_options == options and paper.block_options == {}
    x, t = inputs()
    y = torch.tensor([1, 2, 10])
    with torch.no_grad():
        assert (model(x, t, y) - paper(x, t, y)).abs().max() > 1e-3
    assert ("pos_embed" in model.state_dict()) == (options.get("pos", "sincos") == "sincos")


def test_rope2d_attention_scores_depend_only_on_relative_offsets():
    from timm.layers import apply_rot_embed_cat

    model = tiny(pos="rope2d", input_size=12)  # 6×6 tokens, head size 32
    table = model.rope(torch.device("cpu"))
    g = model.grid_size
    assert table.shape == (g * g, 2 * 32)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 32, generator=gen)
    # the same query and key content at every token: scores may only vary with the positions
    scores = apply_rot_embed_cat(q.expand(g * g, 32), table) @ apply_rot_embed_cat(k.expand(g * g, 32), table).T
    by_offset: dict[tuple[int, int], float] = {}
    for i in range(g * g):
        for j in range(g * g):
            offset = (j // g - i // g, j % g - i % g)
            by_offset.setdefault(offset, float(scores[i, j]))
            assert float(scores[i, j]) == pytest.approx(by_offset[offset], abs=1e-4), (i, j)
    assert len(by_offset) == (2 * g - 1) ** 2
    assert len({round(v, 3) for v in by_offset.values()}) > 0.9 * len(by_offset)  # and they do vary with the offset


def test_all_options_round_trip_through_save_and_load(tmp_path):
    from latentdit.models import load_dit, save_dit

    model = randomize(tiny(**ALL_OPTIONS))
    save_dit(model, tmp_path / "m.safetensors")
    loaded = load_dit(tmp_path / "m.safetensors")
    assert loaded.config == model.config and loaded.block_options == ALL_OPTIONS
    x, t = inputs()
    y = torch.tensor([1, 2, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_all_options_model_samples_through_the_sample_tool(tmp_path, capsys):
    from PIL import Image

    from sampling_helpers import make_tiny_vae_dir, run_sample_tool, save_our_checkpoint

    model = randomize(create_dit("DiT-T/2", input_size=8, num_classes=4, **ALL_OPTIONS))
    ckpt = save_our_checkpoint(model, tmp_path / "ema.safetensors", vae=str(make_tiny_vae_dir(tmp_path / "vae")))
    code = run_sample_tool(["--ckpt", str(ckpt), "--labels", "0,3", "--samples-per-label", "2", "--num-steps", "3",
                            "--device", "cpu", "--out", str(tmp_path / "grid.png"),
                            "--save-individual", str(tmp_path / "ind")])
    assert code == 0, capsys.readouterr().err
    images = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "ind").iterdir())]
    assert len(images) == 4 and images[0].shape == (16, 16, 3)


def test_bad_block_options_are_named():
    with pytest.raises(LatentDiTError, match="model.norm: expected one of layernorm, rmsnorm, got 'batchnorm'"):
        tiny(norm="batchnorm")
    with pytest.raises(LatentDiTError, match="model.pos: expected one of sincos, rope2d"):
        tiny(pos="rope")
    with pytest.raises(LatentDiTError, match="model.qk_norm: expected true or false"):
        tiny(qk_norm="yes")
    with pytest.raises(LatentDiTError, match=r"model.pos: rope2d needs a head size .* = 6\) divisible by 4"):
        tiny(pos="rope2d", hidden_size=24)
