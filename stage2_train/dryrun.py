"""`osp train --dry-run`: the real Trainer at real size on `meta`, with a fake process group of any layout.

    osp train --dry-run --preset osp12-93x480p --tp 2 --sp --nnodes 1 --nproc 8 --rank 3 --card-gb 80

The same `Trainer` code as a real run (model build, TP/SP plan, sequence-parallel collectives, DP
gradient reduction, ZeRO-1, AdamW, EMA, checkpoint state assembly) runs on `meta` tensors (shapes and
dtypes, no data) in one process that plays rank `--rank` (dryrun.rank) of the job's `--nnodes` x
`--nproc` ranks: torch's fake backend answers every collective and, like nccl/hccl, refuses a CPU
tensor, so a tensor on the wrong device fails here instead of at step 1 on the cluster. Nothing is read but shapes (a synthetic sample
of the preset's shape, or one sample of data.shards with dryrun.shape=shards) and nothing is written.

Everything the run holds is held here too: torch DDP builds on `meta` (its gradient buckets, which keep every
gradient alive as a bucket view between steps), ZeRO-1's AdamW shards, the DP-sharded EMA; every collective
of a step (DDP's bucket all-reduce, the TP/SP and CP collectives, the grad-norm and agreement all-reduces,
ZeRO's broadcasts) runs on `meta` under the fake group, the checkpoint save assembles its global tensors over
a `meta` device mesh, and a tensor on another device fails the dry run with one line naming the collective.

Everything reported is MEASURED on the model code as it is, not derived from formulas:
  parameters, gradients, optimizer state, EMA   bytes of the tensors the trainer holds on this rank
                                                (gradients: DDP's bucket storage when DP x CP > 1)
  activations (none / selective / full)         bytes of the storages a micro-step forward leaves alive for
                                                backward, parameters excluded
  peak                                          the high-water mark of live `meta` storages during a whole
                                                steady-state optimizer step (a dispatch-level tracker)
  host (checkpoint staging)                     host bytes an asynchronous save copies this rank's state into
  FLOPs                                         model FLOPs (3 x forward, no recompute: the MFU numerator) and
                                                hardware FLOPs (recompute, flash backward at 2.5 x forward) from
                                                osp.stage2_train.roofline, beside torch's FlopCounterMode count
                                                over a whole step ("counted": its own SDPA formulas)
Attention runs through the fused (flash-style) kernel accelerators use, so no S x S matrix is saved;
its FLOPs use torch's own SDPA formulas. Activations are in `run.precision` (`auto` means the
accelerator regime here: bf16, parameters and optimizer state fp32).
"""

from __future__ import annotations

import gc
import contextlib
import json
import sys
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from osp.common import config as C
from osp.common.errors import OspError
from osp.stage2_train import checkpoint as ckpt
from osp.stage2_train import dist as D
from osp.common.errors import ConfigError
from osp.stage2_train.checkpoint import trained_state
from osp.stage2_train.config import CHECKPOINTING, TrainConfig
from osp.stage2_train.data import Batch
from osp.stage2_train.geometry import Geometry, shard_geometry, video_tokens
from osp.stage2_train.metrics import NullMetrics
from osp.stage2_train.plan import apply_ac
from osp.stage2_train.roofline import hardware_flops, model_flops
from osp.stage2_train.trainer import Parts, Trainer, build_trainer, shard_loader
from osp.stage2_train.validation import Validation

GIB = 2**30
HEADROOM = 0.10  # card memory kept free for the CUDA/CANN context, NCCL buffers and fragmentation

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------------
# measuring tools
# ------------------------------------------------------------------------------------------------
class FusedAttention:
    """Within the block, F.scaled_dot_product_attention runs a fused kernel that has a `meta`
    implementation and the memory footprint of flash / memory-efficient attention (saves out +
    logsumexp, never the S x S probabilities that the math fallback on `meta` would). A module
    attribute swap rather than a TorchFunctionMode: activation checkpointing recomputes blocks in
    backward, on the autograd engine's thread, where a thread-local mode would not apply."""

    def __enter__(self):
        self._saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _fused_sdpa
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._saved
        return False


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    out, _ = aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p=dropout_p, is_causal=is_causal, attn_mask=attn_mask, scale=scale
    )
    return out


