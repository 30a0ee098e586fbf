"""The step efficiency switches on the tiny DiT: bf16 activations end to end, the attention kernel switch and
its single overridable call, torch.compile of the blocks, the config keys."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from osp.common.models import attention as A
from osp.common.models.dit import build_dit, resolve_precision


def _model(seed: int = 0):
    torch.manual_seed(seed)
    m = build_dit("tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.tensor([3.0, 901.25])
    text = torch.randn(2, 9, 64, generator=g)
    mask = torch.ones(2, 9)
    mask[0, 4:] = 0
    return x, t, text, mask


class _DtypeAudit(TorchDispatchMode):
    """Records (op, dtype, numel) of every floating tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                self.seen.append((str(func), o.dtype, o.numel()))
        return out


def test_bf16_activations_end_to_end():
    """With compute_dtype bf16 and fp32 master weights, no activation-sized tensor is fp32: not in the
    forward (bias adds, modulation, residual, LayerNorm output, RoPE) and not among the tensors saved for
    backward; the parameters and their gradients stay fp32."""
    m = _model()
    m.compute_dtype = torch.bfloat16
    x, t, text, mask = _inputs()
    act = 2 * 36 * 24  # B * S * head_dim: smaller fp32 tensors are statistics / embeddings of t
    saved: list[torch.Tensor] = []
    audit = _DtypeAudit()
    with torch.autograd.graph.saved_tensors_hooks(lambda s: (saved.append(s), s)[1], lambda s: s), audit:
        out = m(x, t, text, mask)
    big_fp32 = [(op, n) for op, dt, n in audit.seen if dt == torch.float32 and n >= act]
    assert out.dtype == torch.bfloat16
    assert big_fp32 == [], big_fp32[:5]
    assert sum(1 for _, dt, n in audit.seen if dt == torch.bfloat16 and n >= act) > 50  # the audit saw the blocks
    params = {id(p) for p in m.parameters()}
    saved_fp32 = [
        tuple(s.shape) for s in saved if s.dtype == torch.float32 and s.numel() >= act and id(s) not in params
    ]
    assert saved_fp32 == [], saved_fp32[:5]
    out.float().square().mean().backward()
    assert all(
        p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters()
    )
    # negative control: the fp32 policy leaves activations fp32
    m.compute_dtype = torch.float32
    audit = _DtypeAudit()
    with audit, torch.no_grad():
        m(x, t, text, mask)
    assert not any(dt == torch.bfloat16 for _, dt, _ in audit.seen)


