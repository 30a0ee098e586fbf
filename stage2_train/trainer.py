"""The stage-2 Trainer: OpenSoraT2V on cached shards with megatron-core TP/SP, CP, DP and exact resume.

    trainer = build_trainer(cfg, resume="auto")      # every part made from the config
    trainer.fit()                                    # or trainer.train_step() step by step
    trainer.close()

One optimizer step = `optim.grad_accum` micro-steps; per micro-step:
    batch (DataLoader workers) -> z0 = 0.18215 * posterior sample -> noise, t, caption dropout
    -> DiT forward (activations in run.precision: bf16 on accelerators, fp32 on CPU) -> min-SNR eps loss -> backward
with grads averaged over DP by torch DDP during the last micro-step's backward (bucketed, overlapped),
then: SP-tagged grads summed over TP, global grad norm (TP-aware), non-finite check (agreed by all
ranks), clip, AdamW (torch ZeroRedundancyOptimizer with parallel.zero1), EMA, LR schedule.

SIGTERM: the handler only sets a flag of this rank (`sigterm_received`); every rank sends its flag in the
step's one agreement all-reduce and acts on the agreed value only (`stop_requested`), so all ranks stop
after the same step, save it together, wait for that save and leave. During start-up SIGTERM stays
blocked (`catch_early_sigterm`; under the launcher the ranks start with it blocked): it is delivered when
fit() unblocks it, and all ranks then agree before the first step to stop without a new checkpoint.

The Trainer holds parts it is given (`build_trainer` makes them from the config; `Parts` says how):
the data's geometry, the loader, the host sync, the metrics logger and the checkpoints. `osp train
--dry-run` (osp.stage2_train.dryrun) passes meta variants of them and runs this same code on `meta`
under a fake process group, which refuses CPU tensors.

Accelerator rules (nccl/hccl map only their device type): every tensor passed to a collective lives on
the device of its group (`Device.torch_device()`), and the step reads device values on the host once
per optimizer step (the `host_sync` part), never per micro-step.
The model is built on meta, split by the TP/SP and CP plans and only this rank's shard is allocated,
then filled from a training checkpoint (torch DCP, saved at any layout: `osp.stage2_train.checkpoint`),
from model.init by slices, or from the seeded init (`osp.stage2_train.build`).

Stage 2 never imports transformers, the VAE or stage 1.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from rich.console import Console

from osp.common import config as C
from osp.common import storage
from osp.common.device import Device
from osp.common.errors import ConfigError, MissingFileError, OspError
from osp.common.models.attention import resolve_backend
from osp.common.models.dit import DiTConfig, get_dit_config, resolve_precision
from osp.stage2_train import build
from osp.stage2_train import checkpoint as ckpt
from osp.stage2_train import lora
from osp.stage2_train import dist as D
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.context_parallel import scale_replicated_grads
from osp.stage2_train.data import Batch, CorruptSampleError, ShardLoader, corrupt_message
from osp.stage2_train.data_parallel import DataParallel, ShardedAdamW
from osp.stage2_train.diffusion import add_noise, alphas_cumprod, diffusion_loss, draw, draw_samples
from osp.stage2_train.diffusion import sample_posterior, step_seed
from osp.stage2_train.elastic import PeerWatch
from osp.stage2_train.geometry import Geometry, make_loader, remote_data, shard_geometry, shards_location, video_tokens
from osp.stage2_train.layout import Layout
from osp.stage2_train.lock import take_run_lock
from osp.stage2_train.metrics import MetricsLogger, peak_memory_gb
from osp.stage2_train.roofline import hardware_flops, model_flops
from osp.stage2_train.state_dict_adapter import tp_split_dim
from osp.stage2_train.optim import EMA, clip_grads, global_grad_norm, lr_at
from osp.stage2_train.parallel import reduce_sequence_parallel_grads
from osp.stage2_train.plan import apply_ac, apply_compile
from osp.stage2_train.validation import Validation
from osp.stage2_train.watchdog import Watchdog


class NonFiniteError(OspError, RuntimeError):
    """A non-finite loss or gradient under run.nonfinite=stop (the message names the samples)."""


# ------------------------------------------------------------------------------------------------
# the checkpoint part
# ------------------------------------------------------------------------------------------------
class RunCheckpoints:
    """The run's checkpoints (osp.stage2_train.checkpoint) at this layout: where a resume starts,
    loading into the trainer's state, saving it (in the background with run.async_ckpt)."""

    def __init__(
        self,
        run_dir: Path,
        resume: str,
        layout: Layout,
        device: Device,
        async_save: bool,
        keep_last: int = 0,
        keep_every: int = 0,
    ):
        self.layout = layout
        self.resume_path = ckpt.find(run_dir, resume)
        self.mesh = ckpt.make_mesh(device.type, layout.world, layout.tp)  # CP, DP: replicas
        self.notes: list[str] = []  # retention deletions, printed by the trainer (`take_notes`)
        self.writer = ckpt.Checkpointer(
            run_dir,
            mesh=self.mesh,
            tp=layout.tp,
            rank=layout.rank,
            is_main=layout.is_main,
            async_save=async_save,
            keep_last=keep_last,
            keep_every=keep_every,
            log=self.notes.append,
        )

    @classmethod
    def for_run(cls, cfg: TrainConfig, resume: str, layout: Layout, device: Device) -> RunCheckpoints:
        r = cfg.run
        return cls(r.path, resume, layout, device, r.async_ckpt, r.keep_last, r.keep_every)

    def take_notes(self) -> list[str]:
        """The lines to log since the last call (each checkpoint deletion)."""
        notes, self.notes[:] = list(self.notes), []
        return notes

    @property
    def pending(self) -> bool:
        return bool(self.writer.pending)

    def load_init(self, model, path: str | Path) -> None:
        """model.init into `model`: a training checkpoint's EMA (DCP) or a released / osp-dit folder (slices)."""
        L = self.layout
        ckpt.load_init(path, model=model, mesh=self.mesh, tp=L.tp, tp_rank=L.tp_rank, progress=L.is_main)

    def restore(self, trainer: Trainer) -> list[str]:
        """Model, EMA, AdamW state (resharded to this layout), RNG, counters and data position from
        `resume_path`; returns the notes for the log (a changed layout, a re-cut epoch)."""
        path = self.resume_path
        assert path is not None
        saved = ckpt.read_trainer_state(path).get("layout", {})
        c = ckpt.load(
            path,
            model=trainer.model,
            ema=trainer.ema,
            optimizer=trainer.optimizer,
            mesh=self.mesh,
            tp=self.layout.tp,
            rank=self.layout.rank,
        )
        trainer.load_counters(c)
        ours = trainer.layout_dict()
        changed = {k: (saved.get(k), v) for k, v in ours.items() if k in saved and saved.get(k) != v}
        notes = [n for n in (getattr(trainer.loader, "notice", ""),) if n]
        if changed:
            notes.insert(
                0, "resharded from the saved layout: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            )
        return notes

    def save(self, trainer: Trainer) -> Path:
        return self.writer.save(
            trainer.step,
            model=trainer.model,
            ema=trainer.ema,
            optimizer=trainer.optimizer,
            counters=trainer.counters_state(),
            dit_config=trainer.dit_cfg,
            meta={"layout": trainer.layout_dict(), "config": trainer.cfg.to_dict()},
        )

    def poll(self) -> None:
        self.writer.poll()

    def abandon(self) -> None:
        """Drop the save in flight without waiting (a peer is gone: it can never complete or be published)."""
        self.writer.pending = None

    def wait(self) -> None:
        self.writer.wait()

    def close(self, failing: bool = False) -> None:
        self.writer.close(failing)


# ------------------------------------------------------------------------------------------------
# the parts of a real run
# ------------------------------------------------------------------------------------------------
def shard_loader(cfg: TrainConfig, layout: Layout, geometry: Geometry) -> ShardLoader:
    """This rank's resumable loader over `data.shards` or `data.sources` (split over DP)."""
    return make_loader(cfg, layout, geometry)


def to_host(values: torch.Tensor) -> list[float]:
    """The optimizer step's one device -> host copy."""
    return values.tolist()


@dataclass(frozen=True)
class Parts:
    """How `build_trainer` makes each replaceable part (the dry run passes meta variants)."""

    geometry: Callable[[TrainConfig, DiTConfig, Any], Geometry] = shard_geometry
    loader: Callable[[TrainConfig, Layout, Geometry], Any] = shard_loader
    checkpoints: Callable[[TrainConfig, str, Layout, Device], Any] = RunCheckpoints.for_run
    metrics: Callable[[TrainConfig, Layout, Any], MetricsLogger] = MetricsLogger.for_run
    host_sync: Callable[[torch.Tensor], list[float]] = to_host
    validation: Callable[[TrainConfig, Layout, DiTConfig, Geometry], Validation | None] = Validation.for_run
    dit_config: Callable[[TrainConfig], DiTConfig] | None = None  # None: model_config (osp plan: fewer blocks)


RUN_PARTS = Parts()


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    """The train loop over the parts it is given (see `build_trainer` for how they are made)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        device: Device,
        layout: Layout,
        dit_cfg: DiTConfig,
        geometry: Geometry,
        model,
        dp: DataParallel,
        optimizer: ShardedAdamW,
        ema: EMA | None,
        loader,
        checkpoints,
        metrics: MetricsLogger,
        host_sync: Callable[[torch.Tensor], list[float]] = to_host,
        console=None,
        lock=None,
        attention_kernel: str = "",
        validation: Validation | None = None,
    ):
        self.validation = validation  # samples validation latents every validate.every steps (None: off)
        self.attention_kernel = attention_kernel  # the kernel resolve_backend found (recorded per step)
        self.cfg, self.device, self.layout, self.dit_cfg, self.geometry = cfg, device, layout, dit_cfg, geometry
        self.model, self.dp, self.optimizer, self.ema, self.loader = model, dp, optimizer, ema, loader
        self.checkpoints, self.metrics, self.host_sync, self.lock = checkpoints, metrics, host_sync, lock
        self.remote_data = remote_data(cfg)  # metrics.jsonl then carries the object-store counters
        self.console = console if console is not None else Console(quiet=True)
        self.dev = device.torch_device(layout.local_rank)  # the communication device of every group
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.sharded = [tp_split_dim(n) is not None for n, _ in named]  # TP-sharded (not replicated)
        self.abar = alphas_cumprod().to(self.dev)
        self.step = 0
        self.counters = {"skipped_corrupt": 0, "skipped_nonfinite": 0}
        self.sigterm_received = False  # this rank got SIGTERM (set by the handler, nothing else)
        self.stop_requested = False  # every rank agreed to stop after this step (set from the agreement only)
        self.corrupt = ""  # the first corrupt sample seen with data.skip_corrupt off (see _prepare)
        self.last_keys: list[str] = []
        self.watchdog = Watchdog(0, layout.rank)  # replaced in fit()
        self.peers = PeerWatch.off()  # replaced in fit()
        self.last_save_t, self.ckpt_time_due = time.monotonic(), False  # run.ckpt_every_minutes

    # -- state -------------------------------------------------------------------------------
    def counters_state(self) -> dict[str, int]:
        """The integers of the training state (saved as DCP `state.*` tensors)."""
        pos = self.loader.state_dict()
        return {
            "step": self.step,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "loader_epoch": pos["epoch"],
            "loader_samples": pos["samples"],
            "loader_global_batch": pos["global_batch"],
            "loader_seed": pos["seed"],
            **self.counters,
        }

    def load_counters(self, c: dict[str, int]) -> None:
        """The inverse of counters_state (after a checkpoint filled model, EMA and optimizer)."""
        self.step = c["step"]
        if self.ema is not None:
            self.ema.updates = c["ema_updates"]
        self.counters.update({k: c[k] for k in self.counters if k in c})
        self.loader.load_state_dict(
            {
                "epoch": c["loader_epoch"],
                "samples": c["loader_samples"],
                "global_batch": c["loader_global_batch"],
                "seed": c["loader_seed"],
            }
        )

    def layout_dict(self) -> dict:
        return {
            **self.layout.sizes(),
            "zero1": self.cfg.parallel.zero1,
            "batch_size": self.cfg.data.batch_size,
            "grad_accum": self.cfg.optim.grad_accum,
        }

    def save(self) -> Path:
        self.last_save_t = time.monotonic()
        path = self.checkpoints.save(self)
        pending = " (writing in the background)" if self.checkpoints.pending else ""
        self.metrics.print(f"checkpoint {path}{pending}")
        self._checkpoint_notes()
        return path

    def _checkpoint_notes(self) -> None:
        """Log what the checkpoint part reports (retention deletions)."""
        take = getattr(self.checkpoints, "take_notes", None)
        for line in take() if take is not None else []:
            self.metrics.print(line)

    # -- one micro-step ----------------------------------------------------------------------
    def _prepare(self, batch: Batch) -> tuple[Batch, float]:
        """Count skipped corrupt samples; an all-corrupt batch becomes a zero-weight dummy so that
        collectives stay aligned across ranks."""
        for s in batch.skipped:
            if not self.cfg.data.skip_corrupt:  # every rank stops at this step's agreement (train_step)
                self.corrupt = self.corrupt or corrupt_message(s, shards_location(self.cfg.data.shards))
                continue
            self.counters["skipped_corrupt"] += 1
            self.console.print(f"[yellow]skipped corrupt sample[/] {s['key']} in {s['tar']}: {s['error']}")
        if batch.keys:
            return batch, 1.0
        t, h, w = (int(v) for v in self.loader.shapes[batch.skipped[0]["row"]])
        dummy = Batch(
            torch.zeros(1, self.geometry.latent_channels, t, h, w),
            torch.zeros(1, 1, self.dit_cfg.caption_channels),
            torch.ones(1, 1, dtype=torch.long),
            [],
            [],
            batch.skipped,
            (t, h, w),
        )
        return dummy, 0.0

    def micro_loss(self, batch: Batch, step: int, micro: int, train: bool = False) -> torch.Tensor:
        """Per-sample min-SNR loss [B] of one micro-batch (same numbers on every rank of a TP group).
        `train`: the forward runs through the DDP wrapper (its backward reduces over DP)."""
        dev, cfg, d = self.dev, self.cfg, self.dit_cfg
        moments = batch.moments.to(dev, non_blocking=True)
        shape = (moments.shape[0], d.in_channels) + tuple(moments.shape[2:])
        diff = cfg.diffusion
        if batch.rows:  # per-sample draws: the same numbers at any layout (resume on another layout)
            r = draw_samples(shape, cfg.run.seed, step, batch.rows, diff.noise_offset, diff.cfg_dropout)
        else:
            seed = step_seed(cfg.run.seed, step, micro, self.layout.dp_rank)
            r = draw(shape, seed, diff.noise_offset, diff.cfg_dropout)
        z0 = sample_posterior(moments, r.eps_post.to(dev)) if moments.shape[1] == 2 * d.in_channels else moments.float()
        noise, t = r.noise.to(dev), r.t.to(dev)
        x_t = add_noise(z0 * C.VAE_SCALE_FACTOR, noise, t, self.abar)
        text, mask = self._caption_dropout(batch.text, batch.text_mask, r.drop)
        # no autocast: the model casts itself (every activation in model.compute_dtype = run.precision)
        net = self.dp.module if train else self.model  # train: through DDP, whose backward reduces over DP x CP
        eps_hat = net(x_t, t, text.to(dev, non_blocking=True), mask.to(dev, non_blocking=True))
        return diffusion_loss(eps_hat, noise, t, self.abar, diff.snr_gamma)

    def _caption_dropout(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
        if not bool(drop.any()):
            return text, mask
        uncond = self.geometry.uncond
        lu = uncond.shape[0]
        b, l, dim = text.shape
        if lu > l:
            text = torch.cat([text, text.new_zeros(b, lu - l, dim)], 1)
            mask = torch.cat([mask, mask.new_zeros(b, lu - l)], 1)
        text, mask = text.clone(), mask.clone()
        for i in torch.nonzero(drop).flatten().tolist():
            text[i].zero_()
            text[i, :lu] = uncond.to(text.dtype)
            mask[i].zero_()
            mask[i, :lu] = 1
        return text, mask

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, L, dev, sdt = self.cfg, self.layout, self.dev, self.device.stats_dtype
        accum = cfg.optim.grad_accum
        lr = lr_at(self.step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.run.steps, cfg.optim.min_lr)
        self.optimizer.set_lr(lr)
        t0 = time.perf_counter()
        data_wait, keys, samples, text_len, shape = 0.0, [], 0, 0, None
        loss_sum = torch.zeros((), dtype=sdt, device=dev)  # stays on the device: no host sync per micro-step
        for micro in range(accum):
            tw = time.perf_counter()
            self.watchdog.beat(f"waiting for the data loader (step {self.step + 1})")
            batch, weight = self._prepare(next(self.loader))
            data_wait += time.perf_counter() - tw
            self.watchdog.beat(f"in the forward/backward of step {self.step + 1}")
            with self.dp.sync(final=micro == accum - 1):  # DP reduction overlaps the last micro-step's backward
                loss = self.micro_loss(batch, self.step, micro, train=True).mean() * (weight / accum)
                loss.backward()
            loss_sum += loss.detach().to(sdt)
            keys += batch.keys
            samples += len(batch.keys)
            text_len, shape = max(text_len, batch.text.shape[1]), batch.shape

        self.watchdog.beat(f"in the gradient collectives of step {self.step + 1}")
        # grads are already summed over DP x CP and divided by dp (data_parallel's bucket hook); what is left
        # is linear and commutes with that sum: SP grads summed over TP, CP-complete grads / cp
        reduce_sequence_parallel_grads(self.model)
        scale_replicated_grads(self.model)
        norm = global_grad_norm(self.params, self.sharded, L)

        # one world-wide agreement on: non-finite loss/grad anywhere, a stop request anywhere, a corrupt
        # sample anywhere; then the step's only host sync (all tensors on `dev`: nccl/hccl refuse CPU tensors)
        loss_ok = torch.isfinite(loss_sum)
        nonfinite_t = torch.logical_not(loss_ok)
        flags = torch.stack(
            [
                torch.logical_or(nonfinite_t, torch.logical_not(torch.isfinite(norm))).to(sdt),
                torch.full((), float(self.sigterm_received), dtype=sdt, device=dev),
                torch.full((), float(bool(self.corrupt)), dtype=sdt, device=dev),
                torch.full((), float(self._ckpt_time_due()), dtype=sdt, device=dev),  # rank 0's clock decides
            ]
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stats = torch.stack(
            [
                torch.where(loss_ok, loss_sum, torch.zeros_like(loss_sum)),
                torch.full((), float(samples), dtype=sdt, device=dev),
            ]
        )
        dist.all_reduce(stats, group=L.dp_group)
        host = self.host_sync(
            torch.cat([flags, stats, norm.detach().to(sdt).reshape(1), nonfinite_t.to(sdt).reshape(1)])
        )
        flag_bad, flag_stop, flag_corrupt, flag_time, loss_total, global_samples, norm_value, nonfinite = host
        self.ckpt_time_due = flag_time > 0  # run.ckpt_every_minutes: every rank saves after this step

        if flag_corrupt > 0:  # a corrupt sample on any rank and data.skip_corrupt off: every rank stops now
            found = [None] * L.world
            dist.all_gather_object(found, self.corrupt)
            raise CorruptSampleError(next(m for m in found if m))
        skipped = flag_bad > 0
        if skipped:
            self._skip_nonfinite(keys if nonfinite > 0 else [])
        else:
            clip_grads(self.params, norm, cfg.optim.clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad()
        self.step += 1
        self.stop_requested = flag_stop > 0
        self.device.synchronize()
        dt = time.perf_counter() - t0

        tokens = video_tokens(self.dit_cfg, shape) if shape else 0
        # model FLOPs (3 x forward, no recompute: the MFU numerator) and hardware FLOPs (recompute and the
        # flash-style attention backward included: HFU), per device
        per_device = global_samples / dt / L.world / 1e12
        tflops = model_flops(self.dit_cfg, tokens, text_len) * per_device
        hw_tflops = hardware_flops(self.dit_cfg, tokens, text_len, checkpointing=cfg.model.checkpointing) * per_device
        peak = cfg.run.peak_tflops
        self.last_keys = keys
        per_source = self.loader.step_stats() if hasattr(self.loader, "step_stats") else {}
        return {
            "step": self.step,
            "loss": None if skipped else loss_total / L.dp,
            "lr": lr,
            "grad_norm": norm_value if math.isfinite(norm_value) else None,
            "skipped": skipped,
            "samples_per_s": global_samples / dt,  # global_samples: summed over DP = the global batch
            "tokens_per_s": global_samples * tokens / dt,
            "tflops_per_device": tflops,  # model TFLOP/s
            "hardware_tflops_per_device": hw_tflops,
            "mfu": tflops / peak if peak > 0 else None,
            "hfu": hw_tflops / peak if peak > 0 else None,
            "peak_mem_gb": peak_memory_gb(self.device),
            "step_time_s": dt,
            "data_wait_s": data_wait,
            "attention_kernel": self.attention_kernel,
            "epoch": self.loader.epoch,
            **per_source,
            **self.counters,
        }

    def _ckpt_time_due(self) -> bool:
        """Rank 0: run.ckpt_every_minutes have passed since the last checkpoint (or the start)."""
        minutes = self.cfg.run.ckpt_every_minutes
        return self.layout.is_main and minutes > 0 and time.monotonic() - self.last_save_t >= 60 * minutes

    def _skip_nonfinite(self, my_keys: list[str]) -> None:
        """A non-finite loss or gradient on some rank: stop (naming the samples) or skip the step."""
        bad: list[list[str]] = [[] for _ in range(self.layout.world)]
        dist.all_gather_object(bad, my_keys)
        bad_keys = sorted({k for ks in bad for k in ks})
        if self.cfg.run.nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradient at step {self.step + 1} (samples {bad_keys}); check those samples "
                f"in {self.cfg.data.shards} (osp shards verify), or set run.nonfinite=skip to skip such steps"
            )
        self.counters["skipped_nonfinite"] += 1
        self.console.print(f"[yellow]step {self.step + 1}: non-finite loss, step skipped[/] (samples {bad_keys})")

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        run, history = self.cfg.run, []
        previous = _take_sigterm(self._on_sigterm)  # a SIGTERM held back during start-up arrives here
        self.sigterm_received |= _EARLY_SIGTERM[0]
        self.watchdog = Watchdog(run.watchdog_s, self.layout.rank)
        self.peers = PeerWatch.start(self.cfg.launch.node_rank, self.cfg.launch.min_nodes > 0)
        try:  # a collective failure because a peer went away: one line naming it (osp.stage2_train.elastic)
            with (
                self.peers.guard(lambda: self.watchdog.where, self.checkpoints.abandon),
                self.metrics.progress(self.step),
            ):
                if self._agree_stop():  # a SIGTERM during start-up, on any rank: stop before the first step
                    self.metrics.print(
                        f"stopping on SIGTERM before step {self.step + 1}: no new checkpoint needed ({self._kept()})"
                    )
                    return history
                while self.step < run.steps:
                    self.watchdog.beat(f"in step {self.step + 1}")
                    m = self.train_step()
                    if self.remote_data:  # this rank's object-store requests, retries and cache use
                        m["storage"] = storage.counters()
                    if self.validation is not None and self.validation.due(self.step):
                        self.watchdog.beat(f"sampling the validation latents of step {self.step}")
                        m["validation_time_s"] = self.validate()  # not part of step_time_s
                    history.append(m)
                    self.metrics.log(m, self.last_keys)
                    self.checkpoints.poll()
                    # stop_requested is the value every rank agreed on in train_step; a SIGTERM arriving
                    # after that agreement is acted on after the next step, by every rank alike
                    last = self.stop_requested or self.step == run.steps
                    if last or self.ckpt_time_due or (run.ckpt_every and self.step % run.ckpt_every == 0):
                        self.watchdog.beat(f"writing the checkpoint of step {self.step}")
                        self.save()
                    if last:
                        self.watchdog.beat(f"waiting for the checkpoint of step {self.step}")
                        self.checkpoints.wait()  # every rank: no rank leaves while a save is in flight
                    self._checkpoint_notes()
                    if self.stop_requested:
                        self.metrics.print(f"stopping on SIGTERM after step {self.step} (checkpoint written)")
                        break
            self.metrics.finish(self.step, stopped=self.stop_requested)
        finally:
            self.watchdog.close()
            self.peers.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return history

    def validate(self) -> float:
        """Sample the validation latents of this step (all ranks); returns the seconds spent."""
        assert self.validation is not None
        seconds = self.validation.run(self)
        self.metrics.print(f"validation latents of step {self.step} ({seconds:.1f} s)")
        return seconds

    def _agree_stop(self) -> bool:
        """Whether any rank got SIGTERM (one all-reduce; every rank calls it at the same point)."""
        flag = torch.full((1,), float(self.sigterm_received), dtype=self.device.stats_dtype, device=self.dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_requested = self.host_sync(flag)[0] > 0
        return self.stop_requested

    def _kept(self) -> str:
        path = self.checkpoints.resume_path
        return f"{Path(path).name} is still the latest" if path is not None else "this run has no checkpoint yet"

    def _on_sigterm(self, signum, frame) -> None:  # a signal handler: set a flag, nothing else
        self.sigterm_received = True

    def close(self, failing: bool = False) -> None:
        """Release every part; `failing` (stopping on an error): a save in flight that cannot finish is
        abandoned instead of raising over that error."""
        self.watchdog.close()
        if failing:
            self.checkpoints.close(failing=True)
        else:
            self.checkpoints.close()
        self.loader.close()
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()


# ------------------------------------------------------------------------------------------------
# the builder
# ------------------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig) -> DiTConfig:
    """model.init's config.json, else the preset's."""
    if not cfg.model.init:
        return get_dit_config(cfg.model.preset)
    f = Path(cfg.model.init) / "config.json"
    if not f.is_file():
        raise MissingFileError(
            f"model.init={cfg.model.init}: no config.json; pass a released DiT folder, an osp "
            "checkpoint (osp convert import) or a training checkpoint step-* folder"
        )
    return DiTConfig.from_json(f)


def build_trainer(cfg: TrainConfig, resume: str = "", *, parts: Parts = RUN_PARTS, console=None) -> Trainer:
    """The Trainer of `cfg` with its parts made by `parts`: device and process group, the data's
    geometry, the layout, the model (meta build -> TP/SP and CP plans -> this rank's shard -> weights
    -> activation checkpointing and compile), DP + AdamW, EMA, loader, checkpoints (resumed from
    `resume`: 'auto' or a checkpoint folder) and the metrics logger."""
    device = D.setup_device(cfg.run.device)
    D.init_distributed(device, cfg.parallel.init_timeout_s)
    rank = dist.get_rank()
    meta = device.is_meta  # the dry run: nothing is allocated, read or written
    lock = None if meta else take_run_lock(cfg.run.path, rank == 0)  # before anything reads or writes the run
    console = console if console is not None else Console(quiet=rank != 0, highlight=False, soft_wrap=True)
    trainer = None
    try:
        dit_cfg = (parts.dit_config or model_config)(cfg)
        geometry = parts.geometry(cfg, dit_cfg, console)
        p = cfg.parallel
        L = D.init_parallel(p.tp, p.sp, dit_cfg.num_attention_heads, geometry.tokens, p.init_timeout_s, cp=p.cp)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        checkpoints = parts.checkpoints(cfg, resume, L, device)

        dev = device.torch_device(L.local_rank)
        model = build.build_local(dit_cfg, L).train()
        if cfg.lora.enabled:  # adapters only: the base is frozen (lora.base_dtype) and comes from model.init
            if not cfg.model.init and not meta:
                raise ConfigError(
                    "lora.enabled=true trains adapters on a base model: set model.init (--init) to the base weights "
                    "(a released DiT folder, an osp checkpoint or a training checkpoint)"
                )
            lora.apply_lora(model, lora.LoraSpec.of(cfg.lora))
        # every activation in this dtype (run.precision); the dry run (meta) measures the accelerator regime
        model.compute_dtype = resolve_precision(cfg.run.precision, device.is_accelerator or meta)
        if not meta:
            build.materialize(model, dev)
            if cfg.lora.enabled:  # the base on every start (checkpoints hold adapters only), then fresh adapters
                checkpoints.load_init(model, cfg.model.init)
                lora.init_adapters(model, cfg.run.seed)
            elif checkpoints.resume_path is None:
                _init_weights(model, cfg, dit_cfg, L, checkpoints)
        heads = dit_cfg.num_attention_heads // (L.tp * L.cp)
        kernel = resolve_backend(
            cfg.model.attention_backend, dev, heads, dit_cfg.attention_head_dim, model.compute_dtype
        )
        apply_ac(model, cfg.model.checkpointing)
        if cfg.model.compile:
            apply_compile(model)  # the backend priority is entered inside the attention op, so it holds compiled

        o = cfg.optim
        dp = DataParallel(
            model,
            L,
            overlap=p.overlap_grad_reduce,
            bucket_mb=p.bucket_mb,
            device_ids=[L.local_rank] if device.type == "cuda" else None,
        )
        named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        optimizer = ShardedAdamW(
            [q for _, q in named],
            [n for n, _ in named],
            L.dp_cp_group,
            shard=p.zero1,
            keep_grads=dp.ddp is not None,
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
        ema = EMA(model, o.ema_decay, L, o.ema_start_step) if o.ema_decay > 0 else None  # sharded over DP
        trainer = Trainer(
            cfg,
            device=device,
            layout=L,
            dit_cfg=dit_cfg,
            geometry=geometry,
            model=model,
            dp=dp,
            optimizer=optimizer,
            ema=ema,
            loader=parts.loader(cfg, L, geometry),
            checkpoints=checkpoints,
            metrics=parts.metrics(cfg, L, console),
            host_sync=parts.host_sync,
            console=console,
            lock=lock,
            attention_kernel=kernel,
            validation=parts.validation(cfg, L, dit_cfg, geometry),
        )
        notes = checkpoints.restore(trainer) if checkpoints.resume_path is not None else []
        banner = (
            f"[bold]run[/] {cfg.run.path}  layout tp={L.tp} cp={L.cp} dp={L.dp} sp={L.sp} zero1={p.zero1} "
            f"device={device.type} activations={str(model.compute_dtype).removeprefix('torch.')} attention={kernel} "
            f"checkpointing={cfg.model.checkpointing} compile={cfg.model.compile}"
            + (f" lora=rank {cfg.lora.rank} on {len(lora.adapted(model))} layers" if cfg.lora.enabled else "")
        )
        if checkpoints.resume_path is not None:
            where = (
                f"resuming from {checkpoints.resume_path} at step {trainer.step} (loader {trainer.loader.state_dict()})"
            )
            notes = [where] + [f"[yellow]{n}[/]" for n in notes]
        trainer.metrics.start(cfg.to_toml(), banner, notes)
        return trainer
    except BaseException:
        if trainer is not None:
            trainer.close()
        elif lock is not None:
            lock.release()
        raise


def _init_weights(model, cfg: TrainConfig, dit_cfg: DiTConfig, L: Layout, checkpoints) -> None:
    """A new run: model.init by slices (released / osp-dit safetensors, or a training checkpoint's
    EMA via DCP), else the seeded random init."""
    init = cfg.model.init
    if init:
        checkpoints.load_init(model, init)
    else:
        build.fill_random(model, dit_cfg, cfg.run.seed, L)


# ------------------------------------------------------------------------------------------------
# SIGTERM before fit() installs its handler
# ------------------------------------------------------------------------------------------------
_EARLY_SIGTERM = [False]


def _early_sigterm(signum, frame) -> None:  # a signal handler: set a flag, nothing else
    _EARLY_SIGTERM[0] = True


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def catch_early_sigterm() -> Callable[[], None]:
    """Hold SIGTERM back during start-up: blocked in this thread (and so in every thread started from
    here: process-group set-up, loaders, checkpoint threads), so no system call of the start-up is
    interrupted; fit() unblocks it. The flag handler catches one delivered to a thread that was
    started before (it is then acted on at fit()'s first agreement as well). Returns what puts the
    previous handler and signal mask back (for a caller that goes on living, e.g. one in-process run)."""
    if not _main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _early_sigterm)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    return restore


def _take_sigterm(handler) -> Any:
    """Install `handler` for SIGTERM and unblock it (a pending one is delivered now); returns the
    previous handler (None off the main thread, where signals cannot be handled)."""
    if not _main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return previous
