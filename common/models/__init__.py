"""Model definitions: CausalVAE, the OpenSoraT2V DiT, 3-D RoPE and the mT5 text encoder wrapper."""
