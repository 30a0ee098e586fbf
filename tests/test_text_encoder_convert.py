"""`osp convert text-encoder`: a full mT5 folder (encoder + decoder, fp32 .bin, as google/mt5-xxl ships)
-> an encoder-only bf16 safetensors folder that loads memory-mapped and gives the embeddings the full
model gives in bf16; both have one identity, so a text cache made with one is valid with the other."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from osp.common.models.text import (
    CONVERTED_WEIGHTS,
    TextEncoder,
    convert_text_encoder,
    text_encoder_id,
    write_tiny_text_encoder,
)

CAPTIONS = ["a red ball bouncing on a green field", "a cat", "", "camera pans over the sea at sunset, 4k"]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """A tiny MT5ForConditionalGeneration (encoder + decoder), fp32, saved as pytorch_model.bin."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    base = tmp_path_factory.mktemp("mt5")
    enc = write_tiny_text_encoder(base / "encoder")
    out = base / "full"
    out.mkdir()
    for f in enc.iterdir():
        if not f.name.endswith((".safetensors", ".json")) or "token" in f.name or "special" in f.name:
            shutil.copy2(f, out / f.name)
    cfg = MT5Config.from_pretrained(enc)
    torch.manual_seed(3)
    model = MT5ForConditionalGeneration(cfg)
    model.config.save_pretrained(out)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")  # the .bin layout
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    return out


def test_converted_encoder_equals_the_full_model_in_bf16(full, tmp_path):
    from safetensors import safe_open

    dst = tmp_path / "encoder-bf16"
    convert_text_encoder(full, dst)
    with safe_open(str(dst / CONVERTED_WEIGHTS), "pt") as f:
        names = list(f.keys())
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in names)
    assert names and not any(n.startswith(("decoder.", "lm_head")) for n in names)
    assert (dst / CONVERTED_WEIGHTS).stat().st_size < (full / "pytorch_model.bin").stat().st_size / 3

    a = TextEncoder.from_pretrained(full, device="cpu", dtype=torch.bfloat16)
    b = TextEncoder.from_pretrained(dst, device="cpu", dtype=torch.bfloat16)
    ea, ma = a.encode(CAPTIONS)
    eb, mb = b.encode(CAPTIONS)
    assert torch.equal(ma, mb) and ea.dtype == eb.dtype == torch.bfloat16
    assert torch.equal(ea, eb)
    # the control: the fp32 full model differs from its bf16 run, so the comparison can fail
    e32, _ = TextEncoder.from_pretrained(full, device="cpu", dtype=torch.float32).encode(CAPTIONS)
    assert not torch.equal(e32.to(torch.bfloat16), ea)

    # identity: one id for both in bf16 (a text cache made with either serves the other) ...
    assert a.identity()["text_id"] == b.identity()["text_id"] == text_encoder_id(dst, torch.bfloat16)
    # ... but bf16 weights computed in fp32 are not the fp32 model
    assert text_encoder_id(dst, torch.float32) != text_encoder_id(full, torch.float32)


def test_converted_weights_are_memory_mapped(full, tmp_path):
    dst = tmp_path / "enc"
    convert_text_encoder(full, dst)
    enc = TextEncoder.from_pretrained(dst, device="cpu", dtype=torch.bfloat16)
    w = enc.model.encoder.block[0].layer[0].SelfAttention.q.weight
    # a view of the file's mapping: the storage is not resizable (torch owns no buffer of its own)
    assert not w.untyped_storage().resizable()
    with pytest.raises(Exception, match="not empty"):
        convert_text_encoder(full, dst)
