"""Validation prompts in a text cache: `osp encode-prompts` (stage 1) puts each prepared prompt and the
negative prompt into a text cache (the format of `osp encode --text-cache`, `osp.common.shards`: keys
`text_key(prepared prompt, text_id, max_length)`) and writes their order into its manifest; stage 2's
validation reads them here through `TextCache` / `TextLookup`, so it never loads the text encoder.

    manifest.json "validation_prompts": {
        "prompts":  [{"prompt": as given, "used": as encoded, "key": text key, "length": L}, ...],
        "negative": {"prompt": ..., "used": ..., "key": ..., "length": L},
        "template": bool, "clean": bool, "max_length": int
    }

The embeddings are covered by the shards' checksums (read with verify); the list is checked against
them: every key must be `text_key` of its `used` text under the cache's `text_id`, and every key must
be in the cache with the recorded length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from osp.common import shards as S
from osp.common.errors import OspError

PROMPTS_FIELD = "validation_prompts"
LEGACY_FORMAT = "osp-prompt-cache/1"  # the single-file prompt cache of earlier osp versions


class PromptCacheError(OspError, ValueError):
    """Validation prompts that are missing, damaged or do not fit the run (message names the file)."""


@dataclass
class PromptCache:
    path: Path
    prompts: list[str]  # as given
    texts: list[torch.Tensor]  # [L_i, D] per prompt, in validation order
    negative: torch.Tensor  # [L, D]
    manifest: dict  # the text cache's

    @property
    def dim(self) -> int:
        return int(self.negative.shape[1])

    @property
    def text_id(self) -> str:
        return str(self.manifest.get("text_id", ""))

    @property
    def record(self) -> dict:
        """What a validation step records of its prompts: the cache, the encoder id and the keys."""
        entry = self.manifest[PROMPTS_FIELD]
        return {
            "path": str(self.path),
            "text_id": self.text_id,
            "keys": [p["key"] for p in entry["prompts"]],
            "negative_key": entry["negative"]["key"],
            "text_encoder": self.manifest.get("text_encoder"),
        }


def prompt_entry(prompt: str, used: str, text_id: str, max_length: int, length: int) -> dict:
    return {"prompt": prompt, "used": used, "key": S.text_key(used, text_id, max_length), "length": int(length)}


def write_prompt_list(
    out: str | Path, prompts: list[dict], negative: dict, *, template: bool, clean: bool, max_length: int
) -> dict:
    """Record the validation order (entries of `prompt_entry`) in the text cache's manifest; the
    embeddings must already be in the cache. Returns the manifest written."""
    manifest = S.read_manifest(out)
    manifest[PROMPTS_FIELD] = {
        "prompts": prompts,
        "negative": negative,
        "template": template,
        "clean": clean,
        "max_length": int(max_length),
    }
    S.write_manifest(out, manifest)
    return manifest


def _fix(path: Path) -> str:
    return f"write it with `osp encode-prompts PROMPTS.txt --text-encoder DIR --out {path}`"


def read_prompt_cache(path: str | Path) -> PromptCache:
    """The validation prompts of the text cache at `path`, each embedding checked (shard checksums) and
    each key checked against its text."""
    path = Path(path)
    mf = path / S.MANIFEST_NAME
    try:
        raw = json.loads(mf.read_bytes())
    except FileNotFoundError:
        raise PromptCacheError(f"{mf}: missing; {path} holds no validation prompts: {_fix(path)}") from None
    except ValueError as e:
        raise PromptCacheError(f"{mf}: not valid JSON ({e}); {_fix(path)}") from None
    if isinstance(raw, dict) and raw.get("format") == LEGACY_FORMAT:
        raise PromptCacheError(
            f"{mf}: a prompt cache of an earlier osp (prompts.safetensors); osp now keeps validation prompts in a "
            f"text cache: delete {path} and {_fix(path)}"
        )
    cache = S.TextCache.open(path)
    entry = cache.manifest.get(PROMPTS_FIELD)
    if not isinstance(entry, dict) or not entry.get("prompts") or not isinstance(entry.get("negative"), dict):
        raise PromptCacheError(f"{mf}: a text cache without validation prompts; {_fix(path)}")
    max_length = int(entry.get("max_length", 0))
    items = [*entry["prompts"], entry["negative"]]
    for e in items:
        if S.text_key(e.get("used", ""), cache.text_id, max_length) != e.get("key"):
            raise PromptCacheError(
                f"{mf}: validation prompt {e.get('prompt')!r} does not match its key {e.get('key')} under the "
                f"cache's text_id (edited?); {_fix(path)}"
            )
        if e["key"] not in cache or cache.text_len(e["key"]) != e.get("length"):
            raise PromptCacheError(
                f"{path}: lacks the embedding of validation prompt {e.get('prompt')!r} ({e['key']}) its manifest "
                f"lists; {_fix(path)}"
            )
    lookup = S.TextLookup([cache])
    texts = [lookup.get(e["key"]) for e in items]
    return PromptCache(path, [e["prompt"] for e in entry["prompts"]], texts[:-1], texts[-1], cache.manifest)


# The identity fields that decided the embeddings in manifests written before text ids existed.
_LEGACY_KEYS = ("weights_sha256", "tokenizer_sha256", "max_length", "dtype")


def same_text_encoder(prompts: dict, run_text_id: str | None, run_text_encoder: dict | None) -> bool:
    """Whether a prompt cache (its manifest) was made by the run's text encoder: by `text_id` (a bf16
    conversion has its source's id), or, for training caches that record no text_id, by the source
    weights, tokenizer, max length and dtype of their `text_encoder` record."""
    if run_text_id:
        return prompts.get("text_id") == run_text_id
    te, run = prompts.get("text_encoder") or {}, run_text_encoder or {}
    ours = {**te, **{k: v for k, v in (te.get("source") or {}).items() if k in _LEGACY_KEYS}}
    return bool(run) and all(run.get(k) is not None and ours.get(k) == run.get(k) for k in _LEGACY_KEYS)
