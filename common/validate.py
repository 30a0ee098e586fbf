"""`osp validate RUN --vae DIR [--watch]`: the decoding sidecar of validation during training.

The trainer (osp.stage2_train.validation) writes latents only, so it never loads the VAE:

    <run>/validation/step-0000100/
        latents.safetensors, settings.json, complete     by the trainer (`complete` last)
        000-<prompt>.mp4 ...                              by this sidecar (tiled VAE decode)
        decoded.json                                      by this sidecar, last: the step is done

Each new complete step is decoded (on the CPU or any device), its videos are written next to its
latents and logged to TensorBoard (`<run>/tensorboard`, tag `validation/NNN-prompt`, an animated
image at the training step) and, when the run logs to wandb (`[log] wandb = true` in the run's
config.toml), to a wandb run of the same group (job type `validation`, its id kept in
`<run>/validation/wandb-id`, the videos at the training step). A step folder without its `complete`
marker is being written and is left for later. `--watch` polls until the training process is done:
its `finished.json` marker, or its run lock naming a process of this host that no longer exists.

This module imports no stage code; the VAE, TensorBoard and wandb load only when a step is decoded.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import time
import tomllib
from pathlib import Path
from typing import Callable

from osp.common.errors import MissingFileError, OspError
from osp.common.validation_files import COMPLETE, DECODED, LATENTS, SETTINGS, VALIDATION, latent_key

FINISHED = "finished.json"  # written by the trainer when its process is done
WANDB_ID_FILE = "wandb-id"
STEP_PATTERN = re.compile(r"^step-(\d{7})$")


class ValidationError(OspError, ValueError):
    """Validation latents that cannot be decoded as asked (message names the run and the fix)."""


def complete_steps(run_dir: str | Path) -> dict[int, Path]:
    """Step -> folder of the validation steps whose `complete` marker exists."""
    root = Path(run_dir) / VALIDATION
    out = {}
    for p in root.iterdir() if root.is_dir() else []:
        m = STEP_PATTERN.match(p.name)
        if m and (p / COMPLETE).is_file():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def _run_config(run: Path) -> dict:
    f = run / "config.toml"
    try:
        return tomllib.loads(f.read_text()) if f.is_file() else {}
    except tomllib.TOMLDecodeError:
        return {}


def training_done(run: Path) -> bool:
    """The training process of `run` is done: its finished.json, or its lock names a dead process here."""
    if (run / FINISHED).is_file():
        return True
    lock = run / ".lock"
    try:
        text = lock.read_text()
    except OSError:
        return False
    m = re.match(r"pid (\d+) on (\S+)", text)
    if not m or m.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _slug(text: str, n: int = 40) -> str:
    s = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in s:
        s = s.replace("--", "-")
    return s[:n].strip("-") or "prompt"


def video_name(i: int, prompt: str) -> str:
    return f"{i:03d}-{_slug(prompt)}"


def tensorboard_video(writer, tag: str, frames, step: int, fps: int) -> None:
    """An animated GIF image summary (what SummaryWriter.add_video writes, without moviepy): [T, H, W, 3] uint8."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary  # pyright: ignore[reportAttributeAccessIssue]

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(1, 1000 // fps), loop=0)
    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class Sidecar:
    """Decodes the validation steps of one run (see the module docstring)."""

    def __init__(
        self, run: str | Path, vae: str | Path, device: str = "cpu", tiling: bool = True, fps: int = 0, log=None
    ):
        from osp.common.config import SAMPLE_FPS

        self.run, self.vae_dir, self.device_name, self.tiling = Path(run), Path(vae), device, tiling
        self.fps = fps or SAMPLE_FPS
        self.log: Callable[[str], None] = log or print
        self.config = _run_config(self.run)
        self.vae = self.device = self.tb = self.wandb = None

    # -- what is there ------------------------------------------------------------------------
    def check_run(self, watch: bool) -> None:
        if not self.run.is_dir():
            raise MissingFileError(f"run {self.run} does not exist; pass a run folder (runs/<name>)")
        every = int((self.config.get("validate") or {}).get("every", 0) or 0)
        if complete_steps(self.run):
            return
        if not watch or (self.config and every <= 0):
            raise ValidationError(
                f"{self.run}: no validation latents ({self.run / VALIDATION} holds no complete step); train with "
                "[validate] every = N and prompts = DIR (osp encode-prompts)" + ("" if watch else ", or pass --watch")
            )

    def pending(self) -> list[tuple[int, Path]]:
        return [(s, p) for s, p in complete_steps(self.run).items() if not (p / DECODED).is_file()]

    # -- the loggers and the VAE, on first use -------------------------------------------------------
    def _open(self, settings: dict) -> None:
        import torch

        from osp.common.device import pick_device
        from osp.common.models.vae import load_vae

        dev = pick_device(self.device_name)
        self.device = dev.set_current() if dev.is_accelerator else dev.torch_device()
        vae = load_vae(self.vae_dir)
        want = int(settings["latent_channels"])
        if int(vae.config.embed_dim) != want:
            raise ValidationError(
                f"--vae {self.vae_dir}: its latents have {vae.config.embed_dim} channels, the run's have {want}; pass "
                "the VAE that encoded the run's shards"
            )
        self.vae = vae.to(self.device, torch.float32).eval().requires_grad_(False)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run / "tensorboard"))
        except ImportError:
            self.log("tensorboard is not installed: the videos are not logged to TensorBoard")
        log = self.config.get("log") or {}
        if log.get("wandb"):
            from osp.common.wandb_run import WandbSettings, open_run

            s = WandbSettings(
                project=log.get("project") or "osp",
                entity=log.get("entity") or "",
                name=f"{log.get('name') or self.run.name}-validation",
                mode=log.get("mode") or "",
            )
            folder = self.run / VALIDATION
            self.wandb = open_run(
                folder, folder / WANDB_ID_FILE, s, group=self.run.name, job_type="validation", config=None
            )

    # -- one step --------------------------------------------------------------------------------
    def decode_step(self, step: int, folder: Path) -> list[Path]:
        import torch
        from safetensors.torch import load_file

        from osp.common.sampling import decode_latents, to_uint8, write_mp4

        settings = json.loads((folder / SETTINGS).read_text())
        if self.vae is None:
            self._open(settings)
        assert self.vae is not None
        latents = load_file(str(folder / LATENTS))
        frames, height, width = settings["frames"], settings["height"], settings["width"]
        written, media = [], {}
        for i, prompt in enumerate(settings["prompts"]):
            z = latents[latent_key(i)].to(self.device)
            with torch.no_grad():
                video = decode_latents(self.vae, z, self.tiling)[0][:, :frames, :height, :width]
            pixels = to_uint8(video)
            name = video_name(i, prompt)
            path = folder / f"{name}.mp4"
            write_mp4(path, pixels, fps=self.fps)
            written.append(path)
            if self.tb is not None:
                tensorboard_video(self.tb, f"validation/{name}", pixels, step, self.fps)
            if self.wandb is not None:
                import wandb

                media[f"validation/{name}"] = wandb.Video(str(path), format="mp4", caption=prompt)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(media, step=step)
        record = {"step": step, "videos": [p.name for p in written], "vae": str(self.vae_dir.resolve())}
        tmp = folder / (DECODED + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(folder / DECODED)
        self.log(f"step {step}: {len(written)} videos in {folder}")
        return written

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def validate_run(
    run: str | Path,
    vae: str | Path,
    *,
    watch: bool = False,
    device: str = "cpu",
    tiling: bool = True,
    poll_s: float = 2.0,
    log=None,
) -> list[Path]:
    """Decode every complete, not yet decoded validation step of `run`; with `watch`, keep following
    the run until its training process is done. Returns the mp4s written."""
    car = Sidecar(run, vae, device, tiling, log=log)
    if watch and not (car.run / "config.toml").is_file():  # the trainer writes it when it starts
        car.log(f"waiting for the run {car.run} to start")
        while not (car.run / "config.toml").is_file():
            time.sleep(poll_s)
        car.config = _run_config(car.run)
    car.check_run(watch)
    written: list[Path] = []
    try:
        while True:
            done = training_done(car.run)  # read before the scan: no step written after it is missed
            for step, folder in car.pending():
                written += car.decode_step(step, folder)
            if not watch or done:
                break
            time.sleep(poll_s)
    finally:
        car.close()
    if not written and not complete_steps(car.run):
        raise ValidationError(
            f"{car.run}: the run finished without validation latents; check [validate] in its config.toml"
        )
    return written
