"""LoRA adapters (osp.stage2_train.lora): gradients under TP / SP / CP equal TP=1 (tests/lora_worker.py),
zero-B start, merge, bad input, the peft layout."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tp_worker import make_inputs, randomize, rel_err  # noqa: E402

from osp.common.models.dit import build_dit, get_dit_config  # noqa: E402
from osp.stage2_train.lora import (  # noqa: E402
    LoraError,
    LoraSpec,
    adapter_state,
    apply_lora,
    check_base,
    init_adapters,
    load_adapters,
    merge_state_dict,
    read_peft,
    write_peft,
)
from osp.stage2_train.state_dict_adapter import tensor_shapes  # noqa: E402

TOL = 1e-5  # the TP parity tolerance (fp32, max|a - b| / max|b| per tensor)


# ------------------------------------------------------------------------------------------------
# parity under every layout (one 4-process launch)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lora") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    worker = Path(__file__).with_name("lora_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "tp2_sp_cp2", "tp2_cp2"])
def test_adapter_grads_match_tp1(parity, layout):
    r = parity[layout]
    assert r["n"] == parity["tp1"]["n"] == 40  # 2 blocks x 10 linears x (A, B)
    assert r["out"] < TOL and r["grad"] < TOL, r
    assert r["all_frozen_ok"], r  # base params frozen (no grad), exactly the adapters trainable, on every rank
    assert parity["tp1"]["frozen_base_has_no_grad"]


@pytest.mark.dist
def test_negative_controls_fail(parity):
    wrong = parity["tp2_sp_wrong_b"]  # B of the column-parallel layers split the wrong way round
    assert wrong["out"] > 0.1 and wrong["grad"] > 0.1, wrong
    nosum = parity["tp2_sp_no_sp_sum"]  # forward right, the replicated factors' SP grads left partial
    assert nosum["out"] < TOL and nosum["grad"] > 0.1, nosum


# ------------------------------------------------------------------------------------------------
# one process
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = get_dit_config("tiny")
    base = build_dit(cfg)
    randomize(base, 11)
    return cfg, base, make_inputs(cfg, 7, (5, 7), 12)


def _forward(model, inputs):
    x, t, text, mask, _ = inputs
    return model(x, t, text, mask)


def test_zero_b_first_forward_is_the_base_exactly(tiny):
    cfg, base, inputs = tiny
    m = apply_lora(copy.deepcopy(base), LoraSpec(4, 8.0, base_dtype="fp32"))
    init_adapters(m, 0)
    assert all(float(v.abs().sum()) == 0 for k, v in adapter_state(m).items() if "lora_B" in k)
    assert all(float(v.abs().sum()) > 0 for k, v in adapter_state(m).items() if "lora_A" in k)
    with torch.no_grad():
        assert torch.equal(_forward(m, inputs), _forward(base, inputs))


def test_bf16_base_is_frozen_and_adapters_fp32(tiny):
    cfg, base, inputs = tiny
    m = apply_lora(copy.deepcopy(base), LoraSpec(4, 4.0))
    for n, p in m.named_parameters():
        lora = ".lora_" in n
        assert p.requires_grad == lora, n
        assert p.dtype == (torch.float32 if lora else torch.bfloat16), n


def _train(model, inputs, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t, text, mask, w = inputs
    for _ in range(steps):
        opt.zero_grad()
        (model(x, t, text, mask) * w).sum().backward()
        opt.step()


def test_merged_forward_equals_base_plus_adapter(tiny):
    """After training (B no longer zero), W + s B A folded in gives the adapter forward within 1e-5."""
    cfg, base, inputs = tiny
    spec = LoraSpec(4, 8.0, base_dtype="fp32")
    m = apply_lora(copy.deepcopy(base), spec)
    init_adapters(m, 0)
    _train(m, inputs)
    adapters = adapter_state(m)
    assert all(float(v.abs().max()) > 1e-4 for k, v in adapters.items() if "lora_B" in k)
    merged = build_dit(cfg)
    merged.load_state_dict(merge_state_dict(base.state_dict(), adapters, spec.scale), strict=True)
    with torch.no_grad():
        a, b, ref = _forward(merged, inputs), _forward(m, inputs), _forward(base, inputs)
    assert rel_err(a, b) < 1e-5
    assert rel_err(ref, b) > 1e-3  # the adapters changed the model: the comparison is not trivial


def test_only_the_selected_layers_are_adapted(tiny):
    cfg, base, inputs = tiny
    m = apply_lora(
        copy.deepcopy(base), LoraSpec(2, 2.0, targets=("attn2.to_k", "transformer_blocks.1.ff.*"), base_dtype="fp32")
    )
    names = sorted({k.rsplit(".lora_", 1)[0] for k in adapter_state(m)})
    assert names == [
        "transformer_blocks.0.attn2.to_k",
        "transformer_blocks.1.attn2.to_k",
        "transformer_blocks.1.ff.net.0.proj",
        "transformer_blocks.1.ff.net.2",
    ]
    # a fused group with one adapted member (attn2 k of the k/v GEMM) stays correct
    init_adapters(m, 1)
    _train(m, inputs, 2)
    merged = build_dit(cfg)
    merged.load_state_dict(merge_state_dict(base.state_dict(), adapter_state(m), 1.0))
    with torch.no_grad():
        assert rel_err(_forward(merged, inputs), _forward(m, inputs)) < 1e-5


@pytest.mark.parametrize(
    "spec, message",
    [
        (LoraSpec(4, 4.0, targets=("to_qq",)), "'to_qq' matches no layer; available layers"),
        (LoraSpec(0, 4.0), "lora.rank=0 does not fit"),
        (LoraSpec(49, 4.0), "lora.rank=49 does not fit transformer_blocks.0.attn1.to_q (48 -> 48)"),
    ],
)
def test_bad_settings_are_one_line(tiny, spec, message):
    with pytest.raises(LoraError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        apply_lora(build_dit("tiny", device="meta"), spec)
    assert "\n" not in str(e.value)
    if "matches no layer" in message:
        assert "attn1.to_q" in str(e.value) and "ff.net.2" in str(e.value)


def test_adapters_of_another_base_are_refused(tiny):
    cfg, base, _ = tiny
    other = get_dit_config("tiny")
    other.num_attention_heads, other.attention_head_dim, other.cross_attention_dim = 2, 30, 60  # D 60
    theirs = apply_lora(build_dit(other), LoraSpec(4, 4.0))
    with pytest.raises(LoraError, match=r"transformer_blocks\.0\.attn1\.to_k\.lora_A\.weight has shape \(4, 60\)") as e:
        check_base(adapter_state(theirs), tensor_shapes(base), "adapters/")
    assert "\n" not in str(e.value)
    mine = apply_lora(copy.deepcopy(base), LoraSpec(4, 4.0))
    with pytest.raises(LoraError, match="lora_A.weight has shape"):
        load_adapters(mine, adapter_state(theirs), "adapters/")
    assert check_base(adapter_state(mine), tensor_shapes(base), "adapters/") == 4


def test_peft_layout_round_trip_and_peft_merges_the_same(tiny, tmp_path):
    """The --lora-only layout: osp reads it back exactly, and peft itself loads it onto the plain DiT
    and merges it into the same weights as osp's merge."""
    cfg, base, inputs = tiny
    spec = LoraSpec(4, 8.0, base_dtype="fp32")
    m = apply_lora(copy.deepcopy(base), spec)
    init_adapters(m, 3)
    _train(m, inputs, 2)
    adapters = adapter_state(m)
    write_peft(tmp_path / "a", adapters, spec, "base/")
    spec2, back = read_peft(tmp_path / "a")
    assert (spec2.rank, spec2.alpha) == (4, 8.0)
    assert set(back) == set(adapters) and all(torch.equal(back[k], adapters[k]) for k in adapters)

    peft = pytest.importorskip("peft")
    plain = copy.deepcopy(base)
    merged_by_peft = peft.PeftModel.from_pretrained(plain, str(tmp_path / "a")).merge_and_unload().state_dict()
    ours = merge_state_dict(base.state_dict(), adapters, spec.scale)
    assert set(merged_by_peft) == set(ours)
    for k, v in ours.items():
        assert torch.allclose(merged_by_peft[k].float(), v, atol=1e-6, rtol=1e-6), k
