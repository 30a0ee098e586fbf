"""Shard contract v1: the on-disk format between stage 1 (encode) and stage 2 (train).

A shard directory holds (full description in shards/README.md):

    shard-000000.tar            WebDataset tar: per sample `<key>.safetensors` + `<key>.json`
    shard-000000.rows.json      sidecar: the shard's index rows and error rows (published with the tar)
    index.zarr/                 one row per sample (merge_index): key, shard, member offsets/sizes, ...
    errors.jsonl                every skipped input with its reason (merge_index)
    manifest.json               schema version, encoder identity, geometry, dtypes, counts
    uncond.safetensors          mT5 output for the empty caption (CFG dropout)

Publishing: a writer fills `<name>.tmp-<pid>` files, fsyncs them, renames the sidecar, then the tar
(last). A visible tar whose sidecar records its exact size is a published shard; anything else is
invisible and redone. Checksum (schema v2): CRC-32C (Castagnoli; google-crc32c, hardware accelerated, a
dependency of zarr) of the row's index fields (key, shard, offsets, sizes, latent shape, text length)
followed by the safetensors member bytes and the json member bytes, stored as "crc32c:%08x"; so a
swapped or edited index row fails it as well as a flipped byte. It detects corruption, not tampering.
`manifest.json` pins `uncond.safetensors` by the same checksum ("uncond_checksum"). Schema v1 caches
(bytes-only checksums) are refused with a one-line error naming `osp shards upgrade`.

Nothing here unpickles: safetensors and json are the only decoded members, anything else is skipped
with a warning naming it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import posixpath
import re
import shutil
import struct
import tarfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import google_crc32c
import numpy as np
import torch
from safetensors.torch import save as st_save

from osp.common import storage
from osp.common.errors import OspError

SCHEMA_VERSION = 2
OLD_SCHEMA_VERSIONS = (1,)  # readable only by `upgrade` (v1: checksum over the member bytes only)
MAX_ST_HEADER = 100 * 2**20  # bytes; the safetensors library's own limit for a header
ROW_FIELDS = (
    "key",
    "shard",
    "st_offset",
    "st_size",
    "json_offset",
    "json_size",
    "latent_t",
    "latent_h",
    "latent_w",
    "text_len",
)
SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.tar$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")
MEMBER_EXTS = ("safetensors", "json")
INDEX_NAME, ERRORS_NAME, MANIFEST_NAME, UNCOND_NAME = (
    "index.zarr",
    "errors.jsonl",
    "manifest.json",
    "uncond.safetensors",
)
INDEX_COLUMNS = {  # name -> numpy dtype ("str" = variable-length UTF-8)
    "key": "str",
    "shard": "int32",
    "st_offset": "int64",
    "st_size": "int64",
    "json_offset": "int64",
    "json_size": "int64",
    "latent_t": "int32",
    "latent_h": "int32",
    "latent_w": "int32",
    "text_len": "int32",
    "checksum": "str",
}
LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Fixed tar header fields: same inputs -> same bytes, whoever writes them.
_TAR_MTIME, _TAR_MODE = 0, 0o644
_INDEX_CHUNK = 1 << 16


class ShardError(OspError, ValueError):
    """A shard directory or member that breaks the contract (message names file and key)."""


class StorageFullError(OspError, OSError):
    """A file could not be written for lack of space (disk full, quota, file-size limit); the message
    names the file, the cause and the free space."""


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"."""
    if n < 1024:
        return f"{n} B"
    k = min(3, int(math.log(n, 1024)))
    return f"{n / 1024**k:.1f} {('KiB', 'MiB', 'GiB')[k - 1]}"


STORAGE_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def storage_full_reason(e: BaseException, where: str | os.PathLike) -> str | None:
    """For an OSError of a full disk / quota / file-size limit: "No space left on device (3.1 MiB free
    on DIR)", where DIR is the folder of `where`; None for any other error."""
    if not isinstance(e, OSError) or e.errno not in STORAGE_FULL_ERRNOS:
        return None
    why = os.strerror(e.errno)
    if e.errno == errno.EFBIG:
        why += ", over the file-size limit (ulimit -f)"
    folder = Path(where)
    folder = folder if folder.is_dir() else folder.parent
    try:
        free = f"{human_bytes(shutil.disk_usage(folder).free)} free on {folder}"
    except OSError:
        free = f"free space of {folder} unknown"
    return f"{why} ({free})"


def _version_error(where: Path | str, version) -> ShardError:
    if version in OLD_SCHEMA_VERSIONS:
        return ShardError(
            f"{where}: shard schema version {version} (written by an older osp; its checksums do not cover the index "
            f"rows), this osp reads {SCHEMA_VERSION}; upgrade in place with `osp shards upgrade DIR` or re-encode"
        )
    return ShardError(f"{where}: schema version {version}, this osp reads {SCHEMA_VERSION}; re-encode with this osp")


# --- paths ------------------------------------------------------------------------------------------


def shard_path(out_dir: str | os.PathLike, shard_id: int) -> Path:
    return Path(out_dir) / f"shard-{int(shard_id):06d}.tar"


def rows_path(out_dir: str | os.PathLike, shard_id: int) -> Path:
    return Path(out_dir) / f"shard-{int(shard_id):06d}.rows.json"


def _read_rows(out_dir: str | os.PathLike, shard_id: int) -> dict | None:
    """The sidecar of a published shard, or None when the shard is absent, partial or inconsistent."""
    store = storage.open_store(out_dir)
    try:
        side = json.loads(store.read_bytes(rows_path("", shard_id).name))
        size = store.size(shard_path("", shard_id).name)
    except storage.ObjectMissing:
        return None
    except storage.StoreError:  # an unreachable store is not an unpublished shard
        raise
    except (OSError, ValueError):
        return None
    if side.get("schema_version") != SCHEMA_VERSION or side.get("shard") != shard_id or side.get("tar_size") != size:
        return None
    return side


def published_shards(out_dir: str | os.PathLike) -> set[int]:
    """Ids of shards whose tar and rows sidecar are both present and agree on the tar's size."""
    out = Path(out_dir)
    if storage.is_url(out_dir):
        names = [n for n in storage.open_store(out_dir).list() if "/" not in n]
    elif not out.is_dir():
        return set()
    else:
        names = [p.name for p in out.iterdir()]
    ids = {int(m.group(1)) for n in names if (m := SHARD_PATTERN.match(n))}
    return {i for i in ids if _read_rows(out_dir, i) is not None}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dump_json(obj: Any, where: str) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise ShardError(
            f"{where}: not JSON/UTF-8 serialisable ({e}); pass plain str/int/float/list/dict values"
        ) from None


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ShardError(f"bad sample key {key!r}: use 1-200 characters of [A-Za-z0-9_-] (no dots, no slashes)")
    return key


def row_fields_bytes(row) -> bytes:
    """The canonical bytes of a row's index fields (ROW_FIELDS, NUL-separated) that the checksum covers."""
    return "\0".join(str(row[f]) for f in ROW_FIELDS).encode("utf-8")


