"""Stage 1: read a video dataset once, run CausalVAE and mT5, write WebDataset shards + a zarr index.

Modules (each uses only the ones above it):
    dataset.py  `--data` forms (pixabay_v2 root, annotation .json, DATA_ROOT,ANNOTATION_JSON list), path safety
    clips.py    decord (PyAV fallback) reading, 24 fps resampling, clip placement, centre crop + resize
    plan.py     sorted inputs -> clips -> fixed shard membership and keys; input accounting
    run.py      the pipelined, resumable, rank-parallel encoder; merge, manifest, uncond
    preview.py  decode a cached latent back to mp4 (cache audit)

Deterministic choices where upstream v1.2 is random or filters differently (upstream: opensora/dataset/t2v_datasets.py):
* caption: the first non-empty caption of `cap` (upstream: uniform random per access);
  `--all-captions` makes one sample per caption instead.
* temporal crop: the centred window of `num_frames` resampled frames (upstream: uniform random
  start); `--clips-per-video k` takes up to k consecutive non-overlapping windows, centred as a block.
* clip length: exactly the preset's `num_frames` (1 + 4k); shorter videos are errors ("too short",
  upstream's drop_short_ratio = 1). Upstream's "drop if longer than 2 * num_frames / 24 s" filter is
  off by default (we cut clips from long videos instead) and available as `--drop-long`.
* aspect filter h/w in [a / 1.5, 1.5 a] is applied to the annotation's resolution at plan time and
  to the decoded frame size at decode time.
* records lacking fps, duration or resolution (videos) are errors, as upstream drops them.
* duplicate paths (same root + normalised path): the first in sorted order is encoded, later ones
  are error rows.
"""
