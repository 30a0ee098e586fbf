"""OpenSoraT2V: released key/shape table (meta device), RoPE closed form, masks, patchify, presets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from osp.common.models.dit import DIT_PRESETS, DiTConfig, build_dit, get_dit_config, timestep_sinusoid
from osp.common.models.rope import RopeTable, apply_rope, rope_angles

# Transcribed from the released diffusion_pytorch_model.safetensors key list (D = 2304, FFN 9216, text 4096,
# 32 blocks); independent of the model code.
D, F, TXT = 2304, 9216, 4096
BLOCK_TABLE = {
    "scale_shift_table": (6, D),
    **{f"{a}.{p}.weight": (D, D) for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")},
    **{f"{a}.{p}.bias": (D,) for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "ff.net.0.proj.weight": (F, D),
    "ff.net.0.proj.bias": (F,),
    "ff.net.2.weight": (D, F),
    "ff.net.2.bias": (D,),
}
GLOBAL_TABLE = {
    "pos_embed.proj.weight": (D, 4, 2, 2),
    "pos_embed.proj.bias": (D,),
    "adaln_single.emb.timestep_embedder.linear_1.weight": (D, 256),
    "adaln_single.emb.timestep_embedder.linear_1.bias": (D,),
    "adaln_single.emb.timestep_embedder.linear_2.weight": (D, D),
    "adaln_single.emb.timestep_embedder.linear_2.bias": (D,),
    "adaln_single.linear.weight": (6 * D, D),
    "adaln_single.linear.bias": (6 * D,),
    "caption_projection.linear_1.weight": (D, TXT),
    "caption_projection.linear_1.bias": (D,),
    "caption_projection.linear_2.weight": (D, D),
    "caption_projection.linear_2.bias": (D,),
    "scale_shift_table": (2, D),
    "proj_out.weight": (16, D),
    "proj_out.bias": (16,),
}


def released_table() -> dict[str, tuple[int, ...]]:
    t = dict(GLOBAL_TABLE)
    for i in range(32):
        t.update({f"transformer_blocks.{i}.{k}": v for k, v in BLOCK_TABLE.items()})
    return t


@pytest.mark.parametrize("preset", ["osp12-29x480p", "osp12-93x480p", "osp12-93x720p"])
def test_real_presets_match_released_keys(preset):
    model = build_dit(preset, device="meta")
    sd = model.state_dict()
    table = released_table()
    assert {k: tuple(v.shape) for k, v in sd.items()} == table
    assert len(sd) == 687
    assert sum(v.numel() for v in sd.values()) == 2_771_907_856
    assert list(model.buffers()) == []  # no positional buffers


def test_preset_values_and_config_json(tmp_path):
    assert DIT_PRESETS["osp12-29x480p"].interpolation_scales == (1.0, 1.0, 1.0)
    assert DIT_PRESETS["osp12-93x480p"].sample_size_t == 24
    c720 = DIT_PRESETS["osp12-93x720p"]
    assert (c720.sample_size, c720.sample_size_t, c720.interpolation_scales) == ([90, 160], 24, (1.0, 1.5, 2.0))
    tiny = DIT_PRESETS["tiny"]
    assert (tiny.inner_dim, tiny.caption_channels, tiny.attention_head_dim % 6) == (48, 64, 0)
    # a diffusers config.json with extra keys loads; its scales win over any preset
    cfg = {
        **c720.to_dict(),
        "interpolation_scale_h": 1.25,
        "attention_mode": "xformers",
        "_diffusers_version": "0.28.0",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = DiTConfig.from_json(tmp_path)
    assert loaded.interpolation_scales == (1.0, 1.25, 2.0)
    # null scales fall back to upstream's formula
    assert DiTConfig(
        sample_size=[90, 160],
        sample_size_t=24,
        interpolation_scale_t=None,
        interpolation_scale_h=None,
        interpolation_scale_w=None,
    ).interpolation_scales == (1.5, 3.0, 4.0)
    with pytest.raises(ValueError, match="norm_type"):
        DiTConfig(norm_type="layer_norm")
    with pytest.raises(ValueError, match="unknown DiT preset"):
        get_dit_config("nope")


def test_rope_closed_form_at_known_position():
    grid, hd, scales = (5, 6, 8), 96, (1.0, 1.5, 2.0)
    t, y, x = 3, 5, 7
    s = (t * grid[1] + y) * grid[2] + x  # time-major token index
    v = torch.randn(1, 1, math.prod(grid), hd, dtype=torch.float64)
    out = apply_rope(v, RopeTable(rope_angles(grid, hd, scales).double()))[0, 0, s]
    # closed form: in chunk c, dims (j, j+16) form a complex number rotated by (p_c / s_c) * 1e4^(-2j/32)
    expect = torch.empty(hd, dtype=torch.float64)
    for c, (p, sc) in enumerate(zip((t, y, x), scales)):
        for j in range(16):
            ang = (p / sc) * 10000.0 ** (-2 * j / 32)
            z = complex(v[0, 0, s, 32 * c + j], v[0, 0, s, 32 * c + 16 + j]) * complex(math.cos(ang), math.sin(ang))
            expect[32 * c + j], expect[32 * c + 16 + j] = z.real, z.imag
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)


def test_rope_cache_quirk_switch_and_bf16_angles():
    scales = (1.0, 1.5, 2.0)
    fixed = rope_angles((3, 4, 4), 24, scales)  # H' == W': the quirk would give x the y scale
    quirk = rope_angles((3, 4, 4), 24, scales, quirk_table_cache=True)
    w = slice(16, 24)
    assert torch.equal(quirk[:, 8:16], fixed[:, 8:16])
    assert not torch.allclose(quirk[:, w], fixed[:, w])
    # quirk: x row of token (t, y, x) equals the y table at index x
    ytab = fixed.view(3, 4, 4, 24)[0, :, 0, 8:16]  # y table (scale 1.5) rows y = 0..3
    assert torch.equal(quirk.view(3, 4, 4, 24)[1, 2, :, 16:24], ytab)
    # distinct lengths: quirk has no effect (all released geometries)
    assert torch.equal(
        rope_angles((24, 30, 40), 96, scales, quirk_table_cache=True), rope_angles((24, 30, 40), 96, scales)
    )
    # cos/sin are evaluated in fp32 once, then cast to the activation dtype (same numbers at every TP size)
    table = RopeTable(fixed)
    cos, sin = table.cos_sin(torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, fixed.cos().bfloat16())
    assert not torch.equal(cos, fixed.bfloat16().cos())  # upstream's bf16-angle order differs


def test_fused_rope_equals_reference_form_and_its_gradient():
    """The one-op RoPE (signed sin table, swap) equals x*cos + rot(x)*sin bit for bit in fp32, and its
    hand-written backward equals autograd through the reference form."""
    from osp.common.models.rope import rotate_half_3d

    angles = rope_angles((3, 4, 5), 24, (1.0, 1.5, 2.0))
    x = torch.randn(2, 3, 60, 24, requires_grad=True)
    g = torch.randn(2, 3, 60, 24)
    ref = x * angles.cos() + rotate_half_3d(x) * angles.sin()
    (gref,) = torch.autograd.grad(ref, x, g)
    out = apply_rope(x, RopeTable(angles))
    (gout,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gout, gref, rtol=0, atol=1e-6)


def test_timestep_embedding_cos_first():
    e = timestep_sinusoid(torch.tensor([0.0, 5.0]))
    assert e.shape == (2, 256)
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))
    torch.testing.assert_close(e[1, 0], torch.tensor(math.cos(5.0)))
    torch.testing.assert_close(e[1, 128], torch.tensor(math.sin(5.0)))
    torch.testing.assert_close(e[1, 1], torch.tensor(math.cos(5.0 * math.exp(-math.log(1e4) / 128))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = build_dit("tiny").eval()
    with torch.no_grad():  # non-zero tables / output layer so every path matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def inputs(b=2, l=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 3, 8, 8, generator=g)
    t = torch.tensor([3.0, 901.25][:b])
    text = torch.randn(b, l, 64, generator=g)
    mask = torch.ones(b, l)
    mask[0, 4:] = 0
    if b > 1:
        mask[1, 7:] = 0
    return x, t, text, mask


def test_text_mask_invariance(tiny):
    x, t, text, mask = inputs()
    with torch.no_grad():
        a = tiny(x, t, text, mask)
        text2 = torch.where(mask[..., None] > 0, text, torch.randn_like(text) * 100)
        b = tiny(x, t, text2, mask)
        c = tiny(x, t, text2, torch.ones_like(mask))
    assert torch.equal(a, b)  # padded tokens get exactly zero attention weight in fp32
    assert not torch.allclose(a, c)  # and the mask does act


def test_batch_independence_and_video_mask(tiny):
    """Each sample's output is independent of its batch mates (catches a [B,6D] -> [6,B,D] reshape)."""
    x, t, text, mask = inputs()
    with torch.no_grad():
        both = tiny(x, t, text, mask)
        one = tiny(x[1:], t[1:], text[1:], mask[1:])
        ones = tiny(x, t, text, mask, video_mask=torch.ones(2, 3, 8, 8))
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-6)
    assert torch.equal(both, ones)  # an all-valid video mask is dropped


