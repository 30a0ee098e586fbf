"""Clip reading: decord (1 thread) with a PyAV fallback, 24 fps resampling, centre crop + resize.

Upstream's opensora/dataset/t2v_datasets.py and transform.py, with their random choices made deterministic:
* resampling: index step 1 if |fps - 24| < 0.1 else fps / 24, indices = floor(arange(0, n, step));
  fps 30 when the file does not know it.
* temporal placement: upstream crops `num_frames` at a uniformly random start. Here the k planned
  clips of a video (k = `--clips-per-video`, default 1) are k consecutive, non-overlapping windows of
  `num_frames` resampled frames, centred as a block in the video: one clip is the centre clip.
  A planned clip that does not fit in the decoded video is an error ("too short").
* spatial: the largest centred window with the target aspect ratio, bilinear resize to the target size
  with align_corners=True and antialias=True, on x / 255, then 2x - 1 -> [-1, 1]. No flips.
* aspect filter (upstream keeps h/w within [a / 1.5, 1.5 a], a = target h / w): checked on the
  decoded frame size too, since annotations can be wrong.
Images (.jpg/.png/...) become one-frame clips through the same transform.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from osp.common.config import ASPECT_TOLERANCE, TRAIN_FPS
from osp.common.errors import OspError

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_FPS = 30.0  # upstream's value when a file does not report its frame rate
RESIZE_CHUNK = 16  # frames converted to float at a time (bounds the peak memory of long 720p clips)
# Bounds on annotation and decoder values, checked before anything is allocated from them.
MAX_FPS = 1000.0  # frames per second
MAX_DURATION_S = 86400.0  # one day
MAX_SIDE = 16384  # pixels, either side
MAX_FRAMES = int(MAX_FPS * MAX_DURATION_S)
# Minimum source size: the centred crop must be at least half the target in each direction (at most 2x
# upscaling); a 16x16 video for a 480x640 target is an error, not a blurred sample.
MIN_SOURCE_SCALE = 0.5


class ClipError(OspError):
    """An input that cannot become a clip; the message is the reason written to errors.jsonl."""


def media_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS:
        return "image"
    raise ClipError(
        f"unsupported file type {ext or '(none)'!r}; expected a video ({', '.join(VIDEO_EXTS)}) or image ({', '.join(IMAGE_EXTS)})"
    )


def _step(fps: float, train_fps: float, frame_step: float = 1.0) -> float:
    """Source frames per clip frame: the fps resampling step (upstream: 1 within 0.1 fps of the target),
    times `frame_step` = frame stride x speed factor (upstream's sample_rate and speed_factor)."""
    return (1.0 if abs(fps - train_fps) < 0.1 else fps / train_fps) * frame_step


def resample_count(n_frames: int, fps: float, train_fps: float = TRAIN_FPS, frame_step: float = 1.0) -> int:
    """len(resample_indices(n_frames, fps)), without allocating it."""
    return max(0, math.ceil(n_frames / _step(fps, train_fps, frame_step))) if n_frames > 0 else 0


def resample_indices(
    n_frames: int,
    fps: float,
    train_fps: float = TRAIN_FPS,
    start: int = 0,
    stop: int | None = None,
    frame_step: float = 1.0,
) -> np.ndarray:
    """Source frame indices [start, stop) of the video resampled to `train_fps` (floor(i * step), the
    values of floor(arange(0, n_frames, step))); only the window asked for is allocated."""
    n = resample_count(n_frames, fps, train_fps, frame_step)
    stop = n if stop is None else min(stop, n)
    return np.floor(np.arange(start, stop, dtype=np.float64) * _step(fps, train_fps, frame_step)).astype(np.int64)


def check_size(h: int, w: int, height: int, width: int) -> None:
    """Source size bounds: at most MAX_SIDE, and a centred crop of at least MIN_SOURCE_SCALE x the target."""
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise ClipError(f"frame size {h}x{w} outside 1..{MAX_SIDE} pixels")
    _, _, ch, cw = center_crop_box(h, w, height, width)
    if ch < MIN_SOURCE_SCALE * height or cw < MIN_SOURCE_SCALE * width:
        raise ClipError(
            f"too small: {h}x{w} source gives a {ch}x{cw} crop, below half the {height}x{width} target "
            f"(minimum source size: crop >= {math.ceil(MIN_SOURCE_SCALE * height)}x{math.ceil(MIN_SOURCE_SCALE * width)})"
        )


def clip_window(n_resampled: int, num_frames: int, clips: int, clip: int) -> tuple[int, int]:
    """[start, stop) of clip `clip` of `clips` in the resampled index list (see module docstring)."""
    block = clips * num_frames
    offset = (n_resampled - block) // 2 if n_resampled >= block else 0
    start = offset + clip * num_frames
    stop = start + num_frames
    if stop > n_resampled:
        raise ClipError(
            f"too short: {n_resampled} frames at {TRAIN_FPS} fps, clip {clip + 1} of {clips} needs "
            f"{block if n_resampled >= block else stop} (num_frames {num_frames})"
        )
    return start, stop


def aspect_ok(h: int, w: int, height: int, width: int) -> bool:
    a = height / width
    return a / ASPECT_TOLERANCE <= h / w <= a * ASPECT_TOLERANCE


def center_crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w): the largest centred window of aspect height/width."""
    ratio = height / width
    if h / w > ratio:
        ch, cw = int(w * ratio), w
    else:
        ch, cw = h, int(h / ratio)
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return top, left, ch, cw


def crop_resize(frames: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """uint8 frames [T, H, W, 3] -> float32 clip [3, T, height, width] in [-1, 1], and the crop box."""
    t, h, w, _ = frames.shape
    top, left, ch, cw = center_crop_box(h, w, height, width)
    out = torch.empty(t, 3, height, width, dtype=torch.float32)
    for s in range(0, t, RESIZE_CHUNK):
        x = frames[s : s + RESIZE_CHUNK, top : top + ch, left : left + cw]  # [t', ch, cw, 3] uint8
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [t', 3, ch, cw] in [0, 1]
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True, antialias=True)
        out[s : s + RESIZE_CHUNK] = x.mul_(2.0).sub_(1.0)
    return out.permute(1, 0, 2, 3).contiguous(), (top, left, ch, cw)


@dataclass
class ClipInfo:
    """What was read, for the sample's json metadata."""

    src_frames: int
    src_fps: float
    src_height: int
    src_width: int
    indices: list[int]  # source frame indices of the clip
    crop: tuple[int, int, int, int]  # top, left, height, width in source pixels
    decoder: str

    def as_meta(self) -> dict:
        idx = self.indices
        stride = (idx[-1] - idx[0]) / (len(idx) - 1) if len(idx) > 1 else 0.0
        return {
            "src_frames": self.src_frames,
            "src_fps": round(self.src_fps, 6),
            "src_size": [self.src_height, self.src_width],
            "clip_start": idx[0],
            "clip_stride": round(stride, 6),
            "clip_frames": len(idx),
            "frame_indices": idx,
            "crop": list(self.crop),
            "decoder": self.decoder,
        }


