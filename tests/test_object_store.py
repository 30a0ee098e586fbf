"""Shard caches in object storage against a real S3-compatible server on loopback (moto's
ThreadedMotoServer, started here), through the client code users run; faults come from a loopback
proxy (tests/s3_fault_proxy.py) in front of it, deterministic from a seed.

Launch budget: one training subprocess with every training case (tests/object_store_cases.py), one
reference encode, two killed encodes and their re-runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3_fault_proxy import FaultProxy, S3Server  # noqa: E402
from train_helpers import make_shards  # noqa: E402

from osp.common import remote_cache, storage  # noqa: E402
from osp.common import shards as S  # noqa: E402

HERE = Path(__file__).parent
PY = sys.executable
TRANSIENT = {"503": 0.025, "slowdown": 0.025, "reset": 0.025, "truncate": 0.025}  # 10 % transient errors
STALL = {"stall": 0.01}  # 1 % stalled connections
KIND = {"503": "retry_5xx", "slowdown": "retry_throttle", "reset": "retry_reset", "truncate": "retry_truncated"}
KIND["stall"] = "retry_timeout"


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in [*server.env, "AWS_ENDPOINT_URL"]}
    os.environ.update(server.env)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    storage.configure(endpoint_url=None, cache_dir=None, timeout_s=5.0, retries=8, backoff_s=0.01)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage.configure(timeout_s=30.0, backoff_s=0.05)
    server.stop()


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("s3local") / "tiny", 8)


@pytest.fixture(scope="module")
def remote(s3, local) -> str:
    url = f"s3://{s3.bucket}/caches/tiny"
    remote_cache.upload_cache(local, url)
    return url


def _same(a: S.Sample, b: S.Sample) -> bool:
    return a.key == b.key and a.meta == b.meta and bool((a.latent == b.latent).all() and (a.text == b.text).all())


def _copy_prefix(s3: S3Server, src: str, dst: str, edit=None) -> str:
    """Copy every object of `src` to `dst` (`edit(name, data)` -> new bytes or None to leave it out)."""
    c = s3.client()
    for name, data in s3.objects(src).items():
        if edit is not None:
            data = edit(name, data)
        if data is not None:
            c.put_object(Bucket=s3.bucket, Key=f"{dst}/{name}", Body=data)
    return f"s3://{s3.bucket}/{dst}"


def _flip(local: Path, key: str):
    """An edit for _copy_prefix that flips one byte inside `key`'s safetensors member."""
    index = S.ShardIndex.open(local)
    r = index.row(list(index.key).index(key))

    def edit(name: str, data: bytes) -> bytes:
        if name == S.shard_path("", r.shard).name:
            b = bytearray(data)
            b[r.st_offset + r.st_size - 3] ^= 0xFF
            return bytes(b)
        return data

    return edit


# ------------------------------------------------------------------------------------------------
# reads, in process
# ------------------------------------------------------------------------------------------------
def test_remote_reads_equal_local_and_verify_inspect_work(local, remote):
    li, ri = S.ShardIndex.open(local), S.ShardIndex.open(remote)
    assert list(li.key) == list(ri.key)
    for i in range(len(li)):
        assert _same(S.read_sample(local, li, i), S.read_sample(remote, ri, i))
    assert S.verify(remote) == []
    a, b = S.inspect(local), S.inspect(remote)
    assert b["dir"] == remote and {**a, "dir": ""} == {**b, "dir": ""}
    # one ranged GET per sample; the four rows of one shard, adjacent in its tar, come as one request
    before = storage.counters()["requests"]
    got = S.read_samples(remote, ri, [0, 1, 2, 3])
    assert storage.counters()["requests"] - before == 1
    assert all(_same(g, S.read_sample(local, li, i)) for i, g in enumerate(got))
    before = storage.counters()["requests"]
    S.read_samples(remote, ri, [0, 4])  # two shards: one request each
    assert storage.counters()["requests"] - before == 2


