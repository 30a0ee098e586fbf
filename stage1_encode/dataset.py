"""Dataset listing: the pixabay_v2 annotation layout and the upstream `DATA_ROOT,ANNOTATION_JSON` list.

Accepted `--data` forms:
* a folder with a root `annotation.json` (pixabay_v2): a JSON list of records whose `path` is relative
  to that folder. The root file is authoritative; the per-folder `annotation.json` files are only read
  when the root file is absent. Their paths are relative to the same root folder too (the layout
  `osp demo-data` writes), so each folder file pairs with the root as its data root.
* a `*.json` annotation file: records relative to the file's folder.
* any other file: the upstream list file, one `DATA_ROOT,ANNOTATION_JSON` per line (blank lines and
  lines starting with `#` skipped; relative paths are taken relative to the current directory, as
  upstream does).

A record is `{"path", "cap" (str or list of str), "fps", "duration", "resolution": {"height", "width"}}`;
other fields are ignored. Records are returned raw; validation happens in `plan.py`, so that every
bad record becomes one error row instead of an exception. Annotation files are decoded as UTF-8 with
`surrogateescape`, so a caption holding invalid bytes survives listing and is rejected per record.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osp.common.errors import OspError

ANNOTATION_NAME = "annotation.json"


class DataError(OspError, ValueError):
    """The `--data` argument itself is unusable (not a per-record problem)."""


@dataclass(frozen=True)
class Source:
    """One annotation file and the root its record paths are relative to (both absolute)."""

    root: str
    annotation: str


@dataclass(frozen=True)
class RawRecord:
    """One annotation entry as read. `error` is set when the annotation file itself could not be read
    (then `record` is None and the row stands for the whole file)."""

    source: int  # position of its Source in the listing
    root: str
    annotation: str
    index: int  # position inside the annotation file
    record: Any
    error: str | None = None


def resolve_sources(data: str | os.PathLike) -> list[Source]:
    """The annotation sources named by `--data` (see the module docstring)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder; pass a dataset root with {ANNOTATION_NAME} or a list file")
    if data.is_dir():
        root_ann = data / ANNOTATION_NAME
        if root_ann.is_file():
            return [Source(str(data.resolve()), str(root_ann.resolve()))]
        per_folder = sorted(p for p in data.glob(f"*/{ANNOTATION_NAME}") if p.is_file())
        if not per_folder:
            raise DataError(f"{data}: no {ANNOTATION_NAME} in the folder or its subfolders; pass a pixabay_v2 root")
        return [Source(str(data.resolve()), str(p.resolve())) for p in per_folder]
    if data.suffix.lower() == ".json":
        return [Source(str(data.parent.resolve()), str(data.resolve()))]
    sources = []
    for lineno, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{data}:{lineno}: expected 'DATA_ROOT,ANNOTATION_JSON', got {line!r}")
        sources.append(Source(str(Path(parts[0]).resolve()), str(Path(parts[1]).resolve())))
    if not sources:
        raise DataError(f"{data}: the list file names no 'DATA_ROOT,ANNOTATION_JSON' line")
    return sources


def read_annotation(path: str) -> list[Any]:
    """The records of one annotation file (a JSON list). Raises ValueError with the reason."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read annotation file: {e.strerror or e}") from None
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")  # a UTF-8 BOM is tolerated
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedAnnotation(f"annotation file is not valid JSON: {e}", count_records(text)) from None
    if not isinstance(records, list):
        raise ValueError("annotation file must hold a JSON list of records")
    return records


class MalformedAnnotation(ValueError):
    """Invalid JSON; `n_records` is how many records the file seems to hold (at least 1)."""

    def __init__(self, message: str, n_records: int):
        super().__init__(message)
        self.n_records = max(1, n_records)


_NEXT_RECORD = re.compile(r"\}\s*,\s*\{")


def count_records(text: str) -> int:
    """Records of a malformed JSON list: each top-level object that parses counts one; a broken one
    counts one and the scan resumes at the next `}, {` boundary."""
    dec = json.JSONDecoder()
    pos, n = text.find("[") + 1, 0
    if pos == 0:
        return 1
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            _, pos = dec.raw_decode(text, pos)
            n += 1
        except json.JSONDecodeError:
            n += 1
            m = _NEXT_RECORD.search(text, pos)
            if m is None:
                break
            pos = m.start() + 1
    return n


def list_records(sources: list[Source]) -> list[RawRecord]:
    """Every record of every source, in listing order; an unreadable annotation file is one row, a
    malformed one (invalid JSON) one row per record it seems to hold."""
    rows: list[RawRecord] = []
    for s_idx, src in enumerate(sources):
        try:
            records = read_annotation(src.annotation)
        except MalformedAnnotation as e:
            rows.extend(
                RawRecord(
                    s_idx, src.root, src.annotation, i, None, error=f"{e} (record {i + 1} of ~{e.n_records} in it)"
                )
                for i in range(e.n_records)
            )
            continue
        except ValueError as e:
            rows.append(RawRecord(s_idx, src.root, src.annotation, -1, None, error=str(e)))
            continue
        rows.extend(RawRecord(s_idx, src.root, src.annotation, i, r) for i, r in enumerate(records))
    return rows


def inside_root(root: str, rel: str) -> str:
    """The real path of `rel` under `root`; a symlink that resolves outside the data root is refused
    (README: paths are resolved under the data root only). A missing file is the decoder's to report."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(
            f"path {rel!r} is a symlink to {real}, outside the data root {real_root}; copy the file under the root"
        )
    return real


def safe_relpath(path: Any) -> str:
    """Normalise a record's `path` to a relative POSIX path that stays under its root.

    Raises ValueError for non-strings, empty, absolute or `..`-escaping paths (a lexical check;
    `inside_root` then refuses symlinks that resolve outside the root)."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError("record has no 'path' string")
    if "\x00" in path:
        raise ValueError("path contains a NUL byte")
    p = path.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":"):
        raise ValueError(f"absolute path {path!r} escapes the data root; make it relative to the root")
    norm = os.path.normpath(p).replace(os.sep, "/")
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise ValueError(f"path {path!r} escapes the data root; keep record paths inside the root")
    return norm
