"""DiT checkpoints: the tensor-parallel key rule table, TP split/merge, and the osp checkpoint layout.

Key rule table (the one place; `osp.stage2_train.parallel` uses it too). Names are the released
diffusers keys, which are also the parameter names of OpenSoraT2V at any TP size:

    column-parallel (split dim 0):  transformer_blocks.*.attn{1,2}.to_{q,k,v}.{weight,bias}
                                    transformer_blocks.*.ff.net.0.proj.{weight,bias}
    row-parallel    (split dim 1):  transformer_blocks.*.attn{1,2}.to_out.0.weight
                                    transformer_blocks.*.ff.net.2.weight
    replicated:                     everything else (row biases, tables, pos_embed, adaln_single,
                                    caption_projection, proj_out)

Rank r of TP size N holds the contiguous piece r of torch.chunk(N) along the split dim; since q/k/v
are separate linears, that is exactly heads [r*h/N, (r+1)*h/N).

osp DiT checkpoint folder (format "osp-dit", version 1):

    <dir>/config.json                        DiTConfig (diffusers field names)
    <dir>/osp_checkpoint.json                {"format": "osp-dit", "version": 1, "tp": N,
                                              "ema": true|false, "dtype": "...", "extra": {...}}
    <dir>/model-tp{r:02d}-of-{N:02d}.safetensors   rank r's tensors (names = released keys)
    <dir>/ema-tp{r:02d}-of-{N:02d}.safetensors     optional EMA weights, same layout

`osp_checkpoint.json` is written last, so a folder without it is incomplete. A released diffusers
folder (config.json + diffusion_pytorch_model.safetensors, or a sharded .safetensors.index.json) and
a training checkpoint (torch DCP: `.metadata` + config.json + trainer.json, keys `model.<key>` and
`ema.<key>`; written by `osp.stage2_train.checkpoint`) are accepted wherever a checkpoint is read.

`SliceReader` reads one TP rank's pieces of released or osp-dit safetensors with
`safe_open(...).get_slice`, so a rank never reads (or holds) more than its shard.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from osp.common.errors import ConfigError, MissingFileError
from osp.common.models.dit import DiTConfig

CHECKPOINT_FORMAT = "osp-dit"
CHECKPOINT_VERSION = 1
META_FILE = "osp_checkpoint.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TRAINING_META_FILE = "trainer.json"  # a training checkpoint's step, layout and run config
TRAINING_CONFIG_FILE = "config.json"  # its DiT config
DCP_METADATA = ".metadata"

_COLUMN = re.compile(r"^transformer_blocks\.\d+\.(attn[12]\.to_[qkv]|ff\.net\.0\.proj)\.(weight|bias)$")
_ROW = re.compile(r"^transformer_blocks\.\d+\.(attn[12]\.to_out\.0|ff\.net\.2)\.weight$")


def tp_split_dim(key: str) -> int | None:
    """0 = column-parallel, 1 = row-parallel, None = replicated on every TP rank."""
    if _COLUMN.match(key):
        return 0
    if _ROW.match(key):
        return 1
    return None


def shard_tensor(key: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of the full tensor `key` (a view; the full tensor itself if replicated)."""
    dim = tp_split_dim(key)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ConfigError(
            f"{key}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={tp}; choose a TP size dividing the head count"
        )
    return full.chunk(tp, dim=dim)[rank]


def check_tp(config: DiTConfig, tp: int) -> None:
    if tp < 1 or config.num_attention_heads % tp:
        raise ConfigError(f"TP={tp} must divide num_attention_heads={config.num_attention_heads}; choose a divisor")


def split_state_dict(
    sd: dict[str, torch.Tensor], tp: int, config: DiTConfig | None = None
) -> list[dict[str, torch.Tensor]]:
    """Full (TP=1) state dict -> one dict per TP rank (views into `sd`)."""
    if config is not None:
        check_tp(config, tp)
    if tp < 1:
        raise ConfigError(f"TP size must be >= 1, got {tp}")
    return [{k: shard_tensor(k, v, tp, r) for k, v in sd.items()} for r in range(tp)]