def test_transient_faults_are_retried_and_counted_exactly(s3, local, remote):
    # rates high enough that every kind reaches osp in a few dozen requests (a reset surfaces only when
    # the client's own replay is reset too)
    rates = {"503": 0.05, "slowdown": 0.05, "reset": 0.3, "truncate": 0.05, "stall": 0.04}
    proxy = FaultProxy(s3.port, seed=11, rates=rates, stall_s=2.0).start()
    try:
        storage.configure(endpoint_url=proxy.endpoint, timeout_s=0.5)
        storage.reset_counters()
        li, ri = S.ShardIndex.open(local), S.ShardIndex.open(remote)
        t0 = time.monotonic()
        for _ in range(6):
            storage.configure(endpoint_url=proxy.endpoint, timeout_s=0.5)  # a fresh client (no stat cache)
            ri.__dict__.pop("_shard_problems", None)
            for i in range(len(li)):
                assert _same(S.read_sample(local, li, i), S.read_sample(remote, ri, i))
        assert time.monotonic() - t0 < 90
        c = storage.counters()
        assert min(proxy.surfaced.values()) >= 1, proxy.surfaced  # the seed gives faults of every kind
        assert {KIND[k]: n for k, n in proxy.surfaced.items()} == {KIND[k]: c[KIND[k]] for k in proxy.surfaced}
        assert c["retries"] == sum(proxy.surfaced.values())
        replayed = proxy.injected["reset"] - proxy.surfaced["reset"]  # by the HTTP client, once per request
        # every counted attempt reached the server (s3fs adds a LIST after some failed HEADs of its own)
        assert c["requests"] + replayed <= sum(proxy.requests.values()) <= 1.2 * (c["requests"] + replayed)
    finally:
        proxy.stop()
        storage.configure(endpoint_url=None, timeout_s=5.0)


def test_missing_object_and_flipped_byte_name_object_and_key(s3, local, remote):
    missing = _copy_prefix(s3, "caches/tiny", "caches/missing", lambda n, d: None if n == "shard-000001.tar" else d)
    index = S.ShardIndex.open(missing)
    with pytest.raises(
        S.ShardError, match=r"s3://osp-test/caches/missing/shard-000001\.tar: tar missing \(key clip0004\)"
    ):
        S.read_sample(missing, index, 4)
    assert _same(S.read_sample(missing, index, 0), S.read_sample(local, S.ShardIndex.open(local), 0))  # control

    flipped = _copy_prefix(s3, "caches/tiny", "caches/flipped", _flip(local, "clip0002"))
    index = S.ShardIndex.open(flipped)
    with pytest.raises(S.ShardError, match=r"caches/flipped/shard-000000\.tar: checksum mismatch for key clip0002"):
        S.read_sample(flipped, index, 2)
    assert any("key clip0002: checksum mismatch" in p for p in S.verify(flipped))
    with pytest.raises(storage.ObjectMissing, match=r"caches/none/manifest\.json: no such object"):
        storage.open_store(f"s3://{s3.bucket}/caches/none").read_bytes("manifest.json")


