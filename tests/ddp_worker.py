"""2-process gloo worker of tests/test_ddp.py: the trainer's data-parallel path (torch DDP with the
bucket hook + ZeroRedundancyOptimizer AdamW, `stage2_train/data_parallel.py`) at DP=2 against a
plain model + torch AdamW at DP=1 with twice the batch, on the tiny DiT (real architecture).

    python tests/ddp_worker.py OUT.json     (rank 0 writes the results)

Per case, 3 optimizer steps of 2 micro-steps each (gradient accumulation: the DP reduction only on the
second): the reduced gradients and the parameters after every step vs the reference, plus bucket
counts, the sharding of the AdamW state and a resume of the owned state.
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
from tp_worker import randomize  # noqa: E402
from train_helpers import free_port  # noqa: E402

WORLD, STEPS, ACCUM, PER_RANK = 2, 3, 2, 2
NULL_GRAD = 1e-6
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
# name: (parallel.zero1, parallel.overlap_grad_reduce, bucket MiB, negative control)
CASES = {
    "zero1_overlap": (True, True, 0.02, None),
    "zero1_blocking": (True, False, 0.02, None),
    "replicated_overlap": (False, True, 25.0, None),
    "no_reduction": (True, True, 0.02, "no_reduction"),  # must fail: every micro-step under no_sync
}


def batches(cfg, seed: int):
    """STEPS x ACCUM global micro-batches of WORLD * PER_RANK samples."""
    g = torch.Generator().manual_seed(seed)
    n, (t_, h_, w_) = WORLD * PER_RANK, (cfg.sample_size_t, *cfg.sample_size)
    out = []
    for _ in range(STEPS * ACCUM):
        x = torch.randn(n, cfg.in_channels, t_, h_, w_, generator=g)
        t = torch.rand(n, generator=g) * 999
        text = torch.randn(n, 5, cfg.caption_channels, generator=g)
        mask = torch.ones(n, 5)
        mask[1::2, 3:] = 0
        target = torch.randn(n, cfg.out_channels, t_, h_, w_, generator=g)
        out.append((x, t, text, mask, target))
    return out


def loss_of(net, mb, rows) -> torch.Tensor:
    x, t, text, mask, target = (v[rows] for v in mb)
    return ((net(x, t, text, mask) - target) ** 2).mean() / ACCUM


def reference(base, data):
    """DP=1, the whole global batch per micro-step, torch AdamW: grads and params after every step."""
    m = copy.deepcopy(base)
    opt = torch.optim.AdamW(list(m.parameters()), **ADAMW)
    grads, params = [], []
    for s in range(STEPS):
        for k in range(ACCUM):
            loss_of(m, data[s * ACCUM + k], slice(None)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        params.append({n: p.detach().clone() for n, p in m.named_parameters()})
    return grads, params


def rel(a: dict, b: dict, names) -> float:
    """max over tensors of max|a - b| / max|b|."""
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in names)


def absdiff(a: dict, b: dict, names) -> float:
    return max((float((a[n] - b[n]).abs().max()) for n in names), default=0.0)


def worker(rank: int, port: int, out_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from osp.common import megatron_cpu

    megatron_cpu.apply()
    from osp.common.models.dit import build_dit, get_dit_config
    from osp.stage2_train import dist as D
    from osp.stage2_train.context_parallel import apply_context_parallel
    from osp.stage2_train.data_parallel import DataParallel, ShardedAdamW
    from osp.stage2_train.parallel import parallelize

    cfg = get_dit_config("tiny")
    tokens = cfg.sample_size_t * (cfg.sample_size[0] // 2) * (cfg.sample_size[1] // 2)
    layout = D.init_parallel(1, False, cfg.num_attention_heads, tokens)  # TP 1 -> DP 2, as the trainer builds it
    group = layout.dp_cp_group
    base = build_dit(cfg)
    randomize(base, 11)
    data = batches(cfg, 12)
    ref_grads, ref_params = reference(base, data)
    # analytically zero gradients (the key biases: softmax ignores a constant shift of the scores) are
    # rounding noise, compared in absolute terms; AdamW turns that noise into lr-sized steps
    null = {n for g in ref_grads for n, v in g.items() if float(v.abs().max()) < NULL_GRAD}
    real = [n for n in ref_grads[0] if n not in null]
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    results = {}
    for name, (zero1, overlap, bucket_mb, negative) in CASES.items():
        model = apply_context_parallel(parallelize(copy.deepcopy(base), layout), layout)
        named = list(model.named_parameters())
        dp = DataParallel(model, layout, overlap=overlap, bucket_mb=bucket_mb)
        opt = ShardedAdamW([p for _, p in named], [n for n, _ in named], group, shard=zero1, keep_grads=True, **ADAMW)
        r = {
            "grad": 0.0,
            "param": 0.0,
            "null_grad": 0.0,
            "null_param": 0.0,
            "null": sorted(null),
            "buckets": [],
            "during_backward": [],
        }
        for s in range(STEPS):
            opt.set_lr(ADAMW["lr"])
            before = dp.hook.buckets
            for k in range(ACCUM):
                final = k == ACCUM - 1 and negative != "no_reduction"
                with dp.sync(final):
                    x, t, text, mask, target = (v[mine] for v in data[s * ACCUM + k])
                    x = x.clone().requires_grad_(True)  # its grad is the last one backward computes
                    x.register_hook(
                        lambda g, r=r, dp=dp, before=before: r["during_backward"].append(dp.hook.buckets - before) or g
                    )
                    (((dp.module(x, t, text, mask) - target) ** 2).mean() / ACCUM).backward()
            r["buckets"].append(dp.hook.buckets - before)
            grads = {n: p.grad for n, p in named}
            r["grad"] = max(r["grad"], rel(grads, ref_grads[s], real))
            r["null_grad"] = max(r["null_grad"], absdiff(grads, ref_grads[s], null))
            opt.step()
            opt.zero_grad()
            params = {n: p.detach() for n, p in named}
            r["param"] = max(r["param"], rel(params, ref_params[s], real))
            r["null_param"] = max(r["null_param"], absdiff(params, ref_params[s], null))
        owned = opt.owned_state()
        r["owned"] = sorted(owned)
        r["state_numel"] = sum(st["exp_avg"].numel() for st in owned.values())
        r["all_names"] = [n for n, _ in named]
        r["zero"] = opt.zero is not None

        # resume: a fresh optimizer loaded from owned_state() takes the same next step as the live one
        twin = copy.deepcopy(model)
        tnamed = list(twin.named_parameters())
        topt = ShardedAdamW([p for _, p in tnamed], [n for n, _ in tnamed], group, shard=zero1, **ADAMW)
        topt.load_owned_state({n: {k: v.clone() for k, v in st.items()} for n, st in owned.items()})
        g = torch.Generator().manual_seed(99)
        for (_, p), (_, q) in zip(named, tnamed):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        topt.step()
        r["resume_equal"] = all(torch.equal(p, q) for (_, p), (_, q) in zip(named, tnamed))
        every = [None] * WORLD
        dist.all_gather_object(every, r)
        results[name] = every
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    D.shutdown()


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=WORLD, join=True)