def checksum(st_bytes: bytes | memoryview, json_bytes: bytes | memoryview, row=None) -> str:
    """CRC-32C of the row's index fields (schema v2; `row` a dict/IndexRow with ROW_FIELDS) followed by
    the safetensors member bytes and the json member bytes. `row=None` is the v1 (bytes only) sum,
    which `uncond_checksum` and `upgrade` use."""
    st_bytes = st_bytes if isinstance(st_bytes, bytes) else bytes(st_bytes)  # the C extension takes bytes only
    json_bytes = json_bytes if isinstance(json_bytes, bytes) else bytes(json_bytes)
    c = google_crc32c.value(row_fields_bytes(row)) if row is not None else 0
    c = google_crc32c.extend(c, st_bytes) if row is not None else google_crc32c.value(st_bytes)
    return f"crc32c:{google_crc32c.extend(c, json_bytes):08x}"


# --- writer ------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one shard: `write()` samples, `add_error()` skipped inputs, then `publish()` or `abort()`.

    latent [8, T, H, W] (posterior moments) or [4, T, H, W] (one sample) is cast to `latent_dtype`
    (float16 by default); text [L, D] keeps its dtype. Use as a context manager to abort on errors.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_id: int, *, latent_dtype: str | torch.dtype = "float16"):
        self.out_dir = Path(out_dir)
        self.shard_id = int(shard_id)
        if not 0 <= self.shard_id <= 999_999:
            raise ShardError(f"shard id {shard_id} out of range 0..999999")
        if isinstance(latent_dtype, str):
            if latent_dtype not in LATENT_DTYPES:
                raise ShardError(f"latent_dtype {latent_dtype!r} unknown; choose one of {sorted(LATENT_DTYPES)}")
            latent_dtype = LATENT_DTYPES[latent_dtype]
        self.latent_dtype = latent_dtype
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.final_tar = shard_path(self.out_dir, self.shard_id)
        self.final_rows = rows_path(self.out_dir, self.shard_id)
        # Leftovers of a killed writer of this shard are never visible; remove them now.
        for stale in self.out_dir.glob(f"shard-{self.shard_id:06d}.*.tmp*"):
            stale.unlink(missing_ok=True)
        self._tmp_tar = self.final_tar.with_name(f"{self.final_tar.name}.tmp-{os.getpid()}")
        self._tmp_rows = self.final_rows.with_name(f"{self.final_rows.name}.tmp-{os.getpid()}")
        self._file: io.BufferedWriter | None = None
        self._done = False
        with self._storage():
            self._file = open(self._tmp_tar, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._rows: list[dict] = []
        self._errors: list[dict] = []
        self._keys: set[str] = set()

    @contextlib.contextmanager
    def _storage(self):
        """A full disk (or quota, or file-size limit) while writing: drop the shard, raise one line."""
        try:
            yield
        except OSError as e:
            reason = storage_full_reason(e, self.out_dir)
            if reason is None:
                raise
            self.abort()
            raise StorageFullError(f"{self.final_tar} not written: {reason}") from None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Tar bytes written so far (for callers that cut shards by size)."""
        return self._tar.offset

    def _add_member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime, info.mode, info.type = _TAR_MTIME, _TAR_MODE, tarfile.REGTYPE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        return self._tar.offset - math.ceil(len(data) / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # data offset

    def write(
        self, key: str, latent: torch.Tensor, text: torch.Tensor | None, meta: dict, *, text_len: int | None = None
    ) -> dict:
        """Append one sample; returns its index row. `text=None`: the text lives in a text cache, `meta`
        names it by `text_key` and `text_len` is its token count (see "text caches" below)."""
        if self._done:
            raise ShardError(f"{self.final_tar.name}: writer already published or aborted")
        validate_key(key)
        if key in self._keys:
            raise ShardError(f"{self.final_tar.name}: duplicate key {key!r} in one shard; keys must be unique")
        if latent.ndim != 4 or latent.shape[0] not in (8, 4):
            raise ShardError(f"{key}: latent must be [8|4, T, H, W], got {tuple(latent.shape)}")
        if text is not None and (text.ndim != 2 or text.shape[0] < 1):
            raise ShardError(f"{key}: text must be unpadded [L>=1, D], got {tuple(text.shape)}")
        if not isinstance(meta, dict):
            raise ShardError(f"{key}: meta must be a dict, got {type(meta).__name__}")
        if text is None and (not isinstance(meta.get(TEXT_KEY_FIELD), str) or not text_len or text_len < 1):
            raise ShardError(f"{key}: a sample without text needs meta[{TEXT_KEY_FIELD!r}] and text_len >= 1")
        tensors = {"latent": latent.detach().to("cpu", self.latent_dtype).contiguous()}
        if text is not None:
            tensors["text"] = text.detach().to("cpu").contiguous()
        st_bytes = st_save(tensors)
        json_bytes = _dump_json(meta, f"{self.final_tar.name}: meta of {key}")
        with self._storage():
            row = {
                "key": key,
                "st_offset": self._add_member(f"{key}.safetensors", st_bytes),
                "st_size": len(st_bytes),
                "json_offset": self._add_member(f"{key}.json", json_bytes),
                "json_size": len(json_bytes),
                "latent_t": int(latent.shape[1]),
                "latent_h": int(latent.shape[2]),
                "latent_w": int(latent.shape[3]),
                "text_len": int(text.shape[0]) if text is not None else int(text_len or 0),
            }
        row["checksum"] = checksum(st_bytes, json_bytes, {**row, "shard": self.shard_id})
        self._keys.add(key)
        self._rows.append(row)
        return row

    def add_error(self, record: dict) -> None:
        """Record an input that was skipped (e.g. {"path": ..., "reason": ...})."""
        if not isinstance(record, dict):
            raise ShardError(f"{self.final_tar.name}: error record must be a dict, got {type(record).__name__}")
        _dump_json(record, f"{self.final_tar.name}: error record")
        self._errors.append(dict(record))

    def publish(self) -> list[dict]:
        """Make tar + rows visible atomically (sidecar renamed first, tar last); returns the index rows."""
        if self._done:
            raise ShardError(f"{self.final_tar.name}: writer already published or aborted")
        with self._storage():
            return self._publish()

    def _publish(self) -> list[dict]:
        assert self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        side = {
            "schema_version": SCHEMA_VERSION,
            "shard": self.shard_id,
            "tar": self.final_tar.name,
            "tar_size": self._tmp_tar.stat().st_size,
            "latent_dtype": str(self.latent_dtype).removeprefix("torch."),
            "rows": self._rows,
            "errors": self._errors,
        }
        with open(self._tmp_rows, "wb") as f:
            f.write(_dump_json(side, self.final_rows.name))
            f.flush()
            os.fsync(f.fileno())
        self.final_tar.unlink(missing_ok=True)  # a redone shard is invisible until the new tar lands
        os.replace(self._tmp_rows, self.final_rows)
        os.replace(self._tmp_tar, self.final_tar)
        _fsync_dir(self.out_dir)
        self._done = True
        return [{"shard": self.shard_id, **r} for r in self._rows]

    def abort(self) -> None:
        """Drop everything written; the shard stays as it was (absent or previously published)."""
        if self._done:
            return
        self._done = True
        if self._file is not None:
            try:
                getattr(self, "_tar", self._file).close()
            except Exception:
                pass
            try:
                self._file.close()  # closes the descriptor even when flushing its buffer fails (disk full)
            except OSError:
                pass
        self._tmp_tar.unlink(missing_ok=True)
        self._tmp_rows.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # no-op after publish()


# --- index -------------------------------------------------------------------------------------------


def merge_index(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> int:
    """Merge the published shards' rows into index.zarr (shard order, then insertion order) and their
    error rows into errors.jsonl (same order, each with its shard id). Updates manifest counts when a
    manifest exists. Returns the number of samples. `source`: where the shards are published when not
    in `out_dir` (an object-store URL whose index is staged locally)."""
    import zarr

    out = Path(out_dir)
    cols: dict[str, list] = {c: [] for c in INDEX_COLUMNS}
    errors: list[bytes] = []
    seen: dict[str, int] = {}
    src = out if source is None else source
    shards = sorted(published_shards(src))
    for sid in shards:
        side = _read_rows(src, sid)
        assert side is not None  # published_shards lists only shards whose rows file reads
        for r in side["rows"]:
            if r["key"] in seen:
                raise ShardError(
                    f"{shard_path(src, sid).name}: key {r['key']!r} also in shard {seen[r['key']]}; keys must be unique"
                )
            seen[r["key"]] = sid
            r = {**r, "shard": sid}
            for c in INDEX_COLUMNS:
                cols[c].append(r[c])
        errors += [_dump_json({**e, "shard": sid}, ERRORS_NAME) for e in side["errors"]]

    tmp = out / f"{INDEX_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    n = len(cols["key"])
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for c, dt in INDEX_COLUMNS.items():
        arr = group.create_array(c, shape=(n,), chunks=(_INDEX_CHUNK,), dtype=str if dt == "str" else dt)
        if n:
            arr[:] = np.array(cols[c]) if dt == "str" else np.asarray(cols[c], dtype=dt)
    group.attrs.update({"schema_version": SCHEMA_VERSION, "samples": n, "shards": shards})
    final = out / INDEX_NAME
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_bytes(out / ERRORS_NAME, b"".join(e + b"\n" for e in errors))

    if (out / MANIFEST_NAME).exists():
        manifest = read_manifest(out)
        counts = dict(manifest.get("counts", {}))
        counts.update(samples=n, errors=len(errors), shards=len(shards))
        manifest["counts"] = counts
        write_manifest(out, manifest)
    return n


@dataclass(frozen=True)
class IndexRow:
    key: str
    shard: int
    st_offset: int
    st_size: int
    json_offset: int
    json_size: int
    latent_t: int
    latent_h: int
    latent_w: int
    text_len: int
    checksum: str

    def __getitem__(self, name: str):  # row["key"] works as well as row.key
        return getattr(self, name)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_t, self.latent_h, self.latent_w)


class ShardIndex:
    """index.zarr loaded into numpy columns (no zarr handle is kept, so it forks and pickles cleanly).

    Columns: key, shard, st_offset, st_size, json_offset, json_size, latent_t, latent_h, latent_w,
    text_len, checksum. Open it inside each worker process.
    """

    # one attribute per column (INDEX_COLUMNS), set in __init__
    key: np.ndarray
    shard: np.ndarray
    st_offset: np.ndarray
    st_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray
    latent_t: np.ndarray
    latent_h: np.ndarray
    latent_w: np.ndarray
    text_len: np.ndarray
    checksum: np.ndarray

    def __init__(self, columns: dict[str, np.ndarray], out_dir: Path | None = None):
        self.columns = columns
        self.out_dir = out_dir
        for c, a in columns.items():
            setattr(self, c, a)

    @classmethod
    def open(cls, out_dir: str | os.PathLike) -> "ShardIndex":
        import zarr

        if storage.is_url(out_dir):
            return _open_remote_index(str(out_dir))
        out = Path(out_dir)
        path = out / INDEX_NAME
        if not out.is_dir():
            raise ShardError(f"{out}: no such shard folder; pass the --out folder of a finished osp encode")
        if not (path / "zarr.json").exists():
            raise ShardError(
                f"{path}: missing, the encode into {out} did not finish; run the same osp encode again (it resumes)"
            )
        group = zarr.open_group(str(path), mode="r")
        version = group.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise _version_error(path, version)
        cols = {c: np.asarray(group[c][:]) for c in INDEX_COLUMNS}  # pyright: ignore[reportArgumentType]
        return cls(cols, out)

    def __len__(self) -> int:
        return len(self.columns["key"])

    def row(self, i: int) -> IndexRow:
        values: dict[str, Any] = {
            f.name: (str if f.name in ("key", "checksum") else int)(self.columns[f.name][i]) for f in fields(IndexRow)
        }
        return IndexRow(**values)


def _open_remote_index(url: str) -> ShardIndex:
    """The index of a cache in an object store, read only when the encode finished: the manifest is
    published last, so a cache without one is still being written (or was abandoned)."""
    import tempfile

    store = storage.open_store(url)
    if not store.exists(MANIFEST_NAME):
        raise ShardError(
            f"{store.where(MANIFEST_NAME)}: missing, the encode into {url} did not finish (or is still running); "
            "run the same osp encode again (it resumes)"
        )
    names = [n for n in store.list(INDEX_NAME) if n.startswith(INDEX_NAME + "/")]
    if f"{INDEX_NAME}/zarr.json" not in names:
        raise ShardError(f"{store.where(INDEX_NAME)}: missing; run the same osp encode again (it resumes)")
    with tempfile.TemporaryDirectory(prefix="osp-index-") as tmp:
        for n in names:
            dst = Path(tmp) / n
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(store.read_bytes(n))
        index = ShardIndex.open(tmp)
    index.out_dir = url  # pyright: ignore[reportAttributeAccessIssue]
    return index


# --- readers -----------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors_bytes(
    buf: bytearray | bytes | memoryview, where: str = "safetensors member", *, owned: bool = False
) -> dict[str, torch.Tensor]:
    """Parse a safetensors blob without pickle. Tensors are zero-copy views of a writable `buf`; a
    read-only `buf` is copied first unless `owned` (the caller hands over a private bytes object that
    nothing else reads, as the readers below do)."""
    mv = memoryview(buf)
    if mv.readonly and not owned:
        mv = memoryview(bytearray(mv))
    try:
        if len(mv) < 8:
            raise ValueError("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", mv[:8])
        if n > MAX_ST_HEADER:
            raise ValueError(f"header of {n} bytes is over the {MAX_ST_HEADER} byte limit")
        if 8 + n > len(mv):
            raise ValueError("header runs past the end")
        header = json.loads(bytes(mv[8 : 8 + n]))
        base = 8 + n
        out = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES[spec["dtype"]]
            begin, end = spec["data_offsets"]
            shape = [int(s) for s in spec["shape"]]
            numel = math.prod(shape)
            if not 0 <= begin <= end <= len(mv) - base or (end - begin) != numel * dtype.itemsize:
                raise ValueError(f"tensor {name!r} has bad offsets")
            if numel:
                with warnings.catch_warnings():  # an owned read-only buffer: nothing else sees writes
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.frombuffer(mv, dtype=dtype, count=numel, offset=base + begin)
            else:
                t = torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape)
        return out
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise ShardError(f"{where}: not a valid safetensors blob ({e}); re-encode this shard") from None


@dataclass
class Sample:
    key: str
    latent: torch.Tensor  # [8, T, H, W] moments (or [4, T, H, W]), stored dtype
    text: torch.Tensor | None  # [L, D] unpadded mT5 hidden states; None when it lives in a text cache
    meta: dict  # (then meta["text_key"] names it: TextCache.get)


def _sample_from_members(key: str, st: bytes, js: bytes, where: str) -> Sample:
    tensors = load_safetensors_bytes(st, f"{where}: {key}.safetensors", owned=True)
    try:
        meta = json.loads(bytes(js))
    except ValueError as e:
        raise ShardError(f"{where}: {key}.json is not valid JSON ({e}); re-encode this shard") from None
    by_ref = "text" not in tensors and isinstance(meta, dict) and isinstance(meta.get(TEXT_KEY_FIELD), str)
    if "latent" not in tensors or ("text" not in tensors and not by_ref):
        raise ShardError(f"{where}: {key}.safetensors lacks 'latent' or 'text'; re-encode this shard")
    return Sample(key, tensors["latent"], tensors.get("text"), meta)


def shard_location(out_dir: str | os.PathLike, shard_id: int) -> str:
    """A shard's tar as messages name it: its local path or its object URL."""
    return storage.join(out_dir, shard_path("", shard_id).name)


def _store_gone(e: OSError) -> None:
    """Re-raise an object-store failure that says nothing about the object (unreachable, denied)."""
    if isinstance(e, storage.StoreError) and not isinstance(e, storage.ObjectMissing):
        raise e


def _shard_problem(out_dir: str | os.PathLike, index: ShardIndex, sid: int) -> str | None:
    """What `verify` says of the shard as a whole (sidecar missing/invalid, size differs from the one
    recorded at publish), checked once per shard per process (cached on the index)."""
    cache = index.__dict__.setdefault("_shard_problems", {})
    if sid not in cache:
        store = storage.open_store(out_dir)
        tar, rows = shard_path("", sid).name, rows_path("", sid).name
        problem = None
        try:
            side = json.loads(store.read_bytes(rows))
        except (OSError, ValueError) as e:
            if isinstance(e, OSError):
                _store_gone(e)
            side, problem = None, f"no valid {rows} sidecar"
        try:
            size = store.size(tar)
        except OSError as e:
            _store_gone(e)
            size, problem = None, "tar missing"
        if problem is None and (not isinstance(side, dict) or side.get("schema_version") != SCHEMA_VERSION):
            problem = f"{rows} has schema version {side.get('schema_version') if isinstance(side, dict) else None}, not {SCHEMA_VERSION}"
        elif problem is None and isinstance(side, dict) and side.get("tar_size") != size:
            problem = f"size {size} != {side.get('tar_size')} recorded at publish (truncated or modified)"
        cache[sid] = problem
    return cache[sid]


def _header_problem(block: bytes, name: str, offset: int, size: int) -> str | None:
    """The ustar header block in front of a member's data must be intact (its own checksum), and name
    that member with that size, as `verify`'s tar scan requires."""
    if offset < tarfile.BLOCKSIZE:
        return f"{name}: offset {offset} leaves no room for its tar header"
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        return f"{name}: damaged tar header ({e})"
    if info.size != size or (len(name) < 100 and info.name != name):
        return f"{name}: the tar header at {offset} names {info.name!r} of {info.size} bytes, the index says {name!r} of {size}"
    return None


def _sample_ranges(r: IndexRow, verify: bool) -> list[tuple[int, int]]:
    """The byte ranges of a row: [header, safetensors, header, json] (verify) or [safetensors, json]."""
    members = [(r.st_offset, r.st_size), (r.json_offset, r.json_size)]
    if not verify:
        return members
    H = tarfile.BLOCKSIZE
    return [(max(r.st_offset - H, 0), H), members[0], (max(r.json_offset - H, 0), H), members[1]]


def _checked_members(r: IndexRow, parts: list[bytes], path: str, verify: bool) -> tuple[bytes, bytes] | ShardError:
    """(safetensors bytes, json bytes) of a row read as `_sample_ranges` says, checked as `read_sample` says."""
    fix = "re-encode this shard (osp shards verify)"
    if verify:
        h_st, st, h_js, js = parts
        for name, block, off, sz in (
            (f"{r.key}.safetensors", h_st, r.st_offset, r.st_size),
            (f"{r.key}.json", h_js, r.json_offset, r.json_size),
        ):
            if problem := _header_problem(block, name, off, sz):
                return ShardError(f"{path}: key {r.key}: {problem}; {fix}")
    else:
        st, js = parts
    if len(st) != r.st_size or len(js) != r.json_size:
        return ShardError(f"{path}: truncated at key {r.key}; {fix}")
    if verify and checksum(st, js, r) != r.checksum:
        return ShardError(
            f"{path}: checksum mismatch for key {r.key} (bytes or index row changed); the shard or index is corrupt, {fix}"
        )
    return st, js


def _read_members(
    out_dir: str | os.PathLike, index: ShardIndex, rows: list[int], verify: bool
) -> list[tuple[IndexRow, bytes, bytes, str] | ShardError]:
    """(row, safetensors bytes, json bytes, tar location) of each row, checked as `read_sample` says: the
    byte ranges of the rows of one shard are read in one call (adjacent ones, and in an object store near
    ones, as one request); a failing row's ShardError stands in its place."""
    store = storage.open_store(out_dir)
    fix = "re-encode this shard (osp shards verify)"
    rs = [index.row(int(i)) for i in rows]
    out: list[tuple[IndexRow, bytes, bytes, str] | ShardError | None] = [None] * len(rs)
    by_shard: dict[int, list[int]] = {}
    for j, r in enumerate(rs):
        if verify and (problem := _shard_problem(out_dir, index, r.shard)):
            out[j] = ShardError(f"{shard_location(out_dir, r.shard)}: {problem} (key {r.key}); {fix}")
        else:
            by_shard.setdefault(r.shard, []).append(j)
    n = 4 if verify else 2
    for sid, js in by_shard.items():
        path = shard_location(out_dir, sid)
        try:
            parts = store.read_ranges(shard_path("", sid).name, [g for j in js for g in _sample_ranges(rs[j], verify)])
        except FileNotFoundError:
            for j in js:
                out[j] = ShardError(f"{path}: missing (key {rs[j].key}); {fix}")
            continue
        except storage.StoreError as e:  # unreachable or denied: named with the first key it stops
            for j in js:
                out[j] = ShardError(f"{path}: key {rs[j].key}: {str(e).removeprefix(path + ': ')}")
            continue
        for k, j in enumerate(js):
            got = _checked_members(rs[j], parts[k * n : (k + 1) * n], path, verify)
            out[j] = got if isinstance(got, ShardError) else (rs[j], got[0], got[1], path)
    return [o for o in out if o is not None]


def read_samples(
    out_dir: str | os.PathLike, index: ShardIndex, rows: list[int], *, verify: bool = True
) -> list[Sample | ShardError]:
    """`read_sample` for several rows: the rows of one shard are read together (`_read_members`); every
    row is checked and decoded on its own and a failing row's ShardError stands in its place."""
    out: list[Sample | ShardError] = []
    for got in _read_members(out_dir, index, rows, verify):
        if isinstance(got, ShardError):
            out.append(got)
            continue
        r, st, js, path = got
        try:
            out.append(_sample_from_members(r.key, st, js, path))
        except ShardError as e:
            out.append(e)
    return out


def read_sample(out_dir: str | os.PathLike, index: ShardIndex, i: int, *, verify: bool = True) -> Sample:
    """Random access: read both members at their indexed offsets, check what `verify` checks for this
    row (shard published and untruncated, tar headers, checksum over the row's fields and bytes), decode.
    The tensors are views of a private buffer (no copy beyond the read itself)."""
    s = read_samples(out_dir, index, [i], verify=verify)[0]
    if isinstance(s, ShardError):
        raise s
    return s


def _read_row_members(out_dir: str | os.PathLike, index: ShardIndex, i: int, verify: bool) -> tuple:
    """(key, safetensors bytes, json bytes, tar location) of row i, checked as `read_sample` says."""
    got = _read_members(out_dir, index, [i], verify)[0]
    if isinstance(got, ShardError):
        raise got
    r, st, js, path = got
    return r.key, st, js, path


def split_member_name(name: str) -> tuple[str, str]:
    """'<key>.<ext>' -> (key, ext), splitting at the first dot of the basename (WebDataset rule)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext


def decode_member(key: str, data: bytes):
    """An explicit WebDataset handler: decodes `.safetensors` and `.json` only; returns None (leave
    the bytes alone) for anything else, with a warning naming the member.

    webdataset appends its default handlers (pickle, torch.load) after yours unless told not to, so
    always pass `pre=[], post=[]`:  `WebDataset(urls, shardshuffle=False).decode(decode_member,
    pre=[], post=[])`, or use `.map(wds_decode)`.
    """
    ext = key.rsplit(".", 1)[-1].lower()
    if ext == "safetensors":
        return load_safetensors_bytes(data, key)
    if ext == "json":
        return json.loads(data)
    warnings.warn(f"member {key!r} is not a safetensors/json sample member; left undecoded", stacklevel=2)
    return None


def wds_decode(sample: dict) -> dict:
    """Decode one WebDataset sample dict safely: `WebDataset(urls, shardshuffle=False).map(wds_decode)`.
    Non-sample members stay raw bytes (never unpickled)."""
    out = {}
    for k, v in sample.items():
        if k.startswith("__") or not isinstance(v, (bytes, bytearray)):
            out[k] = v
            continue
        d = decode_member(f"{sample.get('__key__', '')}.{k}", bytes(v))
        out[k] = v if d is None else d
    return out


def iter_shard(tar_path: str | os.PathLike) -> Iterator[Sample]:
    """Stream the samples of one tar in order. Only `.safetensors` and `.json` members are decoded;
    other members (.pyd, .pickle, .pth, links, ...) are skipped with a warning naming them."""
    tar_path = Path(tar_path)
    pending: dict[str, Any] = {}
    current: str | None = None

    def flush():
        if current is None:
            return None
        if "safetensors" in pending and "json" in pending:
            return _sample_from_members(current, pending["safetensors"], pending["json"], str(tar_path))
        warnings.warn(f"{tar_path}: sample {current} lacks a .safetensors or .json member; skipped", stacklevel=2)
        return None

    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for info in tar:
                key, ext = split_member_name(info.name)
                if not info.isreg() or ext not in MEMBER_EXTS or not KEY_PATTERN.match(key):
                    warnings.warn(
                        f"{tar_path}: member {info.name!r} is not a safetensors/json sample member; skipped, never decoded",
                        stacklevel=2,
                    )
                    continue
                if key != current:
                    s = flush()
                    if s is not None:
                        yield s
                    current, pending = key, {}
                f = tar.extractfile(info)
                pending[ext] = f.read() if f is not None else b""
    except tarfile.TarError as e:
        raise ShardError(f"{tar_path}: unreadable or truncated tar ({e}); re-encode this shard") from None
    s = flush()
    if s is not None:
        yield s


# --- manifest, uncond --------------------------------------------------------------------------------


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json atomically; `schema_version` is added (or must equal SCHEMA_VERSION), and
    `uncond_checksum` pins uncond.safetensors when it exists and the manifest pins nothing yet."""
    out = Path(out_dir)
    if "uncond_checksum" not in manifest and (out / UNCOND_NAME).exists():
        manifest = {**manifest, "uncond_checksum": uncond_checksum((out / UNCOND_NAME).read_bytes())}
    version = manifest.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{out / MANIFEST_NAME}: cannot write schema version {version}; this osp writes {SCHEMA_VERSION}"
        )
    out.mkdir(parents=True, exist_ok=True)
    body = json.dumps({**manifest, "schema_version": SCHEMA_VERSION}, sort_keys=True, indent=2, ensure_ascii=False)
    _atomic_write_bytes(out / MANIFEST_NAME, body.encode("utf-8") + b"\n")


