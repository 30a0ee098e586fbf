"""`osp sample` on tiny models: video output, reproducibility, CFG, schedulers, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from osp.common.cli import app
from osp.common.config import NEGATIVE_PROMPT, VAE_SCALE_FACTOR
from osp.common.sampling import (
    SCHEDULERS,
    SampleSettings,
    denoise,
    initial_noise,
    load_models,
    make_scheduler,
    prepare_prompt,
    sample_videos,
)
from osp.stage2_train.checkpoint import open_dit, resolve


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Demo models + a random tiny DiT saved as an osp run in stage 2's layout (checkpoints/step-XXXXXXX/:
    torch DCP with model.* and ema.* global tensors, config.json, trainer.json; latest -> step-0000002)."""
    import torch.distributed.checkpoint as dcp

    from osp.common.demo_models import write_demo_models
    from osp.common.models.dit import build_dit

    root = tmp_path_factory.mktemp("sample")
    info = write_demo_models(root / "models", seed=0)
    torch.manual_seed(0)
    dit = build_dit("tiny")
    sd = dit.state_dict()
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}
    run = root / "run"
    # the run records its shard dir, whose manifest records the encoders (VAE/text defaults of osp sample)
    from osp.common.shards import write_manifest

    write_manifest(root / "shards", {"vae": {"path": info["vae"]}, "text_encoder": {"path": info["text_encoder"]}})
    for i, step in enumerate(("step-0000001", "step-0000002"), 1):
        d = run / "checkpoints" / step
        dcp.save(
            {**{f"model.{k}": v for k, v in sd.items()}, **{f"ema.{k}": v for k, v in ema.items()}},
            checkpoint_id=str(d),
            no_dist=True,
        )
        dit.config.to_json(d / "config.json")
        trainer = {"format": "torch-dcp", "step": i, "layout": {"tp": 2, "dp": 1}}
        if i == 2:  # step 1 does not record its shards (the --vae/--text-encoder error case)
            trainer["config"] = {"data": {"shards": str(root / "shards")}}
        (d / "trainer.json").write_text(json.dumps(trainer))
    (run / "checkpoints" / "latest").write_text("step-0000002\n")
    return {"root": root, "run": run, "vae": info["vae"], "text": info["text_encoder"], "info": info}


@pytest.fixture(scope="module")
def models(assets):
    return load_models(open_dit(assets["run"]), assets["vae"], assets["text"], device="cpu")


def _cli(*args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


def test_demo_models_idempotent(assets):
    from osp.common.demo_models import write_demo_models

    again = write_demo_models(assets["root"] / "models", seed=0)
    assert again["written"] == [] and sorted(again["kept"]) == ["text_encoder", "vae"]
    assert again["vae_identity"] == assets["info"]["vae_identity"]


def test_resolve(assets, tmp_path):
    ck = assets["run"] / "checkpoints"
    assert resolve(assets["run"]) == ck / "step-0000002"
    assert resolve(ck) == ck / "step-0000002"
    assert resolve(ck / "step-0000001") == ck / "step-0000001"
    for step in ("step-0000003", "step-0000010"):
        (tmp_path / "checkpoints" / step).mkdir(parents=True)
        (tmp_path / "checkpoints" / step / "trainer.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-0000011").mkdir()  # no trainer.json: an unfinished folder is skipped
    assert resolve(tmp_path).name == "step-0000010"  # no latest file: the newest step


def test_default_scheduler_matches_upstream():
    s = make_scheduler()
    assert type(s).__name__ == "EulerAncestralDiscreteScheduler"
    c = s.config
    assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule) == (1000, 1e-4, 0.02, "linear")
    assert c.prediction_type == "epsilon" and c.timestep_spacing == "linspace"
    s.set_timesteps(100)
    np.testing.assert_allclose(s.timesteps.numpy(), np.linspace(0, 999, 100)[::-1], atol=1e-3)
    # max sigma from the linear-beta schedule, computed by hand
    acp = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    sigma_max = np.sqrt((1 - acp[-1]) / acp[-1])
    assert float(s.init_noise_sigma) == pytest.approx(np.sqrt(sigma_max**2 + 1), rel=1e-4)
    assert float(s.init_noise_sigma) == pytest.approx(157.4073, abs=1e-3)
    assert make_scheduler("ddim").config.clip_sample is False
    assert make_scheduler("ddpm").config.clip_sample is False


@pytest.fixture(scope="module")
def cfg_text(models):
    return models.text_encoder.encode([prepare_prompt(NEGATIVE_PROMPT, template=False), prepare_prompt("a dog")])


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_runs(models, cfg_text, name):
    emb, mask = cfg_text
    noise = initial_noise((1, 4, 3, 8, 8), seed=1)
    out = denoise(
        models.dit, make_scheduler(name), noise, emb, mask, steps=4, guidance=7.5, seed=1, dtype=torch.float32
    )
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, noise * make_scheduler(name).init_noise_sigma)