def merge_state_dicts(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-rank state dicts -> full (TP=1) state dict. Replicated tensors must agree on every rank."""
    if not sds:
        raise ValueError("merge_state_dicts: empty list of shards")
    keys = list(sds[0])
    for r, sd in enumerate(sds[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise ConfigError(
                f"TP shard {r} has different keys than shard 0: {diff[:8]}{' ...' if len(diff) > 8 else ''}"
            )
    out = {}
    for k in keys:
        dim = tp_split_dim(k)
        parts = [sd[k] for sd in sds]
        if dim is None or len(sds) == 1:
            for r, p in enumerate(parts[1:], 1):
                if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                    raise ConfigError(
                        f"replicated tensor {k} differs between TP shard 0 and {r}; the checkpoint is corrupt"
                    )
            out[k] = parts[0]
        else:
            out[k] = torch.cat(parts, dim=dim)
    return out


# ------------------------------------------------------------------------------------------------
# strict loading with readable errors
# ------------------------------------------------------------------------------------------------
def check_keys(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError naming every missing / unexpected key and every shape mismatch."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k].shape))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        parts.append(
            "shape mismatch: "
            + ", ".join(f"{k} expected {tuple(expected[k])} got {tuple(got[k].shape)}" for k in shapes)
        )
    raise ConfigError(
        f"{source}: state dict does not match the DiT ({'; '.join(parts)}); check the config.json/preset and TP size"
    )


def tensor_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Name -> shape of the model's tensors (megatron layers' empty `_extra_state` entries left out)."""
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


# ------------------------------------------------------------------------------------------------
# checkpoint folders
# ------------------------------------------------------------------------------------------------
def shard_file(kind: str, rank: int, tp: int) -> str:
    return f"{kind}-tp{rank:02d}-of-{tp:02d}.safetensors"


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses shared storage)."""
    t = t.detach().cpu()
    if t._base is not None or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def _save_tensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: _own(v) for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_dit_checkpoint(
    out_dir: str | Path,
    per_rank_state_dicts: list[dict[str, torch.Tensor]],
    config: DiTConfig,
    ema_per_rank: list[dict[str, torch.Tensor]] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write an osp DiT checkpoint (layout in the module docstring). len(per_rank_state_dicts) = TP."""
    tp = len(per_rank_state_dicts)
    check_tp(config, tp)
    if ema_per_rank is not None and len(ema_per_rank) != tp:
        raise ValueError(f"ema_per_rank has {len(ema_per_rank)} shards, model has {tp}")
    for r, sd in enumerate(per_rank_state_dicts):
        write_dit_shard(out_dir, r, tp, sd, ema_per_rank[r] if ema_per_rank is not None else None)
    return finish_dit_checkpoint(
        out_dir, config, tp, ema=ema_per_rank is not None, dtype=state_dict_dtypes(per_rank_state_dicts[0]), extra=extra
    )


def state_dict_dtypes(sd: dict[str, torch.Tensor]) -> str:
    return ",".join(sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}))


def write_dit_shard(
    out_dir: str | Path,
    rank: int,
    tp: int,
    model_sd: dict[str, torch.Tensor],
    ema_sd: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write TP rank `rank`'s model (and EMA) shard. Each TP rank can call this for itself, so a
    2.7 B model is never gathered in one process; `finish_dit_checkpoint` then completes the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # incomplete until the metadata is rewritten
    _save_tensors(model_sd, out / shard_file("model", rank, tp))
    if ema_sd is not None:
        _save_tensors(ema_sd, out / shard_file("ema", rank, tp))


def finish_dit_checkpoint(
    out_dir: str | Path, config: DiTConfig, tp: int, *, ema: bool, dtype: str, extra: dict | None = None
) -> Path:
    """Write config.json and, last, the metadata that marks the folder complete (every shard must exist)."""
    out = Path(out_dir)
    check_tp(config, tp)
    missing = [
        shard_file(kind, r, tp)
        for kind in ("model", "ema")[: 1 + ema]
        for r in range(tp)
        if not (out / shard_file(kind, r, tp)).is_file()
    ]
    if missing:
        raise MissingFileError(f"{out}: shard files missing: {missing}; every TP rank must write its shard first")
    config.to_json(out / "config.json")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "tp": tp,
        "ema": ema,
        "dtype": dtype,
        "extra": extra or {},
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / META_FILE)
    return out


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"{path}: missing; the folder is not a (complete) osp DiT checkpoint") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not {CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}; convert it with `osp convert`"
        )
    return meta


def is_osp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def is_diffusers_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and ((p / DIFFUSERS_WEIGHTS).is_file() or (p / DIFFUSERS_INDEX).is_file())


