"""Training checkpoints with torch.distributed.checkpoint (DCP): resharding, asynchronous, atomic.

    <run>/checkpoints/step-0000100/
        .metadata, __<rank>_0.distcp   DCP: every tensor below as ONE global tensor (chunks + offsets)
        config.json                    the DiT config (diffusers field names)
        trainer.json                   step, saved layout, the run's config (for people and tools)
    <run>/checkpoints/latest           the name of the newest complete checkpoint

Keys (released/diffusers names: what `model.state_dict()` returns at any TP size, TP-split by
`osp.common.convert.tp_split_dim`):

    model.<key>                 weights            DTensor on the (replica, tp) mesh: Shard(split dim) or Replicate
    ema.<key>                   EMA weights        same placement
    optim.exp_avg.<key>         AdamW moments      same placement, written by the DP rank that owns them (ZeRO-1)
    optim.exp_avg_sq.<key>                          or deduplicated over DP replicas (plain AdamW)
    optim.step.<key>            AdamW step count   0-dim tensor
    state.<name>                counters           int64 0-dim: step, ema_updates, loader_epoch, loader_samples, ...
    rng.<kind>.rank<r>          RNG state of rank r (restored when the new run has that rank)

Nothing depends on the saved layout: a resume at another DP size, TP size, SP or ZeRO-1 setting reads
the slices it needs (DCP's planner), the optimizer state goes to whichever rank owns the parameter
now. The data position is the number of samples consumed in the epoch (`ShardLoader.load_state_dict`).

Publication: every rank writes into `checkpoints/.tmp-step-0000100/`; when DCP has finished (its
coordinator writes `.metadata` after all ranks' data), rank 0 adds config.json + trainer.json,
renames the folder to its final name and then rewrites `latest` (temp file + rename). A killed save
therefore never becomes `latest`. With `async_save` the write runs in a background thread on its own
gloo group while training continues; the state is copied first (host copy, the only stall).
Multi-node runs need the run directory on a shared filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor, Replicate, Shard

from osp.common.convert import TRAINING_CONFIG_FILE, TRAINING_META_FILE, tp_split_dim
from osp.common.errors import MissingFileError, OspError

LATEST = "latest"
TRAINER_FILE = TRAINING_META_FILE
FORMAT = "torch-dcp"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
RNG_KINDS = ("torch", "cuda")
SLOW_SAVE_ENV = "OSP_TEST_SLOW_SAVE_S"  # tests: seconds each rank's writer sleeps before writing its data


class CheckpointError(OspError, ValueError):
    """A checkpoint that cannot be resumed as asked (one line: the folder, the setting, the fix)."""


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------
# global tensors of this rank's local pieces
# ------------------------------------------------------------------------------------------------
def make_mesh(device_type: str, world: int, tp: int):
    """(replica, tp) device mesh over the world; TP ranks are contiguous (megatron's order), every
    other dimension (DP, CP) replicates. Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("replica", "tp"))


def _placements(key: str, tp: int):
    dim = tp_split_dim(key) if tp > 1 else None
    return [Replicate(), Replicate() if dim is None else Shard(dim)]


def _global(key: str, local: torch.Tensor, mesh, tp: int) -> DTensor:
    return DTensor.from_local(local, mesh, _placements(key, tp), run_check=False)


def _tensor_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _adamw(optimizer):
    """The torch optimizer holding this rank's AdamW state (None when this rank owns no parameter)."""
    return getattr(optimizer, "optim", None)


