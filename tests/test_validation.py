"""Validation during training: latents from cached prompts with the EMA weights (no encoder in the
trainer), losses bit-identical with validation on and off (also across a resume), the decoding
sidecar (mp4, TensorBoard, offline wandb), `--watch` on a live run, and the one-line refusals."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402
from wandb_records import history  # noqa: E402

from osp.common import shards as S  # noqa: E402
from osp.common.cli import app  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
PROMPTS = ["a red ball bouncing on a green field", "a cat walks in the snow"]


def _one_line_error(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Demo models, tiny shards whose manifest names the demo text encoder, a prompt cache of it."""
    from osp.common.demo_models import write_demo_models
    from osp.common.models.text import TextEncoder

    root = tmp_path_factory.mktemp("validation")
    models = write_demo_models(root / "models")
    shards = make_shards(root / "shards", 8)
    te = TextEncoder.from_pretrained(models["text_encoder"], device="cpu")
    S.write_manifest(shards, {**S.read_manifest(shards), "text_encoder": te.identity()})
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    r = CliRunner().invoke(
        app,
        [
            "encode-prompts",
            str(root / "prompts.txt"),
            "--text-encoder",
            str(models["text_encoder"]),
            "--out",
            str(root / "prompts"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    return {
        "root": root,
        "shards": shards,
        "prompts": root / "prompts",
        "vae": Path(models["vae"]),
        "text": Path(models["text_encoder"]),
    }


@pytest.fixture(scope="module")
def worker(setup) -> dict:
    out = setup["root"] / "worker"
    out.mkdir()
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += [str(HERE / "validation_worker.py"), str(setup["shards"]), str(setup["prompts"]), str(out)]
    env = {**ENV, "WANDB_DIR": str(setup["root"] / "wandb")}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return {"out": out, **{r: json.loads((out / f"result-rank{r}.json").read_text()) for r in (0, 1)}}


def test_prompts_are_a_text_cache_with_the_negative_and_their_order(setup):
    from osp.common.config import NEGATIVE_PROMPT, TEXT_MAX_LENGTH
    from osp.common.models.text import TextEncoder
    from osp.common.prompt_cache import read_prompt_cache
    from osp.common.sampling import prepare_prompt

    cache = read_prompt_cache(setup["prompts"])
    assert cache.prompts == PROMPTS and len(cache.texts) == 2 and cache.negative.shape[1] == 64
    te = TextEncoder.from_pretrained(setup["text"], device="cpu")
    used = [prepare_prompt(p) for p in PROMPTS] + [prepare_prompt(NEGATIVE_PROMPT, template=False)]
    expect = te.encode_unpadded(used)  # an independent encoding (padded to the longest, not to 512)
    for got, want in zip([*cache.texts, cache.negative], expect):
        torch.testing.assert_close(got, want)
    # the text cache format of captions: entries keyed by text_key of the prepared prompt, found by TextLookup
    tc = S.TextCache.open(setup["prompts"])
    text_id = te.identity()["text_id"]
    assert tc.text_id == text_id and len(tc) == 3
    keys = [S.text_key(u, text_id, TEXT_MAX_LENGTH) for u in used]
    lookup = S.TextLookup([tc])
    assert all(torch.equal(lookup.get(k), t) for k, t in zip(keys, [*cache.texts, cache.negative]))
    assert cache.record["keys"] == keys[:2] and cache.record["negative_key"] == keys[2]
    assert S.verify(setup["prompts"]) == []


def test_damaged_or_edited_prompts_are_refused_in_one_line(setup, tmp_path):
    import shutil

    from osp.common.prompt_cache import PROMPTS_FIELD, PromptCacheError, read_prompt_cache

    flipped = tmp_path / "flipped"
    shutil.copytree(setup["prompts"], flipped)
    tar = S.shard_path(flipped, 0)
    idx = S.ShardIndex.open(flipped)
    data = bytearray(tar.read_bytes())
    data[int(idx.st_offset[0]) + int(idx.st_size[0]) - 1] ^= 0xFF  # a flipped byte in an embedding
    tar.write_bytes(bytes(data))
    with pytest.raises(S.ShardError, match="checksum") as e:
        read_prompt_cache(flipped)
    assert "\n" not in str(e.value)

    edited = tmp_path / "edited"  # the list names a prompt whose text is not what was encoded
    shutil.copytree(setup["prompts"], edited)
    m = S.read_manifest(edited)
    m[PROMPTS_FIELD]["prompts"][0]["used"] = "a blue ball"
    S.write_manifest(edited, m)
    with pytest.raises(PromptCacheError, match="does not match its key"):
        read_prompt_cache(edited)

    plain = tmp_path / "plain"  # a text cache without a validation list
    shutil.copytree(setup["prompts"], plain)
    m = S.read_manifest(plain)
    del m[PROMPTS_FIELD]
    S.write_manifest(plain, m)
    with pytest.raises(PromptCacheError, match="without validation prompts"):
        read_prompt_cache(plain)
    read_prompt_cache(setup["prompts"])  # positive control


def test_prompts_into_an_existing_text_cache_reuse_what_it_holds(setup, tmp_path):
    import shutil

    from osp.common.prompt_cache import read_prompt_cache

    both = tmp_path / "both"
    shutil.copytree(setup["prompts"], both)
    (tmp_path / "more.txt").write_text(PROMPTS[1] + "\na dog runs on the beach\n")
    r = CliRunner().invoke(
        app,
        ["encode-prompts", str(tmp_path / "more.txt"), "--text-encoder", str(setup["text"]), "--out", str(both)],
    )
    assert r.exit_code == 0, r.output
    assert "validation prompts 1 encoded, 2 reused" in r.output
    cache, first = read_prompt_cache(both), read_prompt_cache(setup["prompts"])
    assert cache.prompts == [PROMPTS[1], "a dog runs on the beach"] and len(S.TextCache.open(both)) == 4
    assert torch.equal(cache.texts[0], first.texts[1]) and torch.equal(cache.negative, first.negative)


@pytest.mark.dist
@pytest.mark.slow
def test_losses_equal_with_validation_on_off_and_across_resume(worker):
    for r in (0, 1):
        res = worker[r]
        assert res["off"] == res["on"] == res["resumed"], res  # bit-identical floats
        assert res["loaded"] == []  # the training processes never loaded an encoder
    on = worker["out"] / "on"
    for step in (2, 4, 6):
        d = on / "validation" / f"step-{step:07d}"
        assert (d / "complete").is_file()
        settings = json.loads((d / "settings.json").read_text())
        assert settings["step"] == step and settings["prompts"] == PROMPTS and settings["weights"] == "ema"
        lat = load_file(str(d / "latents.safetensors"))
        assert set(lat) == {"latents.0000", "latents.0001"} and lat["latents.0000"].shape == (1, 4, 3, 6, 8)
        assert torch.isfinite(lat["latents.0000"]).all()
    a = load_file(str(on / "validation/step-0000002/latents.safetensors"))["latents.0000"]
    b = load_file(str(on / "validation/step-0000004/latents.safetensors"))["latents.0000"]
    assert not torch.equal(a, b)  # the EMA moved between the two validations
    resumed = load_file(str(worker["out"] / "resumed/validation/step-0000004/latents.safetensors"))["latents.0000"]
    assert torch.equal(resumed, b)  # the same latents after a resume
    metrics = [json.loads(x) for x in (on / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "validation_time_s" in m] == [2, 4, 6]
    assert json.loads((on / "finished.json").read_text())["step"] == 6


@pytest.mark.dist
@pytest.mark.slow
def test_sidecar_writes_mp4s_tensorboard_and_offline_wandb(worker, setup):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = worker["out"] / "on"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(setup["root"] / "wandb")}
    r = CliRunner(env=env).invoke(app, ["validate", str(run), "--vae", str(setup["vae"])])
    assert r.exit_code == 0, r.output
    for step in (2, 4, 6):
        d = run / "validation" / f"step-{step:07d}"
        assert json.loads((d / "decoded.json").read_text())["videos"] == sorted(p.name for p in d.glob("*.mp4"))
    import av

    with av.open(str(next((run / "validation/step-0000006").glob("000-*.mp4")))) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tag = "validation/000-a-red-ball-bouncing-on-a-green-field"
    images = acc.Images(tag)
    assert [e.step for e in images] == [2, 4, 6]
    assert Image.open(io.BytesIO(images[0].encoded_image_string)).n_frames == 9  # an animation, all frames
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    vid = (run / "validation" / "wandb-id").read_text().strip()
    rows = [row for row in history(setup["root"] / "wandb", vid) if f"{tag}/_type" in row]
    assert [row["_step"] for row in rows] == [2, 4, 6] and rows[0][f"{tag}/_type"] == "video-file"
    tid = (run / "wandb-id").read_text().strip()
    assert [row["_step"] for row in history(setup["root"] / "wandb", tid) if "train/loss" in row] == [1, 2, 3, 4, 5, 6]
    r = CliRunner(env=env).invoke(app, ["validate", str(run), "--vae", str(setup["vae"])])  # all decoded already
    assert r.exit_code == 0 and "0 validation videos" in r.output, r.output


@pytest.mark.slow
def test_watch_decodes_while_the_run_is_live_and_exits_with_it(setup, tmp_path):
    run = tmp_path / "live"
    env = {**ENV, "WANDB_DIR": str(tmp_path / "wandb")}
    train = [PY, "-m", "osp.stage2_train.run", str(ROOT / "stage2_train/configs/demo.toml")]  # a rank
    train += [f"data.shards={setup['shards']}", f"run.dir={run}", "run.steps=8", "run.ckpt_every=0", "parallel.tp=1"]
    train += ["parallel.sp=false", "data.num_workers=0", "run.log_every=0", "validate.every=2", "validate.steps=5"]
    train += [f"validate.prompts={setup['prompts']}"]
    watch = [PY, "-m", "osp.common.cli", "validate", str(run), "--vae", str(setup["vae"]), "--watch", "--poll", "0.2"]
    first = run / "validation/step-0000002"
    t = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    w = None
    try:
        deadline = time.time() + 300
        while not (first / "complete").is_file():  # the first validation step is written: freeze the trainer
            assert t.poll() is None and time.time() < deadline, t.stderr.read()[-3000:]  # pyright: ignore
            time.sleep(0.02)
        t.send_signal(signal.SIGSTOP)
        w = subprocess.Popen(watch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (first / "decoded.json").is_file():  # decoded while the run is live (stopped mid-run)
            assert w.poll() is None and time.time() < deadline, w.stderr.read()[-3000:]  # pyright: ignore
            time.sleep(0.1)
        assert list(first.glob("*.mp4")) and not (run / "finished.json").exists()
        time.sleep(1.0)
        assert w.poll() is None  # still following the live run
        t.send_signal(signal.SIGCONT)
        assert t.wait(timeout=300) == 0, t.stderr.read()[-3000:]  # pyright: ignore
        out, err = w.communicate(timeout=120)  # exits on its own once the run has finished
    finally:
        for p in (t, w):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.communicate()  # reaps it and closes its pipes
    assert w.returncode == 0, err[-3000:]
    assert all((run / f"validation/step-{s:07d}/decoded.json").is_file() for s in (2, 4, 6, 8))
    assert "8 validation videos written" in out


def test_a_converted_text_encoder_serves_the_caches_of_its_source(setup, tmp_path):
    import shutil

    from osp.common.models.text import TextEncoder, convert_text_encoder
    from osp.common.prompt_cache import PromptCacheError
    from osp.stage1_encode.prompts import encode_prompts
    from osp.stage2_train.config import TrainConfig
    from osp.stage2_train.trainer import model_config
    from osp.stage2_train.validation import cached_prompts

    conv = tmp_path / "text-bf16"
    convert_text_encoder(setup["text"], conv)  # encoder-only bf16 safetensors
    shards = tmp_path / "shards-bf16"  # training caches encoded in bf16 by the original folder
    shutil.copytree(setup["shards"], shards)
    source = TextEncoder.from_pretrained(setup["text"], device="cpu", dtype=torch.bfloat16).identity()
    S.write_manifest(shards, {**S.read_manifest(shards), "text_encoder": source})

    def check(prompts: Path, data: Path) -> None:
        cfg = TrainConfig.load(None, [f"data.shards={data}", "validate.every=2", f"validate.prompts={prompts}"])
        cached_prompts(cfg, model_config(cfg))

    encode_prompts(PROMPTS, conv, tmp_path / "p-bf16", device="cpu", dtype=torch.bfloat16)
    check(tmp_path / "p-bf16", shards)  # same text_id: accepted
    with pytest.raises(PromptCacheError, match="text_id"):
        check(tmp_path / "p-bf16", setup["shards"])  # the fp32 caches of the same weights are another encoder
    encode_prompts(PROMPTS, conv, tmp_path / "p-fp32", device="cpu")  # bf16 weights run in fp32: another id
    with pytest.raises(PromptCacheError, match="text_id"):
        check(tmp_path / "p-fp32", shards)


def test_training_caches_without_a_text_id_are_matched_by_their_encoder_record(setup, tmp_path):
    import shutil

    from osp.common.prompt_cache import PromptCacheError
    from osp.stage2_train.config import TrainConfig
    from osp.stage2_train.trainer import model_config
    from osp.stage2_train.validation import cached_prompts

    def check(te: dict) -> None:
        shards = tmp_path / f"shards-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(setup["shards"], shards)
        S.write_manifest(shards, {**S.read_manifest(shards), "text_encoder": te})
        cfg = TrainConfig.load(
            None, [f"data.shards={shards}", "validate.every=2", f"validate.prompts={setup['prompts']}"]
        )
        cached_prompts(cfg, model_config(cfg))

    legacy = {k: v for k, v in S.read_manifest(setup["shards"])["text_encoder"].items() if k not in ("text_id",)}
    check(legacy)  # written before text ids: the same weights, tokenizer, length and dtype
    with pytest.raises(PromptCacheError, match="not recorded"):
        check({**legacy, "weights_sha256": "0" * 64})  # other weights


def test_refusals_in_one_line(setup, worker, tmp_path):
    from osp.common.demo_models import write_demo_models
    from osp.common.models.vae import CausalVAEConfig, build_vae, save_vae
    from osp.common.prompt_cache import PromptCacheError
    from osp.stage2_train.config import TrainConfig
    from osp.stage2_train.trainer import model_config
    from osp.stage2_train.validation import cached_prompts

    # a prompt cache of another text encoder than the training shards'
    other = write_demo_models(tmp_path / "other", seed=1)
    r = CliRunner().invoke(
        app,
        [
            "encode-prompts",
            str(setup["root"] / "prompts.txt"),
            "--text-encoder",
            str(other["text_encoder"]),
            "--out",
            str(tmp_path / "p2"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    cfg = TrainConfig.load(
        None, [f"data.shards={setup['shards']}", "validate.every=2", f"validate.prompts={tmp_path / 'p2'}"]
    )
    with pytest.raises(PromptCacheError, match="re-run osp encode-prompts with --text-encoder") as e:
        cached_prompts(cfg, model_config(cfg))
    assert "\n" not in str(e.value)
    assert str(Path(other["text_encoder"]).resolve()) in str(e.value) and str(setup["text"].resolve()) in str(e.value)
    cached_prompts(
        TrainConfig.load(
            None, [f"data.shards={setup['shards']}", "validate.every=2", f"validate.prompts={setup['prompts']}"]
        ),
        model_config(cfg),
    )  # positive control
    # `osp validate` on a run without validation latents
    (tmp_path / "novalid").mkdir()
    line = _one_line_error(CliRunner().invoke(app, ["validate", str(tmp_path / "novalid"), "--vae", str(setup["vae"])]))
    assert "no validation latents" in line
    # a VAE whose latent channels differ from the run's: refused before anything is decoded
    cfg8 = CausalVAEConfig.from_json(setup["vae"] / "config.json")
    import dataclasses

    save_vae(build_vae(dataclasses.replace(cfg8, embed_dim=8)), tmp_path / "vae8")
    run = worker["out"] / "off"  # no validation: copy one step of the "on" run into a fresh run folder
    fresh = tmp_path / "run"
    (fresh / "validation").mkdir(parents=True)
    import shutil

    shutil.copytree(worker["out"] / "on/validation/step-0000002", fresh / "validation/step-0000002")
    for f in (fresh / "validation/step-0000002").glob("*"):
        if f.suffix == ".mp4" or f.name == "decoded.json":
            f.unlink()
    line = _one_line_error(CliRunner().invoke(app, ["validate", str(fresh), "--vae", str(tmp_path / "vae8")]))
    assert "8 channels, the run's have 4" in line and not list((fresh / "validation/step-0000002").glob("*.mp4"))
    assert run.is_dir()
