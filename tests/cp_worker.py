"""4-process gloo worker of tests/test_cp.py: Ulysses CP (alone and with TP / TP+SP) vs the plain
TP=1 model on output and every gradient, all layouts and geometries in one launch.

    python tests/cp_worker.py OUT.json      (rank 0 writes, per case, the worst error over all ranks)

Each layout goes through the trainer's own code: dist.init_parallel(tp, sp, cp) -> parallelize ->
apply_context_parallel -> forward/backward -> reduce_sequence_parallel_grads -> scale_replicated_grads
with the DP x CP reduction of the trainer's DDP wrapper (data_parallel.DataParallel, inside backward)
-> gather_full_grads (TP shards).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from tp_worker import compare, randomize  # noqa: E402
from train_helpers import free_port  # noqa: E402

WORLD = 4
# name: (latent T, H, W -> grid T x H/2 x W/2), RoPE interpolation scales, text length, valid text tokens, video mask
GEOMETRIES = {
    # 93x720p-shaped: the real grid is 24 x 45 x 80 (86,400 tokens, H':W' = 9:16), scaled to 3 x 9 x 16 = 432 tokens
    "720p_432": ((3, 18, 32), (1.0, 1.5, 2.0), 12, (3, 9), False),
    # odd T and H' (3 x 5 x 4 = 60 tokens), odd text length, a partial video mask (bias over keys)
    "odd_60": ((3, 10, 8), (1.0, 1.0, 1.0), 7, (5, 7), True),
}
# name: (tp, sp, cp, gradient checkpointing, negative control)
LAYOUTS = {
    "tp1_cp2": (1, False, 2, False, None),  # world 4: DP 2 x CP 2
    "tp1_cp4": (1, False, 4, False, None),
    "tp2_cp2": (2, False, 2, False, None),
    "tp2_sp_cp2": (2, True, 2, False, None),
    "tp2_sp_cp2_ckpt": (2, True, 2, True, None),
    "tp1_cp2_no_inverse": (1, False, 2, False, "skip_inverse"),  # must fail: outputs wrong
    "tp1_cp2_no_grad_fix": (1, False, 2, False, "no_grad_fix"),  # must fail: gradients wrong
}
# run on the first geometry only (the negative controls, TP x CP without SP); recomputation on the odd grid only
FIRST_ONLY = {"tp2_cp2", "tp1_cp2_no_inverse", "tp1_cp2_no_grad_fix"}
SECOND_ONLY = {"tp2_sp_cp2_ckpt"}
COUNT = {"tp1_cp2", "tp2_cp2", "tp2_sp_cp2"}


def tiny_cfg(scales):
    from osp.common.models.dit import get_dit_config

    cfg = get_dit_config("tiny")
    cfg.num_attention_heads, cfg.attention_head_dim, cfg.cross_attention_dim = 4, 12, 48  # 4 heads: TP x CP = 4
    cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w = scales
    return cfg


def make_inputs(cfg, latent, text_len, valid, masked, seed):
    g = torch.Generator().manual_seed(seed)
    t_, h_, w_ = latent
    x = torch.randn(2, cfg.in_channels, t_, h_, w_, generator=g)
    t = torch.tensor([17.0, 733.5])
    text = torch.randn(2, text_len, cfg.caption_channels, generator=g)
    mask = torch.zeros(2, text_len)
    mask[0, : valid[0]], mask[1, : valid[1]] = 1, 1
    vmask = None
    if masked:
        vmask = torch.ones(2, t_, h_, w_)
        vmask[1, :, :, w_ // 2 :] = 0  # sample 1: right half padded
    w = torch.randn(2, cfg.out_channels, t_, h_, w_, generator=g)
    return x, t, text, mask, vmask, w


def step(model, inputs, reduce, forward=None):
    x, t, text, mask, vmask, w = inputs
    model.zero_grad(set_to_none=True)
    out = (forward or model)(x, t, text, mask, vmask)
    (out * w).sum().backward()
    if reduce is not None:
        reduce(model)
    return out.detach()


def run(model, inputs, reduce, forward=None):
    from tp_worker import gather_full_grads

    return step(model, inputs, reduce, forward), gather_full_grads(model)


class CollectiveCounter:
    """Payload bytes per (group, collective) of everything megatron and osp issue inside the block:
    the names megatron binds at import (layers / mappings) and torch.distributed's all_reduce and
    all_to_all_single are wrapped."""

    def __init__(self, groups: dict):
        import megatron.core.tensor_parallel.layers as layers
        import megatron.core.tensor_parallel.mappings as mappings

        self.groups, self.counts, self._undo = groups, {}, []
        self._targets = [
            (layers, "dist_all_gather_func", "all_gather", 0),
            (layers, "dist_reduce_scatter_func", "reduce_scatter", 1),
            (mappings, "dist_all_gather_func", "all_gather", 0),
            (mappings, "dist_reduce_scatter_func", "reduce_scatter", 1),
            (dist, "all_reduce", "all_reduce", 0),
            (dist, "all_to_all_single", "all_to_all", 1),
        ]

    def _name(self, group) -> str:
        for name, g in self.groups.items():
            if g is group:
                return name
        return "other"

    def __enter__(self):
        for mod, attr, op, which in self._targets:
            orig = getattr(mod, attr)

            def wrapped(*args, _orig=orig, _op=op, _which=which, **kw):
                t = args[_which]
                key = f"{self._name(kw.get('group'))}/{_op}"
                self.counts[key] = self.counts.get(key, 0) + t.numel() * t.element_size()
                return _orig(*args, **kw)

            setattr(mod, attr, wrapped)
            self._undo.append((mod, attr, orig))
        return self

    def __exit__(self, *exc):
        for mod, attr, orig in reversed(self._undo):
            setattr(mod, attr, orig)


def worker(rank: int, port: int, out_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from osp.common import megatron_cpu

    megatron_cpu.apply()
    from osp.common.models.dit import build_dit
    from osp.stage2_train import dist as D
    from osp.stage2_train.context_parallel import apply_context_parallel, scale_replicated_grads
    from osp.stage2_train.data_parallel import DataParallel
    from osp.stage2_train.parallel import parallelize, reduce_sequence_parallel_grads
    from osp.stage2_train.plan import apply_ac

    results: dict[str, dict] = {}
    for gi, (gname, (latent, scales, text_len, valid, masked)) in enumerate(GEOMETRIES.items()):
        cfg = tiny_cfg(scales)
        base = build_dit(cfg)
        randomize(base, 300 + gi)
        inputs = make_inputs(cfg, latent, text_len, valid, masked, 400 + gi)
        ref = run(copy.deepcopy(base), inputs, None)
        tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
        for lname, (tp, sp, cp, ckpt, negative) in LAYOUTS.items():
            if (lname in FIRST_ONLY and gi > 0) or (lname in SECOND_ONLY and gi == 0):
                continue
            layout = D.init_parallel(tp, sp, cfg.num_attention_heads, tokens, cp=cp)
            m = parallelize(copy.deepcopy(base), layout)
            m = apply_context_parallel(m, layout, skip_inverse=negative == "skip_inverse")
            apply_ac(m, "full" if ckpt else "none")
            group = layout.dp_cp_group
            fix = negative != "no_grad_fix"
            # the DP x CP sum / dp runs in DDP's backward; the negative control runs the bare module
            forward = DataParallel(m, layout).module if fix else m

            def reduce(model, fix=fix):
                reduce_sequence_parallel_grads(model)
                if fix:
                    scale_replicated_grads(model)

            r = compare(ref, run(m, inputs, reduce, forward))
            r["layout"] = [layout.tp, layout.cp, layout.dp]
            every = [None] * WORLD
            dist.all_gather_object(every, r)
            worst = max(every, key=lambda e: max(e["out"], e["grad"]))
            worst["all_ranks_out"] = max(e["out"] for e in every)
            worst["all_ranks_grad"] = max(e["grad"] for e in every)
            results[f"{gname}/{lname}"] = worst
            if gi == 0 and lname in COUNT:  # collective bytes of one step vs osp.stage2_train.comm_volume
                from osp.stage2_train.comm_volume import CommLayout, payloads

                groups = {"tp": layout.tp_group, "cp": layout.cp_group, "dp_cp": group}
                with CollectiveCounter(groups) as counter:
                    step(m, inputs, reduce, forward)
                want = payloads(cfg, tokens, text_len, 2, CommLayout(tp, sp, cp, layout.dp), act_bytes=4, grad_bytes=4)
                every = [None] * WORLD
                dist.all_gather_object(every, counter.counts)
                results[f"{gname}/{lname}/bytes"] = {
                    "counted": every,
                    "model": {f"{g}/{op}": v for (g, op), v in want.items()},
                }
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    D.shutdown()


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=WORLD, join=True)