def flop_counter():
    """FlopCounterMode that also counts the fused attention kernel above (torch's own SDPA formulas)."""
    from torch.utils import flop_counter as fc

    def same_as(op):
        counted = fc.flop_registry[op]  # takes tensors, like the fused kernels' own entries

        def count(*args, out_val=None, **kwargs):
            return counted(*args, out_val=out_val, **kwargs)

        count._get_raw = True
        return count

    return fc.FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: same_as(aten._scaled_dot_product_flash_attention),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: same_as(
                aten._scaled_dot_product_flash_attention_backward
            ),
        },
    )


class PeakMemory(TorchDispatchMode):
    """High-water mark of live storages on one device type: every op output is registered once per
    storage and released when the storage object dies (`track` registers what existed before)."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, tensors) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        self.live[key] = st.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._add(t)
        return out


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st._cdata not in seen:
                seen.add(st._cdata)
                total += st.nbytes()
    return total


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    inner = getattr(optimizer, "optim", None)
    if inner is None:
        return []
    # AdamW's `step` counters stay on the host (not capturable/fused): only what lives beside the parameters
    return [
        v for p, s in inner.state.items() for v in s.values() if isinstance(v, torch.Tensor) and v.device == p.device
    ]


def held_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """What a rank holds between steps: parameters, buffers, AdamW state, the EMA shard and, under DDP,
    the gradients (views of its buckets, zeroed in place rather than freed)."""
    out = list(trainer.model.parameters()) + list(trainer.model.buffers()) + optimizer_tensors(trainer.optimizer)
    out += list(trainer.ema.shadow.values()) if trainer.ema is not None else []
    return out + [p.grad for p in trainer.params if p.grad is not None]


def saved_activation_bytes(trainer: Trainer, batch: Batch, checkpointing: str) -> int:
    """Bytes one micro-step's forward leaves alive for backward under `checkpointing` (none | selective |
    full): storages created during the forward that are still alive after it, i.e. tensors saved by
    autograd and the selective-recompute cache alike (parameters and earlier tensors excluded)."""
    model = trainer.model
    tracker = PeakMemory(next(model.parameters()).device.type)
    apply_ac(model, checkpointing)
    try:
        with FusedAttention(), tracker:
            loss = trainer.micro_loss(batch, trainer.step, 0)
        gc.collect()  # what only reference cycles keep alive is not held for backward
        held = tracker.current
        del loss
    finally:
        apply_ac(model, trainer.cfg.model.checkpointing)  # the run's own mode again
    return held


# ------------------------------------------------------------------------------------------------
# the trainer on meta
# ------------------------------------------------------------------------------------------------
class SyntheticLoader:
    """Endless batches of the preset's latent shape (zeros on CPU, as a ShardLoader hands them over)."""

    def __init__(self, batch_size: int, channels: int, shape: tuple, text_len: int, text_dim: int):
        self.shapes = [shape]
        self.epoch = 0
        self._batch = Batch(
            torch.zeros(batch_size, channels, *shape, dtype=torch.float16),
            torch.zeros(batch_size, text_len, text_dim, dtype=torch.float16),
            torch.ones(batch_size, text_len, dtype=torch.long),
            [f"synthetic-{i}" for i in range(batch_size)],
            list(range(batch_size)),
            [],
            shape,
        )
        self.cursor = 0

    def __next__(self) -> Batch:
        self.cursor += 1
        return self._batch

    def state_dict(self) -> dict:  # ShardLoader's fields (checkpoint state assembly reads them)
        n = self._batch.moments.shape[0]
        return {"epoch": self.epoch, "samples": self.cursor * n, "cursor": self.cursor, "seed": 0, "global_batch": n}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])

    def close(self) -> None:
        pass


