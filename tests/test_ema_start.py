"""optim.ema_start_step: the EMA copies the weights until then, then follows diffusers EMAModel with
`update_after_step` (upstream's ema_start_step), compared update by update."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from osp.common.errors import ConfigError
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.optim import EMA


@pytest.mark.parametrize("start", [0, 3])
def test_ema_start_step_matches_diffusers_update_after_step(start):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    ours = EMA(net, 0.99, start_step=start)
    ref = EMAModel(net.parameters(), decay=0.99, update_after_step=start)
    for k in range(1, 13):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update(net)
        ref.step(net.parameters())
        assert ours.decay() == pytest.approx(ref.get_decay(ref.optimization_step))
        for (n, p), s in zip(net.named_parameters(), ref.shadow_params):
            torch.testing.assert_close(ours.shadow[n], s, rtol=1e-6, atol=1e-6)
            if k <= start + 1:  # still copying: the shadow IS the weights
                assert torch.equal(ours.shadow[n], p.detach())
        if k == start + 2:  # the first averaging update: no longer a copy
            assert not torch.equal(ours.shadow["0.weight"], net[0].weight.detach())


def test_ema_start_step_config():
    assert TrainConfig.load(None, ["optim.ema_start_step=50"]).optim.ema_start_step == 50
    with pytest.raises(ConfigError, match="optim.ema_start_step must be >= 0"):
        TrainConfig.load(None, ["optim.ema_start_step=-1"])
