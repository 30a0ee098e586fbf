"""DiT checkpoint conversion: TP split/merge and import/merge/export round trips are bit-exact;
strict-load errors name the keys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from osp.common.cli import app
from osp.stage2_train.checkpoint import load_dit, load_dit_checkpoint
from osp.stage2_train.state_dict_adapter import (
    DIFFUSERS_WEIGHTS,
    merge_state_dicts,
    save_dit_checkpoint,
    split_state_dict,
    tp_split_dim,
)
from osp.common.models.dit import build_dit, get_dit_config


def tiny_sd(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return {k: v.to(dtype) for k, v in build_dit("tiny").state_dict().items()}


def write_diffusers(folder, sd, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    d["_diffusers_version"] = "0.28.0"  # an unknown key, as in the released files
    (folder / "config.json").write_text(json.dumps(d))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / DIFFUSERS_WEIGHTS))


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_key_rules():
    assert tp_split_dim("transformer_blocks.3.attn1.to_q.weight") == 0
    assert tp_split_dim("transformer_blocks.3.attn2.to_v.bias") == 0
    assert tp_split_dim("transformer_blocks.0.ff.net.0.proj.bias") == 0
    assert tp_split_dim("transformer_blocks.3.attn2.to_out.0.weight") == 1
    assert tp_split_dim("transformer_blocks.3.ff.net.2.weight") == 1
    for k in (
        "transformer_blocks.3.attn1.to_out.0.bias",
        "transformer_blocks.3.ff.net.2.bias",
        "transformer_blocks.1.scale_shift_table",
        "proj_out.weight",
        "adaln_single.linear.weight",
    ):
        assert tp_split_dim(k) is None, k


def test_split_merge_bit_exact():
    sd = tiny_sd()
    for tp in (1, 2):
        shards = split_state_dict(sd, tp, get_dit_config("tiny"))
        assert len(shards) == tp
        assert shards[-1]["transformer_blocks.0.attn1.to_q.weight"].shape == (48 // tp, 48)
        assert shards[-1]["transformer_blocks.0.ff.net.2.weight"].shape == (48, 192 // tp)
        assert_bit_equal(merge_state_dicts(shards), sd)
    with pytest.raises(ValueError, match="num_attention_heads=2"):
        split_state_dict(sd, 4, get_dit_config("tiny"))
    bad = split_state_dict(sd, 2)
    bad[1] = {**bad[1], "proj_out.bias": bad[1]["proj_out.bias"] + 1}
    with pytest.raises(ValueError, match="proj_out.bias differs"):
        merge_state_dicts(bad)


def test_import_merge_export_round_trip(tmp_path):
    cfg = get_dit_config("tiny")  # with the 720p RoPE scales
    cfg.interpolation_scale_h, cfg.interpolation_scale_w = 1.5, 2.0
    sd = tiny_sd(1, torch.bfloat16)  # dtype is kept as is
    write_diffusers(tmp_path / "released", sd, cfg)

    runner = CliRunner()
    r = runner.invoke(app, ["convert", "import", str(tmp_path / "released"), str(tmp_path / "tp2"), "--tp", "2"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "tp2" / "osp_checkpoint.json").read_text())
    assert (meta["format"], meta["version"], meta["tp"], meta["ema"]) == ("osp-dit", 1, 2, False)
    shard1 = load_file(str(tmp_path / "tp2" / "model-tp01-of-02.safetensors"))
    assert shard1["transformer_blocks.1.attn2.to_k.weight"].shape == (24, 48)
    r = runner.invoke(app, ["convert", "merge", str(tmp_path / "tp2"), str(tmp_path / "tp1")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["convert", "export", str(tmp_path / "tp1"), str(tmp_path / "exported")])
    assert r.exit_code == 0, r.output

    assert_bit_equal(load_file(str(tmp_path / "exported" / DIFFUSERS_WEIGHTS)), sd)
    cfg2, sd2 = load_dit_checkpoint(tmp_path / "tp2")  # TP shards merged on the fly
    assert cfg2 == cfg
    assert_bit_equal(sd2, sd)
    model = load_dit(tmp_path / "exported")  # released layout loads strictly into the model
    assert model.config.interpolation_scales == (1.0, 1.5, 2.0)
    assert_bit_equal({k: v.bfloat16() for k, v in model.state_dict().items()}, sd)


def test_ema_preferred_and_extra(tmp_path):
    cfg = get_dit_config("tiny")
    model_sd, ema_sd = tiny_sd(2), tiny_sd(3)
    save_dit_checkpoint(
        tmp_path / "c", split_state_dict(model_sd, 2), cfg, split_state_dict(ema_sd, 2), extra={"step": 7}
    )
    assert_bit_equal(load_dit_checkpoint(tmp_path / "c")[1], ema_sd)
    assert_bit_equal(load_dit_checkpoint(tmp_path / "c", prefer_ema=False)[1], model_sd)
    assert json.loads((tmp_path / "c" / "osp_checkpoint.json").read_text())["extra"] == {"step": 7}


def test_strict_errors_name_the_keys(tmp_path):
    cfg = get_dit_config("tiny")
    sd = tiny_sd()
    sd.pop("transformer_blocks.1.attn1.to_k.bias")
    sd["transformer_blocks.1.attn1.norm_q.weight"] = torch.ones(48)
    write_diffusers(tmp_path / "bad", sd, cfg)
    r = CliRunner().invoke(app, ["convert", "import", str(tmp_path / "bad"), str(tmp_path / "out")])
    assert r.exit_code != 0
    with pytest.raises(ValueError) as e:
        load_dit(tmp_path / "bad")
    msg = str(e.value)
    assert "missing keys: transformer_blocks.1.attn1.to_k.bias" in msg
    assert "unexpected keys: transformer_blocks.1.attn1.norm_q.weight" in msg
    with pytest.raises(FileNotFoundError, match="neither an osp DiT checkpoint"):
        load_dit_checkpoint(tmp_path)
