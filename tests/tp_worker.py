"""2-process gloo worker for tests/test_tp.py: TP=2 (SP off / on) vs TP=1 on the tiny DiT, all cases in
one launch. Usage: python tests/tp_worker.py OUT.json  (rank 0 writes the per-case results)."""

from __future__ import annotations

import copy
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ZERO_GRAD_KEYS = ("attn2.to_k.bias",)  # analytically zero: a key bias shifts every logit of a query equally


# --- full-size gathers of a parallelized model (test-side checks of the TP plan) ---------------------
def _gather(key: str, t: torch.Tensor, tp: int, group) -> torch.Tensor:
    from osp.stage2_train.state_dict_adapter import tp_split_dim

    dim = tp_split_dim(key)
    if dim is None or tp == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The TP=1 state dict (released key names) of a parallelized model, on every TP rank. Collective."""
    from osp.stage2_train.parallel import plan_layout

    layout = plan_layout(model)
    return {
        k: _gather(k, v, layout.tp, layout.tp_group)
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state")
    }


def gather_full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-size gradients by parameter name (zeros where a grad is None). Collective."""
    from osp.stage2_train.parallel import plan_layout

    layout = plan_layout(model)
    out = {}
    for k, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[k] = _gather(k, g, layout.tp, layout.tp_group)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_inputs(cfg, text_len: int, valid: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 3, 8, 8, generator=g)
    t = torch.tensor([17.0, 733.5])
    text = torch.randn(2, text_len, cfg.caption_channels, generator=g)
    mask = torch.zeros(2, text_len)
    mask[0, : valid[0]] = 1
    mask[1, : valid[1]] = 1
    w = torch.randn(2, cfg.out_channels, 3, 8, 8, generator=g)
    return x, t, text, mask, w


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-zero so that every gradient is exercised (fan-in scaled
    weights, biases and tables at 0.1: a well-conditioned net, so fp32 agreement is meaningful)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if (p.dim() > 1 and "scale_shift_table" not in name) else 0
            std = fan_in**-0.5 if fan_in else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)


def run(model, inputs, reduce: bool):
    from osp.stage2_train.parallel import reduce_sequence_parallel_grads

    x, t, text, mask, w = inputs
    model.zero_grad(set_to_none=True)
    out = model(x, t, text, mask).float()
    (out * w).sum().backward()
    if reduce:
        reduce_sequence_parallel_grads(model)
    return out.detach(), gather_full_grads(model)


def compare(ref, got) -> dict:
    (ro, rg), (go, gg) = ref, got
    worst, worst_key, zero_abs = 0.0, "", 0.0
    for k, g in rg.items():
        if k.endswith(ZERO_GRAD_KEYS):
            zero_abs = max(zero_abs, float((gg[k] - g).abs().max()))
            continue
        e = rel_err(gg[k], g)
        if e > worst:
            worst, worst_key = e, k
    return {"out": rel_err(go, ro), "grad": worst, "grad_key": worst_key, "zero_grad_abs": zero_abs, "n": len(rg)}


def worker(rank: int, port: int, out_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from osp.common import megatron_cpu

    megatron_cpu.apply()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    from osp.common.models.dit import build_dit, get_dit_config
    from osp.stage2_train.dist import current_layout
    from osp.stage2_train.parallel import load_full_state_dict, parallelize
    from osp.stage2_train.plan import apply_ac

    results: dict[str, dict] = {}
    cases = [
        # name, interpolation scales, padded text length, valid tokens per sample
        ("480p_L7", (1.0, 1.0, 1.0), 7, (5, 7)),
        ("720p_L12", (1.0, 1.5, 2.0), 12, (3, 9)),
    ]
    for ci, (name, scales, text_len, valid) in enumerate(cases):
        cfg = get_dit_config("tiny")
        cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w = scales
        base = build_dit(cfg)
        randomize(base, 100 + ci)
        inputs = make_inputs(cfg, text_len, valid, 200 + ci)
        ref = run(copy.deepcopy(base), inputs, reduce=False)

        variants = [
            ("tp2", False, True, "none"),
            ("tp2_sp", True, True, "none"),
            ("tp2_sp_ckpt", True, True, "full"),
            ("tp2_sp_selective", True, True, "selective"),
        ]
        if ci == 0:
            variants.append(("tp2_sp_nofix", True, False, "none"))  # negative control: must be wrong
        for vname, sp, reduce, ckpt in variants:
            m = parallelize(copy.deepcopy(base), current_layout(sp))
            apply_ac(m, ckpt)
            results[f"{name}/{vname}"] = compare(ref, run(m, inputs, reduce))
            if vname == "tp2_sp":
                full = gather_full_state_dict(m)
                sd = base.state_dict()
                results[f"{name}/state_dict_gather"] = {
                    "equal": all(torch.equal(full[k], sd[k]) for k in sd),
                    "n": len(full),
                    "same_keys": list(m.state_dict()) == list(sd),  # released names at TP=2 too
                }
                m2 = parallelize(build_dit(cfg), current_layout(True))
                load_full_state_dict(m2, sd)
                results[f"{name}/state_dict_load"] = compare(ref, run(m2, inputs, reduce=True))

        for mode in ("full", "selective"):
            m = copy.deepcopy(base)
            apply_ac(m, mode)
            results[f"{name}/tp1_ckpt_{mode}"] = compare(ref, run(m, inputs, reduce=False))

        # bf16 activations (fp32 master weights): TP=2+SP vs TP=1 in bf16, and bf16 vs the fp32 reference
        m1 = copy.deepcopy(base)
        m1.compute_dtype = torch.bfloat16
        ref16 = run(m1, inputs, reduce=False)
        m2 = parallelize(copy.deepcopy(base), current_layout(True))
        m2.compute_dtype = torch.bfloat16
        apply_ac(m2, "selective")
        results[f"{name}/bf16_tp2_sp"] = compare(ref16, run(m2, inputs, reduce=True))
        results[f"{name}/bf16_vs_fp32"] = compare(ref, ref16)

    # clear errors for bad sizes
    errors = {}
    bad = get_dit_config("tiny")
    bad.num_attention_heads, bad.cross_attention_dim = 3, 72
    try:
        parallelize(build_dit(bad), current_layout(False))
    except ValueError as e:
        errors["heads"] = str(e)
    m = parallelize(build_dit("tiny"), current_layout(True))
    try:
        x = torch.randn(1, 4, 3, 6, 6)  # 3*3*3 = 27 tokens, odd
        m(x, torch.tensor([1.0]), torch.randn(1, 5, 64), torch.ones(1, 5))
    except ValueError as e:
        errors["tokens"] = str(e)
    results["errors"] = errors

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=2, join=True)
