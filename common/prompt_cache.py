"""The prompt cache: validation prompts encoded once by the text encoder (`osp encode-prompts`, stage 1),
read by stage 2's validation, which therefore never loads the text encoder. Format (shards/README.md):

    <dir>/prompts.safetensors   "prompt.0000", "prompt.0001", ... [L_i, D] and "negative" [L, D]:
                                unpadded last hidden states, as the shards' `text` tensors
    <dir>/manifest.json         format, text encoder identity (with max_length), caption cleaner,
                                template, the prompts (as given and as encoded), each tensor's length,
                                and the CRC-32C of prompts.safetensors (the shards' checksum function)

Written tensors first, manifest last (each atomically): a folder without a manifest is not a cache,
and a manifest pins the exact tensor file it describes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from osp.common import shards as S
from osp.common.errors import OspError

FORMAT = "osp-prompt-cache/1"
TENSORS, MANIFEST = "prompts.safetensors", "manifest.json"
NEGATIVE = "negative"
# the text encoder identity fields that decide the embeddings (the path may differ between machines)
IDENTITY_KEYS = ("config_sha256", "weights_sha256", "tokenizer_sha256", "max_length")


class PromptCacheError(OspError, ValueError):
    """A prompt cache that is missing, damaged or does not fit the run (message names the file)."""


def prompt_key(i: int) -> str:
    return f"prompt.{i:04d}"


@dataclass
class PromptCache:
    path: Path
    prompts: list[str]  # as given
    texts: list[torch.Tensor]  # [L_i, D] per prompt
    negative: torch.Tensor  # [L, D]
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.negative.shape[1])

    @property
    def checksum(self) -> str:
        return self.manifest["checksum"]


def write_prompt_cache(
    out: str | Path, prompts: list[str], texts: list[torch.Tensor], negative: torch.Tensor, info: dict
) -> Path:
    """Write the tensors, then the manifest (`info` holds the encoder identity and the encoding settings)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {prompt_key(i): t.detach().cpu().contiguous() for i, t in enumerate(texts)}
    tensors[NEGATIVE] = negative.detach().cpu().contiguous()
    data = st_save(tensors)
    S._atomic_write_bytes(out / TENSORS, data)
    manifest = {
        **info,
        "format": FORMAT,
        "prompts": [{"prompt": p, "length": int(t.shape[0])} for p, t in zip(prompts, texts)],
        "negative_length": int(negative.shape[0]),
        "dim": int(negative.shape[1]),
        "dtype": str(negative.dtype).removeprefix("torch."),
        "checksum": S.checksum(data, b""),
    }
    body = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    S._atomic_write_bytes(out / MANIFEST, body.encode("utf-8"))
    return out


def read_prompt_cache(path: str | Path) -> PromptCache:
    """The cache at `path`, its tensor file checked against the manifest's checksum."""
    path = Path(path)
    mf, tf = path / MANIFEST, path / TENSORS
    try:
        manifest = json.loads(mf.read_bytes())
    except FileNotFoundError:
        raise PromptCacheError(
            f"{mf}: missing; {path} is not a prompt cache: write one with `osp encode-prompts PROMPTS.txt "
            f"--text-encoder DIR --out {path}`"
        ) from None
    except ValueError as e:
        raise PromptCacheError(f"{mf}: not valid JSON ({e}); re-run osp encode-prompts") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise PromptCacheError(f"{mf}: format {got!r}, this osp reads {FORMAT!r}; re-run osp encode-prompts")
    try:
        data = tf.read_bytes()
    except FileNotFoundError:
        raise PromptCacheError(f"{tf}: missing; re-run osp encode-prompts") from None
    if S.checksum(data, b"") != manifest.get("checksum"):
        raise PromptCacheError(
            f"{tf}: checksum {S.checksum(data, b'')} != {manifest.get('checksum')} in {MANIFEST} (modified or "
            "corrupt); re-run osp encode-prompts"
        )
    tensors = S.load_safetensors_bytes(bytearray(data), str(tf))
    entries = manifest.get("prompts") or []
    keys = [prompt_key(i) for i in range(len(entries))]
    if NEGATIVE not in tensors or any(k not in tensors for k in keys):
        raise PromptCacheError(f"{tf}: lacks tensors its manifest lists; re-run osp encode-prompts")
    return PromptCache(path, [e["prompt"] for e in entries], [tensors[k] for k in keys], tensors[NEGATIVE], manifest)


def same_text_encoder(a: dict | None, b: dict | None) -> bool:
    """Whether two text encoder identities (manifest records) produce the same embeddings."""
    if not a or not b:
        return False
    return all(a.get(k) == b.get(k) for k in IDENTITY_KEYS)