def preset_geometry(cfg: TrainConfig, dit_cfg, console=None) -> Geometry:
    """The geometry of the DiT preset's own sample size (no shards read)."""
    d = dit_cfg
    shape = (int(d.sample_size_t), int(d.sample_size[0]), int(d.sample_size[1]))
    uncond = torch.zeros(C.TEXT_MAX_LENGTH, d.caption_channels)
    return Geometry(uncond, 2 * d.in_channels, frozenset({shape}), video_tokens(d, shape))


def synthetic_loader(cfg: TrainConfig, layout, geometry: Geometry) -> SyntheticLoader:
    (shape,) = geometry.shapes
    dim = int(geometry.uncond.shape[1])
    return SyntheticLoader(cfg.data.batch_size, geometry.latent_channels, shape, C.TEXT_MAX_LENGTH, dim)


class CollectiveDeviceError(OspError, RuntimeError):
    """A tensor on another device than the run's reached a collective (nccl/hccl would fail at step 1)."""


class MetaCheckpoints:
    """The dry run's checkpoint part: nothing to resume from and nothing written. `save` assembles
    this rank's state as global tensors over the (replica, tp) mesh as a real save does, refuses a local piece
    on another device than the mesh's, and measures the host copy an asynchronous save stages (`host_bytes`)."""

    resume_path = None
    pending = False

    def __init__(self, layout=None):
        self.layout = layout
        self.mesh = ckpt.make_mesh("meta", layout.world, layout.tp) if layout is not None else None
        self.host_bytes = 0

    @classmethod
    def for_run(cls, cfg, resume, layout, device) -> MetaCheckpoints:
        return cls(layout)

    def save(self, trainer) -> None:
        L, mesh = self.layout, self.mesh  # (the save's barrier carries no tensor of the run: not played here)
        assert L is not None and mesh is not None, "MetaCheckpoints.save needs the run's layout"
        to_global = ckpt._global
        device = mesh.device_type

        def checked(key, local, mesh, tp):  # DTensor.from_local would silently copy a stray piece to the device
            if local.device.type != device:
                raise CollectiveDeviceError(
                    f"checkpoint save: {key} is a {local.device.type} tensor placed on the {device} device mesh "
                    "(DTensor.from_local in checkpoint.state_dict, then DCP's save over the mesh's group); keep the "
                    "trainer's state on the run's device"
                )
            return to_global(key, local, mesh, tp)

        ckpt._global = checked
        try:
            sd = ckpt.state_dict(
                model=trainer.model,
                ema=trainer.ema,
                optimizer=trainer.optimizer,
                counters=trainer.counters_state(),
                mesh=mesh,
                tp=L.tp,
                rank=L.rank,
            )
        finally:
            ckpt._global = to_global
        # _CopyStager: one host copy of every local piece (counters, RNG state and AdamW step counts are host
        # tensors by design)
        self.host_bytes = tensor_bytes(v.to_local() if isinstance(v, DTensor) else v for v in sd.values())

    def poll(self) -> None:
        pass

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


_COLLECTIVE_FILES = ("distributed_c10d.py", "c10d_logger.py")


def collective_error(e: BaseException) -> CollectiveDeviceError | None:
    """The fake group's refusal of a non-`meta` tensor as one line naming the collective and its caller
    (from the traceback, or from the frames a C++ boundary such as DDP's reducer quotes in the message)."""
    text = str(e)
    if "No backend type associated with device type" not in text:
        return None
    device = text.split("No backend type associated with device type", 1)[1].split()[0].strip(".,")
    frames: list[tuple[str, str]] = []
    tb = e.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    if "At:" in text:  # pybind11 quotes the Python frames of an error raised in a callback, innermost first
        quoted = []
        for line in text.split("At:", 1)[1].splitlines():
            line = line.strip()
            if "(" in line and "):" in line:
                quoted.append((line.split("(", 1)[0], line.rsplit(": ", 1)[-1]))
        frames += quoted[::-1]
    name, caller = "a collective", ""
    for i in range(len(frames) - 1, -1, -1):
        f, fn = frames[i]
        if f.endswith(_COLLECTIVE_FILES) and fn != "wrapper":
            name = f"torch.distributed.{fn}"
            outer = [fr for fr in frames[:i] if "/torch/" not in fr[0]]
            if outer:
                caller = f" (called from {outer[-1][1]} in {outer[-1][0].rsplit('/', 1)[-1]})"
            break
    return CollectiveDeviceError(
        f"dry run: a {device} tensor reached {name}{caller}: No backend type associated with device type {device}; "
        "nccl/hccl refuse it at step 1, so every tensor of a collective must live on the run's device"
    )


