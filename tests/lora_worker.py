"""4-process gloo worker of tests/test_lora.py: LoRA adapters under TP, TP+SP, TP+SP x CP vs the plain
TP=1 model on the output and every adapter gradient, all layouts in one launch.

    python tests/lora_worker.py OUT.json      (rank 0 writes, per layout, the worst error over all ranks)
    torchrun --nproc_per_node 2 tests/lora_worker.py train SHARDS BASE OUT    (LoRA trainings, below)

Each layout goes through the trainer's own code: dist.init_parallel -> parallelize ->
apply_context_parallel -> apply_lora -> forward/backward through data_parallel.DataParallel (the DP x CP
reduction) -> reduce_sequence_parallel_grads -> scale_replicated_grads -> adapter grads gathered over TP
by the key rule table. Negative controls: the column-parallel B factors loaded with the other TP rank's
rows (a wrong split: output and gradients wrong), and the SP gradient sum left out (gradients wrong).
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
from cp_worker import tiny_cfg  # noqa: E402
from tp_worker import gather_full_grads, rel_err  # noqa: E402
from tp_worker import randomize  # noqa: E402
from train_helpers import free_port  # noqa: E402

WORLD = 4
LATENT = (3, 8, 8)  # 3 x 4 x 4 = 48 tokens: divisible by TP x CP = 4
TEXT_LEN, VALID = 7, (5, 7)
# name: (tp, sp, cp, negative control or False)
LAYOUTS = {
    "tp2": (2, False, 1, False),  # DP 2
    "tp2_sp": (2, True, 1, False),  # DP 2
    "tp2_sp_cp2": (2, True, 2, False),
    "tp2_cp2": (2, False, 2, False),
    "tp2_sp_wrong_b": (2, True, 1, "wrong_b"),  # must fail: output and gradients wrong
    "tp2_sp_no_sp_sum": (2, True, 1, "no_sp_sum"),  # must fail: SP-tagged adapter grads left partial
}
RANK, ALPHA = 4, 8.0


def inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, *LATENT, generator=g)
    t = torch.tensor([17.0, 733.5])
    text = torch.randn(2, TEXT_LEN, cfg.caption_channels, generator=g)
    mask = torch.zeros(2, TEXT_LEN)
    mask[0, : VALID[0]], mask[1, : VALID[1]] = 1, 1
    w = torch.randn(2, cfg.out_channels, *LATENT, generator=g)
    return x, t, text, mask, w


def random_adapters(model, seed) -> dict[str, torch.Tensor]:
    """Full (TP=1) adapters, A and B random and non-zero (every gradient exercised)."""
    from osp.stage2_train.lora import A_KEY, adapted

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in adapted(model):
        lin = model.get_submodule(name)
        a, b = lin.lora_A.weight, lin.lora_B.weight
        out[name + A_KEY] = torch.randn(a.shape, generator=g) * a.shape[1] ** -0.5
        out[name + ".lora_B.weight"] = torch.randn(b.shape, generator=g) * 0.3
    return out


def adapter_grads(model) -> dict[str, torch.Tensor]:
    from osp.stage2_train.lora import is_adapter_key

    return {k: v for k, v in gather_full_grads(model).items() if is_adapter_key(k)}


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
    from osp.stage2_train.lora import LoraSpec, apply_lora, load_adapters
    from osp.stage2_train.parallel import parallelize, reduce_sequence_parallel_grads
    from osp.stage2_train.state_dict_adapter import tp_split_dim

    spec = LoraSpec(RANK, ALPHA, base_dtype="fp32")
    cfg = tiny_cfg((1.0, 1.5, 2.0))
    base = build_dit(cfg)
    randomize(base, 500)
    x, t, text, mask, w = inputs(cfg, 501)

    ref_model = apply_lora(copy.deepcopy(base), spec)
    full = random_adapters(ref_model, 502)
    load_adapters(ref_model, full, "reference")
    ref_out = ref_model(x, t, text, mask)
    (ref_out * w).sum().backward()
    ref_grads = {k: v for k, v in adapter_grads(ref_model).items()}
    frozen_ok = all(p.grad is None for n, p in ref_model.named_parameters() if not p.requires_grad)

    results: dict[str, dict] = {"tp1": {"frozen_base_has_no_grad": frozen_ok, "n": len(ref_grads)}}
    tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    for lname, (tp, sp, cp, wrong) in LAYOUTS.items():
        layout = D.init_parallel(tp, sp, cfg.num_attention_heads, tokens, cp=cp)
        m = apply_context_parallel(parallelize(copy.deepcopy(base), layout), layout)
        apply_lora(m, spec)
        load_adapters(m, full, "test")
        if wrong == "wrong_b":  # column-parallel B with the other TP rank's rows
            with torch.no_grad():
                for k, p in m.named_parameters():
                    if k.endswith(".lora_B.weight") and tp_split_dim(k) == 0:
                        p.copy_(full[k].chunk(tp)[1 - layout.tp_rank])
        dp = DataParallel(m, layout)  # kept alive through backward: its DDP reducer sums over DP x CP
        out = dp.module(x, t, text, mask)
        (out * w).sum().backward()
        if wrong != "no_sp_sum":
            reduce_sequence_parallel_grads(m)
        scale_replicated_grads(m)
        grads = adapter_grads(m)
        worst, key = 0.0, ""
        for k, g in ref_grads.items():
            e = rel_err(grads[k], g)
            if e > worst:
                worst, key = e, k
        r = {
            "out": rel_err(out.detach(), ref_out.detach()),
            "grad": worst,
            "grad_key": key,
            "n": len(grads),
            "frozen_base_has_no_grad": all(p.grad is None for p in m.parameters() if not p.requires_grad),
            "trainable": sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(ref_grads),
        }
        every = [None] * WORLD
        dist.all_gather_object(every, r)
        worst_r = max(every, key=lambda e: max(e["out"], e["grad"]))
        worst_r["all_frozen_ok"] = all(e["frozen_base_has_no_grad"] and e["trainable"] for e in every)
        results[lname] = worst_r
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    D.shutdown()


# ------------------------------------------------------------------------------------------------
# `train`: real trainings (the trainer, its checkpoints) with and without LoRA, 2 ranks
# ------------------------------------------------------------------------------------------------
TRAIN = {
    "run": {"seed": 7, "log_every": 0, "tensorboard": False, "async_ckpt": False},
    "data": {"batch_size": 2, "num_workers": 0},
    "optim": {"lr": 1e-2},
    "diffusion": {"cfg_dropout": 0.0},
}
# name: (overrides, steps, checkpoint every, resume from (run name, step))
RUNS = {
    "full": ({"parallel": {"tp": 2, "sp": True}}, 1, 0, None),
    "lora": ({"parallel": {"tp": 2, "sp": True}, "lora": {"enabled": True, "rank": 1, "alpha": 2.0}}, 4, 2, None),
    "lora_resume": (
        {"parallel": {"tp": 2, "sp": True}, "lora": {"enabled": True, "rank": 1, "alpha": 2.0}},
        4,
        0,
        ("lora", 2),
    ),
    "lora_resume_tp1": (
        # DP 2 x 1 sample = the same global batch of 2 as TP 2 x DP 1 x 2 samples
        {
            "parallel": {"tp": 1, "sp": False},
            "data": {"batch_size": 1},
            "lora": {"enabled": True, "rank": 1, "alpha": 2.0},
        },
        4,
        0,
        ("lora", 2),
    ),
}


def train(shards: str, base: str, out: Path) -> None:
    from osp.stage2_train.config import TrainConfig
    from osp.stage2_train.trainer import build_trainer

    results = {}
    for name, (over, steps, every, resume) in RUNS.items():
        d = json.loads(json.dumps(TRAIN))
        for sec, vals in over.items():
            d.setdefault(sec, {}).update(vals)
        d["run"].update({"steps": steps, "ckpt_every": every, "dir": str(out / name)})
        d["data"]["shards"] = shards
        if d.get("lora", {}).get("enabled"):
            d["model"] = {"init": base}
        src = str(out / resume[0] / "checkpoints" / f"step-{resume[1]:07d}") if resume else ""
        trainer = build_trainer(TrainConfig.from_dict(d), resume=src)
        try:
            history = trainer.fit()
            results[name] = {
                "losses": [h["loss"] for h in history],
                "optimized": sorted(trainer.optimizer.names),
                "ema": sorted(trainer.ema.all_names) if trainer.ema is not None else [],
                "trainable": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad),
                "base_dtypes": sorted(
                    {str(p.dtype) for n, p in trainer.model.named_parameters() if not p.requires_grad}
                ),
            }
        finally:
            trainer.close()
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=WORLD, join=True)
