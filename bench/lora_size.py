"""LoRA checkpoint size at osp12 width: adapter-only training state ÷ full training state (rank 64).

The models are built on `meta` (nothing allocated): the full run's checkpoint holds the fp32 weights,
their EMA and both AdamW moments of every parameter; the LoRA run's holds the same four fp32 tensors of
the adapters only (`osp.stage2_train.checkpoint` saves what `trained_state` returns). Also printed: the
trainable parameters and the frozen bf16 base a LoRA run keeps in memory.
"""

from __future__ import annotations

import time

import torch

from osp.common.models.dit import build_dit
from osp.stage2_train.checkpoint import trained_state
from osp.stage2_train.lora import LoraSpec, apply_lora

PRESET, RANK = "osp12-93x480p", 64
STATE_COPIES = 4  # weights, EMA, AdamW exp_avg, exp_avg_sq: all fp32
GIB = 2**30


def state_bytes(model: torch.nn.Module) -> int:
    return sum(v.numel() * 4 * STATE_COPIES for v in trained_state(model).values())


def main() -> None:
    t0 = time.perf_counter()
    full = build_dit(PRESET, device="meta", dtype=torch.float32)
    lora = apply_lora(build_dit(PRESET, device="meta", dtype=torch.float32), LoraSpec(RANK, float(RANK)))
    n_full = sum(p.numel() for p in full.parameters())
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    base = sum(p.numel() * p.element_size() for p in lora.parameters() if not p.requires_grad)
    f, a = state_bytes(full), state_bytes(lora)
    print(f"{PRESET}, LoRA rank {RANK} on the default targets (q, k, v, out of both attentions, FFN)")
    print(f"  parameters: full {n_full:,}   adapters {n_lora:,} ({n_lora / n_full:.2%})")
    print(f"  checkpoint state: full {f / GIB:.2f} GiB   adapters {a / 2**20:.1f} MiB")
    print(f"  adapter checkpoint / full checkpoint = {a / f:.4f}")
    print(f"  frozen base in memory (bf16): {base / GIB:.2f} GiB   ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
