"""Warning filters installed where osp starts (the `osp` CLI, anything under `osp.stage2_train`),
before megatron-core is imported.

Only third-party notices that do not concern an osp user are silenced, each by its exact message and
category; every other warning still shows (pytest's own filters live in pyproject.toml).
"""

from __future__ import annotations

import warnings

# (message prefix regex, category): why it does not concern the user
_THIRD_PARTY = [
    # megatron-core at import: it falls back to torch kernels, which is osp's plan on every device
    (r"Transformer Engine and Apex are not installed", UserWarning),
    # megatron-core 0.16.1 calls these torch.distributed functions, deprecated in torch >= 2.9
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning),
]
# megatron-core's hint for overlapping SP communication on CUDA streams: meaningless on CPU and NPU
_CUDA_ONLY = [
    (
        r"When using sequence parallelism it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
        UserWarning,
    ),
]


def quiet_third_party_warnings() -> None:
    """Silence the third-party notices above (idempotent)."""
    for message, category in _THIRD_PARTY:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_device_warnings(device_type: str) -> None:
    """Silence the CUDA-only hints when the run is not on CUDA."""
    if device_type != "cuda":
        for message, category in _CUDA_ONLY:
            warnings.filterwarnings("ignore", message=message, category=category)