def test_local_cache_is_lru_bounded_and_checked_on_reuse(tmp_path, local, remote):
    li = S.ShardIndex.open(local)
    sizes = sorted(int(a + b) for a, b in zip(li.st_size, li.json_size))
    bound = 5 * (sizes[-1] + 2048)  # room for five samples' ranges
    storage.configure(cache_dir=str(tmp_path / "cache"), cache_bytes=bound)
    try:
        ri = S.ShardIndex.open(remote)
        storage.reset_counters()
        first = [S.read_sample(remote, ri, i) for i in range(4)]
        c = storage.counters()
        assert (c["cache_misses"], c["cache_hits"]) == (4, 0)
        requests = c["requests"]
        again = [S.read_sample(remote, ri, i) for i in range(4)]
        c = storage.counters()
        assert c["cache_hits"] == 4 and c["requests"] == requests  # served from disk, no request
        assert all(_same(a, b) for a, b in zip(first, again))
        # a damaged entry is dropped and fetched again
        entry = sorted((tmp_path / "cache").glob("*/*.bin"))[0]
        entry.write_bytes(b"\0" + entry.read_bytes()[1:])
        again = [S.read_sample(remote, ri, i) for i in range(4)]
        c = storage.counters()
        assert c["cache_dropped"] == 1 and c["requests"] == requests + 1
        assert all(_same(a, b) for a, b in zip(first, again))
        # bounded: eight samples through a cache of five evict the least recently used
        for i in range(8):
            S.read_sample(remote, ri, i)
        total = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*/*.bin"))
        assert total <= bound and storage.counters()["cache_evictions"] >= 3
    finally:
        storage.configure(cache_dir=None, cache_bytes=0)


# ------------------------------------------------------------------------------------------------
# training, one subprocess
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(s3, local, remote, tmp_path_factory):
    work = tmp_path_factory.mktemp("s3train")
    missing = _copy_prefix(
        s3, "caches/tiny", "caches/train-missing", lambda n, d: None if n == "shard-000001.tar" else d
    )
    flipped = _copy_prefix(s3, "caches/tiny", "caches/train-flipped", _flip(local, "clip0006"))
    proxy = FaultProxy(s3.port, seed=5, rates={**TRANSIENT, **STALL}, stall_s=2.0).start()
    steps = ["run.steps=6", "run.ckpt_every=3", "data.num_workers=1"]
    cases = [
        {"name": "local", "run": "local", "shards": str(local), "extra": steps},
        {"name": "s3", "run": "s3", "shards": remote, "extra": steps},
        {"name": "s3_first", "run": "s3_resume", "shards": remote, "extra": [*steps[1:], "run.steps=3"]},
        {"name": "s3_resumed", "run": "s3_resume", "shards": remote, "extra": [*steps, "run.resume=auto"]},
        {
            "name": "faults",
            "run": "faults",
            "shards": remote,
            "extra": [*steps, f"data.endpoint_url={proxy.endpoint}", "data.timeout_s=0.5"],
        },
        {"name": "missing", "run": "missing", "shards": missing, "extra": steps},
        {"name": "flipped", "run": "flipped", "shards": flipped, "extra": steps},
    ]
    (work / "cases.in.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    try:
        p = subprocess.run(
            [PY, str(HERE / "object_store_cases.py"), str(work), str(work / "cases.in.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        proxy.stop()
    assert p.returncode == 0, p.stderr[-3000:]
    return {**json.loads((work / "cases.json").read_text()), "surfaced": proxy.surfaced}


def _losses(case: dict) -> list:
    assert case["rc"] == 0, case["stderr"][-2000:]
    return [(m["step"], m["loss"]) for m in case["metrics"]]


def test_training_from_s3_is_bit_identical_to_local_and_resumes_exactly(trained):
    ref = _losses(trained["local"])
    assert len(ref) == 6 and all(loss is not None for _, loss in ref)
    assert _losses(trained["s3"]) == ref
    assert _losses(trained["s3_first"]) + _losses(trained["s3_resumed"])[3:] == ref
    assert "storage" not in trained["local"]["metrics"][-1]  # a local cache logs no object-store counters
    last = trained["s3"]["metrics"][-1]["storage"]
    assert last["requests"] > 0 and last["retries"] == 0


def test_training_under_faults_completes_and_counts_every_fault(trained):
    assert _losses(trained["faults"]) == _losses(trained["local"])
    counts = trained["faults"]["metrics"][-1]["storage"]
    surfaced = trained["surfaced"]
    assert sum(surfaced.values()) >= 3, surfaced
    assert {KIND[k]: n for k, n in surfaced.items()} == {KIND[k]: counts[KIND[k]] for k in surfaced}
    assert counts["retries"] == sum(surfaced.values())


@pytest.mark.parametrize(
    "case,pattern",
    [
        (
            "missing",
            r"s3://osp-test/caches/train-missing/shard-000001\.tar: sample 'clip000[4-7]' is corrupt \(tar missing",
        ),
        (
            "flipped",
            r"s3://osp-test/caches/train-flipped/shard-000001\.tar: sample 'clip0006' is corrupt \(checksum mismatch",
        ),
    ],
)
def test_missing_object_and_flipped_byte_stop_training_with_one_line(trained, case, pattern):
    import re

    r = trained[case]
    assert r["rc"] == 1
    lines = [ln for ln in r["stderr"].splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r["stderr"][-2000:]


# ------------------------------------------------------------------------------------------------
# encode to s3://, killed and re-run
# ------------------------------------------------------------------------------------------------
def _encode_cmd(data: Path, models: Path, out: str, staging: Path) -> list[str]:
    return [
        PY,
        "-m",
        "osp.common.cli",
        "encode",
        "--data",
        str(data),
        "--out",
        out,
        "--staging",
        str(staging),
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
        "3",
        "--batch-size",
        "3",
        "--workers",
        "0",
        "--no-progress",
    ]


def _encode_env(endpoint: str) -> dict:
    return {**os.environ, "AWS_ENDPOINT_URL": endpoint, "OMP_NUM_THREADS": "1", "OSP_DEVICE": "cpu"}


@pytest.fixture(scope="module")
def encoded(s3, tmp_path_factory):
    from osp.common.demo_data import write_demo_dataset
    from osp.common.demo_models import write_demo_models

    base = tmp_path_factory.mktemp("s3encode")
    data, models = base / "data", base / "models"
    write_demo_dataset(data, seed=0)
    write_demo_models(models)
    url = f"s3://{s3.bucket}/enc/ref"
    p = subprocess.run(
        _encode_cmd(data, models, url, base / "stage-ref"), env=_encode_env(s3.endpoint), capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return {"base": base, "data": data, "models": models, "ref": s3.objects("enc/ref")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment,held,fresh_staging",
    [
        ("before the manifest", lambda m, p: m == "PUT" and p.endswith("/manifest.json"), False),
        ("between tars", lambda m, p: m == "PUT" and p.endswith("/shard-000001.tar"), True),
    ],
)
def test_encode_to_s3_killed_then_rerun_gives_the_same_objects(s3, encoded, moment, held, fresh_staging):
    name = moment.replace(" ", "-")
    url = f"s3://{s3.bucket}/enc/{name}"
    staging = encoded["base"] / f"stage-{name}"
    proxy = FaultProxy(s3.port, hold=held).start()
    try:
        cmd = _encode_cmd(encoded["data"], encoded["models"], url, staging)
        with subprocess.Popen(  # the with block closes its pipes and reaps it
            cmd, env=_encode_env(proxy.endpoint), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        ) as p:
            assert proxy.held.wait(240), p.communicate()[1][-3000:]
            os.killpg(p.pid, signal.SIGKILL)  # killed while that object is being uploaded
            p.wait()
    finally:
        proxy.stop()
    seen = s3.objects(f"enc/{name}")
    assert "manifest.json" not in seen
    for k, v in seen.items():  # whatever is there is final: the uninterrupted run's bytes
        if k.endswith(".tar") or k.endswith(".rows.json"):
            assert v == encoded["ref"][k], k
    # a reader started now refuses the incomplete cache with one line
    r = subprocess.run(
        [PY, "-m", "osp.common.cli", "shards", "verify", url],
        env=_encode_env(s3.endpoint),
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "did not finish (or is still running)" in r.stderr
    with pytest.raises(S.ShardError, match="did not finish"):
        S.ShardIndex.open(url)
    if fresh_staging:  # the re-run may be on another machine: it resumes from what the store holds
        shutil.rmtree(staging)
    p = subprocess.run(
        _encode_cmd(encoded["data"], encoded["models"], url, staging),
        env=_encode_env(s3.endpoint),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.splitlines()[0])
    if fresh_staging:
        assert result["skipped_shards"] >= 1  # shard 0 was published before the kill
    assert s3.objects(f"enc/{name}") == encoded["ref"]
    assert S.verify(url) == []
