"""The work plan: sorted inputs -> clips -> fixed shard membership, the same for any number of ranks.

Definitions (the accounting behind `samples + errors = inputs`):
* a *record* is one entry of an annotation file (an unreadable annotation file counts as one record);
* an *input* is one unit of planned work: (record, caption slot, clip slot). By default a valid record
  is exactly one input (first caption, one centred clip); `--all-captions` makes one input per caption
  and `--clips-per-video k` up to k non-overlapping clips per video (as many as the annotation's
  fps x duration allows). A record rejected at plan time (bad path, no caption, missing metadata,
  wrong aspect, too short, duplicate, ...) is exactly one input.
* every input ends as exactly one sample in a shard or one row in `errors.jsonl` (plan-time rejects
  here, decode-time failures during encoding).

Order: records sorted by (source, normalised relative path, annotation file, record index); duplicate
paths (compared normalised: `a/x.mp4` = `a/./x.mp4`) keep the first in listing order. Inputs are numbered `seq` in that order; keys are `<seq:08d>_<slug>` (slug =
the sanitised relative path, plus `_c<j>` per caption and `_k<c>` per clip when those options are on):
deterministic, unique and dot-free. Shards hold `samples_per_shard` valid inputs each, consecutive in
seq order; a plan-time error row belongs to the shard of the next valid input (trailing ones to the
last shard), so it is published atomically with that shard, exactly once, also across resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import cast

from osp.common.config import ASPECT_TOLERANCE, TRAIN_FPS, latent_frames

from .clips import MAX_DURATION_S, MAX_FPS, MAX_SIDE, ClipError, aspect_ok, check_size, media_kind, resample_count
from .dataset import RawRecord, inside_root, safe_relpath
from osp.common.errors import ConfigError

PLAN_VERSION = 1
SHORT_CLIPS = ("error", "keep")
_SLUG_BAD = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class EncodeSpec:
    """Clip geometry and the input-expansion options (everything that changes the plan)."""

    num_frames: int
    height: int
    width: int
    fps: int = TRAIN_FPS
    clips_per_video: int = 1
    all_captions: bool = False
    drop_long: bool = False  # upstream's "longer than 2 * num_frames / fps seconds" filter; off by default
    frame_stride: int = 1  # every k-th frame of the fps-resampled sequence (upstream's sample_rate)
    speed_factor: float = 1.0  # > 1 subsamples evenly to len / speed_factor (upstream's speed_factor)
    short_clips: str = "error"  # error | keep (the longest 1 + 4k frames >= min_frames that the video has)
    min_frames: int = 1  # the shortest clip short_clips=keep keeps

    def __post_init__(self):
        latent_frames(self.num_frames)  # raises unless 1 + 4k
        if self.frame_stride < 1:
            raise ConfigError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if not (math.isfinite(self.speed_factor) and self.speed_factor >= 1.0):
            raise ConfigError(
                f"speed_factor must be >= 1 (upstream subsamples, never repeats), got {self.speed_factor}"
            )
        if self.short_clips not in SHORT_CLIPS:
            raise ConfigError(f"short_clips must be one of {', '.join(SHORT_CLIPS)}, got {self.short_clips!r}")
        latent_frames(self.min_frames)
        if self.min_frames > self.num_frames:
            raise ConfigError(f"min_frames {self.min_frames} is above the frames {self.num_frames}")

    @property
    def frame_step(self) -> float:
        """Source-frame step multiplier on top of the fps resampling."""
        return self.frame_stride * self.speed_factor
        if self.height % 8 or self.width % 8 or self.height <= 0 or self.width <= 0:
            raise ConfigError(f"height and width must be positive multiples of 8, got {self.height}x{self.width}")
        if self.clips_per_video < 1:
            raise ConfigError(f"clips_per_video must be >= 1, got {self.clips_per_video}")


@dataclass(frozen=True)
class WorkItem:
    """One valid input: what a decode worker needs, and where the sample goes."""

    seq: int
    key: str
    shard: int
    path: str  # absolute source path (under root)
    rel: str  # relative to root, POSIX
    root: str
    kind: str  # "video" | "image"
    caption: str  # raw caption (cleaned at encode time)
    caption_index: int
    clip: int
    clips: int
    annotation: str = ""
    record: int = -1
    frames: int = 0  # 0 = the spec's num_frames; a shorter 1 + 4k with short_clips=keep


@dataclass
class ShardPlan:
    id: int
    items: list[WorkItem] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # plan-time error rows


@dataclass
class Plan:
    spec: EncodeSpec
    samples_per_shard: int
    shards: list[ShardPlan]
    n_records: int
    n_inputs: int

    @property
    def n_valid(self) -> int:
        return sum(len(s.items) for s in self.shards)

    @property
    def n_plan_errors(self) -> int:
        return sum(len(s.errors) for s in self.shards)

    def digest(self) -> str:
        """sha256 over everything that determines the shard bytes (options, membership, captions)."""
        h = hashlib.sha256()
        h.update(
            json.dumps(
                {"v": PLAN_VERSION, "spec": asdict(self.spec), "sps": self.samples_per_shard}, sort_keys=True
            ).encode()
        )
        for s in self.shards:
            for it in s.items:
                fields_ = [s.id, it.seq, it.key, it.path, it.caption, it.clip, it.clips]
                h.update(json.dumps(fields_ + ([it.frames] if it.frames else []), ensure_ascii=True).encode())
            for e in s.errors:
                h.update(json.dumps([s.id, e], sort_keys=True, ensure_ascii=True).encode())
        return h.hexdigest()


def slugify(rel: str, limit: int = 48) -> str:
    stem = os.path.splitext(rel)[0]
    slug = _SLUG_BAD.sub("_", stem).strip("_") or "x"
    return slug[-limit:].lstrip("_-") or "x"


def error_row(seq: int, rec: RawRecord, file: str, reason: str, stage: str, key: str | None = None) -> dict:
    return {
        "input": seq,
        "key": key,
        "file": file,
        "root": rec.root,
        "annotation": rec.annotation,
        "record": rec.index,
        "stage": stage,
        "reason": reason,
    }


def _captions(rec: dict) -> list[str]:
    cap = rec.get("cap")
    caps = [cap] if isinstance(cap, str) else cap if isinstance(cap, list) else None
    if caps is None:
        raise ClipError("record has no caption ('cap' missing or not a string/list)")
    if not all(isinstance(c, str) for c in caps):
        raise ClipError("'cap' list holds non-string entries")
    caps = [c for c in caps if c.strip()]
    if not caps:
        raise ClipError("record has an empty caption")
    for c in caps:
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            raise ClipError("caption is not valid UTF-8; re-save the annotation file as UTF-8") from None
    return caps


def _positive(rec: dict, name: str, limit: float) -> float:
    v = rec.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ClipError(f"video record needs a positive '{name}' (upstream drops records without it)")
    if v > limit:
        raise ClipError(f"'{name}' {v:g} is above the limit {limit:g}; fix the annotation")
    return float(v)


def _resolution(rec: dict, required: bool) -> tuple[int, int] | None:
    res = rec.get("resolution")
    if res is None and not required:
        return None
    if not isinstance(res, dict):
        raise ClipError("video record needs 'resolution': {'height', 'width'} (upstream drops records without it)")
    h, w = res.get("height"), res.get("width")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (h, w)):
        raise ClipError("'resolution' needs positive 'height' and 'width'")
    h, w = cast(float, h), cast(float, w)  # numbers, checked above
    if h > MAX_SIDE or w > MAX_SIDE:
        raise ClipError(f"'resolution' {h:g}x{w:g} is above the limit {MAX_SIDE} per side; fix the annotation")
    return int(h), int(w)


def _check_record(rec: dict, kind: str, spec: EncodeSpec) -> tuple[int, int]:
    """Validate metadata; return the number of clips this record yields (per caption) and their frames
    (0 = the spec's; a shorter 1 + 4k for a short video under short_clips=keep)."""
    res = _resolution(rec, required=(kind == "video"))
    if res is not None and not aspect_ok(res[0], res[1], spec.height, spec.width):
        a = spec.height / spec.width
        raise ClipError(
            f"aspect ratio h/w = {res[0]}/{res[1]} outside [{a / ASPECT_TOLERANCE:.3f}, {a * ASPECT_TOLERANCE:.3f}] of the target {spec.height}x{spec.width}"
        )
    if res is not None:
        check_size(res[0], res[1], spec.height, spec.width)
    if kind == "image":
        return 1, 0
    fps, duration = _positive(rec, "fps", MAX_FPS), _positive(rec, "duration", MAX_DURATION_S)
    n_src = int(math.floor(fps * duration + 1e-6))
    if spec.drop_long and n_src > 2 * spec.num_frames * fps / spec.fps:
        raise ClipError(f"longer than {2 * spec.num_frames / spec.fps:.2f} s (upstream length filter, --drop-long)")
    n_res = resample_count(n_src, fps, spec.fps, spec.frame_step)
    if n_res < spec.num_frames:
        kept = 1 + (n_res - 1) // 4 * 4 if n_res >= 1 else 0  # the longest 1 + 4k it has
        step = f" (frame step {spec.frame_step:g})" if spec.frame_step != 1 else ""
        if spec.short_clips == "keep" and kept >= spec.min_frames:
            return 1, kept
        need = f"need {spec.num_frames}" + (
            f" (or >= {spec.min_frames} with short_clips=keep)" if spec.short_clips == "keep" else ""
        )
        raise ClipError(
            f"too short: {duration:g} s at {fps:g} fps gives {n_res} frames at {spec.fps} fps{step}, {need}"
        )
    return min(spec.clips_per_video, n_res // spec.num_frames), 0


def make_plan(records: list[RawRecord], spec: EncodeSpec, samples_per_shard: int) -> Plan:
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")

    def sort_key(r: RawRecord):  # by normalised path, so duplicates sit together in listing order
        p = r.record.get("path") if isinstance(r.record, dict) else None
        try:
            p = safe_relpath(p)
        except ValueError:
            p = str(p) if p is not None else ""
        return (r.source, p, r.annotation, r.index)

    ordered = sorted(records, key=sort_key)
    entries: list[tuple[str, dict]] = []  # ("item", partial WorkItem kwargs) | ("error", row)
    seen: dict[tuple[str, str], RawRecord] = {}
    seq = 0
    for r in ordered:
        if r.error is not None:
            entries.append(("error", error_row(seq, r, r.annotation, r.error, "plan")))
            seq += 1
            continue
        rec = r.record
        file = rec.get("path") if isinstance(rec, dict) else None
        file = file if isinstance(file, str) else repr(file)
        try:
            if not isinstance(rec, dict):
                raise ClipError("record is not a JSON object")
            rel = safe_relpath(rec.get("path"))
            file = rel
            inside_root(r.root, rel)
            kind = media_kind(rel)
            caps = _captions(rec)
            clips, frames = _check_record(rec, kind, spec)
            first = seen.get((r.root, rel))
            if first is not None:
                raise ClipError(
                    f"duplicate path: also record {first.index} of {first.annotation}; only the first is encoded"
                )
            seen[(r.root, rel)] = r
        except (ClipError, ValueError) as e:
            entries.append(("error", error_row(seq, r, file, str(e), "plan")))
            seq += 1
            continue
        slots = list(enumerate(caps)) if spec.all_captions else [(0, caps[0])]
        for j, cap in slots:
            for c in range(clips):
                key = f"{seq:08d}_{slugify(rel)}"
                if spec.all_captions:
                    key += f"_c{j}"
                if spec.clips_per_video > 1:
                    key += f"_k{c}"
                entries.append(
                    (
                        "item",
                        dict(
                            seq=seq,
                            key=key,
                            path=os.path.join(r.root, rel),
                            rel=rel,
                            root=r.root,
                            kind=kind,
                            caption=cap,
                            caption_index=j,
                            clip=c,
                            clips=clips,
                            annotation=r.annotation,
                            record=r.index,
                            frames=frames,
                        ),
                    )
                )
                seq += 1

    # Shard membership: consecutive valid inputs; errors join the shard of the next valid input.
    n_valid = sum(1 for k, _ in entries if k == "item")
    n_shards = max(1, math.ceil(n_valid / samples_per_shard))
    shards = [ShardPlan(i) for i in range(n_shards)]
    valid = 0
    for kind, payload in entries:
        sid = min(valid // samples_per_shard, n_shards - 1)
        if kind == "item":
            shards[sid].items.append(WorkItem(shard=sid, **payload))
            valid += 1
        else:
            shards[sid].errors.append(payload)
    return Plan(spec, samples_per_shard, shards, n_records=len(records), n_inputs=seq)
