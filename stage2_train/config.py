"""Training configuration: one dataclass per TOML section, a TOML file plus `section.key=value` overrides.

    [run] [data] [model] [parallel] [optim] [diffusion] [lora] [launch] [dryrun] [log] [validate]

Defaults are the upstream v1.2 recipe (constants from `osp.common.config`); the demo config in
`stage2_train/configs/demo.toml` only changes what the tiny CPU demo needs. Every `osp train` flag
sets one key here (`TrainConfig.load(..., flags=...)`), so a flag means the same in a real run and in
a dry run. This module imports no torch: `osp train --help` reads it.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

from osp.common import config as C
from osp.common.config import CHECKPOINTING, PRECISIONS
from osp.common.errors import ConfigError

DRY_RUN_SHAPES = ("preset", "shards")  # dryrun.shape
# lora.targets default: self/cross attention q, k, v, out and the FFN of every block (osp.stage2_train.lora)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass
class RunConfig:
    name: str = "demo"
    root: str = "runs"  # the run lives in <root>/<name> unless `dir` is set
    dir: str = ""
    seed: int = 42
    steps: int = 100  # optimizer steps in total (a resumed run stops at the same step)
    log_every: int = 1
    ckpt_every: int = 100  # 0 = only at the end and on SIGTERM
    keep_last: int = 0  # keep the newest N checkpoints, delete older ones once a newer one is published; 0 = keep all
    keep_every: int = 0  # with keep_last: also keep every checkpoint whose step is a multiple of K, permanently
    ckpt_every_minutes: float = 0.0  # also a checkpoint once this much time passed since the last one (0 = off)
    async_ckpt: bool = True  # write checkpoints in the background (DCP async_save); training waits only for a host copy
    device: str = "auto"  # auto | cuda | npu | cpu
    precision: str = "auto"  # auto | bf16 | fp32: activation dtype of the DiT (auto = bf16 on accelerators, fp32 on
    #                          CPU); parameters, optimizer state and EMA stay fp32
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = unknown (MFU not reported)
    nonfinite: str = "stop"  # stop | skip: what a NaN/Inf loss or gradient does
    tensorboard: bool = True  # when the tensorboard package is installed
    log_keys: bool = False  # write the sample keys of every step to keys-rankNNNNN.jsonl (data-order audits)
    watchdog_s: float = (
        1800.0  # a rank whose step (data wait, collectives, checkpoint) makes no progress this long stops; 0 = off
    )
    resume: str = ""  # "" = a new run (a run folder that holds checkpoints is refused) | auto | a checkpoint folder

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
    sources: list[dict] = field(default_factory=list)  # several caches mixed by weight, e.g.
    #   [{shards = "shards/29x480p", weight = 3}, {shards = "shards/images", weight = 1}]; empty = data.shards
    tokens_per_batch: int = 0  # > 0: samples per rank per micro-step = tokens_per_batch // video tokens of the
    #                            bucket's shape (image buckets get larger batches); 0 = data.batch_size
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
    ema_start_step: int = 0  # the EMA copies the weights for the first ema_start_step + 1 updates (upstream's)


@dataclass
class DiffusionConfig:
    noise_offset: float = C.NOISE_OFFSET
    snr_gamma: float = C.MIN_SNR_GAMMA  # 0 = plain MSE
    cfg_dropout: float = C.CFG_DROPOUT


@dataclass
class LoraConfig:
    """LoRA fine-tuning (osp.stage2_train.lora): adapters trained in fp32, the base (model.init) frozen."""

    enabled: bool = False  # true: train adapters only; model.init (the base) is required and never saved
    rank: int = 64
    alpha: float = 64.0  # adapter output scale alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # layer names / suffixes / fnmatch
    base_dtype: str = "bf16"  # bf16 | fp32: dtype of the frozen base weights


@dataclass
class LaunchConfig:
    nproc: int = 0  # processes on this node; 0 = parallel.tp x parallel.cp (the layout's smallest world)
    nnodes: int = (
        1  # nodes of the job; "MIN:MAX" (launch.nnodes=1:4, --nnodes 1:4) sets min_nodes = MIN and nnodes = MAX
    )
    min_nodes: int = 0  # > 0: elastic, torchrun restarts the job on the nodes present (MIN..nnodes) after a change
    max_restarts: int = 3  # elastic: restarts after a failure (a lost node) before the job stops
    join_wait_s: int = 30  # elastic: once MIN nodes are there, wait this long for more before (re)starting the ranks
    node_rank: int = 0
    master_addr: str = ""  # "" = MASTER_ADDR from the environment, else 127.0.0.1
    master_port: int = 0  # 0 = MASTER_PORT from the environment, else (one node) a free port; several nodes need one
    precheck_timeout_s: float = 60.0  # every node must reach the rendezvous pre-check within this


@dataclass
class DryRunConfig:  # read by `osp train --dry-run` only
    rank: int = 0  # the rank of launch.nnodes x launch.nproc to play
    card_gb: float = 80.0  # accelerator memory per rank, GiB
    shape: str = (
        "preset"  # preset | shards: the sample shape of model.preset's geometry, or of one sample of data.shards
    )


@dataclass
class LogConfig:
    wandb: bool = False  # also log to Weights & Biases (pip install 'osp[wandb]'); TensorBoard stays (run.tensorboard)
    project: str = "osp"
    entity: str = ""  # "" = wandb's default entity
    name: str = ""  # "" = run.name
    mode: str = ""  # "" = WANDB_MODE, else online | offline | disabled


@dataclass
class ValidateConfig:
    every: int = 0  # sample validation latents every N optimizer steps with the EMA weights; 0 = off
    prompts: str = ""  # text cache folder written by `osp encode-prompts` (same text encoder as the training caches)
    steps: int = 50  # denoising steps
    guidance: float = C.GUIDANCE_SCALE  # 1.0 = conditional only
    scheduler: str = C.DEFAULT_SCHEDULER
    seed: int = 42  # prompt i uses seed + i
    num_frames: int = 0  # frames of the validation videos (1 + 4k); 0 = the trained length


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    dryrun: DryRunConfig = field(default_factory=DryRunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    # --- derived --------------------------------------------------------------------------
    @property
    def nproc(self) -> int:
        """Processes per node (launch.nproc, or tp x cp when it is 0)."""
        return self.launch.nproc or self.parallel.tp * self.parallel.cp

    @property
    def world(self) -> int:
        """Ranks of the whole job: launch.nnodes x processes per node."""
        return self.launch.nnodes * self.nproc

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "TrainConfig":
        cfg = cls()
        for section, values in d.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: top-level key {section!r} must be a [section]; sections: {_sections()}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, source)
        cfg.check(source)
        return cfg

    @classmethod
    def load(
        cls, path: str | Path | None, overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None
    ) -> "TrainConfig":
        """Read a TOML file (None = defaults), apply `section.key=value` overrides, then `flags`
        ({"section.key": value}; None = not given): the values of command-line flags."""
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
        for key, value in (flags or {}).items():
            if value is not None:
                cfg.set(key, value, "flag")
        cfg.check(source)
        return cfg

    def set(self, dotted: str, value: Any, source: str = "override") -> None:
        parts = dotted.split(".")
        if len(parts) != 2 or parts[0] not in _sections():
            raise ConfigError(f"{source}: unknown key {dotted!r}; keys are section.field with sections {_sections()}")
        section = getattr(self, parts[0])
        names = {f.name: f for f in fields(section)}
        if parts[1] not in names:
            raise ConfigError(f"{source}: unknown key {dotted!r}; [{parts[0]}] has {sorted(names)}")
        if dotted == "launch.nnodes" and isinstance(value, str) and ":" in value:  # elastic MIN:MAX
            lo, _, hi = value.partition(":")
            if not (lo.strip().isdigit() and hi.strip().isdigit()):
                raise ConfigError(
                    f"{source}: launch.nnodes = {value!r} must be a number of nodes or MIN:MAX (e.g. 1:4)"
                )
            self.launch.min_nodes, value = int(lo), int(hi)
        elif dotted == "launch.nnodes" and isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # --nnodes N arrives as text (it also takes MIN:MAX)
        current = getattr(section, parts[1])
        setattr(section, parts[1], _coerce(value, current, dotted, source))

    def check(self, source: str = "config") -> None:
        def bad(msg: str) -> NoReturn:
            raise ConfigError(f"{source}: {msg}")

        if self.run.steps < 1:
            bad("run.steps must be >= 1")
        if self.run.keep_last < 0 or self.run.keep_every < 0:
            bad("run.keep_last and run.keep_every must be >= 0 (0 = keep all / none kept permanently)")
        if self.run.nonfinite not in ("stop", "skip"):
            bad("run.nonfinite must be 'stop' or 'skip'")
        if self.run.precision not in PRECISIONS:
            bad(f"run.precision must be one of {', '.join(PRECISIONS)}")
        from osp.common.models.attention import BACKENDS

        if self.model.attention_backend not in BACKENDS:
            bad(f"model.attention_backend must be one of {', '.join(BACKENDS)}")
        if self.data.batch_size < 1:
            bad("data.batch_size must be >= 1")
        if self.data.tokens_per_batch < 0:
            bad("data.tokens_per_batch must be >= 0 (0 = data.batch_size)")
        for i, src in enumerate(self.data.sources):
            w = src.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                bad(f"data.sources[{i}] ({src.get('shards')}): weight {w!r} must be a number > 0")
        if self.parallel.tp < 1:
            bad("parallel.tp must be >= 1")
        if self.parallel.cp < 1:
            bad("parallel.cp must be >= 1")
        if self.parallel.bucket_mb <= 0:
            bad("parallel.bucket_mb must be > 0 (MiB per DDP gradient bucket)")
        if self.parallel.sp and self.parallel.tp == 1:
            bad("parallel.sp=true needs parallel.tp > 1 (pass --no-sp or parallel.sp=false for tp=1)")
        if self.model.checkpointing not in CHECKPOINTING:
            bad(f"model.checkpointing must be one of {', '.join(CHECKPOINTING)}")
        if self.optim.schedule not in ("constant", "cosine"):
            bad("optim.schedule must be 'constant' or 'cosine'")
        if self.optim.grad_accum < 1:
            bad("optim.grad_accum must be >= 1")
        if self.optim.ema_start_step < 0:
            bad("optim.ema_start_step must be >= 0")
        if len(self.optim.betas) != 2:
            bad("optim.betas must be a list of two numbers")
        if not 0.0 <= self.diffusion.cfg_dropout <= 1.0:
            bad("diffusion.cfg_dropout must be in [0, 1]")
        la = self.launch
        if la.nproc < 0:
            bad("launch.nproc must be >= 0 (0 = parallel.tp x parallel.cp)")
        if la.nnodes < 1 or not 0 <= la.node_rank < la.nnodes:
            bad(f"launch.node_rank={la.node_rank} must be in [0, launch.nnodes={la.nnodes})")
        if not 0 <= la.min_nodes <= la.nnodes:
            bad(
                f"launch.nnodes={la.min_nodes}:{la.nnodes}: MIN must be in [1, MAX] (launch.min_nodes, 0 = not elastic)"
            )
        if la.max_restarts < 0:
            bad("launch.max_restarts must be >= 0")
        if la.join_wait_s < 1:
            bad("launch.join_wait_s must be >= 1 (seconds)")
        if self.run.ckpt_every_minutes < 0:
            bad("run.ckpt_every_minutes must be >= 0 (0 = off)")
        if not 0 <= la.master_port < 65536:
            bad("launch.master_port must be a TCP port (0 = free port on one node)")
        lo = self.lora
        if lo.rank < 1:
            bad(f"lora.rank={lo.rank} must be >= 1 (and at most the width of the adapted layers)")
        if lo.alpha <= 0:
            bad(f"lora.alpha={lo.alpha} must be > 0")
        if not 0.0 <= lo.dropout < 1.0:
            bad(f"lora.dropout={lo.dropout} must be in [0, 1)")
        if lo.base_dtype not in ("bf16", "fp32"):
            bad("lora.base_dtype must be 'bf16' or 'fp32'")
        if self.dryrun.shape not in DRY_RUN_SHAPES:
            bad(f"dryrun.shape must be one of {', '.join(DRY_RUN_SHAPES)}")
        v = self.validate
        if v.every < 0:
            bad("validate.every must be >= 0 (0 = no validation)")
        if v.every and not v.prompts:
            bad(
                "validate.every > 0 needs validate.prompts = the text cache of osp encode-prompts PROMPTS.txt ... --out DIR"
            )
        if v.steps < 1 or (v.scheduler == "pndm" and v.steps < 4):
            bad("validate.steps must be >= 1 (>= 4 with the pndm scheduler)")
        if v.scheduler not in C.SCHEDULERS:
            bad(f"validate.scheduler must be one of {', '.join(C.SCHEDULERS)}")
        if v.num_frames < 0 or (v.num_frames and (v.num_frames - 1) % C.VAE_STRIDE_T):
            bad(f"validate.num_frames must be 0 (the trained length) or 1 + {C.VAE_STRIDE_T}k (1, 5, ..., 29, ..., 93)")
        if self.log.mode not in ("", "online", "offline", "disabled"):
            bad("log.mode must be '', 'online', 'offline' or 'disabled' ('' = WANDB_MODE)")

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
    elif kind is list and key == "data.sources":
        return _sources(value, source)
    elif kind is list:
        if current and all(isinstance(v, str) for v in current):  # a list of names (lora.targets)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list):
                return [str(v) for v in value]
        elif isinstance(value, list):
            return [float(v) for v in value]
    raise ConfigError(f"{source}: {key} = {value!r} must be of type {kind.__name__}")


def _sources(value: Any, source: str) -> list[dict]:
    """data.sources: a list of {shards = "DIR", weight = W} tables (weight defaults to 1)."""
    fix = 'use data.sources = [{shards = "DIR", weight = 1.0}, ...]'
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{source}: data.sources = {value!r} is not a list of tables; {fix}")
    out = []
    for i, v in enumerate(value):
        extra = sorted(set(v) - {"shards", "weight"})
        if extra or not isinstance(v.get("shards"), str) or not v["shards"]:
            raise ConfigError(f"{source}: data.sources[{i}] = {v!r} needs shards (a folder) and weight only; {fix}")
        w = v.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"{source}: data.sources[{i}] weight {w!r} is not a number; {fix}")
        out.append({"shards": v["shards"], "weight": float(w)})
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return "[" + ", ".join("{" + ", ".join(f"{k} = {_toml_value(x[k])}" for k in x) + "}" for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, str)):
        return json.dumps(v)
    return repr(v)
