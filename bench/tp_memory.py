"""Per-rank memory of the DiT under megatron-core TP=2 + SP vs TP=1 (CPU, 2 gloo processes).

Measures, for one forward+backward of the same model and batch:
* bytes saved for backward per rank (torch.autograd.graph.saved_tensors_hooks, unique storages,
  parameters excluded): the activation memory that TP+SP shards; target TP=2+SP / TP=1 <= 0.55;
* parameter bytes per rank.

The model keeps the real structure and the real head count (24 heads) at a scaled-down head dim
(12, D = 288) so that it runs in about a minute on 2 cores. SDPA on CPU takes the fused (flash)
kernel, which saves only the output and the log-sum-exp per query, as on GPU; what remains
unsharded under SP is the replicated part (text, adaLN vectors, the final layer after the gather).

Usage: python bench/tp_memory.py [--layers 4] [--frames 3 --size 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TARGET = 0.55


class SavedBytes:
    """Context manager: unique storages saved for backward (excluding the given parameters)."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.skip and ptr not in self.storages:
            self.storages[ptr] = st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def build(args):
    from osp.common.models.dit import DiTConfig, build_dit

    cfg = DiTConfig(
        num_layers=args.layers,
        num_attention_heads=24,
        attention_head_dim=12,
        caption_channels=64,
        cross_attention_dim=288,
        sample_size=[args.size, args.size],
        sample_size_t=args.frames,
    )
    torch.manual_seed(0)
    return build_dit(cfg)


def step(model, args, ckpt=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.frames, args.size, args.size, generator=g)
    text = torch.randn(args.batch, args.text_len, 64, generator=g)
    mask = torch.ones(args.batch, args.text_len)
    from osp.stage2_train.plan import apply_ac

    apply_ac(model, "full" if ckpt else "none")
    with SavedBytes(model.parameters()) as sb:
        out = model(x, torch.full((args.batch,), 500.0), text, mask)
    out.square().mean().backward()
    return sb


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def worker(rank: int, port: int, args) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from osp.common import megatron_cpu

    megatron_cpu.apply()
    from megatron.core import parallel_state

    from osp.stage2_train.dist import current_layout
    from osp.stage2_train.parallel import parallelize, reduce_sequence_parallel_grads

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    base = build(args)
    res = {}
    if rank == 0:
        t0 = time.perf_counter()
        sb = step(copy.deepcopy(base), args)
        res["tp1"] = (sb.total, param_bytes(base), time.perf_counter() - t0)
        t0 = time.perf_counter()
        sbc = step(copy.deepcopy(base), args, ckpt=True)
        res["tp1_ckpt"] = (sbc.total, param_bytes(base), time.perf_counter() - t0)
    dist.barrier()
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        m = parallelize(copy.deepcopy(base), current_layout(sp))
        t0 = time.perf_counter()
        sb = step(m, args)
        reduce_sequence_parallel_grads(m)
        res[name] = (sb.total, param_bytes(m), time.perf_counter() - t0)
    gathered = [None, None]
    dist.all_gather_object(gathered, res)
    if rank == 0:
        report(gathered, args)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def report(per_rank, args) -> None:
    mib = 1 / 2**20
    tokens = args.frames * (args.size // 2) ** 2
    ref_total, ref_params, _ = per_rank[0]["tp1"]
    print(
        f"DiT {args.layers} blocks, 24 heads x 12 (D 288), B={args.batch}, {tokens} video tokens, {args.text_len} text tokens, fp32 CPU"
    )
    print(f"{'config':<14}{'saved/rank MiB':>16}{'ratio':>8}{'params/rank MiB':>18}{'ratio':>8}{'fwd+bwd s':>11}")
    rows = [("TP=1", per_rank[0]["tp1"]), ("TP=1 +ckpt", per_rank[0]["tp1_ckpt"])]
    for name, key in (("TP=2", "tp2"), ("TP=2 +SP", "tp2_sp")):
        worst = max((r[key] for r in per_rank), key=lambda v: v[0])  # the rank with most saved bytes
        rows.append((name, worst))
    ratios = {}
    for name, (total, params, secs) in rows:
        ratios[name] = ratio = total / ref_total
        print(
            f"{name:<14}{total * mib:>16.1f}{ratio:>8.3f}{params * mib:>18.2f}{params / ref_params:>8.3f}{secs:>11.2f}"
        )
    r = ratios["TP=2 +SP"]
    print(f"saved-for-backward TP=2+SP / TP=1 = {r:.3f} (target <= {TARGET}: {'met' if r <= TARGET else 'MISSED'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--size", type=int, default=32, help="latent H = W (tokens = frames * (size/2)^2)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(port, args), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