def load_dit_shards(
    ckpt_dir: str | Path, prefer_ema: bool = True
) -> tuple[DiTConfig, list[dict[str, torch.Tensor]], dict]:
    """An osp checkpoint's per-rank state dicts (EMA if present and preferred) and its metadata."""
    d = Path(ckpt_dir)
    meta = read_checkpoint_meta(d)
    config = DiTConfig.from_json(d / "config.json")
    kind = "ema" if (prefer_ema and meta.get("ema")) else "model"
    tp = int(meta["tp"])
    shards = []
    for r in range(tp):
        f = d / shard_file(kind, r, tp)
        if not f.is_file():
            raise MissingFileError(f"{f}: missing TP shard {r} of {tp}; the checkpoint is incomplete")
        shards.append(load_file(str(f)))
    return config, shards, meta


def load_diffusers_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    d = Path(folder)
    if (d / DIFFUSERS_WEIGHTS).is_file():
        return load_file(str(d / DIFFUSERS_WEIGHTS))
    index = json.loads((d / DIFFUSERS_INDEX).read_text())
    sd: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / fname), framework="pt") as f:
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    return sd


def is_training_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / DCP_METADATA).is_file() and (p / TRAINING_META_FILE).is_file() and (p / TRAINING_CONFIG_FILE).is_file()


def _training_keys(ckpt_dir: str | Path, prefix: str) -> dict:
    """Key -> DCP metadata of a training checkpoint's tensors whose key starts with `prefix`."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    meta = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return {k: m for k, m in meta.items() if k.startswith(prefix)}


def load_training_weights(ckpt_dir: str | Path, prefer_ema: bool = True) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """(config, full TP=1 state dict) of a training checkpoint, read offline (no process group):
    DCP assembles each global tensor from the chunks every rank wrote. EMA if present and preferred."""
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    d = Path(ckpt_dir)
    config = DiTConfig.from_json(d / TRAINING_CONFIG_FILE)
    prefix = "ema." if prefer_ema and _training_keys(d, "ema.") else "model."
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in _training_keys(d, prefix).items()}
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(sd, checkpoint_id=str(d), no_dist=True)
    return config, {k[len(prefix) :]: v for k, v in sd.items()}


def load_dit_checkpoint(ckpt_dir: str | Path, prefer_ema: bool = True) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """(config, full TP=1 state dict) from an osp checkpoint (TP shards merged), a training
    checkpoint (DCP) or a released diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    d = Path(ckpt_dir)
    if is_training_checkpoint(d):
        return load_training_weights(d, prefer_ema)
    if is_osp_checkpoint(d):
        config, shards, _ = load_dit_shards(d, prefer_ema)
        return config, merge_state_dicts(shards)
    if is_diffusers_folder(d):
        return DiTConfig.from_json(d / "config.json"), load_diffusers_state_dict(d)
    raise MissingFileError(
        f"{d}: neither an osp DiT checkpoint ({META_FILE}), a training checkpoint (step-* with {DCP_METADATA}) nor a "
        f"diffusers folder (config.json + {DIFFUSERS_WEIGHTS}); pass the checkpoint folder itself"
    )