def meta_host_sync(values: torch.Tensor) -> list[float]:
    return [0.0] * values.numel()  # meta tensors have no values: finite, no stop request, a full step


def meta_parts(synthetic: bool) -> Parts:
    """The Trainer's parts for a dry run: the preset's geometry and synthetic batches (or one sample
    of the shards), no run folder, no checkpoints, no host sync."""
    return Parts(
        geometry=preset_geometry if synthetic else shard_geometry,
        loader=synthetic_loader if synthetic else shard_loader,
        checkpoints=MetaCheckpoints.for_run,
        metrics=NullMetrics.for_run,
        host_sync=meta_host_sync,
        validation=Validation.for_dry_run,  # [validate] on: one denoising step of the sampling, measured
    )


def _quiet_console() -> Console:
    return Console(quiet=True)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
@dataclass
class DryRunReport:
    preset: str
    layout: dict
    checkpointing: str
    batch_size: int
    tokens: int
    params: int
    grads: int
    optimizer: int
    ema: int
    activations: dict  # checkpointing mode -> bytes saved for backward per micro-step
    peak: int
    step_flops: float  # hardware FLOPs counted by FlopCounterMode over one step (torch's own SDPA formulas)
    checkpoint_state: int  # bytes of model + EMA + optimizer state this rank contributes to a checkpoint
    card_gb: float
    seconds: float
    suggestions: list = field(default_factory=list)
    precision: str = "bf16"  # dtype of the activations (the model's compute_dtype)
    validation_peak: int = 0  # the high-water mark of a validation step ([validate] on; EMA swap + sampling)
    model_flops: float = 0.0  # 3 x forward, no recompute (the MFU numerator), per rank per step
    hardware_flops: float = 0.0  # + recompute, flash attention's backward at 2.5 x forward (HFU)
    host_staging: int = 0  # host bytes an asynchronous checkpoint save stages on this rank
    ddp_buckets: bool = False  # gradients held in DDP's buckets (DP x CP > 1)
    lora: str = ""  # a LoRA run: rank, trainable parameters, the frozen base's dtype

    @property
    def usable(self) -> float:
        return self.card_gb * (1 - HEADROOM) * GIB

    @property
    def fits(self) -> bool:
        return max(self.peak, self.validation_peak) <= self.usable

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "fits": self.fits}, indent=1)

    def table(self) -> str:
        L = self.layout
        unit, scale = ("GiB", GIB) if self.peak >= GIB else ("MiB", 2**20)
        g = lambda b: f"{b / scale:9.2f}"  # noqa: E731
        rows = [
            f"dry run: {self.preset}  world {L['world']} = tp {L['tp']} x cp {L.get('cp', 1)} x dp {L['dp']}  sp {L['sp']}  "
            f"zero1 {L['zero1']}  rank {L['rank']} (tp rank {L['tp_rank']}, cp rank {L.get('cp_rank', 0)}, dp rank {L['dp_rank']})  "
            f"batch {self.batch_size}  "
            f"{self.tokens} video tokens/sample  checkpointing {self.checkpointing}",
            f"{'per rank':<44}{unit:>9}",
            f"{'parameters':<44}{g(self.params)}",
            f"{'gradients' + (' (DDP buckets)' if self.ddp_buckets else ''):<44}{g(self.grads)}",
            f"{'optimizer state (AdamW m, v)':<44}{g(self.optimizer)}",
            f"{'EMA':<44}{g(self.ema)}",
        ]
        for mode, b in self.activations.items():
            mark = "  <- this run" if mode == self.checkpointing else ""
            rows.append(f"{'activations saved for backward, ' + mode:<44}{g(b)}{mark}")
        rows += [
            f"{'peak (measured over one optimizer step)':<44}{g(self.peak)}",
            *(
                [f"{'peak of a validation step (EMA swap, CFG)':<44}{g(self.validation_peak)}"]
                if self.validation_peak
                else []
            ),
            f"{'checkpoint state written by this rank':<44}{g(self.checkpoint_state)}",
            f"{'host: asynchronous checkpoint staging':<44}{g(self.host_staging)}",
            f"step FLOPs on this rank: model {self.model_flops / 1e12:,.4g} TFLOP (3 x forward, no recompute: MFU); "
            f"hardware {self.hardware_flops / 1e12:,.4g} TFLOP (recompute + flash backward 2.5 x forward: HFU); "
            f"hardware counted {self.step_flops / 1e12:,.4g} TFLOP (FlopCounterMode, torch's SDPA formulas)",
            f"activations in {self.precision} (run.precision; auto = the accelerator regime, bf16)",
        ]
        if self.lora:
            rows.append(f"LoRA: {self.lora}")
        budget = f"{self.card_gb:g} GiB card, {HEADROOM:.0%} kept free -> {self.usable / GIB:.1f} GiB usable"
        top = max(self.peak, self.validation_peak)  # a validation step, when on, may set the high-water mark
        host = f"; host {self.host_staging / GIB:.3g} GiB per rank for checkpoint staging"
        if self.fits:
            rows.append(f"verdict: FITS  peak {top / GIB:.3g} GiB on a {budget}{host}")
        else:
            rows.append(f"verdict: DOES NOT FIT  peak {top / GIB:.3g} GiB on a {budget}; try:")
            rows += [f"  - {s}" for s in self.suggestions] or ["  - a card with more memory"]
        rows.append(f"({self.seconds:.1f} s)")
        return "\n".join(rows)


