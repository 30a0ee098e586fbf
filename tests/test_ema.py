"""The vectorised EMA update (one torch._foreach_lerp_) equals the per-tensor rule, fp32 and bf16 models."""

from __future__ import annotations

import torch

from osp.stage2_train.optim import EMA


def _reference(shadow: dict, model: torch.nn.Module, d: float) -> None:
    for n, p in model.named_parameters():
        shadow[n] = d * shadow[n] + (1 - d) * p.detach().float()


def test_foreach_ema_equals_loop_rule_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(dtype)
        ema = EMA(net, 0.99)
        expect = {n: p.detach().float().clone() for n, p in net.named_parameters()}
        for k in range(1, 30):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            ema.update(net)
            _reference(expect, net, 0.0 if k == 1 else min(0.99, k / (k + 9)))
        for n in expect:
            assert ema.shadow[n].dtype == torch.float32
            torch.testing.assert_close(ema.shadow[n], expect[n], rtol=1e-6, atol=1e-6)
        # the shadow is not the parameter itself (a copy that moves slower)
        w = dict(net.named_parameters())["0.weight"]
        assert not torch.allclose(ema.shadow["0.weight"], w.detach().float(), atol=1e-3)


def test_ema_load_keeps_the_vectorised_view():
    net = torch.nn.Linear(4, 4)
    ema = EMA(net, 0.9)
    ema.load({n: torch.full_like(p, 2.0) for n, p in net.named_parameters()}, 5)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.0)
    ema.update(net)  # 6th update: decay min(0.9, 6/15) = 0.4 -> 0.8
    for t in ema.shadow.values():
        torch.testing.assert_close(t, torch.full_like(t, 0.8))
