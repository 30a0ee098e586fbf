"""`osp encode-prompts`: validation prompts (and the negative prompt) through the text encoder once, into
a prompt cache (`osp.common.prompt_cache`) that stage 2's validation reads instead of loading mT5.

Prompts are prepared as `osp sample` prepares them (upstream's template, then the caption cleaner
twice; the negative prompt cleaned without the template) and stored unpadded, as the shards store
captions."""

from __future__ import annotations

from pathlib import Path

import torch

from osp.common.config import NEGATIVE_PROMPT
from osp.common.errors import ConfigError
from osp.common.prompt_cache import write_prompt_cache


def encode_prompts(
    prompts: list[str],
    text_encoder: str | Path,
    out: str | Path,
    *,
    negative_prompt: str = NEGATIVE_PROMPT,
    template: bool = True,
    clean: bool = True,
    device: str = "auto",
) -> dict:
    """Encode `prompts` + the negative prompt; returns the written manifest."""
    from osp.common.device import pick_device
    from osp.common.models.text import TextEncoder, cleaner_identity
    from osp.common.prompt_cache import read_prompt_cache
    from osp.common.sampling import prepare_prompt

    if not prompts:
        raise ConfigError("no prompts to encode: write one prompt per line in the prompts file")
    dev = pick_device(device)
    tdev = dev.set_current() if dev.is_accelerator else dev.torch_device()
    te = TextEncoder.from_pretrained(text_encoder, device=tdev)
    used = [prepare_prompt(p, template, clean) for p in prompts]
    negative = prepare_prompt(negative_prompt, template=False, clean=clean)
    with torch.no_grad():
        states = [t.cpu() for t in te.encode_unpadded(used + [negative])]
    info = {
        "text_encoder": te.identity(),
        "caption_cleaner": cleaner_identity() if clean else None,
        "template": template,
        "prompts_used": used,
        "negative_prompt": negative_prompt,
        "negative_prompt_used": negative,
    }
    write_prompt_cache(out, prompts, states[:-1], states[-1], info)
    return read_prompt_cache(out).manifest