def _suggestions(r: DryRunReport, cfg: TrainConfig, heads: int) -> list[str]:
    """What to change, each with the peak it predicts from this run's measured parts (estimates)."""
    out, L = [], r.layout
    usable = r.usable
    if r.checkpointing == "none" and "full" in r.activations:
        est = r.peak - (r.activations["none"] - r.activations["full"]) * cfg.data.batch_size
        out.append(
            f"--checkpointing full (model.checkpointing=full): peak ~{est / GIB:.1f} GiB (estimate)"
            + ("" if est <= usable else ", not enough alone")
        )
    if not cfg.parallel.zero1 and L["dp"] > 1:
        est = r.peak - r.optimizer * (1 - 1 / L["dp"])
        out.append(f"parallel.zero1=true (AdamW state over {L['dp']} DP ranks): peak ~{est / GIB:.1f} GiB (estimate)")
    tp2 = L["tp"] * 2
    if heads % tp2 == 0 and L["world"] % tp2 == 0:
        out.append(f"--tp {tp2} --sp (rerun this dry run to measure it)")
    elif heads % tp2 == 0:
        out.append(f"--tp {tp2} --sp with a world size divisible by {tp2} (rerun this dry run to measure it)")
    if cfg.data.batch_size > 1:
        out.append("data.batch_size=1 with optim.grad_accum to keep the global batch")
    return out


def _lora_line(trainer: Trainer) -> str:
    params = list(trainer.model.parameters())
    n = sum(p.numel() for p in params if p.requires_grad)
    base = {str(p.dtype).removeprefix("torch.") for p in params if not p.requires_grad}
    return (
        f"rank {trainer.cfg.lora.rank}, {n:,} trainable adapter parameters (fp32; gradients, AdamW, EMA and checkpoints "
        f"hold these only), base frozen in {', '.join(sorted(base))}"
    )


