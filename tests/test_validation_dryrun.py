"""A validation step in the dry run: at 93x480p TP=2+SP the dry run runs the sampling of a validation
step on `meta` (EMA swapped in, CFG batch, one denoising step) and reports its measured peak."""

from __future__ import annotations

import warnings

from osp.stage2_train import dryrun as DR

GIB = 2**30


def _dry(overrides):
    cfg = DR.build_config(None, overrides, "osp12-93x480p", 2, True, "none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DR.dry_run(cfg, 2, 0, 80.0)


def test_480p_tp2_sp_dry_run_counts_a_validation_step():
    on = _dry(["validate.every=100", "validate.prompts=unused-by-the-dry-run"])
    # the training state stays in place, plus the copy of the weights the EMA swap keeps, plus the sampling
    held = on.params + on.optimizer + on.ema + on.params
    assert held < on.validation_peak < held + 8 * GIB, (on.validation_peak / GIB, held / GIB)
    assert "peak of a validation step" in on.table()
    off = _dry([])
    assert off.validation_peak == 0 and "peak of a validation step" not in off.table()
    assert off.peak == on.peak  # the training step itself is unchanged