def read_manifest(out_dir: str | os.PathLike) -> dict:
    store = storage.open_store(out_dir)
    path = store.where(MANIFEST_NAME)
    try:
        manifest = json.loads(store.read_bytes(MANIFEST_NAME))
    except FileNotFoundError:
        raise ShardError(f"{path}: missing; this is not a finished shard directory (run osp encode)") from None
    except ValueError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); re-run osp encode") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise _version_error(path, version)
    return manifest


def write_uncond(out_dir: str | os.PathLike, text: torch.Tensor) -> None:
    """Store the text encoder's output for the empty caption, [L, D] (dtype kept)."""
    if text.ndim != 2:
        raise ShardError(f"{Path(out_dir) / UNCOND_NAME}: uncond text must be [L, D], got {tuple(text.shape)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = st_save({"text": text.detach().to("cpu").contiguous()})
    _atomic_write_bytes(out / UNCOND_NAME, data)
    if (out / MANIFEST_NAME).exists():  # re-pin (the manifest is written before or after uncond)
        write_manifest(out, {**read_manifest(out), "uncond_checksum": uncond_checksum(data)})


def uncond_checksum(data: bytes) -> str:
    return checksum(data, b"")


def _uncond_problem(out: Path | str | os.PathLike, data: bytes) -> str | None:
    try:
        pinned = read_manifest(out).get("uncond_checksum")
    except ShardError:
        return None  # the manifest's own problem is reported where it is read
    if pinned is None:
        return f"{storage.join(out, MANIFEST_NAME)} pins no uncond_checksum"
    if uncond_checksum(data) != pinned:
        return f"checksum {uncond_checksum(data)} != {pinned} pinned in {MANIFEST_NAME} (modified or corrupt)"
    return None


def read_uncond(out_dir: str | os.PathLike) -> torch.Tensor:
    store = storage.open_store(out_dir)
    path = store.where(UNCOND_NAME)
    try:
        data = store.read_bytes(UNCOND_NAME)
    except FileNotFoundError:
        raise ShardError(f"{path}: missing; stage 1 writes it (re-run osp encode)") from None
    if problem := _uncond_problem(out_dir, data):
        raise ShardError(f"{path}: {problem}; re-run osp encode")
    tensors = load_safetensors_bytes(bytearray(data), str(path))
    if "text" not in tensors:
        raise ShardError(f"{path}: lacks the 'text' tensor; re-run osp encode")
    return tensors["text"]


# --- verify, inspect ---------------------------------------------------------------------------------


def _scan_tar(store: storage.Store, name: str) -> tuple[list[tuple[str, int, int]], str | None]:
    """(member name, data offset, size) of every member, and the error that stopped the scan, if any."""
    members = []
    try:
        with store.open(name) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                members.append((info.name, info.offset_data, info.size))
            end = tar.offset
            size = store.size(name)
            for info in tar.getmembers():  # every member's data must lie inside the file
                if info.offset_data + info.size > size:
                    return members, f"member {info.name} runs past the end of the file (truncated)"
            if end > size:
                return members, "truncated"
    except (tarfile.TarError, OSError) as e:
        return members, f"unreadable or truncated tar ({e})"
    return members, None


def verify(out_dir: str | os.PathLike) -> list[str]:
    """Check index rows against the tars (member names, offsets, sizes, checksums), tars against their
    sidecars (truncation, foreign members), and the manifest counts. Returns the problems found."""
    out = Path(out_dir)
    store = storage.open_store(out_dir)
    problems: list[str] = []
    if not storage.is_url(out_dir) and not out.is_dir():
        return [f"{out}: not a directory"]
    manifest = None
    try:
        manifest = read_manifest(out_dir)
    except ShardError as e:
        problems.append(str(e))
    try:
        index = ShardIndex.open(out_dir)
    except ShardError as e:
        return problems + [str(e)]
    refs = text_refs(manifest) if manifest is not None else []
    if not store.exists(UNCOND_NAME):
        if not refs:  # a cache that refers to text caches finds "" there
            problems.append(f"{store.where(UNCOND_NAME)}: missing; stage 1 writes it (re-run osp encode)")
    elif manifest is not None and (problem := _uncond_problem(out_dir, store.read_bytes(UNCOND_NAME))):
        problems.append(f"{store.where(UNCOND_NAME)}: {problem}; re-run osp encode")

    tar_names = sorted(n for n in store.list() if "/" not in n and SHARD_PATTERN.match(n))
    on_disk = {int(m.group(1)) for n in tar_names if (m := SHARD_PATTERN.match(n))}
    published = published_shards(out_dir)
    for sid in sorted(on_disk - published):
        tar = shard_location(out_dir, sid)
        side = None
        try:
            side = json.loads(store.read_bytes(rows_path("", sid).name))
        except (OSError, ValueError):
            problems.append(f"{tar}: no valid {rows_path(out, sid).name} sidecar; re-encode this shard")
        if side is not None:
            problems.append(
                f"{tar}: size {store.size(shard_path('', sid).name)} != {side.get('tar_size')} recorded at publish (truncated or modified); re-encode this shard"
            )
    index_shards = set(int(s) for s in np.unique(index.shard)) if len(index) else set()
    for sid in sorted(published - index_shards):
        side = _read_rows(out_dir, sid)
        if side and side["rows"]:
            problems.append(f"{shard_location(out_dir, sid)}: published but not in {INDEX_NAME}; run merge_index")

    rows_by_shard: dict[int, list[int]] = {}
    for i in range(len(index)):
        rows_by_shard.setdefault(int(index.shard[i]), []).append(i)
    for sid, rows in sorted(rows_by_shard.items()):
        path, tar_name = shard_location(out_dir, sid), shard_path("", sid).name
        if not store.exists(tar_name):
            problems.append(f"{path}: missing but {len(rows)} index rows point at it (first key {index.key[rows[0]]})")
            continue
        members, err = _scan_tar(store, tar_name)
        if err:
            problems.append(f"{path}: {err}")
        by_name = {name: (off, size) for name, off, size in members}
        expected = set()
        size = store.size(tar_name)
        with store.open(tar_name) as f:
            for i in rows:
                r = index.row(i)
                expected |= {f"{r.key}.safetensors", f"{r.key}.json"}
                for ext, off, sz in (("safetensors", r.st_offset, r.st_size), ("json", r.json_offset, r.json_size)):
                    name = f"{r.key}.{ext}"
                    if off + sz > size:
                        problems.append(
                            f"{path}: key {r.key}: {name} at {off}+{sz} lies past the end of the tar ({size} bytes; truncated)"
                        )
                    elif name in by_name and by_name[name] != (off, sz):
                        problems.append(
                            f"{path}: key {r.key}: {name} is at {by_name[name]} in the tar, index says ({off}, {sz})"
                        )
                    elif name not in by_name and not err:
                        problems.append(f"{path}: key {r.key}: member {name} not in the tar")
                if r.json_offset + r.json_size > size:
                    continue
                f.seek(r.st_offset)
                st = f.read(r.st_size)
                f.seek(r.json_offset)
                js = f.read(r.json_size)
                if checksum(st, js, r) != r.checksum:
                    problems.append(
                        f"{path}: key {r.key}: checksum mismatch (stored {r.checksum}, actual {checksum(st, js, r)}; bytes or index row changed)"
                    )
        for name in sorted(set(by_name) - expected):
            problems.append(f"{path}: member {name} is not in the index (foreign member; never decoded)")

    if refs and manifest is not None:
        problems += _text_ref_problems(out_dir, manifest, index)
    if manifest is not None:
        counts = manifest.get("counts", {})
        n_err = (
            sum(1 for line in store.read_bytes(ERRORS_NAME).decode("utf-8").splitlines() if line.strip())
            if store.exists(ERRORS_NAME)
            else 0
        )
        if "samples" in counts and counts["samples"] != len(index):
            problems.append(
                f"{store.where(MANIFEST_NAME)}: counts.samples {counts['samples']} != {len(index)} index rows"
            )
        if "errors" in counts and counts["errors"] != n_err:
            problems.append(
                f"{store.where(MANIFEST_NAME)}: counts.errors {counts['errors']} != {n_err} lines of {ERRORS_NAME}"
            )
        if "inputs" in counts and counts["inputs"] != len(index) + n_err:
            problems.append(
                f"{store.where(MANIFEST_NAME)}: counts.inputs {counts['inputs']} != samples {len(index)} + errors {n_err}"
            )
    return problems


def upgrade(out_dir: str | os.PathLike) -> int:
    """Upgrade a schema v1 cache in place to v2: every row's v1 checksum (bytes only) is checked first,
    then the v2 checksum (row fields + bytes) is written to its sidecar; then index, manifest (with the
    uncond pin). A row whose v1 checksum fails stops the upgrade (re-encode that shard). Returns the
    number of rows upgraded; a v2 cache is left as it is (0)."""
    out = Path(out_dir)
    mpath = out / MANIFEST_NAME
    try:
        manifest = json.loads(mpath.read_bytes())
    except (OSError, ValueError) as e:
        raise ShardError(f"{mpath}: unreadable ({e}); re-encode") from None
    if manifest.get("schema_version") == SCHEMA_VERSION:
        return 0
    if manifest.get("schema_version") not in OLD_SCHEMA_VERSIONS:
        raise _version_error(mpath, manifest.get("schema_version"))
    n = 0
    for tar in sorted(p for p in out.iterdir() if SHARD_PATTERN.match(p.name)):
        m = SHARD_PATTERN.match(tar.name)
        assert m is not None  # the filter above
        sid = int(m.group(1))
        try:
            side = json.loads(rows_path(out, sid).read_bytes())
        except (OSError, ValueError):
            raise ShardError(f"{tar}: no valid {rows_path(out, sid).name} sidecar; re-encode this shard") from None
        if side.get("schema_version") == SCHEMA_VERSION:
            continue
        if side.get("tar_size") != tar.stat().st_size:
            raise ShardError(f"{tar}: size differs from the one recorded at publish; re-encode this shard")
        with open(tar, "rb") as f:
            for r in side["rows"]:
                f.seek(r["st_offset"])
                st = f.read(r["st_size"])
                f.seek(r["json_offset"])
                js = f.read(r["json_size"])
                if checksum(st, js) != r["checksum"]:
                    raise ShardError(f"{tar}: key {r['key']}: v1 checksum mismatch (corrupt); re-encode this shard")
                r["checksum"] = checksum(st, js, {**r, "shard": sid})
                n += 1
        _atomic_write_bytes(
            rows_path(out, sid), _dump_json({**side, "schema_version": SCHEMA_VERSION}, rows_path(out, sid).name)
        )
    manifest["schema_version"] = SCHEMA_VERSION
    manifest.pop("uncond_checksum", None)
    write_manifest(out, manifest)
    merge_index(out)
    return n


def inspect(out_dir: str | os.PathLike) -> dict:
    """Summary of a shard directory: counts, latent-shape histogram, bytes per sample, text lengths."""
    store = storage.open_store(out_dir)
    index = ShardIndex.open(out_dir)
    n = len(index)
    shards = sorted(set(int(s) for s in np.unique(index.shard))) if n else []
    tars = [shard_path("", s).name for s in shards]
    tar_bytes = sum(store.size(t) for t in tars if store.exists(t))
    shapes: dict[str, int] = {}
    for t, h, w in zip(index.latent_t.tolist(), index.latent_h.tolist(), index.latent_w.tolist()):
        k = f"{t}x{h}x{w}"
        shapes[k] = shapes.get(k, 0) + 1
    tl = index.text_len
    errors = 0
    if store.exists(ERRORS_NAME):
        errors = sum(1 for line in store.read_bytes(ERRORS_NAME).decode("utf-8").splitlines() if line.strip())
    try:
        manifest = read_manifest(out_dir)
    except ShardError:
        manifest = None
    m = manifest or {}
    side = _read_rows(out_dir, shards[0]) if shards else None
    return {
        "dir": store.url,
        "samples": n,
        "shards": len(shards),
        "errors": errors,
        "latent_shapes": dict(sorted(shapes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tar_bytes": tar_bytes,
        "bytes_per_sample": tar_bytes / n if n else 0.0,
        "member_bytes_per_sample": float((index.st_size + index.json_size).mean()) if n else 0.0,
        "text_len": {"min": int(tl.min()), "mean": float(tl.mean()), "max": int(tl.max())}
        if n
        else {"min": 0, "mean": 0.0, "max": 0},
        "latent_dtype": (side or {}).get("latent_dtype"),
        "text_dtype": (m.get("text") or {}).get("dtype") if isinstance(m.get("text"), dict) else None,
        "preset": (m.get("geometry") or {}).get("preset") if isinstance(m.get("geometry"), dict) else None,
        "kind": m.get("kind", "latent"),
        "text_id": m.get("text_id"),
        "text_refs": [_ref_summary(out_dir, ref) for ref in text_refs(m)],
        "manifest": manifest,
    }


# --- text caches (one embedding per cleaned caption, shared by latent caches) ------------------------
#
# A text cache is a shard directory of the same format (tars, sidecars, index.zarr, manifest, uncond)
# whose samples hold only `text` [L, D]; its manifest says `"kind": "text"` and `text_id`, the
# identity of the encoder that made the embeddings (`text_encoder_id` in osp.common.models.text).
# Each sample's key is `text_key(cleaned caption, text_id, max_length)`, so one caption is encoded
# once per encoder, whichever dataset or geometry asks for it. Index rows have latent T x H x W 0 x 0 x 0.
#
# A latent cache that refers to text caches stores no text: its samples' json names `text_key`, the
# index keeps `text_len`, and its manifest lists the caches (`text_refs`: path relative to the latent
# cache and absolute, and the text_id each was made with) and the `text_id` all of them share. The
# empty caption "" is the text cache's uncond.safetensors. `verify` checks that every reference
# resolves; caches with text inline (no `text_refs`) read as before.

TEXT_KIND = "text"
TEXT_KEY_FIELD = "text_key"


def text_key(caption_clean: str, text_id: str, max_length: int) -> str:
    """The key of one cleaned caption's embedding: a hash of the caption, the encoder and the length."""
    body = json.dumps([caption_clean, text_id, int(max_length)], ensure_ascii=False, separators=(",", ":"))
    return "t" + hashlib.sha256(body.encode("utf-8")).hexdigest()[:40]


class TextShardWriter(ShardWriter):
    """One shard of a text cache: `write(key, text [L, D], meta)`; publish/abort as ShardWriter."""

    def __enter__(self) -> "TextShardWriter":
        return self

    def write(self, key: str, text: torch.Tensor, meta: dict) -> dict:  # type: ignore[override]
        if self._done:
            raise ShardError(f"{self.final_tar.name}: writer already published or aborted")
        validate_key(key)
        if key in self._keys:
            raise ShardError(f"{self.final_tar.name}: duplicate key {key!r} in one shard; keys must be unique")
        if text.ndim != 2 or text.shape[0] < 1:
            raise ShardError(f"{key}: text must be unpadded [L>=1, D], got {tuple(text.shape)}")
        st_bytes = st_save({"text": text.detach().to("cpu").contiguous()})
        json_bytes = _dump_json(meta, f"{self.final_tar.name}: meta of {key}")
        with self._storage():
            row = {
                "key": key,
                "st_offset": self._add_member(f"{key}.safetensors", st_bytes),
                "st_size": len(st_bytes),
                "json_offset": self._add_member(f"{key}.json", json_bytes),
                "json_size": len(json_bytes),
                "latent_t": 0,
                "latent_h": 0,
                "latent_w": 0,
                "text_len": int(text.shape[0]),
            }
        row["checksum"] = checksum(st_bytes, json_bytes, {**row, "shard": self.shard_id})
        self._keys.add(key)
        self._rows.append(row)
        return row


class TextCache:
    """A text cache opened for lookups: `key in cache`, `cache.get(key)` -> [L, D] (checked as
    read_sample checks), `cache.uncond()`. Holds numpy columns only (pickles into loader workers)."""

    def __init__(self, root: str | os.PathLike, manifest: dict, index: ShardIndex):
        self.root: Path | str = str(root) if storage.is_url(root) else Path(root)  # a URL stays a string
        self.manifest = manifest
        self.index = index
        self.text_id: str = manifest.get("text_id", "")
        keys = np.asarray([str(k) for k in index.key], dtype=str)  # fixed-width unicode: searchsorted works
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]

    @classmethod
    def open(cls, root: str | os.PathLike, *, allow_empty: bool = False) -> "TextCache":
        root = str(root) if storage.is_url(root) else Path(root)
        store = storage.open_store(root)
        if allow_empty and not store.exists(MANIFEST_NAME):
            manifest = {"kind": TEXT_KIND}  # a new text cache: nothing in it yet
        else:
            manifest = read_manifest(root)
        if manifest.get("kind") != TEXT_KIND:
            raise ShardError(f"{root}: not a text cache (manifest kind {manifest.get('kind', 'latent')!r})")
        if allow_empty and not store.exists(f"{INDEX_NAME}/zarr.json"):
            return cls(root, manifest, ShardIndex({c: np.asarray([], dtype=_np_dtype(c)) for c in INDEX_COLUMNS}))
        return cls(root, manifest, ShardIndex.open(root))

    def __len__(self) -> int:
        return len(self.index)

    def row_of(self, key: str) -> int | None:
        j = int(np.searchsorted(self._sorted, key))
        if j < len(self._sorted) and self._sorted[j] == key:
            return int(self._order[j])
        return None

    def __contains__(self, key: str) -> bool:
        return self.row_of(key) is not None

    def text_len(self, key: str) -> int:
        i = self.row_of(key)
        if i is None:
            raise ShardError(f"{self.root}: no text for key {key}")
        return int(self.index.text_len[i])

    def get(self, key: str, *, verify: bool = True) -> torch.Tensor:
        i = self.row_of(key)
        if i is None:
            raise ShardError(f"{self.root}: no text for key {key}; re-run osp encode --text-cache {self.root}")
        k, st, _js, where = _read_row_members(self.root, self.index, i, verify)
        tensors = load_safetensors_bytes(st, f"{where}: {k}.safetensors", owned=True)
        if "text" not in tensors:
            raise ShardError(f"{where}: {k}.safetensors lacks 'text'; re-encode the text cache")
        return tensors["text"]

    def uncond(self) -> torch.Tensor:
        return read_uncond(self.root)


def _np_dtype(column: str):
    return str if INDEX_COLUMNS[column] == "str" else INDEX_COLUMNS[column]


def text_refs(manifest: dict | None) -> list[dict]:
    """The text caches a latent cache's manifest refers to ([] for text inline)."""
    refs = (manifest or {}).get("text_refs") or []
    return [r for r in refs if isinstance(r, dict)]


def make_text_ref(latent_dir: str | os.PathLike, text_dir: str | os.PathLike, text_id: str) -> dict:
    if storage.is_url(latent_dir) or storage.is_url(text_dir):  # object-store URLs: relative within one bucket
        latent, text = str(latent_dir).rstrip("/"), str(text_dir).rstrip("/")
        (lb, lk), (tb, tk) = _bucket_key(latent), _bucket_key(text)
        if lb != tb:
            raise ShardError(
                f"{latent}: its text cache {text} is not in the same object store bucket; "
                "keep the latent and the text cache side by side (one bucket, or both local)"
            )
        return {"path": posixpath.relpath("/" + tk, "/" + lk), "abs_path": text, "text_id": text_id}
    text_abs = Path(text_dir).resolve()
    return {
        "path": os.path.relpath(text_abs, Path(latent_dir).resolve()),
        "abs_path": str(text_abs),
        "text_id": text_id,
    }


def _bucket_key(url: str) -> tuple[str, str]:
    """('scheme://bucket', 'key/prefix') of an object-store URL; ('', path) of a local path."""
    if not storage.is_url(url):
        return "", url
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}", key


def _ref_candidates(latent_dir: str | os.PathLike, ref: dict) -> list[str | Path]:
    rel, absolute = ref.get("path", ""), ref.get("abs_path", "")
    if storage.is_url(latent_dir):
        bucket, key = _bucket_key(str(latent_dir).rstrip("/"))
        near: str | Path = f"{bucket}/{posixpath.normpath(posixpath.join('/' + key, rel)).lstrip('/')}".rstrip("/")
    else:
        near = Path(latent_dir) / rel
    return [near, absolute if storage.is_url(absolute) else Path(absolute)]


def resolve_text_ref(latent_dir: str | os.PathLike, ref: dict) -> Path | str:
    """The folder (or object-store URL) of a text reference: relative to the latent cache first, then the
    absolute one."""
    for cand in _ref_candidates(latent_dir, ref):
        if ref.get("path") is not None and storage.open_store(cand).exists(MANIFEST_NAME):
            return cand
    raise ShardError(
        f"{latent_dir}: refers to the text cache {ref.get('path')} ({ref.get('abs_path')}), which is missing; "
        f"copy it next to the latent cache or re-run osp encode --text-cache DIR"
    )


def open_text_refs(latent_dir: str | os.PathLike, manifest: dict | None = None) -> list[TextCache]:
    """The text caches of a latent cache, each checked to be the one referred to (same text_id)."""
    manifest = read_manifest(latent_dir) if manifest is None else manifest
    caches = []
    for ref in text_refs(manifest):
        tc = TextCache.open(resolve_text_ref(latent_dir, ref))
        if tc.text_id != ref.get("text_id"):
            raise ShardError(
                f"{latent_dir}: its text cache {tc.root} holds embeddings of text encoder {tc.text_id[:12]}, the "
                f"latents were referred to {str(ref.get('text_id'))[:12]}; re-run osp encode --text-cache {tc.root}"
            )
        caches.append(tc)
    return caches


class TextLookup:
    """text_key -> embedding over the text caches of one latent cache (first that holds it)."""

    def __init__(self, caches: list[TextCache]):
        self.caches = caches

    def get(self, key: str, *, verify: bool = True) -> torch.Tensor:
        for c in self.caches:
            if key in c:
                return c.get(key, verify=verify)
        raise ShardError(
            f"text key {key} is in none of the text caches {[str(c.root) for c in self.caches]}; "
            f"re-run osp encode --text-cache DIR (osp shards verify names every missing reference)"
        )


def cache_uncond(out_dir: str | os.PathLike) -> torch.Tensor:
    """The encoding of "" for a latent cache: its own uncond.safetensors, or its text cache's."""
    manifest = read_manifest(out_dir)
    caches = open_text_refs(out_dir, manifest) if text_refs(manifest) else []
    return caches[0].uncond() if caches else read_uncond(out_dir)


def cache_text_id(out_dir: str | os.PathLike, manifest: dict | None = None) -> str | None:
    """The text-encoder identity of a cache (text cache, referring latent cache, or inline text)."""
    m = read_manifest(out_dir) if manifest is None else manifest
    if m.get("text_id"):
        return str(m["text_id"])
    te = m.get("text_encoder")
    return str(te["text_id"]) if isinstance(te, dict) and te.get("text_id") else None


def _text_ref_problems(out: str | os.PathLike, manifest: dict, index: ShardIndex) -> list[str]:
    """Every row's text_key must be in one of the referred text caches."""
    try:
        lookup = TextLookup(open_text_refs(out, manifest))
    except ShardError as e:
        return [str(e)]
    problems = []
    store = storage.open_store(out)
    for i in range(len(index)):
        r = index.row(i)
        try:
            meta = json.loads(store.read_range(shard_path("", r.shard).name, r.json_offset, r.json_size))
        except (OSError, ValueError) as e:
            if isinstance(e, OSError):
                _store_gone(e)
            continue  # the row's own problem is reported by the checks above
        key = meta.get(TEXT_KEY_FIELD) if isinstance(meta, dict) else None
        if key is None:
            continue
        cache = next((c for c in lookup.caches if key in c), None)
        if cache is None:
            problems.append(
                f"{shard_location(out, r.shard)}: key {r.key}: text {key} is in none of the referred text caches "
                f"{[str(c.root) for c in lookup.caches]}; re-run osp encode --text-cache DIR"
            )
        elif cache.text_len(key) != r.text_len:
            problems.append(
                f"{shard_location(out, r.shard)}: key {r.key}: text_len {r.text_len} != {cache.text_len(key)}"
            )
    return problems


def _ref_summary(out: str | os.PathLike, ref: dict) -> dict:
    try:
        root = resolve_text_ref(out, ref)
        tc = TextCache.open(root)
        return {**ref, "resolved": str(root), "samples": len(tc), "ok": tc.text_id == ref.get("text_id")}
    except ShardError as e:
        return {**ref, "resolved": None, "ok": False, "error": str(e)}
