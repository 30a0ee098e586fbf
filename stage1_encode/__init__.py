"""Stage 1: read a video dataset once, run CausalVAE and mT5, write WebDataset shards + a zarr index."""
