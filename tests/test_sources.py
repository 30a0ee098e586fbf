"""Several caches in one run (data.sources): the weighted mix, shape buckets with a batch per bucket from
a token budget, the position on resume and on another layout, and the one-line refusals of caches that
do not belong together. The process tests launch `osp train` (gloo, the tiny DiT): 4 processes with
TP=2 x DP=2, then resumes of its checkpoint at DP=1 with twice the micro-batch and with twice the
gradient accumulation (key logs compared), and a resume at the same layout (bit-exact losses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

from osp.common import shards as S  # noqa: E402
from osp.common.errors import ConfigError  # noqa: E402
from osp.stage2_train.config import TrainConfig  # noqa: E402
from osp.stage2_train.data import ShardLoader, mixed_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OSP = str(Path(sys.executable).with_name("osp"))
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")},
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}
VIDEO, IMAGE = (3, 6, 8), (1, 6, 8)  # the tiny preset's latents: 36 and 12 DiT tokens
TOKENS = {VIDEO: 36, IMAGE: 12}


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    return {
        "video": make_shards(base / "video", 24, per_shard=8, seed=1),
        "image": make_shards(base / "image", 40, per_shard=8, latent=IMAGE, seed=2, prefix="img"),
    }


def _loader(caches, **kw) -> ShardLoader:
    args = dict(batch_size=2, dp_rank=0, dp_size=1, seed=0, tokens_per_batch=72, tokens_of=TOKENS.__getitem__)
    args.update(kw)
    return ShardLoader([(caches["video"], 3.0), (caches["image"], 1.0)], **args)


def _draw(loader: ShardLoader, samples: int) -> list:
    out, n = [], 0
    while n < samples:
        b = next(loader)
        out.append(b)
        n += len(b.keys)
    return out


# ------------------------------------------------------------------------------------------------
# no processes
# ------------------------------------------------------------------------------------------------
def test_weights_3_to_1_within_3_percent_over_400_samples(caches):
    batches = _draw(_loader(caches), 400)
    video = sum(len(b.keys) for b in batches if b.shape == VIDEO)
    total = sum(len(b.keys) for b in batches)
    assert 400 <= total < 400 + 6
    assert abs(video / total - 0.75) <= 0.03, video / total
    # token budget: 72 tokens per rank -> 2 videos (36 tokens) or 6 images (12 tokens) per batch
    assert {(b.shape, len(b.keys)) for b in batches} == {(VIDEO, 2), (IMAGE, 6)}
    # control: the same caches at 1:1 draw about half videos (the weights, not the cache sizes, decide)
    even = ShardLoader([(caches["video"], 1.0), (caches["image"], 1.0)], batch_size=2, dp_rank=0, dp_size=1, seed=0)
    b2 = _draw(even, 400)
    assert abs(sum(len(b.keys) for b in b2 if b.shape == VIDEO) / sum(len(b.keys) for b in b2) - 0.5) <= 0.03


def test_mixed_plan_is_a_pure_function_and_epochs_differ():
    shapes = [np.array([VIDEO] * 10), np.array([IMAGE] * 9 + [VIDEO] * 4)]

    def gb(shape):
        return 2 if shape == VIDEO else 3

    a, oa = mixed_plan(shapes, [2.0, 1.0], 7, 0, gb)
    b, ob = mixed_plan(shapes, [2.0, 1.0], 7, 0, gb)
    assert [x.tolist() for x in a] == [x.tolist() for x in b] and oa == ob
    c, _ = mixed_plan(shapes, [2.0, 1.0], 7, 1, gb)
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    for rows, k in zip(a, oa):  # a global batch holds one source's rows of one shape
        assert len({tuple(s) for s in shapes[k][rows]}) == 1


def test_dp_ranks_share_the_bucket_and_resume_exactly(caches):
    ranks = [_loader(caches, dp_rank=r, dp_size=2, tokens_per_batch=36) for r in (0, 1)]
    for _ in range(12):
        a, b = next(ranks[0]), next(ranks[1])
        assert a.shape == b.shape and len(a.keys) == len(b.keys) and not set(a.keys) & set(b.keys)
    first = _loader(caches)
    _draw(first, 50)
    state = first.state_dict()
    ahead = [next(first).keys for _ in range(8)]
    again = _loader(caches)
    again.load_state_dict(state)
    assert [next(again).keys for _ in range(8)] == ahead and again.notice == ""


def test_dp1_with_twice_the_micro_batch_or_accumulation_reads_the_same_keys(caches):
    def step_keys(loaders, accum: int, steps: int) -> list[list[str]]:
        out = []
        for _ in range(steps):
            keys: list[str] = []
            for _m in range(accum):
                keys += [k for ld in loaders for k in next(ld).keys]
            out.append(keys)
        return out

    dp2 = step_keys([_loader(caches, dp_rank=r, dp_size=2) for r in (0, 1)], 1, 20)
    twice = step_keys([_loader(caches, tokens_per_batch=144)], 1, 20)
    accum = step_keys([_loader(caches, grad_accum=2)], 2, 20)
    # with DP=2 the two ranks' halves are concatenated rank by rank; one rank reads them in that order
    assert dp2 == twice == accum


def test_source_counts_are_logged_per_step(caches):
    loader = _loader(caches)
    n = {VIDEO: 0, IMAGE: 0}
    for b in _draw(loader, 60):
        n[b.shape] += len(b.keys)
    stats = loader.step_stats()
    assert stats["source_samples"] == {"video": n[VIDEO], "image": n[IMAGE]}
    assert loader.step_stats()["source_samples"] == {"video": 0, "image": 0}


def _geometry(cfg):
    from rich.console import Console

    from osp.common.models.dit import get_dit_config
    from osp.stage2_train.geometry import shard_geometry

    return shard_geometry(cfg, get_dit_config("tiny"), Console(quiet=True))


def _cfg(*sources: tuple[Path, float], **data) -> TrainConfig:
    d = {"sources": [{"shards": str(p), "weight": w} for p, w in sources], **data}
    return TrainConfig.from_dict({"data": d})


def test_bad_sources_are_one_line_errors(caches, tmp_path):
    geo = _geometry(_cfg((caches["video"], 3), (caches["image"], 1)))
    assert geo.shapes == {VIDEO, IMAGE} and dict(geo.bucket_tokens) == TOKENS
    with pytest.raises(ConfigError, match=r"data.sources\[1\].*weight 0.* must be a number > 0"):
        _cfg((caches["video"], 3), (caches["image"], 0))
    with pytest.raises(ConfigError, match="needs shards"):
        TrainConfig.from_dict({"data": {"sources": [{"weight": 1}]}})
    few = make_shards(tmp_path / "few", 2, per_shard=2, latent=IMAGE, seed=3)
    with pytest.raises(ConfigError, match=f"{few}: no latent shape has enough samples"):
        ShardLoader([(caches["video"], 1), (few, 1)], batch_size=3, dp_rank=0, dp_size=1, seed=0)
    # another VAE, another text encoder, other latent channels: refused naming both caches
    for field, value, what in (("vae", {"weights_sha256": "b" * 64}, "VAE"), ("text_id", "c" * 64, "text encoder")):
        other = make_shards(tmp_path / f"other-{field}", 4, per_shard=4, latent=IMAGE, seed=4)
        S.write_manifest(other, {**S.read_manifest(other), field: value})
        base = make_shards(tmp_path / f"base-{field}", 4, per_shard=4, seed=5)
        S.write_manifest(base, {**S.read_manifest(base), "vae": {"weights_sha256": "a" * 64}, "text_id": "d" * 64})
        with pytest.raises(ConfigError, match=f"{other}: {what} .* differs from {base}'s"):
            _geometry(_cfg((base, 1), (other, 1)))
    samples = tmp_path / "samples4"
    w = S.ShardWriter(samples, 0)
    w.write("x", torch.zeros(4, *IMAGE), torch.zeros(2, 64), {})
    w.publish()
    S.write_manifest(samples, {})
    S.write_uncond(samples, torch.zeros(1, 64))
    S.merge_index(samples)
    with pytest.raises(ConfigError, match="latent channels 4 differs"):
        _geometry(_cfg((caches["video"], 1), (samples, 1)))
    # the config round-trips through its TOML form
    cfg = _cfg((caches["video"], 3), (caches["image"], 1), tokens_per_batch=72)
    import tomllib

    assert TrainConfig.from_dict(tomllib.loads(cfg.to_toml())) == cfg


# ------------------------------------------------------------------------------------------------
# real launches
# ------------------------------------------------------------------------------------------------
STEPS = 6


def _train(run: Path, caches, nproc: int, tp: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [OSP, "train", "--config", str(ROOT / "stage2_train" / "configs" / "demo.toml")]
    cmd += ["--nproc", str(nproc), "--tp", str(tp), *(["--no-sp"] if tp == 1 else [])]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "parallel.init_timeout_s=60"]
    srcs = f'[{{shards = "{caches["video"]}", weight = 3.0}}, {{shards = "{caches["image"]}", weight = 1.0}}]'
    cmd += [f"data.sources={srcs}", f"run.dir={run}", f"run.steps={STEPS}", "run.ckpt_every=3"]
    cmd += ["data.num_workers=0", "run.log_every=0", "run.tensorboard=false", "run.log_keys=true"]
    cmd += ["data.batch_size=1", "run.async_ckpt=false", *extra]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _keys(run: Path, rank: int) -> dict[int, list[str]]:
    lines = (run / f"keys-rank{rank:05d}.jsonl").read_text().splitlines()
    return {d["step"]: d["keys"] for d in map(json.loads, lines)}


def _metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.dist
@pytest.mark.slow
def test_tp2_dp2_groups_share_shapes_and_other_layouts_read_the_same_keys(caches, tmp_path):
    shape_of = {}
    for name, shape in (("video", VIDEO), ("image", IMAGE)):
        shape_of.update({str(k): shape for k in S.ShardIndex.open(caches[name]).key})
    run = tmp_path / "tp2dp2"
    _train(run, caches, 4, 2)
    keys = [_keys(run, r) for r in range(4)]  # ranks 0, 1 = TP group of dp rank 0; 2, 3 = dp rank 1
    shapes_seen = set()
    for step in range(1, STEPS + 1):
        assert keys[0][step] == keys[1][step] and keys[2][step] == keys[3][step]  # a TP group: same samples
        assert not set(keys[0][step]) & set(keys[2][step])  # DP ranks: different samples
        step_shapes = {shape_of[k] for r in range(4) for k in keys[r][step]}
        assert len(step_shapes) == 1  # one bucket per step on every rank
        shapes_seen |= step_shapes
    assert shapes_seen == {VIDEO, IMAGE}
    m = _metrics(run)
    assert sum(sum(x["source_samples"].values()) for x in m.values()) == sum(
        len(keys[0][s]) + len(keys[2][s]) for s in m
    )

    ckpt = run / "checkpoints" / "step-0000003"
    global_keys = {s: keys[0][s] + keys[2][s] for s in range(4, STEPS + 1)}
    for name, extra in (("twice", ["data.batch_size=2"]), ("accum", ["optim.grad_accum=2"])):
        other = tmp_path / name
        _train(other, caches, 1, 1, "--resume", str(ckpt), "run.ckpt_every=1", *extra)
        got = _keys(other, 0)
        assert {s: got[s] for s in range(4, STEPS + 1)} == global_keys, name
    # bit-exact resume on the same layout: from step 4 of the "twice" run to its end
    again = tmp_path / "again"
    _train(
        again,
        caches,
        1,
        1,
        "--resume",
        str(tmp_path / "twice" / "checkpoints" / "step-0000004"),
        "data.batch_size=2",
    )
    ref, got = _metrics(tmp_path / "twice"), _metrics(again)
    assert [got[s]["loss"] for s in (5, 6)] == [ref[s]["loss"] for s in (5, 6)]
    assert [got[s]["grad_norm"] for s in (5, 6)] == [ref[s]["grad_norm"] for s in (5, 6)]