def _decord_read(path: str, plan):
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        fps = float(vr.get_avg_fps() or 0.0)
        indices = plan(n, fps)
        frames = vr.get_batch(list(map(int, indices))).asnumpy()
    except (RuntimeError, decord.DECORDError) as e:  # DECORDError is not a RuntimeError
        raise _DecoderFailed(f"decord: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return frames, n, fps, indices


def _pyav_read(path: str, plan):
    """Two passes (count, then keep only the planned frames), so a long video is never held whole."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            n = sum(1 for _ in container.decode(stream))
        if n == 0:
            raise _DecoderFailed("pyav: no decodable frames")
        indices = plan(n, fps)
        wanted = {int(i) for i in indices}
        kept = {}
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
    except (av.FFmpegError, IndexError, ValueError, OSError) as e:  # pyright: ignore[reportPrivateImportUsage]
        raise _DecoderFailed(f"pyav: {type(e).__name__}: {e}") from None
    if len(kept) != len(wanted):
        raise _DecoderFailed(f"pyav: second pass decoded {len(kept)} of {len(wanted)} planned frames")
    return np.stack([kept[int(i)] for i in indices]), n, fps, indices


class _DecoderFailed(Exception):
    pass


_NOISE = [
    (re.compile(r"\[\d{2}:\d{2}:\d{2}\]\s*"), ""),  # decord's wall-clock stamp
    (re.compile(r"(?:/[^\s:]+)+\.(?:cc|cpp|c|h|hpp):\d+:\s*"), ""),  # C++ source file:line
    (re.compile(r"0x[0-9a-fA-F]+"), "0x?"),  # addresses
    (re.compile(r"\[Errno -?\d+\]\s*"), ""),
    (re.compile(r":\s*'[^']*'"), ""),  # the file's own path (the error row names it)
    (re.compile(r"\s+"), " "),
]
# decoder message fragments -> what a user is told (first match wins)
_USER_TERMS = [
    (
        ("cannot find video stream", "st_nb >= 0", "IndexError", "no video stream"),
        "no video stream (audio-only or not a video file)",
    ),
    (
        (
            "moov atom not found",
            "End of file",
            "truncated",
            "Invalid data found when processing input",
            "no decodable frames",
            "Error reading",
            "error reading",
        ),
        "truncated or damaged file (no decodable video data)",
    ),
]


def normalise_reason(message: str) -> str:
    """A decoder message without timestamps, source locations, addresses or paths (reproducible)."""
    for pattern, repl in _NOISE:
        message = pattern.sub(repl, message)
    return message.strip()


def user_reason(failures: list[str]) -> str:
    """The decoders' failures -> one reason in user terms, or their normalised messages."""
    text = " ".join(failures)
    for needles, reason in _USER_TERMS:
        if any(n in text for n in needles):
            return f"cannot decode video: {reason}"
    return "cannot decode video (" + "; ".join(normalise_reason(f) for f in failures) + ")"


def check_regular_file(path: str) -> None:
    if not os.path.exists(path):
        raise ClipError("file not found")
    if not os.path.isfile(path):
        raise ClipError("not a regular file (a directory, FIFO or device)")
    if os.path.getsize(path) == 0:
        raise ClipError("empty file")


def read_video_clip(
    path: str,
    num_frames: int,
    height: int,
    width: int,
    clips: int = 1,
    clip: int = 0,
    train_fps: float = TRAIN_FPS,
    frame_step: float = 1.0,
) -> tuple[torch.Tensor, ClipInfo]:
    """Clip `clip` of `clips` of a video -> ([3, num_frames, height, width] in [-1, 1], info)."""
    check_regular_file(path)

    def plan(n: int, fps: float) -> np.ndarray:
        if n <= 0:
            raise ClipError("video has no frames")
        if n > MAX_FRAMES:
            raise ClipError(
                f"the file claims {n} frames, more than {MAX_FRAMES} ({MAX_DURATION_S:g} s at {MAX_FPS:g} fps)"
            )
        if not math.isfinite(fps) or fps <= 0:
            fps = DEFAULT_FPS
        if fps > MAX_FPS:
            raise ClipError(f"the file claims {fps:g} fps, more than {MAX_FPS:g}")
        start, stop = clip_window(resample_count(n, fps, train_fps, frame_step), num_frames, clips, clip)
        return resample_indices(n, fps, train_fps, start, stop, frame_step)

    failures = []
    for name, reader in (("decord", _decord_read), ("pyav", _pyav_read)):  # noqa: B007 (the decoder that worked is used after the loop)
        try:
            frames, n, fps, indices = reader(path, plan)
            break
        except _DecoderFailed as e:
            failures.append(str(e))
    else:
        raise ClipError(user_reason(failures))
    if frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3:
        raise ClipError(f"decoder returned frames of shape {tuple(frames.shape)}, expected ({num_frames}, H, W, 3)")
    h, w = int(frames.shape[1]), int(frames.shape[2])
    if not aspect_ok(h, w, height, width):
        raise ClipError(
            f"aspect ratio h/w = {h}/{w} = {h / w:.3f} outside [{height / width / ASPECT_TOLERANCE:.3f}, {height / width * ASPECT_TOLERANCE:.3f}]"
        )
    check_size(h, w, height, width)
    clip_t, box = crop_resize(torch.from_numpy(frames), height, width)
    info = ClipInfo(n, fps if fps > 0 else DEFAULT_FPS, h, w, [int(i) for i in indices], box, name)
    return clip_t, info


def read_image(path: str, height: int, width: int) -> tuple[torch.Tensor, ClipInfo]:
    """An image -> ([3, 1, height, width] in [-1, 1], info)."""
    from PIL import Image, UnidentifiedImageError

    check_regular_file(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ClipError(f"cannot decode image ({type(e).__name__}: {normalise_reason(str(e))})") from None
    h, w = arr.shape[:2]
    if not aspect_ok(h, w, height, width):
        raise ClipError(
            f"aspect ratio h/w = {h}/{w} = {h / w:.3f} outside [{height / width / ASPECT_TOLERANCE:.3f}, {height / width * ASPECT_TOLERANCE:.3f}]"
        )
    check_size(h, w, height, width)
    clip_t, box = crop_resize(torch.from_numpy(arr.copy())[None], height, width)
    return clip_t, ClipInfo(1, 0.0, h, w, [0], box, "pil")
