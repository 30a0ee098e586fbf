"""What a training run reports per optimizer step (model TFLOP/s, MFU and HFU from the roofline module's
FLOP counts): the MetricsLogger writes each step's metrics (metrics.jsonl, TensorBoard, wandb with
log.wandb, the progress bar and log lines on rank 0; the per-rank sample keys with run.log_keys).
The wandb run id is kept in `<run>/wandb-id`: a resumed run continues the same wandb run."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

TENSORBOARD_KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
    "tflops_per_device",
    "peak_mem_gb",
    "validation_time_s",  # on validation steps only (not part of step_time_s)
)
WANDB_ID_FILE = "wandb-id"
FINISHED = "finished.json"  # <run>/finished.json: this training process is done (`osp validate --watch` exits)


def peak_memory_gb(device) -> float:
    if device.is_accelerator:
        return device.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (host RSS)


# ------------------------------------------------------------------------------------------------
# the logger
# ------------------------------------------------------------------------------------------------
class MetricsLogger:
    """One run's step log. `start(...)` opens it (rank 0: the run folder's config.toml, the banner,
    TensorBoard); `progress(step)` is the context of the loop (the progress bar); `log(m, keys)`
    records one step."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        steps: int,
        log_every: int,
        log_keys: bool,
        tensorboard: bool,
        console,
        wandb=None,
        config: dict | None = None,
    ):
        self.run_dir, self.rank, self.is_main = Path(run_dir), rank, rank == 0
        self.steps, self.log_every, self.log_keys, self.want_tb = steps, log_every, log_keys, tensorboard
        self.console = console
        self.tb = None
        self.want_wandb, self.config = wandb, config  # WandbSettings or None; the run's config for wandb
        self.wandb = None
        self._progress: Progress | None = None
        self._task = None

    @classmethod
    def for_run(cls, cfg, layout, console) -> MetricsLogger:
        r = cfg.run
        return cls(
            r.path,
            rank=layout.rank,
            steps=r.steps,
            log_every=r.log_every,
            log_keys=r.log_keys,
            tensorboard=r.tensorboard,
            console=console,
            wandb=wandb_settings(cfg),
            config=cfg.to_dict(),
        )

    def start(self, config_toml: str, banner: str, notes: list[str]) -> None:
        """Rank 0: the run folder with its config.toml; the banner, the config and notes on the console."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / FINISHED).unlink(missing_ok=True)  # running (again)
            (self.run_dir / "config.toml").write_text(config_toml)
            self.console.print(banner)
            self.console.print(config_toml.rstrip(), markup=False)
            for line in notes:
                self.console.print(line)
            if self.want_tb:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # optional dependency

                    self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                except ImportError:
                    self.tb = None
            if self.want_wandb is not None:
                from osp.common.wandb_run import open_run

                self.wandb = open_run(
                    self.run_dir,
                    self.run_dir / WANDB_ID_FILE,
                    self.want_wandb,
                    group=self.run_dir.name,
                    job_type="train",
                    config=self.config,
                )
        dist.barrier()  # the run folder exists before any rank writes into it

    def progress(self, completed: int) -> Progress:
        """The context of the loop, starting at step `completed`."""
        self._progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.is_main,
        )
        self._task = self._progress.add_task("train", total=self.steps, completed=completed, info="")
        return self._progress

    def log(self, m: dict, keys: list[str]) -> None:
        step = m["step"]
        if self.log_keys:
            with open(self.run_dir / f"keys-rank{self.rank:05d}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "keys": keys}) + "\n")
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        scalars = {f"train/{k}": m[k] for k in TENSORBOARD_KEYS if m.get(k) is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        loss = f"{m['loss']:.5f}" if m["loss"] is not None else "skipped"
        gnorm = m["grad_norm"] or float("nan")
        if self._progress is not None and self._task is not None:
            info = f"loss {loss} lr {m['lr']:.2e} gnorm {gnorm:.3f} {m['samples_per_s']:.1f} samples/s"
            self._progress.update(self._task, completed=step, info=info)
        if self.log_every and step % self.log_every == 0:
            mfu = f" MFU {m['mfu']:.1%} HFU {m['hfu']:.1%}" if m["mfu"] is not None else ""
            self.console.print(
                f"step {step:>6} loss {loss} lr {m['lr']:.2e} gnorm {gnorm:.4f} "
                f"{m['samples_per_s']:.2f} samples/s {m['tokens_per_s']:.0f} tok/s {m['tflops_per_device']:.4f} model TFLOP/s{mfu} "
                f"data {m['data_wait_s'] / m['step_time_s']:.0%} mem {m['peak_mem_gb']:.2f} GB"
            )

    def finish(self, step: int, stopped: bool) -> None:
        """Rank 0: the run-finished marker (the last step; stopped: on SIGTERM, to be resumed)."""
        if self.is_main:
            body = json.dumps({"step": step, "steps": self.steps, "stopped": stopped}) + "\n"
            tmp = self.run_dir / (FINISHED + ".tmp")
            tmp.write_text(body)
            tmp.replace(self.run_dir / FINISHED)

    def print(self, line: str) -> None:
        """A line on rank 0 (above the progress bar while it runs)."""
        if self.is_main:
            (self._progress.console if self._progress is not None else self.console).print(line)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def wandb_settings(cfg):
    """The [log] section as WandbSettings (None with log.wandb off); the name defaults to run.name."""
    log = cfg.log
    if not log.wandb:
        return None
    from osp.common.wandb_run import WandbSettings

    return WandbSettings(project=log.project, entity=log.entity, name=log.name or cfg.run.name, mode=log.mode)


class NullMetrics(MetricsLogger):
    """Records nothing and writes nothing (the dry run)."""

    def __init__(self, console=None):
        super().__init__(Path("."), rank=0, steps=0, log_every=0, log_keys=False, tensorboard=False, console=console)
        self.is_main = False

    @classmethod
    def for_run(cls, cfg, layout, console) -> NullMetrics:
        return cls(console)

    def start(self, config_toml: str, banner: str, notes: list[str]) -> None:
        pass

    def log(self, m: dict, keys: list[str]) -> None:
        pass