@contextlib.contextmanager
def ddp_on_meta():
    """torch DDP on `meta` tensors: its two steps that read values on the host are skipped, the parameter
    shape check across ranks (one process plays every rank: the shapes agree by construction) and the
    one-time bucket rebuild in gradient-ready order after the first step (it exchanges bucket indices by
    value; the first assignment holds the same gradients in buckets of the same capacity)."""
    import torch.nn.parallel.distributed as ddp_module
    from torch._C._distributed_c10d import Reducer

    check = "_verify_param_shape_across_processes"  # a private helper of torch's DDP module
    verify, rebuild = getattr(ddp_module, check), Reducer._rebuild_buckets
    setattr(ddp_module, check, lambda *a, **k: None)
    Reducer._rebuild_buckets = lambda self: False
    try:
        yield
    finally:
        setattr(ddp_module, check, verify)
        Reducer._rebuild_buckets = rebuild


@contextlib.contextmanager
def fake_world(world: int, rank: int):
    """Be rank `rank` of `world` on `meta`: the fake process group, and megatron's buffers on `meta`
    (the CPU shim, forced even where an accelerator exists and undone afterwards). A collective that
    meets a tensor of another device fails with one line naming it (`CollectiveDeviceError`)."""
    from osp.common import megatron_cpu

    D.init_fake(world, rank)
    shim_was_on = megatron_cpu.is_applied()
    megatron_cpu.apply(force=True)  # megatron's CUDA entry points -> the dry run's device
    megatron_cpu.use_device("meta")
    try:
        with ddp_on_meta():
            yield
    except RuntimeError as e:
        err = collective_error(e)
        if err is None:
            raise
        raise err from None
    finally:
        D.shutdown()
        megatron_cpu.use_device("cpu")
        if not shim_was_on and not megatron_cpu.needed():
            megatron_cpu.undo()  # an accelerator machine gets its torch.cuda back


