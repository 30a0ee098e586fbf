"""Shard contract v1: round trips, interop with plain tarfile / webdataset / zarr, atomic publish,
corruption detection, and that a pickle member is never executed."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from osp.common import shards as S


def _samples(seed: int, n: int, shard: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        t, hw = 1 + (j % 3), 4 + 2 * (j % 2)
        text_dtype = torch.bfloat16 if j % 2 else torch.float32
        out.append(
            (
                f"s{shard:02d}_{j:03d}",
                torch.randn(8, t, hw, hw, generator=g),
                torch.randn(3 + 2 * j, 16, generator=g).to(text_dtype),
                {"cap": f"caption {j} \u00e9\u4e2d", "path": f"folder/clip_{j}.mp4", "fps": 24.0, "start": j},
            )
        )
    return out


def _write_dir(out: Path, n_shards: int = 2, per_shard: int = 3, latent_dtype: str = "float16"):
    expected = {}
    for sid in range(n_shards):
        with S.ShardWriter(out, sid, latent_dtype=latent_dtype) as w:
            for key, lat, txt, meta in _samples(100 + sid, per_shard, sid):
                w.write(key, lat, txt, meta)
                expected[key] = (lat, txt, meta)
            w.add_error({"path": f"bad_{sid}.mp4", "reason": "truncated"})
            rows = w.publish()
        assert [r["shard"] for r in rows] == [sid] * per_shard
    S.write_manifest(
        out, {"latent_dtype": latent_dtype, "preset": "tiny", "counts": {"inputs": n_shards * (per_shard + 1)}}
    )
    S.write_uncond(out, torch.randn(1, 16, generator=torch.Generator().manual_seed(0)))
    assert S.merge_index(out) == n_shards * per_shard
    return expected


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, _write_dir(out)


def _check(sample, expected, dtype=torch.float16):
    lat, txt, meta = expected[sample.key]
    assert sample.latent.dtype == dtype and torch.equal(sample.latent, lat.to(dtype))
    assert sample.text.dtype == txt.dtype and torch.equal(sample.text, txt)
    assert sample.meta == meta


def test_round_trip_indexed_and_streaming(shard_dir):
    out, expected = shard_dir
    index = S.ShardIndex.open(out)
    assert len(index) == 6 and list(index.key) == sorted(expected)  # shard then insertion order
    for i in range(len(index)):
        _check(S.read_sample(out, index, i), expected)
        r = index.row(i)
        assert r["text_len"] == expected[r.key][1].shape[0] and r.latent_shape == tuple(expected[r.key][0].shape[1:])
    streamed = [s for sid in sorted(S.published_shards(out)) for s in S.iter_shard(S.shard_path(out, sid))]
    assert [s.key for s in streamed] == list(index.key)
    for s in streamed:
        _check(s, expected)
    assert torch.equal(S.read_uncond(out), S.read_uncond(out)) and S.read_uncond(out).shape == (1, 16)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [
        {"path": "bad_0.mp4", "reason": "truncated", "shard": 0},
        {"path": "bad_1.mp4", "reason": "truncated", "shard": 1},
    ]
    m = S.read_manifest(out)
    assert m["counts"] == {"inputs": 8, "samples": 6, "errors": 2, "shards": 2}
    assert S.verify(out) == []
    info = S.inspect(out)
    assert info["samples"] == 6 and info["shards"] == 2 and info["errors"] == 2
    assert sum(info["latent_shapes"].values()) == 6
    lens = [expected[k][1].shape[0] for k in expected]
    assert info["text_len"] == {"min": min(lens), "mean": float(np.mean(lens)), "max": max(lens)}


def test_float32_latents(tmp_path):
    expected = _write_dir(tmp_path, n_shards=1, per_shard=2, latent_dtype="float32")
    index = S.ShardIndex.open(tmp_path)
    for i in range(len(index)):
        _check(S.read_sample(tmp_path, index, i), expected, dtype=torch.float32)


def test_interop_tarfile_zarr_webdataset(shard_dir):
    import webdataset as wds
    import zarr

    out, expected = shard_dir
    group = zarr.open_group(str(out / "index.zarr"), mode="r")
    assert group.attrs["schema_version"] == S.SCHEMA_VERSION
    keys = [str(k) for k in group["key"][:]]
    # Offsets in the index equal those plain tarfile reports; members decode with plain safetensors.
    for sid in sorted(S.published_shards(out)):
        with tarfile.open(S.shard_path(out, sid)) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for i in np.flatnonzero(group["shard"][:] == sid):
                key = keys[i]
                st_m, js_m = members[f"{key}.safetensors"], members[f"{key}.json"]
                assert (st_m.offset_data, st_m.size) == (group["st_offset"][i], group["st_size"][i])
                assert (js_m.offset_data, js_m.size) == (group["json_offset"][i], group["json_size"][i])
                tensors = st_load(tar.extractfile(st_m).read())
                lat, txt, meta = expected[key]
                assert torch.equal(tensors["latent"], lat.half()) and torch.equal(tensors["text"], txt)
                assert json.loads(tar.extractfile(js_m).read()) == meta
                assert m_mode(st_m) and st_m.mtime == 0 and st_m.uid == 0 and st_m.uname == ""
    urls = [str(S.shard_path(out, sid)) for sid in sorted(S.published_shards(out))]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(S.decode_member, pre=[], post=[]))
    got2 = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(S.wds_decode))
    assert [d["__key__"] for d in got] == [d["__key__"] for d in got2] == keys
    for d in got + got2:
        lat, txt, meta = expected[d["__key__"]]
        assert torch.equal(d["safetensors"]["latent"], lat.half()) and torch.equal(d["safetensors"]["text"], txt)
        assert d["json"] == meta


def m_mode(info: tarfile.TarInfo) -> bool:
    return info.mode == 0o644 and info.isreg()


def test_deterministic_bytes(tmp_path):
    _write_dir(tmp_path / "a")
    _write_dir(tmp_path / "b")
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000000.rows.json", "errors.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


_KILLED_WRITER = """
import os, sys, torch
from osp.common.shards import ShardWriter
w = ShardWriter(sys.argv[1], 7)
for j in range(3):
    w.write(f"k{j}", torch.zeros(8, 1, 2, 2), torch.zeros(2, 4), {"j": j})
