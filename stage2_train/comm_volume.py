"""Collective bytes of one training micro-step of OpenSoraT2V per rank, by process group and
collective, for a (TP, SP, CP, DP) layout: what the TP/SP plan (`parallel.py`), the CP plan
(`context_parallel.py`) and the gradient reduction (`data_parallel.py`: torch DDP + ZeroRedundancyOptimizer) issue, counted from the
model's real shapes (parameter counts from the model built on the meta device).

`payloads` gives the bytes handed to each collective (all-gather: the gathered output; reduce-scatter:
the input; all-reduce: the tensor; all-to-all: the local input; broadcast: the tensor), summed over
one forward + backward + gradient reduction without recomputation. tests/test_cp.py checks them
byte-exactly against the collectives a real gloo run issues. `wire_bytes` turns them into bytes sent
per rank with ring / pairwise algorithms: all-gather, reduce-scatter, all-to-all, broadcast (g-1)/g,
all-reduce 2(g-1)/g of the payload (g the group size). Times derived from these are estimates.

Per block (N = TP, C = CP, S_c = S/C tokens of the rank's CP chunk, B batch, D width, L text, e bytes
per activation element, M = S_c B D e, T = L B D e):
* TP+SP: all-gather 13 M (5 column inputs forward, again in backward for the weight grads, 3 row
  output grads), reduce-scatter 8 M (3 row outputs, 5 column input grads), all-reduce 2 T (the
  replicated text's k/v input grads);
* TP without SP: all-reduce 8 M + 2 T;
* CP: all-to-all 8 S_c B (D/N) e (q|k|v in one, the output back; the same in backward).
Outside the blocks: SP scatter/gather of the video M each, t6 [B, 6D] all-reduce; CP: all-gather of the
full sequence S B D e twice, the text and t6 all-reduce; SP-tagged grads (9 D per block, fp32) over TP;
every local parameter's fp32 grad all-reduced over DP x CP (+ a broadcast over DP with ZeRO-1).

Activation checkpointing (`checkpointing` = selective or full) recomputes each block's forward in backward, and
the forward's collectives with it (torch's checkpoint re-runs every op it does not keep; the collectives are in
place into megatron's buffers, which a selective-checkpoint cache cannot hand back): per block TP+SP all-gather
3 M + reduce-scatter 3 M (TP without SP: all-reduce 3 M), CP all-to-all 4 S_c B (D/N) e. osp plan counts the
same on the Trainer on meta (tests/test_planner.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

GROUPS = ("tp", "cp", "dp_cp", "dp")


@dataclass(frozen=True)
class CommLayout:
    tp: int = 1
    sp: bool = False
    cp: int = 1
    dp: int = 1
    zero1: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp

    def group_size(self, group: str) -> int:
        return {"tp": self.tp, "cp": self.cp, "dp_cp": self.dp * self.cp, "dp": self.dp}[group]

    def name(self) -> str:
        s = f"TP{self.tp}{'+SP' if self.sp else ''}"
        if self.cp > 1:
            s += f" CP{self.cp}"
        return s + f" DP{self.dp}" + (" ZeRO-1" if self.zero1 else "")


@lru_cache(maxsize=None)
def local_param_count(cfg_json: str, tp: int) -> int:
    """Parameters held by one TP rank (TP-sharded tensors / tp, replicated ones whole)."""
    import json

    from osp.stage2_train.state_dict_adapter import tp_split_dim
    from osp.common.models.dit import build_dit

    model = build_dit(json.loads(cfg_json), device="meta")
    return sum(p.numel() // (tp if tp_split_dim(n) is not None else 1) for n, p in model.named_parameters())


def payloads(
    cfg,
    tokens: int,
    text_len: int,
    batch: int,
    layout: CommLayout,
    act_bytes: int = 2,
    grad_bytes: int = 4,
    params: int | None = None,
    checkpointing: str = "none",
) -> dict[tuple[str, str], int]:
    """{(group, collective): payload bytes} of one micro-step (forward, backward, gradient reduction, and the
    forward's collectives again under selective / full recompute)."""
    import json

    n, s, b, d, e, g = cfg.num_layers, tokens, batch, cfg.inner_dim, act_bytes, grad_bytes
    tp, cp = layout.tp, layout.cp
    sc = s // cp
    m, t = sc * b * d * e, text_len * b * d * e
    out: dict[tuple[str, str], int] = {}

    def add(group: str, op: str, nbytes: int) -> None:
        if layout.group_size(group) > 1 and nbytes:
            out[(group, op)] = out.get((group, op), 0) + int(nbytes)

    # per block, column-parallel GEMMs on the video: fused q/k/v, cross-attention q, FFN in (3); row-parallel:
    # the two attention outputs and the FFN out (3); cross-attention k/v is one fused GEMM on the text
    if tp > 1:
        if layout.sp:
            # all-gather: 3 column inputs forward + the same 3 again in backward + 3 row grads; plus the video's
            # scatter (backward) and gather (forward); reduce-scatter: 3 row outputs + 3 column input grads
            add("tp", "all_gather", n * 9 * m + 2 * m)
            add("tp", "reduce_scatter", n * 6 * m)
            add("tp", "all_reduce", n * t + b * 6 * d * e + n * 9 * d * g)  # text k/v, t6 copy_to, SP-tagged grads
        else:
            add("tp", "all_reduce", n * (6 * m + t))  # 3 row outputs + 3 column input grads; the text k/v grad
    if checkpointing in ("selective", "full"):  # the recomputed forward's collectives
        if tp > 1 and layout.sp:
            add("tp", "all_gather", n * 3 * m)
            add("tp", "reduce_scatter", n * 3 * m)
        elif tp > 1:
            add("tp", "all_reduce", n * 3 * m)
        if cp > 1:
            add("cp", "all_to_all", n * 4 * sc * b * (d // tp) * e)
    if cp > 1:
        add("cp", "all_to_all", n * 8 * sc * b * (d // tp) * e)
        add("cp", "all_gather", 2 * s * b * d * e)
        add("cp", "all_reduce", t + b * 6 * d * e)
    if params is None:
        params = local_param_count(json.dumps(cfg.to_dict()), tp)
    add("dp_cp", "all_reduce", params * g)
    if layout.zero1:
        add("dp", "broadcast", params * 4)
    return out


FACTOR = {"all_gather": 1, "reduce_scatter": 1, "all_to_all": 1, "broadcast": 1, "all_reduce": 2}


def wire_bytes(p: dict[tuple[str, str], int], layout: CommLayout) -> dict[str, float]:
    """Bytes sent per rank per group (ring / pairwise algorithms), plus 'total'."""
    out = {k: 0.0 for k in GROUPS}
    for (group, op), nbytes in p.items():
        gs = layout.group_size(group)
        out[group] += FACTOR[op] * (gs - 1) / gs * nbytes
    out["total"] = sum(out[k] for k in GROUPS)
    return out


def attention_flops_per_rank(cfg, tokens: int, batch: int, layout: CommLayout) -> float:
    """Self-attention score + value FLOPs (4 S^2 D per block and sample, forward) on one rank: every rank
    runs full-sequence attention over h / (TP * CP) heads."""
    return cfg.num_layers * 4.0 * tokens * tokens * cfg.inner_dim * batch / (layout.tp * layout.cp)
