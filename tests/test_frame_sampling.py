"""Upstream's frame sampling in stage 1: a frame stride / speed factor on top of the 24 fps resampling,
and what a clip shorter than the frames becomes (an error row, or its longest 1 + 4k frames)."""

from __future__ import annotations

import numpy as np
import pytest

from osp.common.errors import ConfigError
from osp.stage1_encode.clips import resample_count, resample_indices
from osp.stage1_encode.dataset import RawRecord
from osp.stage1_encode.plan import EncodeSpec, make_plan


def _records(durations: list[float], fps: float = 24.0) -> list[RawRecord]:
    return [
        RawRecord(
            0,
            "/data",
            "/data/a.json",
            i,
            {"path": f"v{i}.mp4", "cap": "a cat", "fps": fps, "duration": d, "resolution": {"height": 48, "width": 64}},
        )
        for i, d in enumerate(durations)
    ]


def test_stride_and_speed_factor_step_through_the_resampled_frames():
    # 30 fps -> 24 fps step 1.25; a stride of 2 doubles it; a speed factor of 1.5 multiplies it again
    assert resample_indices(60, 30.0, 24.0, 0, 5).tolist() == np.floor(np.arange(5) * 1.25).astype(int).tolist()
    assert resample_indices(60, 30.0, 24.0, 0, 5, frame_step=2).tolist() == [0, 2, 5, 7, 10]
    assert resample_indices(60, 24.0, 24.0, 0, 4, frame_step=2 * 1.5).tolist() == [0, 3, 6, 9]
    assert resample_count(48, 24.0, 24.0, 2) == 24 and resample_count(48, 24.0, 24.0) == 48
    assert EncodeSpec(9, 48, 64, frame_stride=2, speed_factor=1.5).frame_step == 3.0
    with pytest.raises(ConfigError, match="speed_factor must be >= 1"):
        EncodeSpec(9, 48, 64, speed_factor=0.5)
    with pytest.raises(ConfigError, match="short_clips must be one of error, keep"):
        EncodeSpec(9, 48, 64, short_clips="pad")


def test_short_clips_error_by_default_or_kept_at_a_shorter_1_plus_4k():
    recs = _records([1.0, 0.5, 0.25, 0.1])  # 24, 12, 6, 2 frames at 24 fps
    plan = make_plan(recs, EncodeSpec(9, 48, 64), 8)
    assert [it.frames for it in plan.shards[0].items] == [0, 0]  # 24, 12 frames: full 9-frame clips
    errors = plan.shards[0].errors
    assert len(errors) == 2 and "too short" in errors[0]["reason"] and "need 9" in errors[0]["reason"]
    # stride 2: 12, 6, 3, 1 frames -> only the first clip is long enough
    strided = make_plan(recs, EncodeSpec(9, 48, 64, frame_stride=2), 8)
    assert len(strided.shards[0].items) == 1 and len(strided.shards[0].errors) == 3
    kept = make_plan(recs, EncodeSpec(9, 48, 64, frame_stride=2, short_clips="keep", min_frames=5), 8)
    assert [it.frames for it in kept.shards[0].items] == [0, 5]  # 6 frames -> 5 (1 + 4k); 3 and 1 < 5: errors
    assert len(kept.shards[0].errors) == 2 and "or >= 5 with short_clips=keep" in kept.shards[0].errors[0]["reason"]
    assert kept.digest() != strided.digest() != plan.digest()


def test_decoded_clip_follows_the_stride(tmp_path):
    from osp.common.demo_data import write_mp4
    from osp.stage1_encode.clips import read_video_clip

    frames = np.random.default_rng(0).integers(0, 255, (48, 48, 64, 3), dtype=np.uint8)
    write_mp4(tmp_path / "v.mp4", frames, 24)
    _, plain = read_video_clip(str(tmp_path / "v.mp4"), 9, 48, 64)
    _, strided = read_video_clip(str(tmp_path / "v.mp4"), 9, 48, 64, frame_step=2.0)
    assert np.diff(plain.indices).tolist() == [1] * 8 and np.diff(strided.indices).tolist() == [2] * 8
    assert strided.as_meta()["clip_stride"] == 2.0  # centred: 24 strided frames, the middle 9
    assert strided.indices[0] == 2 * ((48 // 2 - 9) // 2)
