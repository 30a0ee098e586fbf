"""Peak host memory per rank to build the DiT and load its weights: meta + slices vs the full build.

Three ways to get a TP=2 (+SP) training model on each of 2 gloo ranks, each in fresh processes:
  full     the previous trainer: build the full fp32 model on every rank, read the whole checkpoint
           (merge its TP shards), apply the TP plan, load the local shard
  slices   build on meta, apply the plan, to_empty this rank's shard, read only its slices of the
           released safetensors (safe_open(...).get_slice)       [osp.stage2_train.checkpoint]
  dcp      same model, filled from a torch DCP training checkpoint (resharded reads)
Peak = VmHWM of the rank after the load minus its VmRSS after the imports (torch, megatron).
Also printed: the exact parameter bytes (full model, one rank's shard).

The real OpenSoraT2V width (24 heads x 96 = 2304, mT5-XXL captions) with --layers of its 32 blocks:
2.77 B parameters (11 GB fp32 per rank for the full build) do not fit next to other work on this
24 GiB machine; the per-layer bytes scale linearly, so the ratio holds at 32 layers.

Usage: python bench/ckpt_memory.py [--layers 4] [--preset osp12-93x480p]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

TARGET = 0.6  # slices / full peak per rank at TP=2, 4 layers (the replicated embeddings weigh more at fewer layers)


def _status_gb(field: str) -> float:
    """VmRSS / VmHWM of this process (per address space: unlike ru_maxrss, not inherited across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(rank: int, port: int, mode: str, cfg_json: str, folder: str, dcp_dir: str, out: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from osp.common import megatron_cpu

    megatron_cpu.apply()
    from megatron.core import parallel_state as ps

    from osp.common.models.dit import DiTConfig, build_dit
    from osp.stage2_train import build
    from osp.stage2_train import checkpoint as ckpt
    from osp.stage2_train.dist import current_layout
    from osp.stage2_train.parallel import load_full_state_dict, parallelize

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    cfg = DiTConfig.from_json(cfg_json)
    layout = current_layout(True)
    mesh = ckpt.make_mesh("cpu", 2, 2)
    try:  # reset the peak to the current RSS (Linux >= 4.0), so the imports' transient peak is not counted
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _status_gb("VmRSS")
    t0 = time.perf_counter()
    if mode == "full":
        from osp.stage2_train.checkpoint import load_dit_checkpoint

        model = build_dit(cfg, dtype=torch.float32)
        _, full = load_dit_checkpoint(folder)
        model = parallelize(model, layout)
        load_full_state_dict(model, full, folder)
        del full
    else:
        model = build.materialize(build.build_local(cfg, layout), "cpu")
        if mode == "slices":
            ckpt.fill_from_folder(model, folder, 2, rank)
            if dcp_dir:  # leave a training checkpoint (weights only) for the dcp mode
                import torch.distributed.checkpoint as dcp

                dcp.save(
                    {f"model.{k}": ckpt._global(k, v, mesh, 2) for k, v in ckpt._tensor_state(model).items()},
                    checkpoint_id=dcp_dir,
                )
        else:
            ckpt.load_weights(dcp_dir, model=model, mesh=mesh, tp=2, prefer_ema=False)
    dt = time.perf_counter() - t0
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = _status_gb("VmHWM") - base
    stall = (0.0, 0.0)
    if mode == "dcp":  # how long a save blocks the train loop: synchronous DCP save vs async_save (host copy)
        import torch.distributed.checkpoint as dcp

        sd = {f"model.{k}": ckpt._global(k, v, mesh, 2) for k, v in ckpt._tensor_state(model).items()}
        group = dist.new_group(backend="gloo")
        t1 = time.perf_counter()
        dcp.save(sd, checkpoint_id=dcp_dir + "-sync", process_group=group)
        t2 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=dcp_dir + "-async", process_group=group, async_stager=ckpt._CopyStager())
        t3 = time.perf_counter()
        fut.result()
        stall = (t2 - t1, t3 - t2)
    Path(out, f"{mode}-{rank}.txt").write_text(f"{peak} {local} {dt} {stall[0]} {stall[1]}\n")
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--preset", default="osp12-93x480p")
    args = p.parse_args(argv)
    from osp.stage2_train.state_dict_adapter import DIFFUSERS_WEIGHTS
    from osp.common.models.dit import DiTConfig, build_dit, get_dit_config

    cfg = DiTConfig.from_dict({**get_dit_config(args.preset).to_dict(), "num_layers": args.layers})
    with tempfile.TemporaryDirectory(prefix="osp-ckpt-mem-") as tmp:
        folder = Path(tmp, "released")
        folder.mkdir()
        cfg.to_json(folder / "config.json")
        model = build_dit(cfg, device="meta")
        full_bytes = sum(t.numel() * 4 for t in model.parameters())
        from safetensors.torch import save_file

        torch.manual_seed(0)  # random weights in the released layout (values do not matter here)
        save_file(
            {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}, str(folder / DIFFUSERS_WEIGHTS)
        )
        cfg_json = str(folder / "config.json")
        dcp_dir = str(Path(tmp, "dcp"))
        res = {}
        for mode in ("full", "slices", "dcp"):
            mp.start_processes(
                worker,
                args=(_port(), mode, cfg_json, str(folder), dcp_dir, tmp),
                nprocs=2,
                join=True,
                start_method="spawn",
            )
            res[mode] = [tuple(float(x) for x in Path(tmp, f"{mode}-{r}.txt").read_text().split()) for r in (0, 1)]
    n = full_bytes // 4
    print(
        f"DiT {args.preset} width {cfg.inner_dim}, {args.layers} of 32 layers: {n / 1e9:.3f} B parameters, "
        f"{full_bytes / 2**30:.2f} GiB fp32 in full, {res['slices'][0][1] / 2**30:.2f} GiB per TP=2 rank"
    )
    print(f"{'mode':8} {'peak GiB rank0':>15} {'rank1':>8} {'load s':>8}")
    for mode, rows in res.items():
        print(f"{mode:8} {rows[0][0]:15.2f} {rows[1][0]:8.2f} {max(r[2] for r in rows):8.1f}")
    ratio = max(r[0] for r in res["slices"]) / max(r[0] for r in res["full"])
    ratio_dcp = max(r[0] for r in res["dcp"]) / max(r[0] for r in res["full"])
    sync_s, async_s = (max(r[i] for r in res["dcp"]) for i in (3, 4))
    print(
        f"save of the weights ({res['dcp'][0][1] / 2**30:.2f} GiB per rank) blocks training: synchronous {sync_s:.2f} s, "
        f"async_save {async_s:.2f} s (host copy; ratio {async_s / sync_s:.2f})"
    )
    print(f"peak per rank, slices / full: {ratio:.2f} (target <= {TARGET}); dcp / full: {ratio_dcp:.2f}")
    from osp.stage2_train.state_dict_adapter import tp_split_dim

    real = build_dit(get_dit_config(args.preset), device="meta").state_dict()
    real_full = sum(v.numel() * 4 for v in real.values())
    real_local = sum(v.numel() * 4 // (2 if tp_split_dim(k) is not None else 1) for k, v in real.items())
    full_x = max(r[0] for r in res["full"]) * 2**30 / full_bytes  # measured peak / full model bytes
    slices_x = max(r[0] for r in res["slices"]) * 2**30 / res["slices"][0][1]  # measured peak / local shard bytes
    print(
        f"at the real 32 layers (exact counts, fp32): full model {real_full / 2**30:.2f} GiB, one TP=2 shard "
        f"{real_local / 2**30:.2f} GiB; with this run's peak factors ({full_x:.2f} x full, {slices_x:.2f} x shard) the "
        f"estimated peak per rank is {full_x * real_full / 2**30:.1f} GiB (full build) vs {slices_x * real_local / 2**30:.1f} GiB (meta + slices)"
    )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