def test_patchify_unpatchify_identity_and_token_order(tiny):
    x = torch.randn(2, 4, 3, 8, 8)
    b, c, t, h, w = x.shape
    # independent patchify: token (t, y, x) time-major; features in (ph, pw, c) order, c fastest
    tokens = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, -1, 16)
    assert torch.equal(tiny.unpatchify(tokens, (t, h // 2, w // 2)), x)
    # the patch embedding maps token (t, y, x) = (2, 1, 3) to the conv of that patch
    with torch.no_grad():
        emb = tiny.pos_embed(x)
        s = (2 * 4 + 1) * 4 + 3
        patch = x[:, :, 2, 2:4, 6:8]  # [B, C, 2, 2]
        ref = torch.einsum("bchw,dchw->bd", patch, tiny.pos_embed.proj.weight) + tiny.pos_embed.proj.bias
    torch.testing.assert_close(emb[:, s], ref, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_fp32(tiny):
    x, t, text, mask = inputs()
    with torch.no_grad():
        ref = tiny(x, t, text, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(x, t, text, mask)
    assert out.shape == ref.shape
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_gpu_bench_dry_run(tmp_path, capsys):
    """bench/gpu/bench_dit_gpu.py runs end to end at tiny sizes on CPU (so it cannot rot)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "bench_dit_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_dit_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_dit_gpu"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    assert mod.main(["--dry-run", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fwd_bwd_ms"] > 0 and r["matmul_peak_tflops"] > 0 and r["train_tflop"] > 0
    assert 0 < r["bf16_vs_fp32"]["rel_max"] < 0.05 and r["bf16_vs_fp32"]["cosine"] > 0.999
    # the trainer's regime: bf16 activations over fp32 masters, selective recompute, a full optimizer step
    assert (r["precision"], r["checkpointing"], r["dp"]) == ("bfloat16", "selective", 1) and r["step_ms"] > 0
    assert mod.NOMINAL_BF16_TFLOPS["H200 NVL"] == 835.0
    assert next(v for k, v in mod.NOMINAL_BF16_TFLOPS.items() if k in "NVIDIA H200 NVL") == 835.0
    assert "| card |" in capsys.readouterr().out
    # analytic FLOPs of the real 93x480p model: 32 blocks at 28,800 + 512 tokens
    s = mod.Shape(32, 24, 96, 4096, 24, 60, 80, 512, 1)
    S, L, D = 28800, 512, 2304
    block = 2 * S * D * D * (4 + 2 + 8) + 4 * L * D * D + 4 * S * S * D + 4 * S * L * D
    assert abs(mod.model_flops(s)["forward"] / (32 * block) - 1) < 0.01
