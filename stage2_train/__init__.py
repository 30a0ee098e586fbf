"""Stage 2: megatron-core TP/SP DiT training that reads only the stage-1 shards (never an encoder)."""
