"""The stage-2 train loop: OpenSoraT2V on cached shards with megatron-core TP/SP, DP and exact resume.

    python -m osp.stage2_train.run --config stage2_train/configs/demo.toml [--resume auto] [--init DIR] [k=v ...]
    torchrun --nproc_per_node 2 -m osp.stage2_train.run --config ...           (TP/DP over processes)

One optimizer step = `optim.grad_accum` micro-steps; per micro-step:
    batch (DataLoader workers) -> z0 = 0.18215 * posterior sample -> noise, t, caption dropout
    -> DiT forward (bf16 autocast on accelerators, fp32 on CPU) -> min-SNR eps loss -> backward
with grads averaged over DP by torch DDP during the last micro-step's backward (bucketed, overlapped),
then: SP-tagged grads summed over TP, global grad norm (TP-aware), non-finite check (agreed by all
ranks), clip, AdamW (torch ZeroRedundancyOptimizer with parallel.zero1), EMA, LR schedule. A SIGTERM sets a flag
that all ranks agree on at the next step boundary: checkpoint, exit 0.

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
from osp.stage2_train import checkpoint as ckpt
from osp.stage2_train import dist as D
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.data import Batch, CorruptSampleError, ShardDataset, ShardLoader, corrupt_message
from osp.stage2_train.lock import RunLockedError, take_run_lock
from osp.stage2_train.watchdog import Watchdog
from osp.stage2_train.diffusion import add_noise, alphas_cumprod, diffusion_loss, draw, sample_posterior, step_seed
from osp.stage2_train.data_parallel import DataParallel, ShardedAdamW
from osp.stage2_train.optim import EMA, clip_grads, global_grad_norm, lr_at


class NonFiniteError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# analytic FLOPs (matmuls only; multiply-add = 2 FLOPs)
# ------------------------------------------------------------------------------------------------
def dit_forward_flops(cfg, tokens: int, text_len: int) -> float:
    """Forward FLOPs of one sample: N video tokens, L text tokens (attention scores and values included)."""
    d, n, l = cfg.inner_dim, tokens, text_len
    patch_in = cfg.in_channels * cfg.patch_size**2 * cfg.patch_size_t
    patch_out = cfg.out_channels * cfg.patch_size**2 * cfg.patch_size_t
    block = (
        8 * n * d * d  # self-attn q, k, v, out
        + 4 * n * n * d  # self-attn QK^T and AV
        + 4 * n * d * d  # cross-attn q, out
        + 4 * l * d * d  # cross-attn k, v
        + 4 * n * l * d  # cross-attn QK^T and AV
        + 16 * n * d * d  # feed-forward D -> 4D -> D
    )
    embed = 2 * n * patch_in * d + 2 * l * (cfg.caption_channels * d + d * d) + 2 * (256 * d + d * d + 6 * d * d)
    return float(cfg.num_layers * block + embed + 2 * n * d * patch_out)


def dit_train_flops(cfg, tokens: int, text_len: int) -> float:
    """Forward + backward (2x forward); recomputation under activation checkpointing is not counted."""
    return 3.0 * dit_forward_flops(cfg, tokens, text_len)


def peak_memory_gb(device) -> float:
    if device.is_accelerator:
        return device.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (host RSS)


# ------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str = "", console=None):
        from osp.common.models.dit import build_dit, get_dit_config
        from osp.stage2_train.context_parallel import apply_context_parallel
        from osp.stage2_train.parallel import load_full_state_dict, parallelize

        self.cfg = cfg
        self.stop_requested = False
        self.corrupt = ""  # the first corrupt sample seen with data.skip_corrupt off (see _prepare)
        self.device = D.setup_device(cfg.run.device)
        D.init_distributed(self.device, cfg.parallel.init_timeout_s)
        self.run_dir = cfg.run.path
        rank = dist.get_rank()
        self.watchdog = Watchdog(0, rank)  # replaced in fit()
        self.lock = take_run_lock(self.run_dir, rank == 0)  # before anything reads or writes the run
        self.console = console if console is not None else _console(rank == 0)

        # --- model config and the data's geometry ---
        init_sd = None
        if cfg.model.init:
            from osp.common.convert import load_dit_checkpoint

            self.dit_cfg, init_sd = load_dit_checkpoint(cfg.model.init, prefer_ema=True)
        else:
            self.dit_cfg = get_dit_config(cfg.model.preset)
        self.shards = Path(cfg.data.shards)
        self.uncond, self.latent_channels, tokens = self._check_geometry()

        self.layout = D.init_parallel(cfg.parallel.tp, cfg.parallel.sp, self.dit_cfg.num_attention_heads, tokens,
                                      cfg.parallel.init_timeout_s, cp=cfg.parallel.cp)
        L = self.layout
        self.tp_group, self.dp_group, self.dp_cp_group = D.tp_group(), D.dp_group(), D.dp_cp_group()
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)

        # --- resume point ---
        self.ckpt_path = ckpt.find(self.run_dir, resume)
        state = ckpt.read_trainer_state(self.ckpt_path) if self.ckpt_path else None
        if state is not None:
            self._check_resume_layout(state)

        # --- model: full weights on every rank, then the TP/SP plan ---
        torch.manual_seed(cfg.run.seed)  # identical init on every rank
        model = build_dit(self.dit_cfg, dtype=torch.float32)
        full = None
        if state is not None:
            full, ema_local = ckpt.load_weights(self.ckpt_path, L.tp, L.tp_rank)
        elif init_sd is not None:
            full, ema_local = init_sd, None
        model = apply_context_parallel(parallelize(model, cfg.parallel.sp))
        if full is not None:
            load_full_state_dict(model, full, str(self.ckpt_path or cfg.model.init))
        del full, init_sd
        model.gradient_checkpointing = cfg.model.grad_checkpointing
        self.model = model.to(self.device.torch_device(L.local_rank)).train()
        from osp.common.convert import tp_split_dim

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.sharded = [tp_split_dim(n) is not None for n, _ in named]  # TP-sharded (not replicated)

        o = cfg.optim
        adamw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        # DP x CP replicas: torch DDP (bucketed all-reduce overlapped with backward) + ZeRO AdamW (parallel.zero1)
        dev_ids = [L.local_rank] if self.device.type == "cuda" else None
        self.dp = DataParallel(self.model, self.dp_cp_group, L.dp, overlap=cfg.parallel.overlap_grad_reduce,
                               bucket_mb=cfg.parallel.bucket_mb, device_ids=dev_ids)
        self.optimizer = ShardedAdamW(self.params, [n for n, _ in named], self.dp_cp_group, shard=cfg.parallel.zero1,
                                      keep_grads=self.dp.ddp is not None, **adamw)
        self.ema = EMA(self.model, o.ema_decay, self.dp_group, L.dp_rank, L.dp) if o.ema_decay > 0 else None  # sharded over DP

        self.loader = ShardLoader(
            self.shards,
            batch_size=cfg.data.batch_size,
            dp_rank=L.dp_rank,
            dp_size=L.dp,
            seed=cfg.run.seed,
            num_workers=cfg.data.num_workers,
            skip_corrupt=cfg.data.skip_corrupt,  # (a corrupt row left out by the shape filter stops here)
            shapes=self.train_shapes,
        )
        self.loader.skip_corrupt = True  # from here on corrupt samples come back in Batch.skipped; _prepare decides
        self.abar = alphas_cumprod().to(self.device.torch_device(L.local_rank))
        self.step = 0
        self.counters = {"skipped_corrupt": 0, "skipped_nonfinite": 0}
        if state is not None:
            self.step = int(state["step"])
            self.loader.load_state_dict(state["loader"])
            self.counters.update(state.get("counters", {}))
            self.optimizer.load_state_dict(ckpt.load_optimizer(self.ckpt_path, L.rank, L.dp_rank, cfg.parallel.zero1))
            if self.ema is not None:
                if ema_local is None:
                    raise ValueError(f"{self.ckpt_path}: has no EMA weights but optim.ema_decay > 0; resume with optim.ema_decay=0")
                self.ema.load(ema_local, state.get("ema_updates", 0))  # copies only this DP rank's shard to the device
            rng = ckpt.load_rng(self.ckpt_path, L.rank)
            if rng is not None:
                ckpt.set_rng_state(rng)
        self._writers()

    # -- checks ------------------------------------------------------------------------------
    def _check_geometry(self):
        """The manifest/index geometry must match the DiT; returns (uncond text, latent channels, tokens)."""
        cfg, root = self.dit_cfg, self.shards
        manifest = S.read_manifest(root)
        index = S.ShardIndex.open(root)
        if len(index) == 0:
            raise ValueError(f"{root}: the index holds no samples; encode some clips first (osp encode)")
        first = self._first_readable(root, index)
        c = int(first.latent.shape[0])
        if c not in (cfg.in_channels, 2 * cfg.in_channels):
            raise ValueError(
                f"{root}: latents have {c} channels, the DiT takes {cfg.in_channels} (moments {2 * cfg.in_channels}); "
                "encode with the VAE that matches the DiT"
            )
        uncond = S.read_uncond(root)
        for what, dim in (("samples' text", int(first.text.shape[1])), ("uncond.safetensors", int(uncond.shape[1]))):
            if dim != cfg.caption_channels:
                raise ValueError(
                    f"{root}: {what} width is {dim} but the DiT's caption_channels is {cfg.caption_channels}; "
                    f"use the DiT preset matching the shards' text encoder ({manifest.get('preset', 'see manifest.json')})"
                )
        shapes = {(int(t), int(h), int(w)) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w)}
        want = (int(cfg.sample_size_t), int(cfg.sample_size[0]), int(cfg.sample_size[1]))
        image = (1,) + want[1:]
        bad = sorted(s for s in shapes if s not in (want, image))
        if bad:
            raise ValueError(
                f"{root}: latent T x H x W {bad[0]} (of {len(index)} samples) does not match the DiT's "
                f"sample_size_t x sample_size {want}; train the DiT preset matching the encode preset "
                f"({manifest.get('preset', 'see manifest.json')}) or re-encode"
            )
        self.train_shapes = {want, image} if self.cfg.data.images else {want}
        n_used = sum(int((t, h, w) in self.train_shapes) for t, h, w in zip(index.latent_t, index.latent_h, index.latent_w))
        if n_used < len(index) and dist.get_rank() == 0:
            self.console.print(f"{root}: training on the {n_used} samples of shape {want}; "
                               f"{len(index) - n_used} single-frame samples left out (data.images=true includes them)")
        p, pt = cfg.patch_size, cfg.patch_size_t
        tokens = (want[0] // pt) * (want[1] // p) * (want[2] // p)
        return uncond, c, tokens

    def _first_readable(self, root: Path, index) -> "S.Sample":
        """The first row that passes its checks (a corrupt row 0 stops the run unless data.skip_corrupt)."""
        ds = ShardDataset(root, index)
        for i in range(len(index)):
            item = ds[i]
            if not isinstance(item, dict):
                return item[1]
            if not self.cfg.data.skip_corrupt:
                raise CorruptSampleError(corrupt_message(item, root))
        raise CorruptSampleError(f"{root}: all {len(index)} samples are corrupt; re-encode (osp shards verify {root})")

    def _check_resume_layout(self, state: dict) -> None:
        lay = state.get("layout", {})
        ours = {"tp": self.layout.tp, "dp": self.layout.dp, "zero1": self.cfg.parallel.zero1}
        diff = {k: (lay.get(k), v) for k, v in ours.items() if lay.get(k) != v}
        if diff:
            raise ValueError(
                f"{self.ckpt_path}: saved with {', '.join(f'{k}={a}' for k, (a, _) in diff.items())}, this run has "
                f"{', '.join(f'{k}={b}' for k, (_, b) in diff.items())}; resume with the same layout, or start a new run "
                f"with model.init={self.ckpt_path / 'model'} (weights only)"
            )

    # -- outputs -----------------------------------------------------------------------------
    def _writers(self) -> None:
        self.tb = None
        if self.layout.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(self.cfg.to_toml())
            self.console.print(f"[bold]run[/] {self.run_dir}  layout tp={self.layout.tp} cp={self.layout.cp} dp={self.layout.dp} sp={self.layout.sp} "
                               f"zero1={self.cfg.parallel.zero1} device={self.device.type}")
            self.console.print(self.cfg.to_toml().rstrip(), markup=False)
            if self.ckpt_path:
                self.console.print(f"resuming from {self.ckpt_path} at step {self.step} (loader {self.loader.state_dict()})")
            if self.cfg.run.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                except ImportError:
                    self.tb = None
        dist.barrier()

    def trainer_state(self) -> dict:
        return {
            "loader": self.loader.state_dict(),
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "counters": dict(self.counters),
            "layout": {"tp": self.layout.tp, "cp": self.layout.cp, "dp": self.layout.dp, "zero1": self.cfg.parallel.zero1, "world": self.layout.world},
            "config": self.cfg.to_dict(),
        }

    def save(self) -> Path:
        path = ckpt.save(self.run_dir, self.step, model=self.model, ema=self.ema, optimizer=self.optimizer,
                         trainer_state=self.trainer_state(), layout=self.layout, tp_group=self.tp_group)
        if self.layout.is_main:
            self.console.print(f"checkpoint {path}")
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
        r = draw(shape, step_seed(cfg.run.seed, step, micro, self.layout.dp_rank), cfg.diffusion.noise_offset, cfg.diffusion.cfg_dropout)
        if moments.shape[1] == 2 * d.in_channels:
            z0 = sample_posterior(moments, r.eps_post.to(dev))
        else:
            z0 = moments.float()
        z0 = z0 * C.VAE_SCALE_FACTOR
        noise, t = r.noise.to(dev), r.t.to(dev)
        x_t = add_noise(z0, noise, t, self.abar)
        text, mask = self._caption_dropout(batch.text, batch.text_mask, r.drop)
        with torch.autocast(self.device.type, dtype=self.device.autocast_dtype, enabled=self.device.is_accelerator):
            net = self.dp.module if train else self.model
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
        t0 = time.perf_counter()
        data_wait, loss_sum, nonfinite, keys, samples, text_len, shape = 0.0, 0.0, False, [], 0, 0, None
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
            value = float(loss.detach())
            nonfinite |= not math.isfinite(value)
            loss_sum += value
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

        # one world-wide agreement on: non-finite loss/grad anywhere, a stop request anywhere
        flags = torch.tensor([float(nonfinite or not bool(torch.isfinite(norm))), float(self.stop_requested), float(bool(self.corrupt))])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[2] > 0:  # a corrupt sample on any rank and data.skip_corrupt off: every rank stops now
            found = [None] * L.world
            dist.all_gather_object(found, self.corrupt)
            raise CorruptSampleError(next(m for m in found if m))
        stats = torch.tensor([loss_sum if math.isfinite(loss_sum) else 0.0, float(samples)], dtype=torch.float64)
        dist.all_reduce(stats, group=self.dp_group)
        skipped = False
        if flags[0] > 0:
            bad = [None] * L.world
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
        self.stop_requested = bool(flags[1] > 0)
        self.device.synchronize()
        dt = time.perf_counter() - t0

        d = self.dit_cfg
        tokens = (shape[0] // d.patch_size_t) * (shape[1] // d.patch_size) * (shape[2] // d.patch_size) if shape else 0
        global_samples = float(stats[1])  # summed over the DP group = the global batch
        flops = dit_train_flops(d, tokens, text_len) * global_samples
        tflops = flops / dt / L.world / 1e12
        m = {
            "step": self.step,
            "loss": None if skipped else float(stats[0]) / L.dp,
            "lr": lr,
            "grad_norm": float(norm) if math.isfinite(float(norm)) else None,
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

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, L = self.cfg, self.layout
        history = []
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        self.stop_requested |= _EARLY_SIGTERM[0]  # a SIGTERM during start-up stops after the first step
        metrics_path = self.run_dir / "metrics.jsonl"
        keys_path = self.run_dir / f"keys-rank{L.rank:05d}.jsonl"
        progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=self.console, disable=not L.is_main)
        try:
            with progress:
                task = progress.add_task("train", total=cfg.run.steps, completed=self.step, info="")
                self.watchdog = Watchdog(cfg.run.watchdog_s, L.rank)
                while self.step < cfg.run.steps:
                    self.watchdog.beat(f"in step {self.step + 1}")
                    m = self.train_step()
                    history.append(m)
                    if L.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(m) + "\n")
                        if self.tb is not None:
                            for k in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "tflops_per_device", "peak_mem_gb"):
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
                    periodic = cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0
                    if periodic or self.stop_requested or self.step == cfg.run.steps:
                        self.watchdog.beat(f"writing the checkpoint of step {self.step}")
                        self.save()
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
        self.loader.close()
        if self.lock is not None:
            self.lock.release()
        if self.tb is not None:
            self.tb.close()


_EARLY_SIGTERM = [False]


def _early_sigterm(signum, frame) -> None:
    _EARLY_SIGTERM[0] = True


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
    p = argparse.ArgumentParser(prog="python -m osp.stage2_train.run", description="Train the OpenSoraT2V DiT on cached shards.")
    p.add_argument("--config", default=None, help="TOML config (stage2_train/configs/demo.toml)")
    p.add_argument("--resume", default="", help="'auto' (latest checkpoint of the run, if any) or a checkpoint folder")
    p.add_argument("--init", default="", help="converted released DiT checkpoint (or osp checkpoint) to start from")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.steps=10 parallel.tp=1")
    return p.parse_intermixed_args(argv)


EXPECTED_ERRORS = (ValueError, FileNotFoundError, RuntimeError, CorruptSampleError, NonFiniteError, RunLockedError)


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
        sys.stderr.write(f"error (rank {rank}): a checkpoint file was refused ({what}); it would run code when unpickled. "
                         "Resume from a checkpoint this osp wrote (--resume DIR)\n")
        return 1
    except EXPECTED_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"error (rank {rank}): {msg}\n")  # one write: ranks sharing a pipe keep whole lines
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
