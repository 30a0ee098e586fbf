"""The attention-backend switch holds inside compiled graphs; FlashAttention-3 and NPU fused attention are
guarded with one-line errors; the kernel in use is kept for the metrics."""

from __future__ import annotations

import copy

import pytest
import torch

from osp.common.errors import OspError
from osp.common.models import attention as A
from osp.common.models.dit import build_dit
from osp.stage2_train.plan import apply_compile


@pytest.fixture(autouse=True)
def _auto_afterwards():
    yield
    A.set_backend("auto", "cpu")


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 16, 8, generator=g) for _ in range(3)]


def _compiled_graphs(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, graphs


def test_backend_priority_is_traced_into_the_compiled_graph():
    q, k, v = _qkv()
    A.set_backend("math", "cpu")
    ref = A.attention(q, k, v)
    out, graphs = _compiled_graphs(A.attention, q, k, v)
    torch.testing.assert_close(out, ref)
    code = "\n".join(g.code for g in graphs)
    # the context enters the graph: the MATH backend only, with priority
    assert "_sdpa_kernel(" in code and "_backend_from_string('MATH')" in code
    before = code[: code.index("scaled_dot_product_attention(")]  # what the graph sets up before the kernel
    assert "_backend_from_string('MATH')" in before and "'FLASH_ATTENTION'" not in before
    assert "_sdpa_kernel([_backend_from_string], True)" in before  # set_priority=True
    # the auto switch on CPU leaves the choice to torch (no context in the graph)
    A.set_backend("auto", "cpu")
    _, graphs = _compiled_graphs(A.attention, q, k, v)
    assert "_sdpa_kernel(" not in "\n".join(g.code for g in graphs)


def test_a_backend_that_cannot_run_fails_compiled_as_in_eager():
    """Mem-efficient attention has no CPU kernel: eager refuses it, and so does the compiled call (the
    restriction holds inside the graph instead of falling back to torch's order); math runs in both."""
    q, k, v = _qkv()
    A.set_backend("efficient", "cpu")
    with pytest.raises(RuntimeError, match="No viable backend"):
        A.attention(q, k, v)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="No viable backend"):
        torch.compile(A.attention, backend="aot_eager", fullgraph=True)(q, k, v)
    A.set_backend("math", "cpu")
    torch._dynamo.reset()
    out = torch.compile(A.attention, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, A.attention(q, k, v))


def test_compiled_blocks_keep_the_switch():
    """The DiT's compiled blocks with a forced backend: same output as eager, and the forced backend still
    refuses to run where it cannot (efficient on CPU)."""
    torch.manual_seed(0)
    eager = build_dit("tiny")
    comp = copy.deepcopy(eager)
    torch._dynamo.reset()
    apply_compile(comp, backend="aot_eager", fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 3, 6, 8, generator=g), torch.tensor([500.0])
    text, mask = torch.randn(1, 9, 64, generator=g), torch.ones(1, 9)
    mask[0, 5:] = 0
    assert A.resolve_backend("math", torch.device("cpu"), 2, 24, torch.float32) == "sdpa:math"
    assert A.backend_in_use() == "sdpa:math"
    with torch.no_grad():
        torch.testing.assert_close(comp(x, t, text, mask), eager(x, t, text, mask), rtol=1e-5, atol=1e-5)
    A.set_backend("efficient", "cpu")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="No viable backend"), torch.no_grad():
        comp(x, t, text, mask)


def test_fa3_and_npu_are_guarded_with_one_line_errors():
    cpu = torch.device("cpu")
    with pytest.raises(OspError) as e:
        A.resolve_backend("fa3", cpu, 2, 24, torch.float32)
    assert "\n" not in str(e.value) and "fa3" in str(e.value) and "auto" in str(e.value)
    try:
        import torch_npu  # noqa: F401  # pyright: ignore[reportMissingImports]
    except ImportError:
        with pytest.raises(OspError, match="torch_npu"):
            A.resolve_backend("npu", cpu, 2, 24, torch.float32)
    with pytest.raises(OspError, match="cannot run on cpu"):
        A.resolve_backend("efficient", cpu, 2, 24, torch.float32)
    with pytest.raises(OspError, match="unknown"):
        A.set_backend("xformers", "cpu")
    # the dry run on meta: nothing to probe, the switch is kept (fa3 planned for the GPU run)
    assert A.resolve_backend("fa3", torch.device("meta"), 2, 24, torch.bfloat16) == "fa3 (not probed on meta)"
    assert A.backend_in_use() == "fa3 (not probed on meta)"
