"""The text pass of `osp encode --text-cache DIR`: every cleaned caption of the plan that the text cache
lacks is encoded once and appended as new shards; captions it holds are reused (counted, logged).

Keys are `osp.common.shards.text_key(cleaned caption, text_id, max_length)`; `text_id` is the text
encoder's identity (`osp.common.models.text.text_encoder_id`: source weights, compute dtype, max length),
computed from the folder's files, so a run that finds every caption in the cache never loads the encoder.
The cache's manifest pins its text_id; a run with another encoder is refused. New shards get the next
free ids and are published atomically, so a killed text pass loses at most the shard it was writing.
With several encode ranks, rank 0 fills the cache and the others wait for it.
"""

from __future__ import annotations

import time
from pathlib import Path

from osp.common import shards as S
from osp.common.config import TEXT_MAX_LENGTH
from osp.common.errors import OspError
from osp.common.models.text import cleaner_identity, source_identity


class TextCacheError(OspError, RuntimeError):
    """A text cache that cannot serve this run (another encoder, missing captions after the wait)."""


class TextKeys:
    """Cleaned caption -> key, key -> token count, over a filled text cache."""

    def __init__(self, cache: S.TextCache, text_id: str, max_length: int = TEXT_MAX_LENGTH):
        self.cache, self.text_id, self.max_length = cache, text_id, max_length

    def key(self, caption_clean: str) -> str:
        return S.text_key(caption_clean, self.text_id, self.max_length)

    def length(self, key: str) -> int:
        return self.cache.text_len(key)


def _encoder_record(enc, text_id: str) -> dict:
    return {
        "path": str(Path(enc.text_dir).resolve()),
        "source": source_identity(enc.text_dir),
        "dtype": str(enc.text_dtype).removeprefix("torch."),
        "max_length": TEXT_MAX_LENGTH,
        "pad_to_max": enc.text_pad_to_max,
        "text_id": text_id,
    }


def check_text_cache(text_dir: Path, text_id: str, enc) -> None:
    """An existing text cache must hold this encoder's embeddings (one line naming both otherwise)."""
    if not (text_dir / S.MANIFEST_NAME).exists():
        return
    m = S.read_manifest(text_dir)
    if m.get("kind") != S.TEXT_KIND:
        raise TextCacheError(f"{text_dir}: is a latent cache, not a text cache; pass another --text-cache folder")
    if m.get("text_id") != text_id:
        theirs = (m.get("text_encoder") or {}).get("path", "?")
        raise TextCacheError(
            f"{text_dir}: holds embeddings of the text encoder {theirs} (id {str(m.get('text_id'))[:12]}), this run "
            f"encodes with {enc.text_dir} (id {text_id[:12]}); pass another --text-cache folder or that encoder"
        )


def fill_text_cache(text_dir: str | Path, captions: list[str], enc, *, per_shard: int = 1024, progress=None) -> dict:
    """Encode the captions (cleaned) the cache lacks; returns {"text_encoded", "text_reused", "text_id"}."""
    text_dir = Path(text_dir)
    text_id = enc.text_id()
    check_text_cache(text_dir, text_id, enc)
    text_dir.mkdir(parents=True, exist_ok=True)
    if S.published_shards(text_dir):
        S.merge_index(text_dir)  # shards published by a killed pass join the index
    cache = S.TextCache.open(text_dir, allow_empty=True)
    unique = sorted({S.text_key(c, text_id, TEXT_MAX_LENGTH): c for c in captions}.items())
    missing = [(k, c) for k, c in unique if k not in cache]
    bs = max(1, int(enc.batch_size))
    next_id = max(S.published_shards(text_dir), default=-1) + 1
    for lo in range(0, len(missing), per_shard):
        chunk = missing[lo : lo + per_shard]
        with S.TextShardWriter(text_dir, next_id) as w:
            for b in range(0, len(chunk), bs):
                part = chunk[b : b + bs]
                for (k, c), t in zip(part, enc.encode_text([c for _, c in part])):
                    w.write(k, t, {"caption_clean": c, "text_id": text_id})
                if progress is not None:
                    progress(len(part))
            w.publish()
        next_id += 1
    uncond = None if (text_dir / S.UNCOND_NAME).exists() else enc.encode_text([""])[0]
    old = S.read_manifest(text_dir) if (text_dir / S.MANIFEST_NAME).exists() else {}
    text = old.get("text")
    if uncond is not None:
        old.pop("uncond_checksum", None)
        text = {
            "dtype": str(uncond.dtype).removeprefix("torch."),
            "dim": int(uncond.shape[1]),
            "unpadded": True,
            "max_length": TEXT_MAX_LENGTH,
            "uncond_len": int(uncond.shape[0]),
        }
    manifest = {
        **old,
        "kind": S.TEXT_KIND,
        "tool": "osp.stage1_encode",
        "text_id": text_id,
        "text_encoder": old.get("text_encoder") or _encoder_record(enc, text_id),
        "caption_cleaner": cleaner_identity(),
        "text": text,
    }
    S.write_manifest(text_dir, manifest)
    if uncond is not None:
        S.write_uncond(text_dir, uncond)
    S.merge_index(text_dir)  # index, errors and manifest counts
    return {"text_encoded": len(missing), "text_reused": len(unique) - len(missing), "text_id": text_id}


def wait_for_text(text_dir: str | Path, keys: set[str], timeout: float) -> None:
    """Ranks other than 0: wait until rank 0's text pass has put every key of the plan in the cache."""
    text_dir, t0 = Path(text_dir), time.monotonic()
    while True:
        try:
            cache = S.TextCache.open(text_dir)
            if (text_dir / S.UNCOND_NAME).exists() and all(k in cache for k in keys):
                return
        except S.ShardError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TextCacheError(
                f"{text_dir}: after {timeout:.0f} s the text cache still lacks captions of this plan; "
                f"is rank 0 running? rerun osp encode"
            )
        time.sleep(2.0)