class SliceReader:
    """This TP rank's piece of every tensor of a released diffusers folder or an osp-dit checkpoint
    (any saved TP size), read with `safe_open(...).get_slice`: only the bytes of the piece are read.

        reader = SliceReader(folder, prefer_ema=True)
        local = reader.read("transformer_blocks.0.attn1.to_q.weight", tp=2, rank=1)
    """

    def __init__(self, folder: str | Path, prefer_ema: bool = True):
        d = Path(folder)
        self.folder = d
        self.pieces: dict[str, list[tuple[str, int]]] = {}  # key -> [(file, TP index)] ; saved TP size below
        if is_osp_checkpoint(d):
            meta = read_checkpoint_meta(d)
            kind = "ema" if (prefer_ema and meta.get("ema")) else "model"
            self.saved_tp = int(meta["tp"])
            files = [d / shard_file(kind, r, self.saved_tp) for r in range(self.saved_tp)]
        elif is_diffusers_folder(d):
            self.saved_tp = 1
            if (d / DIFFUSERS_WEIGHTS).is_file():
                files = [d / DIFFUSERS_WEIGHTS]
            else:
                files = sorted({d / f for f in json.loads((d / DIFFUSERS_INDEX).read_text())["weight_map"].values()})
        else:
            raise MissingFileError(
                f"{d}: neither an osp DiT checkpoint ({META_FILE}) nor a diffusers folder "
                f"(config.json + {DIFFUSERS_WEIGHTS}); pass the folder itself as model.init"
            )
        self.config = DiTConfig.from_json(d / "config.json")
        self._open: dict[str, safe_open] = {}  # file -> safe_open handle (memory-mapped, read lazily)
        for i, f in enumerate(files):
            if not f.is_file():
                raise MissingFileError(f"{f}: missing; the checkpoint is incomplete")
            for k in self._handle(str(f)).keys():
                self.pieces.setdefault(k, []).append((str(f), i if self.saved_tp > 1 else 0))

    def _handle(self, f: str):
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f]

    def keys(self) -> set[str]:
        return set(self.pieces)

    def shape(self, key: str) -> tuple[int, ...]:
        """The full (TP=1) shape of `key`."""
        dim = tp_split_dim(key)
        shapes = [list(self._handle(f).get_slice(key).get_shape()) for f, _ in self.pieces[key]]
        full = shapes[0]
        if dim is not None and self.saved_tp > 1:
            full[dim] = sum(s[dim] for s in shapes)
        return tuple(full)

    def read(self, key: str, tp: int, rank: int) -> torch.Tensor:
        """Rank `rank` of TP size `tp`'s piece of `key` (the whole tensor if replicated)."""
        dim = tp_split_dim(key)
        files = sorted(self.pieces[key], key=lambda x: x[1])
        if dim is None or (tp == 1 and self.saved_tp == 1):
            return self._handle(files[0][0]).get_tensor(key)
        full = self.shape(key)
        if full[dim] % tp:
            raise ValueError(
                f"{key}: dim {dim} of shape {full} is not divisible by TP={tp}; choose a TP size dividing the head count"
            )
        lo, hi = rank * full[dim] // tp, (rank + 1) * full[dim] // tp  # wanted [lo, hi) of the full dim
        parts, start = [], 0
        for f, _ in files:
            sl = self._handle(f).get_slice(key)
            n = sl.get_shape()[dim]
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                idx = [slice(None)] * len(full)
                idx[dim] = slice(a - start, b - start)
                parts.append(sl[tuple(idx)])
            start += n
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def load_dit(ckpt_dir: str | Path, prefer_ema: bool = True, device=None, dtype=None):
    """Build an OpenSoraT2V from a checkpoint folder and load its weights strictly."""
    from osp.common.models.dit import build_dit

    config, sd = load_dit_checkpoint(ckpt_dir, prefer_ema)
    model = build_dit(config, device="meta")
    check_keys(tensor_shapes(model), sd, str(ckpt_dir))
    model = model.to_empty(device=device or "cpu")
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model


# ------------------------------------------------------------------------------------------------
# `osp convert` operations
# ------------------------------------------------------------------------------------------------
def convert_import(src: str | Path, out: str | Path, tp: int = 1) -> Path:
    """Released diffusers folder -> osp checkpoint sharded for TP `tp` (strict key check first)."""
    if not is_diffusers_folder(src):
        raise MissingFileError(
            f"{src}: not a diffusers DiT folder (config.json + {DIFFUSERS_WEIGHTS}); pass e.g. Open-Sora-Plan-v1.2.0/93x480p"
        )
    config = DiTConfig.from_json(Path(src) / "config.json")
    sd = load_diffusers_state_dict(src)
    _check_full(config, sd, str(src))
    return save_dit_checkpoint(out, split_state_dict(sd, tp, config), config, extra={"source": str(src)})


def convert_merge(src: str | Path, out: str | Path) -> Path:
    """osp checkpoint at any TP, or a training checkpoint -> osp checkpoint at TP 1 (model and EMA)."""
    if is_training_checkpoint(src):
        config, full = load_training_weights(src, prefer_ema=False)
        _check_full(config, full, str(src))
        ema = [load_training_weights(src, prefer_ema=True)[1]] if _training_keys(src, "ema.") else None
        return save_dit_checkpoint(out, [full], config, ema_per_rank=ema, extra={"source": str(src)})
    config, shards, meta = load_dit_shards(src, prefer_ema=False)
    full = merge_state_dicts(shards)
    _check_full(config, full, str(src))
    ema = None
    if meta.get("ema"):
        ema = [merge_state_dicts(load_dit_shards(src, prefer_ema=True)[1])]
    return save_dit_checkpoint(out, [full], config, ema_per_rank=ema, extra=meta.get("extra"))


def convert_export(src: str | Path, out: str | Path, prefer_ema: bool = True) -> Path:
    """osp checkpoint -> diffusers layout (config.json + diffusion_pytorch_model.safetensors)."""
    config, sd = load_dit_checkpoint(src, prefer_ema)
    _check_full(config, sd, str(src))
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    config.to_json(o / "config.json")
    _save_tensors(sd, o / DIFFUSERS_WEIGHTS)
    return o


def _check_full(config: DiTConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    from osp.common.models.dit import build_dit

    check_keys(tensor_shapes(build_dit(config, device="meta")), sd, source)
