"""Scale-out layouts for the real 93x480p / 93x720p DiT on 8 ranks: collective bytes per rank per step
(TP, CP, DP) and self-attention FLOPs per rank, as ratios against the shipped layout (TP=2 + SP, DP=4,
ZeRO-1: stage2_train/configs/osp12-93x480p.toml on 8 GPUs). A step trains DP samples (batch 1 per DP
rank), so 'GB/sample' (the step's bytes per rank / DP) is the throughput-relevant figure: CP and TP
shrink each rank's share of one sample, DP spreads the gradient all-reduce over more samples.

Counted exactly at the real sizes (no accelerator needed) with osp.stage2_train.comm_volume, whose
per-collective payloads tests/test_cp.py checks byte for byte against a real gloo step. One micro-step,
batch 1 per DP rank, bf16 activations, fp32 gradients, text at its 512-token maximum, no recomputation
(the 'selective total' column adds the forward's TP/CP collectives that selective or full recompute re-issue). Per-rank memory columns: the exact
optimizer-side state (fp32 weights, grads; the EMA, sharded over DP; AdamW m, v, sharded with ZeRO-1) and the block inputs
kept by per-block checkpointing; the working set of the block being recomputed comes on top (the
accelerator dry run measures it). Bytes are sent per rank with ring /
pairwise algorithms; the 'est. ms' column divides them by an assumed 400 GB/s per-rank link (an
estimate, not a measurement).

Usage: python bench/scaleout.py [--world 8] [--text 512] [--link-gbps 400]
"""

from __future__ import annotations

import argparse

from osp.common.config import TEXT_MAX_LENGTH
from osp.common.models.dit import get_dit_config
from osp.stage2_train.comm_volume import CommLayout, attention_flops_per_rank, local_param_count, payloads, wire_bytes
from osp.stage2_train.layout import check_context_parallel


def layouts(world: int) -> list[CommLayout]:
    out = []
    for tp in (1, 2, 4, 8):
        for cp in (1, 2, 4, 8):
            if world % (tp * cp):
                continue
            out.append(CommLayout(tp=tp, sp=tp > 1, cp=cp, dp=world // (tp * cp), zero1=world // (tp * cp) > 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--text", type=int, default=TEXT_MAX_LENGTH)
    ap.add_argument(
        "--link-gbps", type=float, default=400.0, help="assumed per-rank link bandwidth for the time estimate"
    )
    a = ap.parse_args()
    base_layout = CommLayout(tp=2, sp=True, cp=1, dp=a.world // 2, zero1=True)
    import json

    for preset in ("osp12-93x480p", "osp12-93x720p"):
        cfg = get_dit_config(preset)
        tokens = cfg.sample_size_t * (cfg.sample_size[0] // cfg.patch_size) * (cfg.sample_size[1] // cfg.patch_size)

        def figures(lay: CommLayout, cfg=cfg, tokens=tokens) -> dict:
            w = wire_bytes(payloads(cfg, tokens, a.text, 1, lay, act_bytes=2, grad_bytes=4), lay)
            sel = wire_bytes(
                payloads(cfg, tokens, a.text, 1, lay, act_bytes=2, grad_bytes=4, checkpointing="selective"), lay
            )
            w["selective"] = sel["total"]
            w["attn"] = attention_flops_per_rank(cfg, tokens, 1, lay)
            w["params"] = p = local_param_count(json.dumps(cfg.to_dict()), lay.tp)
            # fp32 weights + fp32 grads, fp32 EMA (sharded over DP), AdamW m and v (sharded over DP with ZeRO-1)
            w["state"] = p * 8 + p * 4 / lay.dp + p * 8 / (lay.dp if lay.zero1 else 1)
            # per-block checkpointing keeps each block's input: [S / (CP (x TP under SP)), B, D] bf16
            w["ckpt_act"] = cfg.num_layers * tokens // (lay.cp * (lay.tp if lay.sp else 1)) * cfg.inner_dim * 2
            return w

        base = figures(base_layout)
        print(
            f"\n## {preset}: {tokens} video tokens, {a.text} text tokens, {a.world} ranks "
            f"(baseline {base_layout.name()}: {base['total'] / 1e9:.2f} GB sent per rank per step)\n"
        )
        print(
            "| layout | TP GB | CP GB | DP GB | total GB | selective total GB | ÷ shipped | GB/sample | ÷ shipped | est. ms @ link | attn TFLOP/rank (fwd) | ÷ shipped | params/rank (M) | state GiB/rank | ckpt inputs GiB/rank |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for lay in layouts(a.world):
            try:
                check_context_parallel(cfg.num_attention_heads, tokens, lay.tp, lay.cp, lay.sp)
            except ValueError:
                continue
            f = figures(lay)
            print(
                f"| {lay.name()} | {f['tp'] / 1e9:.2f} | {f['cp'] / 1e9:.2f} | {(f['dp_cp'] + f['dp']) / 1e9:.2f} | "
                f"{f['total'] / 1e9:.2f} | {f['selective'] / 1e9:.2f} | {f['total'] / base['total']:.2f} | {f['total'] / lay.dp / 1e9:.2f} | "
                f"{f['total'] / lay.dp / (base['total'] / base_layout.dp):.2f} | {f['total'] / (a.link_gbps * 1e9) * 1e3:.0f} | "
                f"{f['attn'] / 1e12:.1f} | {f['attn'] / base['attn']:.2f} | {f['params'] / 1e6:.0f} | "
                f"{f['state'] / 2**30:.1f} | {f['ckpt_act'] / 2**30:.2f} |"
            )


if __name__ == "__main__":
    main()
