"""`osp plan`: every valid layout, evaluated from the Trainer on meta at one and two blocks.

Independent check: a planned layout's peak (measured at 1-2 blocks and micro-batch 1-2, extended to the preset's
depth and the layout's micro-batch, plus the exact held state) against a full dry run of that layout at the preset's depth. Refusals are one line.
"""

from __future__ import annotations

import json
import warnings

import pytest

from osp.stage2_train import dryrun as DR
from osp.stage2_train import planner as P
from osp.stage2_train import roofline as R


@pytest.fixture(scope="module")
def tiny_plan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return P.plan("tiny", 1, 2, "h100-80gb", 4, samples=1e5)


def test_layouts_cover_the_valid_space(tiny_plan):
    names = {r.layout.name() for r in tiny_plan.rows}
    assert "TP2+SP DP1 selective mb2x2" in names and "TP1 CP2 DP1 ZeRO-1 full mb4x1" in names
    assert "TP1 DP2 ZeRO-1 none mb2x1" in names and "TP1 DP2 ZeRO-1 none mb1x2" in names
    for r in tiny_plan.rows:
        lay = r.layout
        assert lay.tp * lay.cp * lay.dp == 2 and lay.dp * lay.micro_batch * lay.grad_accum == 4
        assert not (lay.zero1 and lay.dp * lay.cp == 1)
    card = R.get_card("h100-80gb")
    for r in tiny_plan.rows:
        assert r.fits == (r.peak <= 0.9 * card.memory_gb * 1e9 and r.host <= 0.9 * tiny_plan.host_gb * 1e9)
    ranked = tiny_plan.ranked()
    fitting = [r for r in ranked if r.fits]
    assert ranked[: len(fitting)] == fitting
    assert [r.samples_per_s for r in fitting] == sorted((r.samples_per_s for r in fitting), reverse=True)
    out = json.loads(tiny_plan.to_json())
    assert out["rows"][0]["layout"] == ranked[0].layout.name() and "parallel.tp=" in out["rows"][0]["overrides"][0]


@pytest.mark.parametrize(
    "tp, cp, zero1, mode, mb",
    [(1, 1, True, "selective", 2), (2, 1, False, "full", 1), (1, 2, True, "none", 2)],
)
def test_planned_peak_matches_a_full_dry_run(tiny_plan, tp, cp, zero1, mode, mb):
    row = next(
        r
        for r in tiny_plan.rows
        if (r.layout.tp, r.layout.cp, r.layout.zero1, r.layout.checkpointing, r.layout.micro_batch)
        == (tp, cp, zero1, mode, mb)
    )
    cfg = DR.build_config(None, row.layout.overrides(), "tiny", None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dry = DR.dry_run(cfg, 2, 0, 80.0)
    assert abs(row.peak - dry.peak) <= 0.03 * dry.peak, (row.layout.name(), row.peak, dry.peak)
    state = P.held_state(P.get_dit("tiny"), row.layout)
    assert state.params == dry.params and state.grads == dry.grads
    assert state.optimizer >= dry.optimizer and state.ema >= dry.ema  # the largest rank's share


def test_refusals_are_one_line(capsys):
    assert P.main_cli(preset="tiny", nodes=1, gpus=2, card="nope", global_batch=2) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "h100-80gb" in err and "a100-80gb" in err
    assert P.main_cli(preset="osp12-93x480p", nodes=1, gpus=10, card="h100-80gb", global_batch=10, tp=5) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tp 5" in err and "heads" in err
    assert P.main_cli(preset="tiny", nodes=1, gpus=2, card="h100-80gb", global_batch=0) == 1
    assert "--global-batch" in capsys.readouterr().err


def test_selective_recompute_collectives_are_counted():
    """Selective recompute re-runs the block's forward elementwise ops, the SP all-gathers and reduce-scatters
    among them: the counted TP bytes are higher than without recompute (and the estimate pays for them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = P.measure("tiny", 2, 1)
    block = {k: m[(2, 1)].modes[k] - m[(1, 1)].modes[k] for k in P.MODES}
    assert block["none"].tp_coll > 0
    assert block["selective"].tp_coll > block["none"].tp_coll
    assert block["full"].attn_recompute > 0 and block["selective"].attn_recompute == 0
