"""`osp encode-prompts`: validation prompts (and the negative prompt) through the text encoder once, into
a text cache (the format of `osp encode --text-cache`) whose manifest lists them in validation order
(`osp.common.prompt_cache`); stage 2's validation reads it instead of loading mT5.

Prompts are prepared as `osp sample` prepares them (upstream's template, then the caption cleaner
twice; the negative prompt cleaned without the template) and encoded as `osp encode` encodes captions
(same dtype, same padding), keyed by `text_key` of the prepared text. `--out` may be an existing text
cache of the same encoder (the training one, say): what it holds is reused, the rest is appended.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from osp.common import shards as S
from osp.common.config import NEGATIVE_PROMPT, TEXT_MAX_LENGTH
from osp.common.errors import ConfigError
from osp.common.prompt_cache import LEGACY_FORMAT, prompt_entry, write_prompt_list
from osp.stage1_encode.run import Encoders
from osp.stage1_encode.text_cache import fill_text_cache


def encode_prompts(
    prompts: list[str],
    text_encoder: str | Path,
    out: str | Path,
    *,
    negative_prompt: str = NEGATIVE_PROMPT,
    template: bool = True,
    clean: bool = True,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    pad_to_max: bool = True,
) -> dict:
    """Encode `prompts` + the negative prompt into the text cache `out` (those it lacks); returns the
    manifest written. dtype: the text encoder's compute dtype (default: as `osp encode`, fp32 on the
    CPU, bf16 on accelerators)."""
    from osp.common.sampling import prepare_prompt

    if not prompts:
        raise ConfigError("no prompts to encode: write one prompt per line in the prompts file")
    out = Path(out)
    _refuse_legacy(out)
    enc = Encoders("", str(text_encoder), device, "float32", False, pad_to_max)  # the VAE is never loaded
    if dtype is not None:
        enc.text_dtype = dtype
    used = [prepare_prompt(p, template, clean) for p in prompts]
    negative = prepare_prompt(negative_prompt, template=False, clean=clean)
    stats = fill_text_cache(out, used + [negative], enc)
    print(f"{out}: validation prompts {stats['text_encoded']} encoded, {stats['text_reused']} reused", file=sys.stderr)
    cache = S.TextCache.open(out)
    text_id = stats["text_id"]

    def entry(p: str, u: str) -> dict:
        return prompt_entry(p, u, text_id, TEXT_MAX_LENGTH, cache.text_len(S.text_key(u, text_id, TEXT_MAX_LENGTH)))

    return write_prompt_list(
        out,
        [entry(p, u) for p, u in zip(prompts, used)],
        entry(negative_prompt, negative),
        template=template,
        clean=clean,
        max_length=TEXT_MAX_LENGTH,
    )


def _refuse_legacy(out: Path) -> None:
    mf = out / S.MANIFEST_NAME
    try:
        legacy = json.loads(mf.read_bytes()).get("format") == LEGACY_FORMAT
    except (OSError, ValueError, AttributeError):
        return  # no manifest yet, or one the text cache check reports
    if legacy:
        raise ConfigError(f"{mf}: a prompt cache of an earlier osp; delete {out} or pass another --out")
