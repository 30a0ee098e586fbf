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


# ------------------------------------------------------------------------------------------------
# real trainings: adapter-only checkpoints, exact resume, export, sampling
# ------------------------------------------------------------------------------------------------
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _write_base(folder: Path) -> Path:
    """A random tiny DiT as a released-layout (diffusers) folder: the LoRA runs' model.init."""
    from osp.stage2_train.state_dict_adapter import DIFFUSERS_WEIGHTS, save_tensors

    torch.manual_seed(5)
    dit = build_dit("tiny")
    folder.mkdir(parents=True)
    dit.config.to_json(folder / "config.json")
    save_tensors(dit.state_dict(), folder / DIFFUSERS_WEIGHTS)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from train_helpers import free_port, make_shards

    root = tmp_path_factory.mktemp("lora_train")
    shards = make_shards(root / "shards", n=8)
    base = _write_base(root / "base")
    out = root / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += [str(Path(__file__).with_name("lora_worker.py")), "train", str(shards), str(base), str(out)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return {"root": root, "base": base, "runs": out, "r": json.loads((out / "results.json").read_text())}


def _state_bytes(d: Path) -> int:
    from osp.stage2_train.checkpoint import saved_keys

    keys = saved_keys(d).items()
    return sum(
        m.size.numel() * m.properties.dtype.itemsize for k, m in keys if k.startswith(("model.", "ema.", "optim."))
    )


def _folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


@pytest.mark.dist
def test_only_adapters_reach_the_optimizer_and_ema(trained):
    r = trained["r"]["lora"]
    assert r["optimized"] == r["trainable"] == r["ema"]
    assert len(r["optimized"]) == 40 and all(".lora_" in n for n in r["optimized"])
    assert r["base_dtypes"] == ["torch.bfloat16"]  # the frozen base in bf16
    assert len(trained["r"]["full"]["optimized"]) == 57


@pytest.mark.dist
def test_adapter_checkpoint_is_small_and_resume_is_exact(trained):
    from osp.stage2_train.checkpoint import saved_keys

    runs, r = trained["runs"], trained["r"]
    lora_ckpt = runs / "lora" / "checkpoints" / "step-0000004"
    full_ckpt = runs / "full" / "checkpoints" / "step-0000001"
    keys = saved_keys(lora_ckpt)
    assert not [k for k in keys if k.startswith(("model.", "ema.", "optim.")) and ".lora_" not in k]  # no base
    # the state the checkpoints hold (tensor bytes of the DCP entries): adapters only vs model + EMA + AdamW
    ratio = _state_bytes(lora_ckpt) / _state_bytes(full_ckpt)
    assert ratio < 0.05, ratio
    # the files: at the tiny preset's 100 kB of weights DCP's per-tensor framing dominates (about 1 kB for
    # each of the 200 adapter entries of a rank); bench/lora_size.py gives the ratio at osp12 width
    assert _folder_bytes(lora_ckpt) < 0.3 * _folder_bytes(full_ckpt)
    # resume at the same layout: the same losses as the uninterrupted run; at TP=1 within fp32 reordering
    assert r["lora_resume"]["losses"] == r["lora"]["losses"][2:]
    np_close = [abs(a - b) / abs(b) for a, b in zip(r["lora_resume_tp1"]["losses"], r["lora"]["losses"][2:])]
    assert max(np_close) < 1e-4, (r["lora_resume_tp1"]["losses"], r["lora"]["losses"])
    assert r["lora"]["losses"][0] != r["lora"]["losses"][-1]


@pytest.mark.dist
def test_merged_export_equals_the_adapter_forward(trained, tmp_path):
    from osp.stage2_train.checkpoint import convert_export, load_dit, open_adapters
    from osp.stage2_train.lora import attach

    run = trained["runs"] / "lora"
    merged = convert_export(run, tmp_path / "merged", merge_lora=True)
    only = convert_export(run, tmp_path / "adapter", lora_only=True)
    a = open_adapters(run)
    assert a.base == str(trained["base"]) and a.spec.rank == 1
    assert any(float(v.abs().max()) > 0 for k, v in a.tensors.items() if "lora_B" in k)  # trained
    cfg = get_dit_config("tiny")
    inputs = make_inputs(cfg, 7, (5, 7), 13)
    with torch.no_grad():
        got = _forward(load_dit(merged), inputs)
        want = _forward(attach(load_dit(trained["base"]), a.spec, a.tensors, 1.0, "run"), inputs)
        plain = _forward(load_dit(trained["base"]), inputs)
        b = open_adapters(only)  # the peft-layout folder gives the same adapters
        again = _forward(attach(load_dit(trained["base"]), b.spec, b.tensors, 1.0, "export"), inputs)
    assert rel_err(got, want) < 1e-5
    assert rel_err(plain, want) > 1e-4  # the adapters matter
    assert torch.equal(again, want)


@pytest.mark.dist
def test_sample_with_lora_equals_sampling_the_merged_export(trained, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from osp.common.cli import app
    from osp.common.demo_models import write_demo_models

    info = write_demo_models(tmp_path / "models", seed=0)
    run = trained["runs"] / "lora"
    merged = tmp_path / "merged"
    assert CliRunner().invoke(app, ["convert", "export", str(run), str(merged), "--merge-lora"]).exit_code == 0
    monkeypatch.setenv("OSP_SAMPLE_DUMP_LATENTS", "1")
    common = ["--vae", info["vae"], "--text-encoder", info["text_encoder"], "--prompt", "a red ball", "--steps", "3"]
    common += ["--device", "cpu", "--seed", "3"]

    def sample(out, *args):
        res = CliRunner().invoke(app, ["sample", *map(str, args), *common, "--out", str(out)])
        assert res.exit_code == 0, res.output
        (f,) = out.glob("*.latents.safetensors")
        return load_file(str(f))["latents"], json.loads(next(out.glob("*.json")).read_text())

    lat_lora, side = sample(tmp_path / "s_lora", "--checkpoint", trained["base"], "--lora", run)
    lat_merged, _ = sample(tmp_path / "s_merged", "--checkpoint", merged)
    lat_base, _ = sample(tmp_path / "s_base", "--checkpoint", trained["base"])
    torch.testing.assert_close(lat_lora, lat_merged, atol=1e-3, rtol=1e-3)
    assert float((lat_lora - lat_base).abs().max()) > 1e-2  # the adapters change the sample
    assert side["identity"]["lora"] == {"path": str(run), "scale": 1.0}
    # scale 0: the base model's sample
    lat_zero, _ = sample(tmp_path / "s_zero", "--checkpoint", trained["base"], "--lora", run, "--lora-scale", "0")
    torch.testing.assert_close(lat_zero, lat_base, atol=1e-5, rtol=1e-5)


@pytest.mark.dist
def test_lora_checkpoint_without_its_base_is_one_line(trained, tmp_path):
    from typer.testing import CliRunner

    from osp.common.cli import app

    run = trained["runs"] / "lora"
    step = run / "checkpoints" / "step-0000004"
    res = CliRunner().invoke(app, ["convert", "export", str(step), str(tmp_path / "x")])
    assert res.exit_code == 1 and "holds LoRA adapters only" in res.output and "--merge-lora" in res.output
    other = tmp_path / "other"
    cfg = get_dit_config("tiny")
    cfg.num_attention_heads, cfg.attention_head_dim, cfg.cross_attention_dim = 2, 30, 60
    from osp.stage2_train.state_dict_adapter import DIFFUSERS_WEIGHTS, save_tensors

    other.mkdir()
    cfg.to_json(other / "config.json")
    save_tensors(build_dit(cfg).state_dict(), other / DIFFUSERS_WEIGHTS)
    res = CliRunner().invoke(
        app, ["convert", "export", str(run), str(tmp_path / "y"), "--merge-lora", "--base", str(other)]
    )
    assert res.exit_code == 1 and "lora_A.weight has shape" in res.output, res.output
    assert res.output.count("\n") == 1


def test_dry_run_counts_a_frozen_bf16_base_and_adapter_state_only():
    import warnings

    from osp.stage2_train import dryrun as DR

    cfg = DR.build_config(None, ["lora.enabled=true", "lora.rank=4", "optim.ema_decay=0.99"], "tiny", 1, None, "full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = DR.dry_run(cfg, 1, 0, 80.0)
    n = 2 * (8 * 4 * (48 + 48) + 2 * 4 * (48 + 192))  # 2 blocks: 8 attention linears + 2 FFN linears, rank 4
    assert r.params == 111520 * 2 + n * 4  # bf16 base + fp32 adapters
    assert r.grads == r.ema == n * 4 and r.optimizer == 2 * n * 4
    assert 4 * n * 4 <= r.checkpoint_state < 4 * n * 4 + 1024  # adapters, their EMA, m, v (+ AdamW step counters)
    assert f"rank 4, {n:,} trainable adapter parameters" in r.table() and "base frozen in bfloat16" in r.table()