w._tar.fileobj.flush()
os._exit(9)  # killed before publish()
"""


def test_killed_writer_leaves_no_visible_shard(tmp_path):
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], capture_output=True, timeout=120)
    assert r.returncode == 9, r.stderr.decode()
    leftovers = sorted(p.name for p in out.iterdir())
    assert leftovers and all(".tmp-" in n for n in leftovers)
    assert S.published_shards(out) == set() and S.merge_index(out) == 0
    # Killed between the sidecar rename and the tar rename: rows alone are not a shard.
    (out / "shard-000003.rows.json").write_text(
        json.dumps({"schema_version": 1, "shard": 3, "tar_size": 1024, "rows": [], "errors": []})
    )
    assert S.published_shards(out) == set()
    # The next writer of shard 7 cleans the leftovers and publishes.
    w = S.ShardWriter(out, 7)
    w.write("k0", torch.zeros(8, 1, 2, 2), torch.zeros(2, 4), {})
    w.publish()
    assert S.published_shards(out) == {7}
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    # An aborted rewrite keeps the previous publication intact.
    with S.ShardWriter(out, 7) as w2:
        w2.write("other", torch.zeros(8, 1, 2, 2), torch.zeros(2, 4), {})
    assert S.published_shards(out) == {7} and [s.key for s in S.iter_shard(S.shard_path(out, 7))] == ["k0"]


def test_verify_detects_flipped_byte_and_truncation(tmp_path):
    _write_dir(tmp_path)
    index = S.ShardIndex.open(tmp_path)
    r = index.row(4)
    path = S.shard_path(tmp_path, r.shard)
    data = bytearray(path.read_bytes())
    data[r.st_offset + r.st_size - 3] ^= 0x01
    path.write_bytes(bytes(data))
    problems = S.verify(tmp_path)
    assert len(problems) == 1 and path.name in problems[0] and r.key in problems[0] and "checksum" in problems[0]
    with pytest.raises(S.ShardError, match=f"{path.name}.*{r.key}"):
        S.read_sample(tmp_path, index, 4)
    from typer.testing import CliRunner

    from osp.common.cli import app

    res = CliRunner().invoke(app, ["shards", "verify", str(tmp_path)])
    assert res.exit_code == 1 and r.key in res.output

    path.write_bytes(bytes(data[: r.json_offset + 2]))  # truncated mid-member
    problems = S.verify(tmp_path)
    assert any(path.name in p and "truncated" in p for p in problems)
    assert any(r.key in p and "past the end" in p for p in problems)
    assert S.published_shards(tmp_path) == {0}  # the truncated tar no longer counts as published


def test_cli_inspect_and_verify_ok(shard_dir):
    from typer.testing import CliRunner

    from osp.common.cli import app

    out, _ = shard_dir
    runner = CliRunner()
    res = runner.invoke(app, ["shards", "verify", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["shards", "inspect", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["samples"] == 6
    res = runner.invoke(app, ["shards", "inspect", str(out)])
    assert res.exit_code == 0 and "bytes / sample" in res.output


def test_cli_inspect_missing_folder_says_so(tmp_path):
    from typer.testing import CliRunner

    from osp.common.cli import app

    res = CliRunner().invoke(app, ["shards", "inspect", str(tmp_path / "nope")])
    assert res.exit_code == 1, res.output
    assert f"{tmp_path / 'nope'}: no such shard folder" in res.output and "python" not in res.output


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_pickle_member_is_never_executed(tmp_path):
    import webdataset as wds

    out = tmp_path / "s"
    with S.ShardWriter(out, 0) as w:
        w.write("good", torch.ones(8, 1, 2, 2), torch.ones(2, 4), {"cap": "x"})
        w.publish()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    # Append sample members carrying pickles to the published tar (as a hostile shard would).
    path = S.shard_path(out, 0)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members + [
            (tarfile.TarInfo("good.pyd"), payload),
            (tarfile.TarInfo("evil.pickle"), payload),
            (tarfile.TarInfo("evil.pth"), payload),
        ]:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(S.iter_shard(path))
    assert [s.key for s in got] == ["good"] and set(got[0].meta) == {"cap"}
    assert {n for n in ("good.pyd", "evil.pickle", "evil.pth") if any(n in str(c.message) for c in caught)} == {
        "good.pyd",
        "evil.pickle",
        "evil.pth",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ds in (
            wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode(S.decode_member, pre=[], post=[]),
            wds.WebDataset(str(path), shardshuffle=False, empty_check=False).map(S.wds_decode),
        ):
            decoded = {d["__key__"]: d for d in ds}
            assert isinstance(decoded["good"]["pyd"], bytes) and isinstance(decoded["evil"]["pickle"], bytes)
            assert isinstance(decoded["evil"]["pth"], bytes) and decoded["good"]["json"] == {"cap": "x"}
    assert not marker.exists()
    # The appended members fit in the tar's final 10 KiB record, so its size is unchanged: it still
    # counts as published, and verify names every foreign member.
    assert path.stat().st_size == json.loads(S.rows_path(out, 0).read_text())["tar_size"]
    S.write_manifest(out, {})
    S.write_uncond(out, torch.zeros(1, 4))
    S.merge_index(out)
    problems = S.verify(out)
    assert sorted(p.split("member ")[1].split(" ")[0] for p in problems) == ["evil.pickle", "evil.pth", "good.pyd"]
    assert not marker.exists()


def test_bad_input_errors(tmp_path):
    w = S.ShardWriter(tmp_path, 0)
    for bad in ("a.b", "a/b", "", "x" * 201, "sp ace"):
        with pytest.raises(S.ShardError, match="no dots"):
            w.write(bad, torch.zeros(8, 1, 2, 2), torch.zeros(2, 4), {})
    with pytest.raises(S.ShardError, match="latent"):
        w.write("k", torch.zeros(3, 1, 2, 2), torch.zeros(2, 4), {})
    with pytest.raises(S.ShardError, match="unpadded"):
        w.write("k", torch.zeros(8, 1, 2, 2), torch.zeros(2, 4, 1), {})
    with pytest.raises(S.ShardError, match="JSON"):
        w.write("k", torch.zeros(8, 1, 2, 2), torch.zeros(2, 4), {"cap": "\ud800"})
    w.write("k", torch.zeros(8, 1, 2, 2), torch.zeros(2, 4), {})
    with pytest.raises(S.ShardError, match="duplicate"):
        w.write("k", torch.zeros(8, 1, 2, 2), torch.zeros(2, 4), {})
    w.abort()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(S.ShardError, match="schema version 99"):
        S.read_manifest(tmp_path)
    with pytest.raises(S.ShardError, match="index.zarr: missing, the encode .* did not finish"):
        S.ShardIndex.open(tmp_path)
    with pytest.raises(S.ShardError, match="safetensors"):
        S.load_safetensors_bytes(b"\xff" * 16, "x")
