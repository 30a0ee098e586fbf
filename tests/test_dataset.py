"""Stage 1 listing, clip reading and planning (no models): fast unit tests."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osp.stage1_encode import clips as C
from osp.stage1_encode.dataset import DataError, list_records, resolve_sources, safe_relpath
from osp.stage1_encode.plan import EncodeSpec, make_plan


def write_counter_video(path, n_frames=60, fps=30, h=48, w=64):
    """Frame i is flat grey level 4*i, so decoded frames reveal their source index."""
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(n_frames):
            img = np.full((h, w, 3), 4 * i, dtype=np.uint8)
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.mp4", "a/../../x.mp4", "", None, 3, "C:/x.mp4", "."])
def test_safe_relpath_rejects_escapes(bad):
    with pytest.raises(ValueError):
        safe_relpath(bad)


def test_safe_relpath_normalises():
    assert safe_relpath("a/./b/../c.mp4") == "a/c.mp4"
    assert safe_relpath("a\\c.mp4") == "a/c.mp4"


def test_resample_and_window():
    assert C.resample_indices(5, 24.05).tolist() == [0, 1, 2, 3, 4]  # |fps - 24| < 0.1: step 1
    assert C.resample_indices(10, 30).tolist() == [0, 1, 2, 3, 5, 6, 7, 8]  # floor(arange(0, 10, 1.25))
    assert C.resample_indices(6, 12).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # upsampling repeats
    assert C.clip_window(20, 9, 1, 0) == (5, 14)  # centred
    assert C.clip_window(20, 9, 2, 0) == (1, 10) and C.clip_window(20, 9, 2, 1) == (10, 19)
    with pytest.raises(C.ClipError, match="too short"):
        C.clip_window(8, 9, 1, 0)
    with pytest.raises(C.ClipError, match="too short"):
        C.clip_window(17, 9, 2, 1)


def test_center_crop_box():
    assert C.center_crop_box(480, 640, 64, 64) == (0, 80, 480, 480)  # wide source: crop width
    assert C.center_crop_box(640, 480, 64, 64) == (80, 0, 480, 480)  # tall source: crop height
    assert C.center_crop_box(720, 1280, 480, 640) == (0, 160, 720, 960)


def test_crop_resize():
    # uint8 -> [-1, 1]: black and white frames map to exactly -1 and 1 through crop + resize
    frames = torch.zeros(3, 40, 30, 3, dtype=torch.uint8)
    frames[1] = 255
    out, box = C.crop_resize(frames, 16, 16)
    assert box == (5, 0, 30, 30) and out.shape == (3, 3, 16, 16)
    assert torch.all(out[:, 0] == -1) and torch.allclose(out[:, 1], torch.ones(()), atol=1e-6, rtol=0)
    # the crop keeps the centre: a wide frame with a bright centre column band stays bright
    wide = torch.zeros(2, 32, 64, 3, dtype=torch.uint8)
    wide[:, :, 16:48] = 255
    out, box = C.crop_resize(wide, 16, 16)
    assert box == (0, 16, 32, 32) and torch.allclose(out, torch.ones(()), atol=1e-6, rtol=0)
    # chunking over frames equals one interpolate over all frames
    x = torch.randint(0, 256, (C.RESIZE_CHUNK + 3, 20, 30, 3), dtype=torch.uint8)
    out, (t, l, h, w) = C.crop_resize(x, 16, 16)
    ref = (
        F.interpolate(
            x[:, t : t + h, l : l + w].permute(0, 3, 1, 2).float() / 255,
            size=(16, 16),
            mode="bilinear",
            align_corners=True,
            antialias=True,
        )
        * 2
        - 1
    )
    torch.testing.assert_close(out, ref.permute(1, 0, 2, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("reader", ["decord", "pyav"])
def test_read_video_clip_frame_indices(tmp_path, reader, monkeypatch):
    path = tmp_path / "counter.mp4"
    write_counter_video(path, n_frames=60, fps=30)
    if reader == "pyav":  # force the fallback

        def broken(path, plan):
            raise C._DecoderFailed("decord: forced")

        monkeypatch.setattr(C, "_decord_read", broken)
    clip, info = C.read_video_clip(str(path), 9, 16, 16, clips=2, clip=1)
    res = C.resample_indices(60, 30)  # 48 frames at 24 fps; 2 clips of 9 centred -> start 15
    assert info.indices == res[24:33].tolist() and info.decoder == reader
    grey = (clip[0, :, 8, 8] + 1) / 2 * 255
    torch.testing.assert_close(grey, 4.0 * torch.tensor(info.indices, dtype=torch.float32), atol=3.0, rtol=0)
    assert clip.shape == (3, 9, 16, 16) and clip.min() >= -1 and clip.max() <= 1


def test_read_video_errors(tmp_path):
    with pytest.raises(C.ClipError, match="not found"):
        C.read_video_clip(str(tmp_path / "none.mp4"), 9, 16, 16)
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(C.ClipError, match="cannot decode"):
        C.read_video_clip(str(tmp_path / "junk.mp4"), 9, 16, 16)
    write_counter_video(tmp_path / "short.mp4", n_frames=6, fps=24)
    with pytest.raises(C.ClipError, match="too short"):
        C.read_video_clip(str(tmp_path / "short.mp4"), 9, 16, 16)
    write_counter_video(tmp_path / "wide.mp4", n_frames=10, fps=24, h=16, w=64)
    with pytest.raises(C.ClipError, match="aspect"):
        C.read_video_clip(str(tmp_path / "wide.mp4"), 9, 16, 16)


def _rec(path, cap="a cat", fps=24.0, duration=1.0, h=48, w=64, **kw):
    r = {"path": path, "cap": cap, "fps": fps, "duration": duration, "resolution": {"height": h, "width": w}}
    r.update(kw)
    return r


def test_listing_forms(tmp_path):
    root = tmp_path / "ds"
    (root / "f1").mkdir(parents=True)
    (root / "f1" / "annotation.json").write_text(json.dumps([_rec("f1/v.mp4")]))
    assert [(s.root, s.annotation) for s in resolve_sources(root)] == [  # per-folder fallback, paths from root
        (str(root.resolve()), str((root / "f1" / "annotation.json").resolve()))
    ]
    (root / "annotation.json").write_text(json.dumps([_rec("f1/v.mp4")]))
    assert resolve_sources(root)[0].annotation == str((root / "annotation.json").resolve())  # root wins
    lst = tmp_path / "merge.txt"
    lst.write_text(f"# comment\n{root},{root / 'annotation.json'}\n\n{root / 'f1'},{root / 'f1' / 'annotation.json'}\n")
    assert len(resolve_sources(lst)) == 2
    lst.write_text("just-one-field\n")
    with pytest.raises(DataError, match="DATA_ROOT,ANNOTATION_JSON"):
        resolve_sources(lst)
    (root / "annotation.json").write_bytes(b"{not json")
    rows = list_records(resolve_sources(root))
    assert len(rows) == 1 and "not valid JSON" in rows[0].error


def test_plan_accounting_and_membership(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    recs = [
        _rec("b.mp4", cap=["first", "second"], duration=2.0),  # 48 frames -> up to 5 clips of 9
        _rec("a.mp4"),
        _rec("img.png", fps=None, duration=None),
        _rec("../escape.mp4"),
        _rec("nocap.mp4", cap=None),
        _rec("bad_utf8.mp4", cap="caf\udcc3"),
        _rec("wide.mp4", h=10, w=64),
        _rec("short.mp4", duration=0.2),
        _rec("nofps.mp4", fps=None),
        _rec("a.mp4"),  # duplicate
        _rec("x.txt"),
        "not a record",
    ]
    (root / "annotation.json").write_text(json.dumps(recs))
    records = list_records(resolve_sources(root))
    spec = EncodeSpec(9, 16, 16)
    plan = make_plan(records, spec, samples_per_shard=2)
    errs = [e for s in plan.shards for e in s.errors]
    items = [it for s in plan.shards for it in s.items]
    assert plan.n_records == 12 and plan.n_inputs == 12 and len(items) == 3 and len(errs) == 9
    reasons = {e["file"]: e["reason"] for e in errs}
    assert "escapes" in reasons["../escape.mp4"] and "duplicate" in reasons["a.mp4"]
    assert "UTF-8" in reasons["bad_utf8.mp4"] and "caption" in reasons["nocap.mp4"]
    assert "aspect" in reasons["wide.mp4"] and "too short" in reasons["short.mp4"] and "fps" in reasons["nofps.mp4"]
    assert "unsupported" in reasons["x.txt"]
    assert [it.rel for it in items] == ["a.mp4", "b.mp4", "img.png"]  # sorted by path
    assert [len(s.items) for s in plan.shards] == [2, 1]
    assert all("." not in it.key for it in items)
    assert sorted([it.seq for it in items] + [e["input"] for e in errs]) == list(range(12))
    # expansion: every caption x up to 3 clips
    plan3 = make_plan(records, EncodeSpec(9, 16, 16, clips_per_video=3, all_captions=True), samples_per_shard=4)
    keys = [it.key for s in plan3.shards for it in s.items]
    assert plan3.n_inputs == 9 + 2 + 2 * 3 + 1  # errors + a (24 frames: 2 clips) + b (2 caps x 3) + image
    assert len(keys) == len(set(keys)) == 9 and keys[1].endswith("_c0_k1")
    assert make_plan(records, spec, 2).digest() == plan.digest() != plan3.digest()
