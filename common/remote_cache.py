"""Publishing a shard cache into an object store (`osp encode --out s3://...`, or a finished local cache).

A cache is written locally (a staging folder, with the local fsync + rename rules) and uploaded in
the order that keeps every state a reader can see consistent:

    per shard:  the sidecar `shard-N.rows.json`, then the tar (a PUT shows a whole object or none; the
                tar is what makes the shard published, as locally)
    at the end: uncond.safetensors, errors.jsonl, index.zarr/*, and manifest.json last

Readers refuse a cache without manifest.json (`ShardIndex.open`), so a reader started mid-encode sees
"did not finish" and never a partial index. A re-run skips objects that are already there with the
same bytes (sidecar equal, tar of the recorded size), so an upload killed at any point resumes; when
any final object must change, the remote manifest is deleted first.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from osp.common import shards as S
from osp.common import storage

FINAL_NAMES = (S.UNCOND_NAME, S.ERRORS_NAME)  # uploaded before the index; the manifest is last


def default_staging(url: str) -> Path:
    """The local staging folder of an object-store output: one per URL, kept across runs (resume)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "osp" / "encode-staging"
    return base / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _remote_bytes(store: storage.Store, name: str) -> bytes | None:
    try:
        return store.read_bytes(name)
    except FileNotFoundError:
        return None


def upload_shard(local: str | os.PathLike, url: str, shard_id: int) -> bool:
    """Publish one locally published shard in the object store (sidecar, then tar); False when the
    same shard is already there."""
    store = storage.open_store(url)
    tar, rows = S.shard_path(local, shard_id), S.rows_path(local, shard_id)
    side = rows.read_bytes()
    if _remote_bytes(store, rows.name) == side and _remote_size(store, tar.name) == tar.stat().st_size:
        return False
    store.delete(tar.name)  # a redone shard is invisible until its new tar lands
    store.put_atomic(rows.name, side)
    store.put_file(tar.name, tar)
    return True


def _remote_size(store: storage.Store, name: str) -> int | None:
    try:
        return store.size(name)
    except FileNotFoundError:
        return None


def upload_shards(local: str | os.PathLike, url: str, rank: int = 0, world: int = 1) -> int:
    """Publish the shards (of this rank: id % world == rank) published in `local` and not yet (or
    differently) in `url`; returns how many."""
    mine = sorted(sid for sid in S.published_shards(local) if sid % world == rank)
    return sum(upload_shard(local, url, sid) for sid in mine)


def upload_final(local: str | os.PathLike, url: str) -> None:
    """uncond, errors, index, then manifest.json (the object that makes the cache readable)."""
    store = storage.open_store(url)
    out = Path(local)
    index_files = sorted(str(p.relative_to(out)) for p in (out / S.INDEX_NAME).rglob("*") if p.is_file())
    names = [n for n in FINAL_NAMES if (out / n).exists()] + index_files
    changed = [n for n in names if _remote_bytes(store, n) != (out / n).read_bytes()]
    manifest = (out / S.MANIFEST_NAME).read_bytes()
    if not changed and _remote_bytes(store, S.MANIFEST_NAME) == manifest:
        return
    store.delete(S.MANIFEST_NAME)  # unreadable from here until the new manifest lands
    for n in changed:
        store.put_atomic(n, (out / n).read_bytes())
    stale = set(store.list(S.INDEX_NAME)) - set(index_files)  # chunks of an older, longer index
    for n in sorted(stale):
        store.delete(n)
    store.put_atomic(S.MANIFEST_NAME, manifest)


def upload_cache(local: str | os.PathLike, url: str) -> None:
    """Publish a finished local cache (shards, then index, then manifest) under `url`."""
    S.read_manifest(local)  # a finished cache only
    upload_shards(local, url)
    upload_final(local, url)


def upload_plan(path: str | os.PathLike, url: str) -> None:
    """The encode's plan.json (which plan the shards belong to), unless the same is already there."""
    data = Path(path).read_bytes()
    store = storage.open_store(url)
    if _remote_bytes(store, Path(path).name) != data:
        store.put_atomic(Path(path).name, data)


def pull_file(url: str, name: str, local: str | os.PathLike) -> bool:
    """Copy one small object into the staging folder (plan.json on resume); False when absent."""
    data = _remote_bytes(storage.open_store(url), name)
    if data is None:
        return False
    path = Path(local) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.LocalStore(path.parent).put_atomic(path.name, data)
    return True
