"""Stage 2: megatron-core TP/SP DiT training that reads only the stage-1 shards (never an encoder)."""

from osp.common.quiet import quiet_third_party_warnings

quiet_third_party_warnings()  # before anything here imports megatron-core
