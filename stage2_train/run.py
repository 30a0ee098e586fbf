"""The stage-2 train loop: OpenSoraT2V on cached shards with megatron-core TP/SP, DP and exact resume.

    python -m osp.stage2_train.run --config stage2_train/configs/demo.toml [--resume auto] [--init DIR] [k=v ...]
    torchrun --nproc_per_node 2 -m osp.stage2_train.run --config ...           (TP/DP over processes)

One optimizer step = `optim.grad_accum` micro-steps; per micro-step:
    batch (DataLoader workers) -> z0 = 0.18215 * posterior sample -> noise, t, caption dropout
    -> DiT forward (activations in run.precision: bf16 on accelerators, fp32 on CPU) -> min-SNR eps loss -> backward
with grads averaged over DP by torch DDP during the last micro-step's backward (bucketed, overlapped),
then: SP-tagged grads summed over TP, global grad norm (TP-aware), non-finite check (agreed by all
ranks), clip, AdamW (torch ZeroRedundancyOptimizer with parallel.zero1), EMA, LR schedule. A SIGTERM sets a flag
that all ranks agree on at the next step boundary: checkpoint, exit 0.

Accelerator rules (nccl/hccl map only their device type): every tensor passed to a collective lives on
the device of its group (`Device.torch_device()`), and the step reads device values on the host once
per optimizer step (`Trainer._host_sync`), never per micro-step. `osp train --dry-run`
(stage2_train/dryrun.py) runs this code on `meta` under a fake process group, which refuses CPU tensors.
The model is built on meta, split by the TP/SP plan and only this rank's shard is allocated, then
filled from a training checkpoint (torch DCP, saved at any layout: `osp.stage2_train.checkpoint`),
from model.init by slices, or from the seeded init (`osp.stage2_train.build`).

Stage 2 never imports transformers, the VAE or stage 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from osp.common import config as C
from osp.common import shards as S
from osp.common import storage
from osp.common.errors import ConfigError, MissingFileError, OspError, one_line
from osp.stage2_train import checkpoint as ckpt
from osp.stage2_train import dist as D
from osp.common.models.attention import resolve_backend
from osp.stage2_train.config import TrainConfig, resolve_precision
from osp.stage2_train.roofline import model_flops as dit_train_flops
from osp.stage2_train.data import Batch, CorruptSampleError, ShardDataset, ShardLoader, corrupt_message
from osp.stage2_train.lock import take_run_lock
from osp.stage2_train.watchdog import Watchdog
from osp.stage2_train.diffusion import (
    add_noise,
    alphas_cumprod,
    diffusion_loss,
    draw,
    draw_samples,
    sample_posterior,
    step_seed,
)
from osp.stage2_train.data_parallel import DataParallel, ShardedAdamW
from osp.stage2_train.optim import EMA, clip_grads, global_grad_norm, lr_at


class NonFiniteError(OspError, RuntimeError):
    """A non-finite loss or gradient under run.nonfinite=stop (the message names the samples)."""


def peak_memory_gb(device) -> float:
    if device.is_accelerator:
        return device.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (host RSS)


# ------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str = "", console=None):
        self.cfg = cfg
        self.stop_requested = False
        self.corrupt = ""  # the first corrupt sample seen with data.skip_corrupt off (see _prepare)
        self.device = D.setup_device(cfg.run.device)
        D.init_distributed(self.device, cfg.parallel.init_timeout_s)
        self.run_dir = cfg.run.path
        rank = dist.get_rank()
        self.watchdog = Watchdog(0, rank)  # replaced in fit()
        # before anything reads or writes the run (the dry run writes nothing and takes no lock)
        self.lock = None if self.device.is_meta else take_run_lock(self.run_dir, rank == 0)
        self.console = console if console is not None else _console(rank == 0)

        # --- model config and the data's geometry ---
        self.dit_cfg = self._model_config()
        self.shards = _shards_location(cfg.data)
        self.uncond, self.latent_channels, tokens = self._check_geometry()

        self.layout = D.init_parallel(
            cfg.parallel.tp,
            cfg.parallel.sp,
            self.dit_cfg.num_attention_heads,
            tokens,
            cfg.parallel.init_timeout_s,
            cp=cfg.parallel.cp,
        )
        L = self.layout
        self.tp_group, self.dp_group, self.dp_cp_group = D.tp_group(), D.dp_group(), D.dp_cp_group()
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        self.ckpt_path = ckpt.find(self.run_dir, resume)
        self.mesh = None if self.device.is_meta else ckpt.make_mesh(self.device.type, L.world, L.tp)  # CP, DP: replicas

        meta = self.device.is_meta  # the dry run: nothing is allocated, read or written
        self._build_model(materialize=not meta)
        if self.ckpt_path is None and not meta:
            self._init_weights()
        self.optimizer = self._build_optimizer()
        o = cfg.optim
        self.ema = (
            EMA(self.model, o.ema_decay, self.dp_group, L.dp_rank, L.dp) if o.ema_decay > 0 else None
        )  # sharded over DP
        self.loader = self._build_loader()
        self.abar = alphas_cumprod().to(self.device.torch_device(L.local_rank))
        self.step = 0
        self.counters = {"skipped_corrupt": 0, "skipped_nonfinite": 0}
        self.resume_notes: list[str] = []
        self.checkpointer = (
            None
            if meta
            else ckpt.Checkpointer(
                self.run_dir, mesh=self.mesh, tp=L.tp, rank=L.rank, is_main=L.is_main, async_save=cfg.run.async_ckpt
            )
        )
        if self.ckpt_path is not None:
            self._load_checkpoint()
        self._writers()

    # -- construction (each piece on its own: the dry run builds on meta and does not materialise) ---
    def _model_config(self):
        from osp.common.models.dit import DiTConfig, get_dit_config

        if not self.cfg.model.init:
            return get_dit_config(self.cfg.model.preset)
        f = Path(self.cfg.model.init) / "config.json"
        if not f.is_file():
            raise MissingFileError(
                f"model.init={self.cfg.model.init}: no config.json; pass a released DiT folder, an osp "
                "checkpoint (osp convert import) or a training checkpoint step-* folder"
            )
        return DiTConfig.from_json(f)

    def _build_model(self, materialize: bool = True) -> None:
        """Meta build -> TP/SP plan -> CP plan -> (materialise this rank's shard on the device, uninitialised)."""
        from osp.common.convert import tp_split_dim
        from osp.stage2_train import build

        from osp.stage2_train.context_parallel import apply_context_parallel

        cfg, dev = self.cfg, self.device.torch_device(self.layout.local_rank)
        model = apply_context_parallel(build.build_local(self.dit_cfg, cfg.parallel.sp))
        model.checkpointing = cfg.model.checkpointing
        # every activation in this dtype (run.precision); the dry run (meta) measures the accelerator regime
        model.compute_dtype = resolve_precision(cfg.run.precision, self.device.is_accelerator or self.device.is_meta)
        if materialize:
            build.materialize(model, dev)
        self.model = model.train()
        d = self.dit_cfg
        self.attention_kernel = resolve_backend(
            cfg.model.attention_backend,
            dev,
            d.num_attention_heads // (self.layout.tp * self.layout.cp),
            d.attention_head_dim,
            model.compute_dtype,
        )
        if cfg.model.compile:
            self.model.compile_blocks()
            self.attention_kernel += " (eager probe; compiled blocks use SDPA's own order)"
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.sharded = [tp_split_dim(n) is not None for n, _ in named]  # TP-sharded (not replicated)

    def _init_weights(self) -> None:
        """A new run: model.init by slices (released / osp-dit safetensors, or a training checkpoint's
        EMA via DCP), else the seeded random init."""
        from osp.common.convert import is_training_checkpoint
        from osp.stage2_train import build

        L, init = self.layout, self.cfg.model.init
        if init and is_training_checkpoint(init):
            ckpt.load_weights(init, model=self.model, mesh=self.mesh, tp=L.tp, prefer_ema=True)
        elif init:
            build.fill_from_folder(self.model, init, L.tp, L.tp_rank, prefer_ema=True, progress=L.is_main)
        else:
            build.fill_random(self.model, self.dit_cfg, self.cfg.run.seed, L.tp, L.tp_rank)

    def _build_optimizer(self):
        """DP x CP replicas: torch DDP (bucketed all-reduce overlapped with backward) + AdamW, its state
        sharded by ZeroRedundancyOptimizer with parallel.zero1 (osp.stage2_train.data_parallel)."""
        o, L, p = self.cfg.optim, self.layout, self.cfg.parallel
        adamw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        dev_ids = [L.local_rank] if self.device.type == "cuda" else None
        self.dp = DataParallel(
            self.model, self.dp_cp_group, L.dp, overlap=p.overlap_grad_reduce, bucket_mb=p.bucket_mb, device_ids=dev_ids
        )
        names = [n for n, q in self.model.named_parameters() if q.requires_grad]
        return ShardedAdamW(
            self.params, names, self.dp_cp_group, shard=p.zero1, keep_grads=self.dp.ddp is not None, **adamw
        )

    def _build_loader(self):
        cfg, L = self.cfg, self.layout
        loader = ShardLoader(
            self.shards,
            batch_size=cfg.data.batch_size,
            dp_rank=L.dp_rank,
            dp_size=L.dp,
            seed=cfg.run.seed,
            num_workers=cfg.data.num_workers,
            skip_corrupt=cfg.data.skip_corrupt,  # (a corrupt row left out by the shape filter stops here)
            shapes=self.train_shapes,
            grad_accum=cfg.optim.grad_accum,
        )
        loader.skip_corrupt = True  # from here on corrupt samples come back in Batch.skipped; _prepare decides
        return loader

    def _load_checkpoint(self) -> None:
        """Model, EMA, AdamW state (resharded to this layout), RNG, counters and data position."""
        L = self.layout
        assert self.ckpt_path is not None
        saved = ckpt.read_trainer_state(self.ckpt_path).get("layout", {})
        c = ckpt.load(
            self.ckpt_path,
            model=self.model,
            ema=self.ema,
            optimizer=self.optimizer,
            mesh=self.mesh,
            tp=L.tp,
            rank=L.rank,
        )
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
        ours = self._layout_dict()
        self.resume_notes = [n for n in (self.loader.notice,) if n]
        changed = {k: (saved.get(k), v) for k, v in ours.items() if k in saved and saved.get(k) != v}
        if changed:
            self.resume_notes.insert(
                0, "resharded from the saved layout: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            )

    def _layout_dict(self) -> dict:
        L = self.layout
        return {
            "tp": L.tp,
            "cp": L.cp,
            "dp": L.dp,
            "sp": L.sp,
            "zero1": self.cfg.parallel.zero1,
            "world": L.world,
            "batch_size": self.cfg.data.batch_size,
            "grad_accum": self.cfg.optim.grad_accum,
        }

    # -- checks ------------------------------------------------------------------------------
    def _check_geometry(self):
        """The manifest/index geometry must match the DiT; returns (uncond text, latent channels, tokens)."""
        cfg, root = self.dit_cfg, self.shards
        manifest = S.read_manifest(root)
        index = S.ShardIndex.open(root)
        if len(index) == 0:
            raise ConfigError(f"{root}: the index holds no samples; encode some clips first (osp encode)")
        first = self._first_readable(root, index)
        c = int(first.latent.shape[0])
        if c not in (cfg.in_channels, 2 * cfg.in_channels):
            raise ConfigError(
                f"{root}: latents have {c} channels, the DiT takes {cfg.in_channels} (moments {2 * cfg.in_channels}); "
                "encode with the VAE that matches the DiT"
            )
        uncond = S.read_uncond(root)
        for what, dim in (("samples' text", int(first.text.shape[1])), ("uncond.safetensors", int(uncond.shape[1]))):
            if dim != cfg.caption_channels:
                raise ConfigError(
                    f"{root}: {what} width is {dim} but the DiT's caption_channels is {cfg.caption_channels}; "
                    f"use the DiT preset matching the shards' text encoder ({manifest.get('preset', 'see manifest.json')})"
                )
        shapes = {(int(t), int(h), int(w)) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w)}
        want = (int(cfg.sample_size_t), int(cfg.sample_size[0]), int(cfg.sample_size[1]))
        image = (1,) + want[1:]
        bad = sorted(s for s in shapes if s not in (want, image))
        if bad:
            raise ConfigError(
                f"{root}: latent T x H x W {bad[0]} (of {len(index)} samples) does not match the DiT's "
                f"sample_size_t x sample_size {want}; train the DiT preset matching the encode preset "
                f"({manifest.get('preset', 'see manifest.json')}) or re-encode"
            )
        self.train_shapes = {want, image} if self.cfg.data.images else {want}
        n_used = sum(
            int((t, h, w) in self.train_shapes) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w)
        )
        if n_used < len(index) and dist.get_rank() == 0:
            self.console.print(
                f"{root}: training on the {n_used} samples of shape {want}; "
                f"{len(index) - n_used} single-frame samples left out (data.images=true includes them)"
            )
        p, pt = cfg.patch_size, cfg.patch_size_t
        tokens = (want[0] // pt) * (want[1] // p) * (want[2] // p)
        return uncond, c, tokens

    def _first_readable(self, root: "Path | str", index) -> "S.Sample":
        """The first row that passes its checks (a corrupt row 0 stops the run unless data.skip_corrupt)."""
        ds = ShardDataset(root, index)
        for i in range(len(index)):
            item = ds[i]
            if not isinstance(item, dict):
                return item[1]
            if not self.cfg.data.skip_corrupt:
                raise CorruptSampleError(corrupt_message(item, root))
        raise CorruptSampleError(f"{root}: all {len(index)} samples are corrupt; re-encode (osp shards verify {root})")

    # -- outputs -----------------------------------------------------------------------------
    def _writers(self) -> None:
        self.tb = None
        if self.layout.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(self.cfg.to_toml())
            self.console.print(
                f"[bold]run[/] {self.run_dir}  layout tp={self.layout.tp} cp={self.layout.cp} dp={self.layout.dp} sp={self.layout.sp} "
                f"zero1={self.cfg.parallel.zero1} device={self.device.type} "
                f"activations={str(self.model.compute_dtype).removeprefix('torch.')} attention={self.attention_kernel} "
                f"checkpointing={self.cfg.model.checkpointing} compile={self.cfg.model.compile}"
            )
            self.console.print(self.cfg.to_toml().rstrip(), markup=False)
            if self.ckpt_path:
                self.console.print(
                    f"resuming from {self.ckpt_path} at step {self.step} (loader {self.loader.state_dict()})"
                )
                for note in getattr(self, "resume_notes", []):
                    self.console.print(f"[yellow]{note}[/]")
            if self.cfg.run.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                except ImportError:
                    self.tb = None
        dist.barrier()

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

    def save(self) -> Path:
        checkpointer = self.checkpointer
        assert checkpointer is not None  # None only in the dry run (meta), which never saves
        path = checkpointer.save(
            self.step,
            model=self.model,
            ema=self.ema,
            optimizer=self.optimizer,
            counters=self.counters_state(),
            dit_config=self.dit_cfg,
            meta={"layout": self._layout_dict(), "config": self.cfg.to_dict()},
        )
        if self.layout.is_main:
            self.console.print(f"checkpoint {path}{' (writing in the background)' if checkpointer.pending else ''}")
        return path

    # -- one micro-step ----------------------------------------------------------------------
    def _prepare(self, batch: Batch) -> tuple[Batch, float]:
        """Count skipped corrupt samples; an all-corrupt batch becomes a zero-weight dummy so that
        collectives stay aligned across ranks."""
        for s in batch.skipped:
            if not self.cfg.data.skip_corrupt:  # every rank stops at this step's agreement (train_step)
                self.corrupt = self.corrupt or corrupt_message(s, self.shards)
                continue
            self.counters["skipped_corrupt"] += 1
            self.console.print(f"[yellow]skipped corrupt sample[/] {s['key']} in {s['tar']}: {s['error']}")
        if batch.keys:
            return batch, 1.0
        t, h, w = (int(v) for v in self.loader.shapes[batch.skipped[0]["row"]])
        dummy = Batch(
            torch.zeros(1, self.latent_channels, t, h, w),
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
        dev = self.device.torch_device(self.layout.local_rank)
        cfg, d = self.cfg, self.dit_cfg
        moments = batch.moments.to(dev, non_blocking=True)
        b = moments.shape[0]
        shape = (b, d.in_channels) + tuple(moments.shape[2:])
        if batch.rows:  # per-sample draws: the same numbers at any layout (resume on another layout)
            r = draw_samples(
                shape, cfg.run.seed, step, batch.rows, cfg.diffusion.noise_offset, cfg.diffusion.cfg_dropout
            )
        else:
            r = draw(
                shape,
                step_seed(cfg.run.seed, step, micro, self.layout.dp_rank),
                cfg.diffusion.noise_offset,
                cfg.diffusion.cfg_dropout,
            )
        if moments.shape[1] == 2 * d.in_channels:
            z0 = sample_posterior(moments, r.eps_post.to(dev))
        else:
            z0 = moments.float()
        z0 = z0 * C.VAE_SCALE_FACTOR
        noise, t = r.noise.to(dev), r.t.to(dev)
        x_t = add_noise(z0, noise, t, self.abar)
        text, mask = self._caption_dropout(batch.text, batch.text_mask, r.drop)
        # no autocast: the model casts itself (every activation in model.compute_dtype = run.precision)
        net = self.dp.module if train else self.model  # train: through DDP, whose backward reduces over DP x CP
        eps_hat = net(x_t, t, text.to(dev, non_blocking=True), mask.to(dev, non_blocking=True))
        return diffusion_loss(eps_hat, noise, t, self.abar, cfg.diffusion.snr_gamma)

    def _caption_dropout(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
        if not bool(drop.any()):
            return text, mask
        lu = self.uncond.shape[0]
        b, l, dim = text.shape
        if lu > l:
            text = torch.cat([text, text.new_zeros(b, lu - l, dim)], 1)
            mask = torch.cat([mask, mask.new_zeros(b, lu - l)], 1)
        text, mask = text.clone(), mask.clone()
        for i in torch.nonzero(drop).flatten().tolist():
            text[i].zero_()
            text[i, :lu] = self.uncond.to(text.dtype)
            mask[i].zero_()
            mask[i, :lu] = 1
        return text, mask

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, L = self.cfg, self.layout
        accum = cfg.optim.grad_accum
        lr = lr_at(self.step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.run.steps, cfg.optim.min_lr)
        self.optimizer.set_lr(lr)
        dev = self.device.torch_device(L.local_rank)  # the communication device of every group
        sdt = self.device.stats_dtype
        t0 = time.perf_counter()
        data_wait, keys, samples, text_len, shape = 0.0, [], 0, 0, None
        loss_sum = torch.zeros((), dtype=sdt, device=dev)  # stays on the device: no host sync per micro-step
        for micro in range(accum):
            tw = time.perf_counter()
            self.watchdog.beat(f"waiting for the data loader (step {self.step + 1})")
            batch = next(self.loader)
            data_wait += time.perf_counter() - tw
            batch, weight = self._prepare(batch)
            with self.dp.sync(final=micro == accum - 1):  # DP reduction overlaps the last micro-step's backward
                per_sample = self.micro_loss(batch, self.step, micro, train=True)
                loss = per_sample.mean() * (weight / accum)
                loss.backward()
            loss_sum += loss.detach().to(sdt)
            keys += batch.keys
            samples += len(batch.keys)
            text_len, shape = max(text_len, batch.text.shape[1]), batch.shape
        from osp.stage2_train.context_parallel import scale_replicated_grads
        from osp.stage2_train.parallel import reduce_sequence_parallel_grads

        self.watchdog.beat(f"in the gradient collectives of step {self.step + 1}")
        # grads are already summed over DP x CP and divided by dp (data_parallel's bucket hook); what is left
        # is linear and commutes with that sum: SP grads summed over TP, CP-complete grads / cp
        reduce_sequence_parallel_grads(self.model)
        scale_replicated_grads(self.model)
        norm = global_grad_norm(self.params, self.sharded, self.tp_group, L.tp_rank, L.tp)

        # one world-wide agreement on: non-finite loss/grad anywhere, a stop request anywhere; then the
        # step's only host sync (all tensors on `dev`: nccl/hccl refuse CPU tensors)
        loss_ok = torch.isfinite(loss_sum)
        nonfinite_t = torch.logical_not(loss_ok)
        flags = torch.stack(
            [
                torch.logical_or(nonfinite_t, torch.logical_not(torch.isfinite(norm))).to(sdt),
                torch.full((), float(self.stop_requested), dtype=sdt, device=dev),
                torch.full((), float(bool(self.corrupt)), dtype=sdt, device=dev),
            ]
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stats = torch.stack(
            [
                torch.where(loss_ok, loss_sum, torch.zeros_like(loss_sum)),
                torch.full((), float(samples), dtype=sdt, device=dev),
            ]
        )
        dist.all_reduce(stats, group=self.dp_group)
        host = self._host_sync(
            torch.cat([flags, stats, norm.detach().to(sdt).reshape(1), nonfinite_t.to(sdt).reshape(1)])
        )
        flag_bad, flag_stop, flag_corrupt, loss_total, global_samples, norm_value = host[:6]
        nonfinite = host[6] > 0
        if flag_corrupt > 0:  # a corrupt sample on any rank and data.skip_corrupt off: every rank stops now
            found = [None] * L.world
            dist.all_gather_object(found, self.corrupt)
            raise CorruptSampleError(next(m for m in found if m))
        skipped = False
        if flag_bad > 0:
            bad: list[list[str]] = [[] for _ in range(L.world)]
            dist.all_gather_object(bad, keys if nonfinite else [])
            bad_keys = sorted({k for ks in bad for k in ks})
            if cfg.run.nonfinite == "stop":
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {self.step + 1} (samples {bad_keys}); check those samples "
                    f"in {self.shards} (osp shards verify), or set run.nonfinite=skip to skip such steps"
                )
            self.counters["skipped_nonfinite"] += 1
            skipped = True
            self.console.print(f"[yellow]step {self.step + 1}: non-finite loss, step skipped[/] (samples {bad_keys})")
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

        d = self.dit_cfg
        tokens = (shape[0] // d.patch_size_t) * (shape[1] // d.patch_size) * (shape[2] // d.patch_size) if shape else 0
        # global_samples: summed over the DP group = the global batch
        flops = dit_train_flops(d, tokens, text_len) * global_samples
        tflops = flops / dt / L.world / 1e12
        m = {
            "step": self.step,
            "loss": None if skipped else loss_total / L.dp,
            "lr": lr,
            "grad_norm": norm_value if math.isfinite(norm_value) else None,
            "skipped": skipped,
            "samples_per_s": global_samples / dt,
            "tokens_per_s": global_samples * tokens / dt,
            "tflops_per_device": tflops,
            "mfu": tflops / cfg.run.peak_tflops if cfg.run.peak_tflops > 0 else None,
            "peak_mem_gb": peak_memory_gb(self.device),
            "step_time_s": dt,
            "data_wait_s": data_wait,
            "epoch": self.loader.epoch,
            **self.counters,
        }
        self.last_keys = keys
        return m

    def _host_sync(self, values: torch.Tensor) -> list[float]:
        """The optimizer step's one device -> host copy (the dry run, on `meta`, overrides it)."""
        return values.tolist()

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, L = self.cfg, self.layout
        history = []
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        self.stop_requested |= _EARLY_SIGTERM[0]  # a SIGTERM during start-up stops after the first step
        metrics_path = self.run_dir / "metrics.jsonl"
        keys_path = self.run_dir / f"keys-rank{L.rank:05d}.jsonl"
        progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not L.is_main,
        )
        try:
            with progress:
                task = progress.add_task("train", total=cfg.run.steps, completed=self.step, info="")
                self.watchdog = Watchdog(cfg.run.watchdog_s, L.rank)
                while self.step < cfg.run.steps:
                    self.watchdog.beat(f"in step {self.step + 1}")
                    m = self.train_step()
                    if storage.is_url(self.shards):  # this rank's object-store requests, retries, cache
                        m["storage"] = storage.counters()
                    history.append(m)
                    if L.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(m) + "\n")
                        if self.tb is not None:
                            for k in (
                                "loss",
                                "lr",
                                "grad_norm",
                                "samples_per_s",
                                "tokens_per_s",
                                "tflops_per_device",
                                "peak_mem_gb",
                            ):
                                if m.get(k) is not None:
                                    self.tb.add_scalar(f"train/{k}", m[k], m["step"])
                        loss_txt = f"{m['loss']:.5f}" if m["loss"] is not None else "skipped"
                        info = f"loss {loss_txt} lr {m['lr']:.2e} gnorm {m['grad_norm'] or float('nan'):.3f} {m['samples_per_s']:.1f} samples/s"
                        progress.update(task, completed=self.step, info=info)
                        if cfg.run.log_every and self.step % cfg.run.log_every == 0:
                            mfu = f" mfu {m['mfu']:.1%}" if m["mfu"] is not None else ""
                            progress.console.print(
                                f"step {m['step']:>6} loss {loss_txt} lr {m['lr']:.2e} gnorm {m['grad_norm'] or float('nan'):.4f} "
                                f"{m['samples_per_s']:.2f} samples/s {m['tokens_per_s']:.0f} tok/s {m['tflops_per_device']:.4f} TFLOP/s{mfu} "
                                f"data {m['data_wait_s'] / m['step_time_s']:.0%} mem {m['peak_mem_gb']:.2f} GB"
                            )
                    if cfg.run.log_keys:
                        with open(keys_path, "a") as f:
                            f.write(json.dumps({"step": self.step, "keys": self.last_keys}) + "\n")
                    checkpointer = self.checkpointer
                    assert checkpointer is not None  # None only in the dry run (meta), which never runs fit
                    checkpointer.poll()
                    periodic = cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0
                    if periodic or self.stop_requested or self.step == cfg.run.steps:
                        self.watchdog.beat(f"writing the checkpoint of step {self.step}")
                        self.save()
                    if self.stop_requested or self.step == cfg.run.steps:
                        checkpointer.wait()
                    if self.stop_requested:
                        if L.is_main:
                            self.console.print(f"stopping on SIGTERM after step {self.step} (checkpoint written)")
                        break
        finally:
            self.watchdog.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return history

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def close(self) -> None:
        self.watchdog.close()
        checkpointer = getattr(self, "checkpointer", None)  # absent if __init__ failed before it
        if checkpointer is not None:
            checkpointer.close()
        self.loader.close()
        if self.lock is not None:
            self.lock.release()
        if self.tb is not None:
            self.tb.close()


_EARLY_SIGTERM = [False]


def _early_sigterm(signum, frame) -> None:
    _EARLY_SIGTERM[0] = True


def _shards_location(data) -> "Path | str":
    """data.shards as a folder, or an object-store URL with the data section's store settings applied
    (process-wide, inherited by the loader workers)."""
    if not storage.is_url(data.shards):
        return Path(data.shards)
    storage.configure(
        endpoint_url=data.endpoint_url or None,
        cache_dir=data.cache_dir or None,
        cache_bytes=data.cache_bytes,
        timeout_s=data.timeout_s,
        retries=data.retries,
    )
    return data.shards


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _console(enabled: bool):
    from rich.console import Console

    return Console(quiet=not enabled, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    from osp.stage2_train.config import config_keys_help

    p = argparse.ArgumentParser(
        prog="python -m osp.stage2_train.run",
        description="Train the OpenSoraT2V DiT on cached shards.",
        epilog=config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="TOML config (stage2_train/configs/demo.toml)")
    p.add_argument("--resume", default="", help="'auto' (latest checkpoint of the run, if any) or a checkpoint folder")
    p.add_argument("--init", default="", help="converted released DiT checkpoint (or osp checkpoint) to start from")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.steps=10 parallel.tp=1")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from osp.stage2_train.launch import die_with_parent

    die_with_parent()  # under the launcher: this rank dies with it, however it dies
    if _main_thread():
        signal.signal(signal.SIGTERM, _early_sigterm)  # until fit() installs its own handler
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    trainer = None
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        if args.init:
            cfg.model.init = args.init
        trainer = Trainer(cfg, resume=args.resume)
        trainer.fit()
        return 0
    except pickle.UnpicklingError as e:  # a resume file holding more than tensors (weights_only load refused it)
        what = next((x.strip() for x in str(e).splitlines() if "GLOBAL" in x), "objects beyond tensors")
        sys.stderr.write(
            f"error (rank {rank}): a checkpoint file was refused ({what}); it would run code when unpickled. "
            "Resume from a checkpoint this osp wrote (--resume DIR)\n"
        )
        return 1
    except OspError as e:  # a user error: one line (OSP_TRACEBACK=1 adds the traceback); bugs keep theirs
        sys.stderr.write(f"error (rank {rank}): {one_line(e)}\n")  # one write: ranks sharing a pipe keep whole lines
        sys.stderr.flush()
        if os.environ.get("OSP_TRACEBACK"):
            raise
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