def test_guidance_one_is_the_conditional_path(models):
    """sample_videos(guidance=1) equals a hand-written DDIM loop with the DiT's conditional output."""
    from diffusers import DDIMScheduler

    prompt, seed, steps = "a red ball bouncing", 7, 4
    rec = sample_videos(
        models, SampleSettings(prompts=[prompt], steps=steps, guidance=1.0, scheduler="ddim", seed=seed), progress=False
    )[0]
    assert rec["negative_prompt_used"] is None

    te = models.text_encoder
    text = "(masterpiece), (best quality), (ultra-detailed), a red ball bouncing."
    from osp.common.models.text import clean_caption

    emb, mask = te.encode([clean_caption(text)])
    sched = DDIMScheduler(
        beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, clip_sample=False
    )
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 3, 6, 8, generator=g)  # the tiny geometry: 9 x 48 x 64 px
    with torch.no_grad():
        for t in sched.timesteps:
            eps = models.dit(x, t.reshape(1), emb, mask)
            x = sched.step(eps, t, x).prev_sample
        video = models.vae.decode(x / VAE_SCALE_FACTOR)[0]
    expected = ((video / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    diff = np.abs(rec["frames_uint8"].astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3

    # identical negative and positive prompts: CFG at any scale gives the conditional prediction
    emb2, mask2 = emb.repeat(2, 1, 1), mask.repeat(2, 1)
    noise = initial_noise((1, 4, 3, 8, 8), seed)
    a = denoise(models.dit, make_scheduler("ddim"), noise, emb, mask, steps, 1.0, seed, torch.float32)
    b = denoise(models.dit, make_scheduler("ddim"), noise, emb2, mask2, steps, 7.5, seed, torch.float32)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cli_writes_mp4_and_sidecar(assets, tmp_path):
    import av

    out = tmp_path / "out"
    r = _cli(
        "--checkpoint",
        assets["run"],
        "--vae",
        assets["vae"],
        "--text-encoder",
        assets["text"],
        "--prompt",
        "a red ball",
        "--prompt",
        "a green field",
        "--steps",
        3,
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    mp4s = sorted(out.glob("*.mp4"))
    assert len(mp4s) == 2
    with av.open(str(mp4s[0])) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert float(stream.average_rate) == 24
    assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
    side = json.loads(mp4s[0].with_suffix(".json").read_text())
    assert side["seed"] == 42 and side["settings"]["steps"] == 3 and side["settings"]["scheduler"] == "euler-ancestral"
    assert side["identity"]["dit"]["meta"]["layout"]["tp"] == 2 and side["identity"]["dit"]["resolved"].endswith(
        "step-0000002"
    )
    assert set(side["identity"]) == {"dit", "vae", "text_encoder"}


def test_seed_reproducibility(models):
    s = SampleSettings(prompts=["a cat"], steps=3, seed=3)
    a, b = (sample_videos(models, s, progress=False)[0]["frames_uint8"] for _ in range(2))
    assert np.array_equal(a, b)
    # a different seed changes the initial noise and the ancestral noise, hence the latents
    emb, mask = models.text_encoder.encode(["a cat"])

    def latents(seed):
        return denoise(
            models.dit, make_scheduler(), initial_noise((1, 4, 3, 8, 8), seed), emb, mask, 3, 1.0, seed, torch.float32
        )

    torch.testing.assert_close(latents(3), latents(3), atol=0, rtol=0)
    assert not torch.allclose(latents(3), latents(4))


def test_ema_is_preferred(assets, models):
    plain = load_models(open_dit(assets["run"], prefer_ema=False), assets["vae"], assets["text"], device="cpu")
    x = initial_noise((1, 4, 3, 8, 8), 0)
    emb, mask = models.text_encoder.encode(["a"])
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert not torch.allclose(models.dit(x, t, emb, mask), plain.dit(x, t, emb, mask))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--checkpoint", "/nonexistent/run"], "does not exist"),
        (["--height", "100"], "impossible"),
        (["--frames", "8"], "impossible"),
        (["--frames", "5"], "--allow-untrained-size"),
        (["--checkpoint", "STEP1"], "--vae not given"),  # step 1 has no trainer.json
    ],
)
def test_cli_errors(assets, tmp_path, extra, message):
    base = {"--checkpoint": assets["run"], "--vae": assets["vae"], "--text-encoder": assets["text"]}
    if extra[1] == "STEP1":
        extra = ["--checkpoint", assets["run"] / "checkpoints" / "step-0000001"]
        base.pop("--vae")
    for k in extra[::2]:
        base.pop(k, None)
    args = (
        [x for kv in base.items() for x in kv]
        + extra
        + ["--prompt", "x", "--steps", 1, "--device", "cpu", "--out", tmp_path]
    )
    r = _cli(*args)
    assert r.exit_code != 0
    assert message in r.output and "error:" in r.output
    assert not list(tmp_path.glob("*.mp4"))


def test_cli_prompt_file_errors_and_untrained_size_warning(assets, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n# only a comment\n\n")
    # no --vae / --text-encoder: taken from the run's shard manifest
    common = ["--checkpoint", assets["run"], "--device", "cpu", "--steps", 1, "--out", tmp_path / "o"]
    r = _cli(*common, "--prompt-file", empty)
    assert r.exit_code != 0 and "holds no prompts" in r.output
    r = _cli(*common)
    assert r.exit_code != 0 and "no prompts given" in r.output
    r = _cli(*common, "--prompt", "x", "--frames", 5, "--allow-untrained-size", "--guidance", 1.0)
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "Open-Sora-Plan/issues/356" in r.output


# ---- tensor-parallel sampling under torchrun (2-process gloo) vs one process -----------------------
def _read_mp4(path):
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_tp2_sample_matches_single_process(assets, models, tmp_path, monkeypatch):
    """torchrun --nproc_per_node 2 osp sample (TP=2, and TP=2 + SP) gives the one-process final latents
    (up to fp32 reduction order, amplified by sigma_max ~157) and the same video; only rank 0 writes files.

    The video is compared by PSNR, not per pixel: the random-weight VAE decoder amplifies the ~4e-4
    latent differences and h264 then rounds some of them into different macroblock decisions (measured:
    up to 19 levels at a few pixels, mean 0.3, PSNR well above 35 dB)."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OSP_SAMPLE_DUMP_LATENTS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [
        "sample",
        "--checkpoint",
        assets["run"],
        "--vae",
        assets["vae"],
        "--text-encoder",
        assets["text"],
        "--prompt",
        "a red ball",
        "--steps",
        3,
        "--device",
        "cpu",
    ]

    def run(out, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "osp.common.cli",
        ]
        p = subprocess.run(
            cmd + [str(a) for a in args] + ["--out", str(out), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    ref_dir, tp_dir, sp_dir = tmp_path / "tp1", tmp_path / "tp2", tmp_path / "tp2sp"
    # the reference: the CLI's defaults in this process (TP=1), with the latents dump on
    monkeypatch.setenv("OSP_SAMPLE_DUMP_LATENTS", "1")
    sample_videos(models, SampleSettings(prompts=["a red ball"], steps=3), out_dir=ref_dir, progress=False)
    p_tp = run(tp_dir)
    p_sp = run(sp_dir, "--sp")
    ref_mp4 = sorted(ref_dir.glob("*.mp4"))
    assert len(ref_mp4) == 1
    ref_frames = _read_mp4(ref_mp4[0]).astype(int)
    ref_lat = load_file(str(ref_mp4[0].with_suffix(".latents.safetensors")))["latents"]
    for d, p, sp in ((tp_dir, p_tp, False), (sp_dir, p_sp, True)):
        # only rank 0 writes (one mp4, one sidecar, one latents file) and prints
        assert sorted(x.name for x in d.iterdir()) == sorted(x.name for x in ref_dir.iterdir())
        assert p.stdout.count("wrote ") == 1
        mp4 = d / ref_mp4[0].name
        frames = _read_mp4(mp4).astype(np.float64)
        assert frames.shape == ref_frames.shape
        mse = float(np.mean((frames - ref_frames) ** 2))
        assert mse == 0 or 10 * np.log10(255**2 / mse) >= 35.0, f"PSNR {10 * np.log10(255**2 / mse):.1f} dB"
        lat = load_file(str(mp4.with_suffix(".latents.safetensors")))["latents"]
        torch.testing.assert_close(lat, ref_lat, atol=1e-3, rtol=1e-3)
        side = json.loads(mp4.with_suffix(".json").read_text())
        assert side["parallel"] == {"tp": 2, "sp": sp, "world": 2}
    assert "parallel" not in json.loads(ref_mp4[0].with_suffix(".json").read_text())


def test_tp_sample_layout_errors(assets, tmp_path, monkeypatch):
    """A world size that does not divide the heads (tiny DiT: 2) and --sp on one process fail in one
    line before any process group starts."""
    import torch.distributed as dist

    base = [
        "--checkpoint",
        assets["run"],
        "--vae",
        assets["vae"],
        "--text-encoder",
        assets["text"],
        "--prompt",
        "x",
        "--steps",
        1,
        "--device",
        "cpu",
        "--out",
        tmp_path,
    ]
    r = _cli(*base, "--sp")
    assert r.exit_code != 0 and "--sp needs several ranks" in r.output
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    r = _cli(*base)
    assert r.exit_code != 0
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "2 attention heads over 3 ranks" in err[0] and "--nproc_per_node" in err[0]
    assert not dist.is_initialized() and not list(tmp_path.glob("*.mp4"))