def dry_run(cfg: TrainConfig, world: int, rank: int, card_gb: float, shards: str | None = None) -> DryRunReport:
    """Run the Trainer's code path as rank `rank` of `world` on `meta`; returns the measured report."""
    t0 = time.perf_counter()
    cfg.run.device = "meta"
    cfg.model.init = ""
    cfg.data.num_workers = 0
    cfg.run.tensorboard = False
    if shards:
        cfg.data.shards = shards
    trainer = None
    with fake_world(world, rank):
        try:
            trainer = build_trainer(cfg, parts=meta_parts(synthetic=not shards), console=_quiet_console())
            L = trainer.layout
            batch = next(trainer.loader)
            tokens = video_tokens(trainer.dit_cfg, batch.shape)
            d, text_len, batch_size = trainer.dit_cfg, int(batch.text.shape[1]), cfg.data.batch_size
            accum = cfg.optim.grad_accum
            activations = {m: saved_activation_bytes(trainer, batch, m) for m in CHECKPOINTING}

            grads = {}
            zero_grad = trainer.optimizer.zero_grad

            def counting_zero_grad():
                grads["bytes"] = tensor_bytes(p.grad for p in trainer.params if p.grad is not None)
                zero_grad()

            trainer.optimizer.zero_grad = counting_zero_grad
            with FusedAttention(), flop_counter() as flops:  # step 1 creates the optimizer state
                trainer.train_step()
            peak = PeakMemory("meta")
            peak.track(held_tensors(trainer))  # under DDP the gradients stay alive in its buckets
            with FusedAttention(), peak:  # a steady-state step: the peak with optimizer state in place
                trainer.train_step()
            trainer.checkpoints.save(trainer)  # the save's device side; measures the host staging

            validation_peak = 0
            if trainer.validation is not None:  # the sampling with the training state in place
                vpeak = PeakMemory("meta")
                vpeak.track(held_tensors(trainer))
                with FusedAttention(), vpeak:
                    trainer.validation.run(trainer)
                validation_peak = vpeak.peak

            ckpt_state = trained_state(trainer.model)  # a LoRA run saves its adapters only
            opt_sd = trainer.optimizer.state_dict()
            json.dumps(trainer.counters_state())  # the checkpoint's state.* integers
            ckpt_bytes = tensor_bytes(
                list(ckpt_state.values())
                + list(trainer.ema.shadow.values() if trainer.ema else [])
                + [v for s in opt_sd["optim"].get("state", {}).values() for v in s.values()]
            )
            report = DryRunReport(
                preset=cfg.model.preset,
                layout={
                    "world": L.world,
                    "rank": L.rank,
                    "tp": L.tp,
                    "cp": L.cp,
                    "dp": L.dp,
                    "sp": L.sp,
                    "tp_rank": L.tp_rank,
                    "cp_rank": L.cp_rank,
                    "dp_rank": L.dp_rank,
                    "zero1": cfg.parallel.zero1,
                },
                checkpointing=cfg.model.checkpointing,
                batch_size=cfg.data.batch_size,
                tokens=tokens,
                params=tensor_bytes(trainer.model.parameters()),
                grads=grads.get("bytes", 0),
                optimizer=tensor_bytes(optimizer_tensors(trainer.optimizer)),
                ema=tensor_bytes(trainer.ema.shadow.values()) if trainer.ema is not None else 0,
                activations=activations,
                peak=peak.peak,
                step_flops=float(flops.get_total_flops()),
                checkpoint_state=ckpt_bytes,
                card_gb=card_gb,
                seconds=0.0,
                precision=str(trainer.model.compute_dtype).removeprefix("torch."),
                validation_peak=validation_peak,
                model_flops=accum * model_flops(d, tokens, text_len, batch_size, L.tp, L.cp),
                hardware_flops=accum
                * hardware_flops(d, tokens, text_len, batch_size, L.tp, L.cp, checkpointing=cfg.model.checkpointing),
                host_staging=trainer.checkpoints.host_bytes,
                ddp_buckets=trainer.dp.ddp is not None,
                lora=_lora_line(trainer) if cfg.lora.enabled else "",
            )
            report.suggestions = _suggestions(report, cfg, trainer.dit_cfg.num_attention_heads)
            report.seconds = time.perf_counter() - t0
            return report
        finally:
            if trainer is not None:
                trainer.close()


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def build_config(
    config: str | None,
    overrides: list[str],
    preset: str | None,
    tp: int | None,
    sp: bool | None,
    checkpointing: str | None,
    cp: int | None = None,
) -> TrainConfig:
    """The run's config (file + overrides) with layout values applied last, as `osp train`'s flags are
    (a TP size of 1 without an SP choice turns SP off: benches sweep TP over one config)."""
    if tp == 1 and sp is None:
        sp = False
    flags = {
        "model.preset": preset,
        "parallel.tp": tp,
        "parallel.sp": sp,
        "parallel.cp": cp,
        "model.checkpointing": checkpointing,
    }
    return TrainConfig.load(config, list(overrides), flags=flags)


def run(cfg: TrainConfig, *, json_out: bool = False) -> int:
    """`osp train --dry-run`: play rank dryrun.rank of the job's launch.nnodes x launch.nproc ranks on
    `meta`; print the report (a table, or JSON); exit code 0 fits, 2 does not fit, 1 a user error."""
    from osp.common.errors import OspError, one_line

    world, rank = cfg.world, cfg.dryrun.rank
    try:
        if not 0 <= rank < world:
            raise ConfigError(
                f"dryrun.rank={rank} (--rank) is outside the job's {world} ranks "
                f"(launch.nnodes {cfg.launch.nnodes} x {cfg.nproc} per node); pick a rank in [0, {world - 1}]"
            )
        shards = cfg.data.shards if cfg.dryrun.shape == "shards" else None
        with warnings.catch_warnings():  # library notices (no Transformer Engine, deprecated c10d names) are noise here
            warnings.simplefilter("ignore")
            report = dry_run(cfg, world, rank, cfg.dryrun.card_gb, shards)
    except (ValueError, FileNotFoundError, OspError) as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 1
    print(report.to_json() if json_out else report.table())
    return 0 if report.fits else 2