def _owned(optimizer, model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter whose AdamW state lives on this rank."""
    opt = _adamw(optimizer)
    if opt is None:
        return []
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [(name_of[id(p)], p) for g in opt.param_groups for p in g["params"]]


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def state_dict(*, model, ema, optimizer, counters: dict[str, int], mesh, tp: int, rank: int) -> dict:
    """This rank's view of the training state as DCP global tensors (sharing storage with the live
    tensors: load fills them in place)."""
    sd: dict = {}
    for k, v in _tensor_state(model).items():
        sd[f"model.{k}"] = _global(k, v, mesh, tp)
    if ema is not None:
        for k, v in ema.shadow.items():
            sd[f"ema.{k}"] = _global(k, v, mesh, tp)
    opt = _adamw(optimizer)
    for name, p in _owned(optimizer, model):
        assert opt is not None  # _owned is empty without it
        st = opt.state.get(p) or {}
        if "exp_avg" not in st:
            continue  # no optimizer step yet (or a skipped one)
        for m in ADAM_MOMENTS:
            sd[f"optim.{m}.{name}"] = _global(name, st[m], mesh, tp)
        sd[f"optim.step.{name}"] = st["step"]
    for k, v in counters.items():
        sd[f"state.{k}"] = torch.tensor(int(v), dtype=torch.int64)
    for kind, t in _rng_state().items():
        sd[f"rng.{kind}.rank{rank:05d}"] = t
    return sd


class _CopyStager(AsyncStager):
    """Stage = a host copy of every local piece (so training may change the live tensors at once)."""

    _synchronize_after_execute = False

    def stage(self, sd: dict) -> dict:
        out = {}
        for k, v in sd.items():
            if isinstance(v, DTensor):
                local = v.to_local().detach().to("cpu", copy=True)
                out[k] = DTensor.from_local(local, v.device_mesh, v.placements, run_check=False)
            else:
                out[k] = v.detach().to("cpu", copy=True)
        return out

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _writer(path: Path):
    """DCP's file writer; tests may make it pause before writing (to kill a save mid-way)."""
    delay = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
    if not delay:
        return FileSystemWriter(str(path))

    class _SlowWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            time.sleep(delay)
            return super().write_data(plan, planner)

    return _SlowWriter(str(path))


# ------------------------------------------------------------------------------------------------
# save + publish
# ------------------------------------------------------------------------------------------------
class Checkpointer:
    """Saves (optionally asynchronously) and publishes training checkpoints of one run."""

    def __init__(self, run_dir: Path, *, mesh, tp: int, rank: int, is_main: bool, async_save: bool):
        self.ckroot = Path(run_dir) / "checkpoints"
        self.mesh, self.tp, self.rank, self.is_main = mesh, tp, rank, is_main
        self.async_save = async_save
        # DCP's own collectives run on a separate gloo group: a background save never interleaves
        # with the training collectives (and gloo serves CPU staging on any accelerator)
        self.group = cast("dist.ProcessGroup", dist.new_group(backend="gloo"))  # every rank is a member
        if is_main and self.ckroot.is_dir():  # leftovers of saves killed before they were published
            for stale in self.ckroot.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.pending: tuple[Future, Path, Path, dict] | None = None

    def save(self, step: int, *, model, ema, optimizer, counters: dict[str, int], meta: dict, dit_config) -> Path:
        """Collective over the world (every rank at the same step). Returns the final folder name;
        with async saving it is published later (`poll`, `wait`)."""
        self.wait()  # at most one save in flight
        final, tmp = self.ckroot / step_name(step), self.ckroot / f".tmp-{step_name(step)}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            dit_config.to_json(tmp / TRAINING_CONFIG_FILE)
        dist.barrier()
        sd = state_dict(
            model=model, ema=ema, optimizer=optimizer, counters=counters, mesh=self.mesh, tp=self.tp, rank=self.rank
        )
        info = {"format": FORMAT, **meta, "step": step}
        if self.async_save:
            fut = dcp_async_save(sd, storage_writer=_writer(tmp), process_group=self.group, async_stager=_CopyStager())
            assert isinstance(fut, Future)  # a stager that returns the staged dict itself: the upload future
            self.pending = (fut, tmp, final, info)
        else:
            dcp_save(sd, storage_writer=_writer(tmp), process_group=self.group)
            self._publish(tmp, final, info)
        return final

    def poll(self) -> None:
        """Publish a finished background save (rank 0); cheap, call it every step."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is written, then publish it."""
        if self.pending is None:
            return
        fut, tmp, final, info = self.pending
        self.pending = None
        fut.result()  # re-raises a failed write
        self._publish(tmp, final, info)

    def _publish(self, tmp: Path, final: Path, info: dict) -> None:
        # DCP's coordinator (rank 0 of self.group = global rank 0) writes .metadata only after
        # every rank reported its data written: on rank 0 the folder is complete here
        if not self.is_main:
            return
        (tmp / TRAINER_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if final.exists():  # a re-run of the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.ckroot)
        latest_tmp = self.ckroot / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.ckroot / LATEST)
        _fsync(self.ckroot)

    def close(self) -> None:
        self.wait()


