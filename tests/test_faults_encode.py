"""Encode under bad inputs: bounded validation, README promises, reproducible reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from osp.stage1_encode.clips import ClipError, read_video_clip, resample_count, resample_indices
from osp.stage1_encode.dataset import list_records, resolve_sources
from osp.stage1_encode.plan import EncodeSpec, make_plan


def _rec(path, cap="a cat", fps=24.0, duration=1.0, h=48, w=64, **kw):
    return {"path": path, "cap": cap, "fps": fps, "duration": duration, "resolution": {"height": h, "width": w}, **kw}


def _plan(root: Path, recs, spec=EncodeSpec(9, 48, 64), raw: bytes | None = None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotation.json").write_bytes(raw if raw is not None else json.dumps(recs).encode())
    return make_plan(list_records(resolve_sources(root)), spec, samples_per_shard=4)


def _reasons(plan) -> dict:
    return {e["file"]: e["reason"] for s in plan.shards for e in s.errors}


def test_huge_annotation_values_are_error_rows_with_bounded_memory(tmp_path):
    recs = [
        _rec("dur.mp4", duration=1e12),
        _rec("fps.mp4", fps=1e308),
        _rec("long.mp4", duration=3e6),
        _rec("big.mp4", h=1e9, w=1.4e9),
        _rec("nan.mp4", fps=float("nan")),
        _rec("ok_long.mp4", fps=999.0, duration=86000.0),
    ]  # inside the bounds: 8.6e7 source frames
    raw = json.dumps(recs).replace("NaN", "1e999").encode()  # 1e999 parses to inf
    tracemalloc.start()
    plan = _plan(tmp_path / "ds", None, raw=raw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # nothing allocated in proportion to a claimed duration
    reasons = _reasons(plan)
    assert "'duration' 1e+12 is above the limit" in reasons["dur.mp4"]
    assert "'fps' 1e+308 is above the limit" in reasons["fps.mp4"]
    assert "above the limit" in reasons["long.mp4"] and "above the limit" in reasons["big.mp4"]
    assert "positive 'fps'" in reasons["nan.mp4"]
    assert [it.rel for s in plan.shards for it in s.items] == ["ok_long.mp4"]
    assert plan.n_inputs == len(recs)


def test_resample_window_equals_the_full_list():
    for n, fps in [(100, 24.0), (1000, 30000 / 1001), (77, 60.0), (50, 12.5), (10, 24.05)]:
        full = np.floor(np.arange(0, n, 1.0 if abs(fps - 24) < 0.1 else fps / 24)).astype(np.int64)
        assert resample_count(n, fps) == len(full)
        assert np.array_equal(resample_indices(n, fps), full)
        assert np.array_equal(resample_indices(n, fps, start=3, stop=12), full[3:12])
    assert len(resample_indices(10**12, 1000.0, start=5, stop=14)) == 9  # a window of a huge video is 9 numbers


def test_readme_promises_symlinks_duplicates_bom_malformed_min_size(tmp_path):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"x")
    (root / "a" / "link.mp4").symlink_to(outside)
    (root / "a" / "inner.mp4").write_bytes(b"x")
    (root / "a" / "ok_link.mp4").symlink_to(root / "a" / "inner.mp4")  # inside the root: fine
    recs = [
        _rec("a/x.mp4", cap="first"),
        _rec("a/link.mp4"),
        _rec("a/x.mp4", cap="second"),
        _rec("a/./x.mp4", cap="third"),
        _rec("a/ok_link.mp4"),
        _rec("tiny.mp4", h=16, w=16),
    ]
    bom = b"\xef\xbb\xbf" + json.dumps(recs).encode()  # a UTF-8 BOM is tolerated
    plan = _plan(root, None, raw=bom)
    items = {it.rel: it for s in plan.shards for it in s.items}
    errs = [e for s in plan.shards for e in s.errors]
    assert set(items) == {"a/x.mp4", "a/ok_link.mp4"}
    assert items["a/x.mp4"].caption == "first"  # the first in listing order wins, `a/./x.mp4` is the same file
    dup = [e for e in errs if "duplicate" in e["reason"]]
    assert sorted(e["record"] for e in dup) == [2, 3]
    assert any("outside the data root" in e["reason"] and e["file"] == "a/link.mp4" for e in errs)
    assert any("too small: 16x16" in e["reason"] for e in errs)
    assert plan.n_inputs == len(recs)

    # a malformed annotation file counts its records (3 here, the second broken)
    text = '[{"path": "a.mp4", "cap": "x"}, {"path": "b.mp4" "cap": "y"}, {"path": "c.mp4", "cap": "z", "resolution": {"height": 1}}]'
    plan = _plan(tmp_path / "m", None, raw=text.encode())
    assert plan.n_inputs == 3 and all("not valid JSON" in e["reason"] for s in plan.shards for e in s.errors)


def _bad_media(d: Path) -> None:
    import av

    from osp.common.demo_data import write_mp4

    d.mkdir(parents=True, exist_ok=True)
    with av.open(str(d / "audio_only.mp4"), "w") as c:  # an mp4 with an audio stream and no video
        s = c.add_stream("aac", rate=8000)
        s.layout = "mono"
        for i in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 8000, i * 1024
            for pk in s.encode(fr):
                c.mux(pk)
        for pk in s.encode(None):
            c.mux(pk)
    v = np.random.default_rng(0).integers(0, 255, (24, 96, 128, 3)).astype(np.uint8)
    write_mp4(d / "good.mp4", v, 24)
    (d / "header_only.mp4").write_bytes((d / "good.mp4").read_bytes()[:200])
    (d / "random.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "dir.mp4").mkdir(exist_ok=True)
    os.mkfifo(d / "fifo.mp4")


def test_decoder_failures_in_user_terms(tmp_path):
    _bad_media(tmp_path)
    want = {
        "audio_only": "no video stream",
        "header_only": "truncated or damaged file",
        "random": "truncated or damaged file",
        "dir": "not a regular file",
        "fifo": "not a regular file",
        "missing": "file not found",
    }
    for name, phrase in want.items():
        with pytest.raises(ClipError) as e:
            read_video_clip(str(tmp_path / f"{name}.mp4"), 9, 48, 64)
        assert phrase in str(e.value), (name, str(e.value))
        assert not any(c in str(e.value) for c in ("[0", "0x", ".cc:", str(tmp_path))), str(e.value)


@pytest.mark.slow
def test_two_encodes_with_decoder_errors_are_byte_identical(tmp_path):
    from osp.common.demo_models import write_demo_models

    data, models = tmp_path / "data", tmp_path / "models"
    _bad_media(data / "v")
    recs = [
        _rec(f"v/{n}.mp4", h=96, w=128)
        for n in ("good", "audio_only", "header_only", "random", "dir", "fifo", "missing")
    ]
    (data / "annotation.json").write_text(json.dumps(recs))
    write_demo_models(models)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OSP_DEVICE": "cpu"}
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        cmd = [
            sys.executable,
            "-m",
            "osp.common.cli",
            "encode",
            "--data",
            str(data),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--height",
            "48",
            "--width",
            "64",
            "--vae",
            str(models / "vae"),
            "--text-encoder",
            str(models / "text_encoder"),
            "--samples-per-shard",
            "4",
            "--no-progress",
        ]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(out)
    tree = [{str(f.relative_to(o)): f.read_bytes() for f in sorted(o.rglob("*")) if f.is_file()} for o in outs]
    assert sorted(tree[0]) == sorted(tree[1])
    assert [k for k in tree[0] if tree[0][k] != tree[1][k]] == []
    errors = [json.loads(x) for x in (outs[0] / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 6
    text = " ".join(e["reason"] for e in errors)
    assert "no video stream" in text and "truncated or damaged" in text and "not a regular file" in text
