"""DiT weight layouts other than the training format: the TP key rule table, TP split/merge, the
released diffusers folder and the osp-dit folder. The training format (torch DCP) and every reader
that chooses between the layouts live in `osp.stage2_train.checkpoint`.

The parameter names of OpenSoraT2V at any TP size ARE the released diffusers keys, so the mapping
between the model and a released file is a layout mapping only: full tensors <-> TP pieces.

Key rule table (the one place; `osp.stage2_train.parallel` and the training checkpoint use it):

    column-parallel (split dim 0):  transformer_blocks.*.attn{1,2}.to_{q,k,v}.{weight,bias}
                                    transformer_blocks.*.ff.net.0.proj.{weight,bias}
    row-parallel    (split dim 1):  transformer_blocks.*.attn{1,2}.to_out.0.weight
                                    transformer_blocks.*.ff.net.2.weight
    replicated:                     everything else (row biases, tables, pos_embed, adaln_single,
                                    caption_projection, proj_out)

LoRA adapters (osp.stage2_train.lora; `<linear>.lora_A.weight` [r, in], `<linear>.lora_B.weight` [out, r]):
B of a column-parallel linear is split like its output (dim 0), A of a row-parallel linear like its
input (dim 1); the other factor is replicated.

Rank r of TP size N holds the contiguous piece r of torch.chunk(N) along the split dim; since q/k/v
are separate linears, that is exactly heads [r*h/N, (r+1)*h/N).

Released diffusers folder: config.json + diffusion_pytorch_model.safetensors (or a sharded
diffusion_pytorch_model.safetensors.index.json), full tensors.

osp-dit folder (format "osp-dit", version 1; what `osp convert import --tp N` writes):

    <dir>/config.json                        DiTConfig (diffusers field names)
    <dir>/osp_checkpoint.json                {"format": "osp-dit", "version": 1, "tp": N,
                                              "ema": true|false, "dtype": "...", "extra": {...}}
    <dir>/model-tp{r:02d}-of-{N:02d}.safetensors   rank r's tensors (names = released keys)
    <dir>/ema-tp{r:02d}-of-{N:02d}.safetensors     optional EMA weights, same layout

`osp_checkpoint.json` is written last, so a folder without it is incomplete.

`SliceReader` reads one TP rank's pieces of released or osp-dit safetensors with
`safe_open(...).get_slice`, so a rank never reads (or holds) more than its shard. Every safetensors
file is opened through `open_safetensors`: a garbled or truncated file is refused in one line.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from osp.common.errors import ConfigError, MissingFileError, OspError, one_line
from osp.common.models.dit import DiTConfig

CHECKPOINT_FORMAT = "osp-dit"
CHECKPOINT_VERSION = 1
META_FILE = "osp_checkpoint.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_FILE = "config.json"  # the DiT config (diffusers field names) of every layout

_COLUMN = re.compile(r"^transformer_blocks\.\d+\.(attn[12]\.to_[qkv]|ff\.net\.0\.proj)\.(weight|bias|lora_B\.weight)$")
_ROW = re.compile(r"^transformer_blocks\.\d+\.(attn[12]\.to_out\.0|ff\.net\.2)\.(weight|lora_A\.weight)$")


class CheckpointError(OspError, ValueError):
    """A checkpoint file that cannot be used as asked (one line: the file, the cause, the fix)."""


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
# safetensors files (never pickle)
# ------------------------------------------------------------------------------------------------
@contextmanager
def _refusing_damaged(path: str | Path):
    """A safetensors file whose header or data is garbled, truncated or oversized: one line."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({one_line(e)}); the file is damaged or not "
            "DiT weights: download or convert it again"
        ) from None


def open_safetensors(path: str | Path):
    """`safe_open` of a weights file (memory-mapped, read lazily); a damaged file is a CheckpointError."""
    with _refusing_damaged(path):
        return safe_open(str(path), framework="pt")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file; a damaged file is a CheckpointError."""
    with _refusing_damaged(path):
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}


# ------------------------------------------------------------------------------------------------
# osp-dit and diffusers folders
# ------------------------------------------------------------------------------------------------
def shard_file(kind: str, rank: int, tp: int) -> str:
    return f"{kind}-tp{rank:02d}-of-{tp:02d}.safetensors"


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses shared storage)."""
    t = t.detach().cpu()
    if t._base is not None or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def save_tensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temp file + rename)."""
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
    save_tensors(model_sd, out / shard_file("model", rank, tp))
    if ema_sd is not None:
        save_tensors(ema_sd, out / shard_file("ema", rank, tp))


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
    config.to_json(out / CONFIG_FILE)
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
    return (p / CONFIG_FILE).is_file() and ((p / DIFFUSERS_WEIGHTS).is_file() or (p / DIFFUSERS_INDEX).is_file())


def load_dit_shards(
    ckpt_dir: str | Path, prefer_ema: bool = True
) -> tuple[DiTConfig, list[dict[str, torch.Tensor]], dict]:
    """An osp checkpoint's per-rank state dicts (EMA if present and preferred) and its metadata."""
    d = Path(ckpt_dir)
    meta = read_checkpoint_meta(d)
    config = DiTConfig.from_json(d / CONFIG_FILE)
    kind = "ema" if (prefer_ema and meta.get("ema")) else "model"
    tp = int(meta["tp"])
    shards = []
    for r in range(tp):
        f = d / shard_file(kind, r, tp)
        if not f.is_file():
            raise MissingFileError(f"{f}: missing TP shard {r} of {tp}; the checkpoint is incomplete")
        shards.append(read_safetensors(f))
    return config, shards, meta


def load_diffusers_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    d = Path(folder)
    if (d / DIFFUSERS_WEIGHTS).is_file():
        return read_safetensors(d / DIFFUSERS_WEIGHTS)
    index = json.loads((d / DIFFUSERS_INDEX).read_text())
    sd: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        sd.update(read_safetensors(d / fname))
    return sd


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
        self.config = DiTConfig.from_json(d / CONFIG_FILE)
        self._open: dict[str, safe_open] = {}  # file -> safe_open handle (memory-mapped, read lazily)
        for i, f in enumerate(files):
            if not f.is_file():
                raise MissingFileError(f"{f}: missing; the checkpoint is incomplete")
            for k in self._handle(str(f)).keys():
                self.pieces.setdefault(k, []).append((str(f), i if self.saved_tp > 1 else 0))

    def _handle(self, f: str):
        if f not in self._open:
            self._open[f] = open_safetensors(f)
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
