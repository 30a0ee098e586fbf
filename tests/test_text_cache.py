"""Text caches: caption embeddings stored once and shared by latent caches of several geometries.

The demo data is encoded in-process (tiny models, no decode workers) into a text cache and two latent
caches (9 and 5 frames); the text encoder's and the VAE's forward calls are counted. Then a
re-captioned copy of the dataset reuses the first cache's latents (no VAE call), and the refusals: a
missing text cache, a text cache of another encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from osp.common import shards as S

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """Forward calls of the text encoder and the VAE, counted around the encodes of this module."""
    from osp.common.models.text import TextEncoder
    from osp.common.models.vae import CausalVAE

    calls = {"text": 0, "vae": 0}
    text_fwd, vae_fwd = TextEncoder._forward, CausalVAE.encode_moments

    def text(self, *a, **k):
        calls["text"] += 1
        return text_fwd(self, *a, **k)

    def vae(self, *a, **k):
        calls["vae"] += 1
        return vae_fwd(self, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(TextEncoder, "_forward", text)
    mp.setattr(CausalVAE, "encode_moments", vae)
    yield calls
    mp.undo()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from osp.common.demo_data import write_demo_dataset
    from osp.common.demo_models import write_demo_models

    root = tmp_path_factory.mktemp("textcache")
    write_demo_dataset(root / "data", seed=0)
    write_demo_models(root / "models")
    return root


def encode(base: Path, out: Path | None, frames: int = 9, data: Path | None = None, models: str = "models", **kw):
    from osp.stage1_encode.run import EncodeOptions, encode as run

    opts = EncodeOptions(
        data=str(data or base / "data"),
        out=str(out) if out else "",
        preset="tiny",
        vae=str(base / models / "vae"),
        text_encoder=str(base / models / "text_encoder"),
        frames=frames,
        height=48,
        width=64,
        workers=0,
        progress=False,
        device="cpu",
        samples_per_shard=8,
        **kw,
    )
    return run(opts)


@pytest.fixture(scope="module")
def two(base, counted):
    """One text cache, then latent caches at 9 and 5 frames; the calls each encode made."""
    text = base / "text"
    before = dict(counted)
    first = encode(base, base / "lat9", 9, text_cache=str(text))
    mid = dict(counted)
    second = encode(base, base / "lat5", 5, text_cache=str(text))
    after = dict(counted)
    return {
        "text": text,
        "first": first,
        "second": second,
        "calls_first": {k: mid[k] - before[k] for k in mid},
        "calls_second": {k: after[k] - mid[k] for k in mid},
    }


def _samples(out: Path) -> list[S.Sample]:
    index = S.ShardIndex.open(out)
    return [S.read_sample(out, index, i) for i in range(len(index))]


def test_second_geometry_runs_no_text_encoder_and_holds_no_text(base, two):
    assert two["calls_first"]["text"] > 0 and two["first"]["text_encoded"] == two["first"]["samples"] == 17
    assert two["calls_second"] == {"text": 0, "vae": two["calls_second"]["vae"]} and two["calls_second"]["vae"] > 0
    assert two["second"]["text_encoded"] == 0 and two["second"]["text_reused"] == 17
    for out, t in ((base / "lat9", 3), (base / "lat5", 2)):
        assert not (out / S.UNCOND_NAME).exists()
        samples = _samples(out)
        assert all(s.text is None and s.latent.shape[1] in (t, 1) for s in samples)
        with __import__("tarfile").open(S.shard_path(out, 0)) as tar:  # no text tensor in any member
            for m in tar.getmembers():
                if m.name.endswith(".safetensors"):
                    f = tar.extractfile(m)
                    assert f is not None and b'"text"' not in f.read()[:200]
        assert S.verify(out) == []
        m = S.read_manifest(out)
        assert m["text_id"] == two["first"]["text_id"] and m["text_refs"][0]["path"] == "../text"
    assert {s.meta["text_key"] for s in _samples(base / "lat9")} == {
        s.meta["text_key"] for s in _samples(base / "lat5")
    }
    info = S.inspect(base / "lat5")
    assert info["kind"] == "latent" and info["text_refs"][0]["ok"] and info["text_refs"][0]["samples"] == 17
    assert S.inspect(two["text"])["kind"] == "text" and S.verify(two["text"]) == []


def test_text_by_reference_equals_inline_text_and_trains(base, two):
    from osp.stage2_train.data import ShardLoader

    inline = base / "inline9"
    encode(base, inline, 9)  # today's form: text inside the samples
    ref = {s.key: s.text for s in _samples(inline)}
    assert all(t is not None for t in ref.values())
    loader = ShardLoader(base / "lat9", batch_size=1, dp_rank=0, dp_size=1, seed=0)
    seen = 0
    for _ in range(len(loader.rows)):
        b = next(loader)
        for j, key in enumerate(b.keys):
            L = int(b.text_mask[j].sum())
            torch.testing.assert_close(b.text[j, :L], ref[key].to(b.text.dtype), rtol=0, atol=1e-5)
            seen += 1
    assert seen >= 15
    assert torch.equal(S.cache_uncond(base / "lat9"), S.read_uncond(inline))


def test_recaption_reuses_latents_without_the_vae(base, two, counted):
    data = base / "recaptioned"
    shutil.copytree(base / "data", data)
    ann = json.loads((data / "annotation.json").read_text())
    for rec in ann:
        rec["cap"] = "a better caption: " + rec["cap"]
    (data / "annotation.json").write_text(json.dumps(ann))
    before = dict(counted)
    res = encode(
        base,
        base / "recap9",
        9,
        data=data,
        text_cache=str(two["text"]),
        text_only=True,
        latents_from=str(base / "lat9"),
    )
    calls = {k: counted[k] - before[k] for k in counted}
    assert calls["vae"] == 0 and calls["text"] > 0 and res["text_encoded"] == 17
    old = {s.key: s for s in _samples(base / "lat9")}
    new = _samples(base / "recap9")
    assert sorted(s.key for s in new) == sorted(old)
    for s in new:
        assert torch.equal(s.latent, old[s.key].latent)
        assert s.meta["caption"].startswith("a better caption") and s.meta["text_key"] != old[s.key].meta["text_key"]
    assert S.verify(base / "recap9") == []
    # text only, no latent cache: the captions are all there now, nothing is encoded
    before = dict(counted)
    res = encode(base, None, 9, data=data, text_cache=str(two["text"]), text_only=True)
    assert res["text_encoded"] == 0 and res["text_reused"] == 17 and counted == before


def test_missing_or_foreign_text_cache_is_refused(base, two, tmp_path):
    from rich.console import Console

    from osp.common.models.dit import get_dit_config
    from osp.stage1_encode.run import EncodeError
    from osp.stage1_encode.text_cache import TextCacheError
    from osp.stage2_train.config import TrainConfig
    from osp.stage2_train.geometry import shard_geometry

    moved = tmp_path / "lat5"
    shutil.copytree(base / "lat5", moved)
    m = S.read_manifest(moved)
    m["text_refs"] = [{**m["text_refs"][0], "path": "../nowhere", "abs_path": str(tmp_path / "nowhere")}]
    S.write_manifest(moved, m)
    problems = S.verify(moved)
    assert len(problems) == 1 and f"{moved}: refers to the text cache ../nowhere" in problems[0]
    cfg = TrainConfig.from_dict({"data": {"shards": str(moved)}})
    with pytest.raises(S.ShardError, match=f"{moved}: refers to the text cache ../nowhere .*{tmp_path / 'nowhere'}"):
        shard_geometry(cfg, get_dit_config("tiny"), Console(quiet=True))
    # a latent key missing from the text cache: verify names the sample
    partial = tmp_path / "partial"
    shutil.copytree(two["text"], partial)
    m = S.read_manifest(moved)
    m["text_refs"] = [S.make_text_ref(moved, partial, m["text_id"])]
    S.write_manifest(moved, m)
    for p in partial.glob("shard-*"):
        p.unlink()
    S.merge_index(partial)
    assert any("is in none of the referred text caches" in p for p in S.verify(moved))

    from osp.common.demo_models import write_demo_models

    write_demo_models(base / "models-other", seed=1)
    with pytest.raises(
        TextCacheError, match=f"{two['text']}: holds embeddings of the text encoder .* this run encodes with"
    ):
        encode(base, tmp_path / "foreign", 9, models="models-other", text_cache=str(two["text"]))
    with pytest.raises(EncodeError, match="--text-only needs --text-cache"):
        encode(base, tmp_path / "x", 9, text_only=True)