def test_precision_switch_and_config_keys():
    from osp.stage2_train.config import TrainConfig

    assert resolve_precision("auto", True) == torch.bfloat16 and resolve_precision("auto", False) == torch.float32
    assert resolve_precision("bf16", False) == torch.bfloat16
    cfg = TrainConfig.load(
        None,
        ["run.precision=bf16", "model.checkpointing=selective", "model.attention_backend=math", "model.compile=true"],
    )
    assert (cfg.run.precision, cfg.model.checkpointing, cfg.model.attention_backend, cfg.model.compile) == (
        "bf16",
        "selective",
        "math",
        True,
    )
    for bad, msg in [
        ("run.precision=fp16", "run.precision"),
        ("model.checkpointing=some", "model.checkpointing"),
        ("model.attention_backend=xformers", "model.attention_backend"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig.load(None, [bad])


def test_attention_backend_switch_and_single_core_call():
    m = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        ref = m(x, t, text, mask)
    assert A.resolve_backend("math", torch.device("cpu"), 2, 24, torch.float32) == "sdpa:math"
    try:
        with torch.no_grad():
            forced = m(x, t, text, mask)
    finally:
        A.set_backend("auto", "cpu")
    torch.testing.assert_close(forced, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_backend"):
        A.resolve_backend("flash-v9", torch.device("cpu"), 2, 24, torch.float32)
    # every attention goes through the one overridable call (context parallelism wraps it)
    calls = []

    def core(q, k, v, bias):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return A.attention(q, k, v, bias)

    for blk in m.transformer_blocks:
        blk.attn1.core = blk.attn2.core = core
    with torch.no_grad():
        again = m(x, t, text, mask)
    assert torch.equal(again, ref)
    assert calls == [((2, 2, 48, 24), (2, 2, 48, 24)), ((2, 2, 48, 24), (2, 2, 9, 24))] * 2


def test_fused_qkv_equals_three_linears():
    """The fused q/k/v GEMM is a compute-time concatenation: same parameters, same result as three GEMMs."""
    m = _model()
    a = m.transformer_blocks[0].attn1
    h = torch.randn(48, 2, 48)
    fused = torch.cat([a.to_q(h), a.to_k(h), a.to_v(h)], dim=-1)
    from osp.common.models.dit import fused_linear

    torch.testing.assert_close(fused_linear(h, (a.to_q, a.to_k, a.to_v)), fused, rtol=1e-6, atol=1e-6)
    assert [n for n, _ in a.named_parameters()] == [
        "to_q.weight",
        "to_q.bias",
        "to_k.weight",
        "to_k.bias",
        "to_v.weight",
        "to_v.bias",
        "to_out.0.weight",
        "to_out.0.bias",
    ]


@pytest.mark.parametrize(
    "backend,ckpt", [("aot_eager", "selective"), pytest.param("inductor", "none", marks=pytest.mark.slow)]
)
def test_compile_blocks_equals_eager(backend, ckpt):
    """model.compile: compiled blocks (one graph each: fullgraph) give the eager output and gradients
    (fp32, CPU). aot_eager checks tracing + AOT autograd in seconds; inductor (C++ codegen, ~2 min on 2
    cores with a cold cache) is marked slow."""
    eager = _model()
    comp = copy.deepcopy(eager)
    from osp.stage2_train.plan import apply_ac, apply_compile

    apply_ac(comp, ckpt)  # selective recompute traced inside the compiled block
    apply_compile(comp, backend=backend, fullgraph=True, dynamic=False)
    x, t, text, mask = _inputs()
    outs = []
    for m in (eager, comp):
        out = m(x, t, text, mask)
        out.square().mean().backward()
        outs.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (o1, g1), (o2, g2) = outs
    assert list(g1) == list(g2)  # parameter names unchanged by compile
    torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-3, atol=1e-5, msg=k)


def test_step_proxy_counter_on_known_graphs():
    """bench/step_proxies.py's tracer: exact bytes of a known elementwise chain (eager per op, fused as
    one kernel), GEMM FLOPs, and views counted as free."""
    import importlib.util
    from pathlib import Path

    from torch._subclasses.fake_tensor import FakeTensorMode

    path = Path(__file__).resolve().parents[1] / "bench" / "step_proxies.py"
    spec = importlib.util.spec_from_file_location("step_proxies", path)
    P = importlib.util.module_from_spec(spec)
    sys.modules["step_proxies"] = P  # dataclasses look their module up
    spec.loader.exec_module(P)
    n = 1000
    with FakeTensorMode():
        x = torch.randn(n, n)  # 4 MB fp32
        w = torch.randn(n, 2 * n)
        tr = P.Tracer()
        with tr:
            y = (x * 2.0).sin() + x  # 3 elementwise ops
            z = y.view(-1).view(n, n).t().t() @ w  # views are free; one GEMM
            z.sum()
    mb = n * n * 4
    eager_chain = 2 * mb + 2 * mb + 3 * mb  # mul r/w, sin r/w, add 2r/w
    assert tr.counts.flops["gemm"] == 2 * n * n * 2 * n
    # sum reads z (8 MB) and writes a scalar; the chain is one fused group reading x, writing y (read by the GEMM)
    assert tr.counts.mem_eager == eager_chain + 2 * mb + 4
    assert tr.fused_bytes() == mb + mb + (2 * mb + 4)
    assert [nd.kind for nd in tr.nodes] == ["mem", "mem", "mem", "gemm", "mem"]


def test_gelu_linear_keeps_only_the_pre_activation():
    """ff.net.2 on the GELU pre-activation: same output and gradients as GELU then linear, and the
    GELU output is not among the tensors saved for backward."""
    from osp.common.models.dit import gelu_linear

    pre = torch.randn(5, 2, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    g = torch.randn(5, 2, 8)
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(pre, approximate="tanh"), w)
    rp, rw = torch.autograd.grad(ref, (pre, w), g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: (saved.append(s), s)[1], lambda s: s):
        out = gelu_linear(pre, w)
    gp, gw = torch.autograd.grad(out, (pre, w), g)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gp, rp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-6)
    assert all(s is pre or s is w for s in saved) and len(saved) == 2
