"""Training configuration: one dataclass per TOML section, a TOML file plus `section.key=value` overrides.

    [run] [data] [model] [parallel] [optim] [diffusion]

Defaults are the upstream v1.2 recipe (constants from `osp.common.config`); the demo config in
`stage2_train/configs/demo.toml` only changes what the tiny CPU demo needs.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, Sequence

from osp.common import config as C
from osp.common.errors import ConfigError
from osp.common.models.dit import PRECISIONS, resolve_precision  # noqa: F401  (re-exported for run.py)


CHECKPOINTING = ("none", "selective", "full")  # model.checkpointing modes


@dataclass
class RunConfig:
    name: str = "demo"
    root: str = "runs"  # the run lives in <root>/<name> unless `dir` is set
    dir: str = ""
    seed: int = 42
    steps: int = 100  # optimizer steps in total (a resumed run stops at the same step)
    log_every: int = 1
    ckpt_every: int = 100  # 0 = only at the end and on SIGTERM
    async_ckpt: bool = True  # write checkpoints in the background (DCP async_save); training waits only for a host copy
    device: str = "auto"  # auto | cuda | npu | cpu
    precision: str = "auto"  # auto | bf16 | fp32: activation dtype of the DiT (auto = bf16 on accelerators, fp32 on
    #                          CPU); parameters, optimizer state and EMA stay fp32 (the "train.precision")
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = unknown (MFU not reported)
    nonfinite: str = "stop"  # stop | skip: what a NaN/Inf loss or gradient does
    tensorboard: bool = True  # when the tensorboard package is installed
    log_keys: bool = False  # write the sample keys of every step to keys-rankNNNNN.jsonl (data-order audits)
    watchdog_s: float = (
        1800.0  # a rank whose step (data wait, collectives, checkpoint) makes no progress this long stops; 0 = off
    )

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path(self.root) / self.name


@dataclass
class DataConfig:
    shards: str = "shards/demo"
    batch_size: int = 1  # samples per data-parallel rank per micro-step
    num_workers: int = 2
    skip_corrupt: bool = False  # a checksum failure skips the sample (counted) instead of stopping
    images: bool = False  # also train on single-frame samples (T = 1) as their own buckets (upstream v1.2
    #                       trained images in separate stages, so video runs leave them out)
    # object storage (data.shards = "s3://bucket/prefix"); credentials: the standard AWS chain only
    endpoint_url: str = ""  # S3-compatible endpoint (MinIO, R2, ...); "" = AWS_ENDPOINT_URL or AWS itself
    cache_dir: str = ""  # local cache of the samples read from object storage (checked on reuse); "" = none
    cache_bytes: int = 0  # size bound of cache_dir (least recently used ranges go first); 0 = unbounded
    timeout_s: float = 30.0  # per object-store request (a stalled connection fails over to a retry)
    retries: int = 8  # transient object-store errors retried per request (exponential backoff)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a DiT preset name, or a path to a diffusers-style config.json
    init: str = ""  # converted released checkpoint (or an osp checkpoint) loaded strictly as the start
    checkpointing: str = "none"  # none | selective (keep GEMM + attention outputs, recompute elementwise) | full
    attention_backend: str = "auto"  # auto | cudnn | flash | efficient | math | fa3 | npu (osp.common.models.attention)
    compile: bool = False  # torch.compile each transformer block


@dataclass
class ParallelConfig:
    tp: int = 1
    sp: bool = False  # megatron sequence parallelism (needs tp > 1)
    cp: int = 1  # Ulysses context parallelism over the video tokens (tp * cp must divide the heads)
    zero1: bool = False  # shard AdamW state across data-parallel ranks (torch ZeroRedundancyOptimizer)
    overlap_grad_reduce: bool = (
        True  # DP all-reduce of each gradient bucket during backward (false: blocking, same numbers)
    )
    bucket_mb: float = 25.0  # DDP gradient bucket size in MiB
    init_timeout_s: float = 300.0  # bound on reaching MASTER_ADDR / the other ranks


@dataclass
class OptimConfig:
    lr: float = C.LEARNING_RATE
    weight_decay: float = C.WEIGHT_DECAY
    betas: list[float] = field(default_factory=lambda: list(C.ADAM_BETAS))
    eps: float = C.ADAM_EPS
    schedule: str = "constant"  # constant | cosine (both after a linear warmup)
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine floor
    grad_accum: int = 1
    clip: float = C.GRAD_CLIP  # global grad-norm clip across TP shards; 0 = off
    ema_decay: float = C.EMA_DECAY  # 0 = no EMA


@dataclass
class DiffusionConfig:
    noise_offset: float = C.NOISE_OFFSET
    snr_gamma: float = C.MIN_SNR_GAMMA  # 0 = plain MSE
    cfg_dropout: float = C.CFG_DROPOUT


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "TrainConfig":
        cfg = cls()
        for section, values in d.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: top-level key {section!r} must be a [section]; sections: {_sections()}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, source)
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Read a TOML file (None = defaults), then apply `section.key=value` overrides."""
        data: dict = {}
        source = "<defaults>"
        if path is not None:
            source = str(path)
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(
                    f"{path}: config file not found; pass --config stage2_train/configs/demo.toml or a copy of it"
                ) from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: not valid TOML ({e}); fix the file") from None
        cfg = cls.from_dict(data, source)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value (e.g. run.steps=10)")
            key, raw = item.split("=", 1)
            cfg.set(key.strip(), _parse_value(raw.strip()), "override")
        cfg.validate(source)
        return cfg

    def set(self, dotted: str, value: Any, source: str = "override") -> None:
        parts = dotted.split(".")
        if len(parts) != 2 or parts[0] not in _sections():
            raise ConfigError(f"{source}: unknown key {dotted!r}; keys are section.field with sections {_sections()}")
        section = getattr(self, parts[0])
        names = {f.name: f for f in fields(section)}
        if parts[1] not in names:
            raise ConfigError(f"{source}: unknown key {dotted!r}; [{parts[0]}] has {sorted(names)}")
        current = getattr(section, parts[1])
        setattr(section, parts[1], _coerce(value, current, dotted, source))

    def validate(self, source: str = "config") -> None:
        def bad(msg: str) -> NoReturn:
            raise ConfigError(f"{source}: {msg}")

        if self.run.steps < 1:
            bad("run.steps must be >= 1")
        if self.run.nonfinite not in ("stop", "skip"):
            bad("run.nonfinite must be 'stop' or 'skip'")
        if self.run.precision not in PRECISIONS:
            bad(f"run.precision must be one of {', '.join(PRECISIONS)}")
        from osp.common.models.attention import BACKENDS

        if self.model.attention_backend not in BACKENDS:
            bad(f"model.attention_backend must be one of {', '.join(BACKENDS)}")
        if self.data.batch_size < 1:
            bad("data.batch_size must be >= 1")
        if self.parallel.tp < 1:
            bad("parallel.tp must be >= 1")
        if self.parallel.cp < 1:
            bad("parallel.cp must be >= 1")
        if self.parallel.bucket_mb <= 0:
            bad("parallel.bucket_mb must be > 0 (MiB per DDP gradient bucket)")
        if self.parallel.sp and self.parallel.tp == 1:
            bad("parallel.sp=true needs parallel.tp > 1 (set parallel.sp=false for tp=1)")
        if self.model.checkpointing not in CHECKPOINTING:
            bad(f"model.checkpointing must be one of {', '.join(CHECKPOINTING)}")
        if self.optim.schedule not in ("constant", "cosine"):
            bad("optim.schedule must be 'constant' or 'cosine'")
        if self.optim.grad_accum < 1:
            bad("optim.grad_accum must be >= 1")
        if len(self.optim.betas) != 2:
            bad("optim.betas must be a list of two numbers")
        if not 0.0 <= self.diffusion.cfg_dropout <= 1.0:
            bad("diffusion.cfg_dropout must be in [0, 1]")

    # --- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


def config_keys_help() -> str:
    """Every `section.key` with its default, one paragraph per section (for `--help` texts)."""
    default = TrainConfig().to_dict()
    parts = ["Config keys (section.key=default; set in the TOML file or as overrides):"]
    for section, values in default.items():
        parts.append(" ".join(f"{section}.{k}={_toml_value(v)}" for k, v in values.items()))
    return "\n\n".join(parts)


def _sections() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _parse_value(raw: str) -> Any:
    """TOML literal if it parses (1, 1e-4, true, [0.9, 0.99], "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _coerce(value: Any, current: Any, key: str, source: str) -> Any:
    kind = type(current)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        return str(value)
    elif kind is list:
        if isinstance(value, list):
            return [float(v) for v in value]
    raise ConfigError(f"{source}: {key} = {value!r} must be of type {kind.__name__}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, str)):
        return json.dumps(v)
    return repr(v)
