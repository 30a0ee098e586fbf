"""Training checkpoints: everything needed to continue bit-exactly, written atomically.

    <run>/checkpoints/step-0000100/
        model/                    osp DiT checkpoint (layout of osp.common.convert): TP-sharded
                                  safetensors of the weights and of the EMA, each TP rank writing its own
        optim-rank00000.pt        AdamW state of each rank that owns some (tensors + numbers only;
                                  read back with torch.load(weights_only=True))
        rng-rank00000.pt          torch (+ accelerator) RNG states per rank
        trainer.json              step, loader position, EMA update count, counters, layout, config
    <run>/checkpoints/latest      the name of the newest complete checkpoint

All ranks write into `checkpoints/.tmp-step-0000100/`; after a barrier rank 0 renames it to its final
name and then rewrites `latest` (temp file + rename), so a killed run never leaves a half checkpoint
that `--resume auto` would pick. Multi-node runs need the run directory on a shared filesystem.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from osp.common.convert import (
    finish_dit_checkpoint, load_dit_shards, merge_state_dicts, read_checkpoint_meta, split_state_dict, state_dict_dtypes,
    write_dit_shard,
)
from osp.common.errors import MissingFileError

LATEST = "latest"
TRAINER_FILE = "trainer.json"


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(run_dir: Path, step: int, *, model, ema, optimizer, trainer_state: dict, layout) -> Path:
    """Collective over the world: every rank calls it at the same step."""
    ckroot = Path(run_dir) / "checkpoints"
    final = ckroot / step_name(step)
    tmp = ckroot / f".tmp-{step_name(step)}"
    if layout.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    # Each TP rank of the first data-parallel replica writes its own shard: no rank ever holds the
    # full model (2.7 B parameters would be ~11 GB of host memory per rank).
    ema_full = ema.gathered(model) if ema is not None else None  # collective over DP (EMA sharded over DP)
    if layout.dp_rank == 0 and layout.cp_rank == 0:  # CP replicas hold the same weights
        write_dit_shard(tmp / "model", layout.tp_rank, layout.tp, model.state_dict(), ema_full)
    dist.barrier()
    if layout.is_main:
        finish_dit_checkpoint(tmp / "model", model.config, layout.tp, ema=ema is not None,
                              dtype=state_dict_dtypes(model.state_dict()), extra={"step": step})
    opt_sd = optimizer.state_dict()
    if opt_sd.get("zero1") or layout.dp_rank == 0:  # without ZeRO the DP replicas hold the same state
        torch.save(opt_sd, tmp / f"optim-rank{layout.rank:05d}.pt")
    torch.save(rng_state(), tmp / f"rng-rank{layout.rank:05d}.pt")
    if layout.is_main:
        (tmp / TRAINER_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True) + "\n")
    dist.barrier()
    if layout.is_main:
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if final.exists():  # a re-run of the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckroot)
        latest_tmp = ckroot / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, ckroot / LATEST)
        _fsync(ckroot)
    dist.barrier()
    return final


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
        raise MissingFileError(f"{path}: not a complete training checkpoint (no {TRAINER_FILE}); pass --resume auto or a step-XXXXXXX folder")
    return path


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / TRAINER_FILE).read_text())


def load_weights(path: Path, tp: int, tp_rank: int) -> tuple[dict, dict | None]:
    """(full model state dict, this TP rank's EMA shard or None) of a training checkpoint."""
    model_dir = Path(path) / "model"
    _, shards, meta = load_dit_shards(model_dir, prefer_ema=False)
    full = merge_state_dicts(shards)
    ema_local = None
    if read_checkpoint_meta(model_dir).get("ema"):
        _, ema_shards, _ = load_dit_shards(model_dir, prefer_ema=True)
        if len(ema_shards) == tp:
            ema_local = ema_shards[tp_rank]
        else:
            ema_local = split_state_dict(merge_state_dicts(ema_shards), tp)[tp_rank]
    return full, ema_local


def load_optimizer(path: Path, rank: int, dp_rank: int, zero1: bool) -> dict:
    f = Path(path) / f"optim-rank{rank if zero1 else _dp0_rank(rank, dp_rank):05d}.pt"
    if not f.is_file():
        raise MissingFileError(f"{f}: missing optimizer state; resume with the same parallel layout (tp, data-parallel size, zero1)")
    return torch.load(f, map_location="cpu", weights_only=True)


def _dp0_rank(rank: int, dp_rank: int) -> int:
    """Global rank of the DP-rank-0 replica of this rank's TP x CP position (tp-cp-dp rank order)."""
    from megatron.core import parallel_state as ps

    return rank - dp_rank * ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size()


def load_rng(path: Path, rank: int) -> dict | None:
    f = Path(path) / f"rng-rank{rank:05d}.pt"
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None