# ------------------------------------------------------------------------------------------------
# find + load
# ------------------------------------------------------------------------------------------------
def find(run_dir: Path, resume: str) -> Path | None:
    """`auto` -> the latest complete checkpoint of the run (None if there is none); else a path to a
    step folder or a run folder."""
    if not resume:
        return None
    if resume == "auto":
        ckroot = Path(run_dir) / "checkpoints"
        latest = ckroot / LATEST
        if not latest.is_file():
            return None
        path = ckroot / latest.read_text().strip()
    else:
        path = Path(resume)
        if (path / "checkpoints" / LATEST).is_file():
            path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    if not (path / TRAINER_FILE).is_file():
        raise MissingFileError(
            f"{path}: not a complete training checkpoint (no {TRAINER_FILE}); pass --resume auto or a step-XXXXXXX folder"
        )
    if read_trainer_state(path).get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a resumable checkpoint ({TRAINER_FILE} has no format {FORMAT!r}); start a new run with "
            f"model.init={path / 'model'} (weights only)"
        )
    return path


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_FILE).read_text())


def saved_keys(path: Path) -> dict:
    """Key -> DCP metadata (global size and dtype for tensors) of a checkpoint."""
    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def load(path: Path, *, model, ema, optimizer, mesh, tp: int, rank: int) -> dict[str, int]:
    """Fill model, EMA and the AdamW state this rank owns from `path`, resharded to this layout, and
    restore this rank's RNG if the checkpoint has it. Returns the `state.*` counters. Collective."""
    path = Path(path)
    have = saved_keys(path)
    sd = {}
    for k, v in _tensor_state(model).items():
        sd[f"model.{k}"] = _global(k, v, mesh, tp)
    if ema is not None:
        if not any(k.startswith("ema.") for k in have):
            raise CheckpointError(f"{path}: has no EMA weights but optim.ema_decay > 0; resume with optim.ema_decay=0")
        for k, v in ema.shadow.items():
            sd[f"ema.{k}"] = _global(k, v, mesh, tp)
    missing = sorted(k for k in sd if k not in have)
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(missing)} tensors of this model ({', '.join(missing[:4])} ...); "
            "resume with the model.preset / config.json it was trained with"
        )
    opt, moments = _adamw(optimizer), {}
    for name, p in _owned(optimizer, model):
        if f"optim.exp_avg.{name}" not in have:
            continue
        st = {m: torch.zeros_like(p, memory_format=torch.contiguous_format) for m in ADAM_MOMENTS}
        st["step"] = torch.zeros((), dtype=have[f"optim.step.{name}"].properties.dtype)
        for m in ADAM_MOMENTS:
            sd[f"optim.{m}.{name}"] = _global(name, st[m], mesh, tp)
        sd[f"optim.step.{name}"] = st["step"]
        moments[p] = st
    counters = {k[len("state.") :]: torch.zeros((), dtype=torch.int64) for k in have if k.startswith("state.")}
    sd.update({f"state.{k}": v for k, v in counters.items()})
    rng = {kind: f"rng.{kind}.rank{rank:05d}" for kind in RNG_KINDS if f"rng.{kind}.rank{rank:05d}" in have}
    rng_t = {kind: torch.zeros(have[key].size, dtype=have[key].properties.dtype) for kind, key in rng.items()}
    sd.update({rng[kind]: t for kind, t in rng_t.items()})

    dcp_load(sd, checkpoint_id=str(path))

    for p, st in moments.items():
        assert opt is not None  # moments come from _owned, empty without it
        opt.state[p] = st
    if "torch" in rng_t:
        torch.set_rng_state(rng_t["torch"])
    if "cuda" in rng_t and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng_t["cuda"])
    return {k: int(v) for k, v in counters.items()}


def load_weights(path: str | Path, *, model, mesh, tp: int, prefer_ema: bool = True) -> None:
    """Only the weights (EMA if present and preferred) of a training checkpoint into `model`, resharded:
    `model.init=<run>/checkpoints/step-*` starts a new run from them. Collective."""
    path = Path(path)
    have = saved_keys(path)
    prefix = "ema." if prefer_ema and any(k.startswith("ema.") for k in have) else "model."
    sd = {f"{prefix}{k}": _global(k, v, mesh, tp) for k, v in _tensor_state(model).items()}
    missing = sorted(k for k in sd if k not in have)
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(missing)} tensors of this model ({', '.join(missing[:4])} ...); "
            "use the model.preset / config.json it was trained with"
        )
    dcp_load(sd, checkpoint_id=str(path))
