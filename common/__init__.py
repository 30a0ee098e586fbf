"""osp: Open-Sora Plan 1.2 as a two-stage offline feature-cache pipeline.

`osp.common` holds what more than one stage uses: model definitions, presets and constants,
the shard contract, checkpoint key maps, device selection and the `osp` CLI entry point.
"""

__version__ = "0.1.0"
