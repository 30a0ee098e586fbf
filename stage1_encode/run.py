"""`osp encode`: the pipelined, resumable, rank-parallel encoder.

One process per rank (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them: rank 0 of 1).
Every rank builds the same plan (plan.py) and encodes the shards r, r + W, r + 2W, ... that are not
published yet. Inside a rank, a DataLoader with `workers` processes decodes and crops clips in plan
order while the main process runs batched CausalVAE + mT5 forwards: clips of one shard are grouped
by shape into batches of `batch_size` in plan order (so batch composition, and therefore every byte,
is independent of timing, of the number of workers and of the number of ranks), and samples and
error rows are written in plan order. A shard becomes visible only by ShardWriter.publish(); a killed
run leaves nothing visible of the shard it was writing and redoes it on restart.

When all shards are published, rank 0 writes `uncond.safetensors` (the encoding of ""), merges the
index (`index.zarr`, `errors.jsonl`) and writes `manifest.json`. Other ranks exit after their shards;
rank 0 polls for theirs (a shared output folder is required across nodes) up to `merge_timeout`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from osp.common import remote_cache
from osp.common import shards as S
from osp.common import storage
from osp.common.config import (
    LATENT_CHANNELS,
    TEXT_MAX_LENGTH,
    TILING_TRAIN,
    VAE_SCALE_FACTOR,
    get_preset,
    latent_frames,
)

from .clips import ClipError, read_image, read_video_clip
from .text_cache import TextKeys, fill_text_cache, wait_for_text
from .dataset import list_records, resolve_sources
from .plan import Plan, ShardPlan, WorkItem, EncodeSpec, make_plan
from osp.common.errors import OspError
from osp.common.process import die_with_parent
from osp.common.loader_guard import WorkerFix, loader_error, share_in_worker, watch_workers
from osp.common.models.text import cleaner_identity

PLAN_NAME = "plan.json"
TOOL = "osp.stage1_encode"
DEFAULT_DEMO_MODELS = "models/demo"
RERUN = "re-run the same command to resume (published shards are kept)"
WORKER_FIX = WorkerFix(no_workers="run osp encode with --workers 0", rerun=RERUN)


class EncodeError(OspError, RuntimeError):
    """A problem with the encode arguments or the output folder (message says how to fix it)."""


@dataclass
class EncodeOptions:
    data: str
    out: str  # a folder, or an object-store URL (written through the local `staging` folder)
    staging: str | None = None
    preset: str = "tiny"
    vae: str | None = None
    text_encoder: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    clips_per_video: int = 1
    all_captions: bool = False
    drop_long: bool = False
    frame_stride: int = 1  # take every k-th frame of the 24 fps sequence (upstream's sample_rate)
    speed_factor: float = 1.0  # > 1: subsample evenly to len / speed (upstream's speed_factor)
    short_clips: str = "error"  # error | keep: a clip shorter than the frames -> error row, or the longest 1 + 4k
    min_frames: int = 1  # with short_clips=keep: the shortest clip kept (1 + 4k)
    text_cache: str | None = None  # a text cache folder: embeddings by caption key, none in the latent cache
    text_only: bool = False  # no VAE: fill the text cache (and, with latents_from, write a re-captioned cache)
    latents_from: str | None = None  # text_only: the latent cache whose latents the re-captioned cache reuses
    samples_per_shard: int = 256
    batch_size: int = 4
    workers: int = 2
    device: str = "auto"
    latent_dtype: str = "float16"
    vae_dtype: str = "float32"  # upstream encodes with the VAE in fp32
    tiling: bool = True
    text_pad_to_max: bool = True  # run mT5 on the exact upstream 512-token shape
    merge_timeout: float = 24 * 3600.0
    progress: bool = True
    rank: int | None = None
    world_size: int | None = None

    def spec(self) -> EncodeSpec:
        p = get_preset(self.preset)
        return EncodeSpec(
            num_frames=self.frames or p.num_frames,
            height=self.height or p.height,
            width=self.width or p.width,
            fps=p.fps,
            clips_per_video=self.clips_per_video,
            all_captions=self.all_captions,
            drop_long=self.drop_long,
            frame_stride=self.frame_stride,
            speed_factor=self.speed_factor,
            short_clips=self.short_clips,
            min_frames=self.min_frames,
        )


# --------------------------------------------------------------------------------------------------
# decoding (runs in DataLoader workers)
# --------------------------------------------------------------------------------------------------


class ClipDataset(torch.utils.data.Dataset):
    """Work items -> decoded clips. Never raises for a bad input: returns an error reason instead."""

    def __init__(self, items: list[WorkItem], spec: EncodeSpec):
        self.items = items
        self.spec = spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        sp = self.spec
        try:
            if it.kind == "image":
                clip, info = read_image(it.path, sp.height, sp.width)
            else:
                frames = it.frames or sp.num_frames
                clip, info = read_video_clip(
                    it.path, frames, sp.height, sp.width, it.clips, it.clip, sp.fps, sp.frame_step
                )
        except ClipError as e:
            return {"seq": it.seq, "error": str(e)}
        except Exception as e:  # an unexpected decoder failure is still one error row, not a dead run
            return {"seq": it.seq, "error": f"unexpected {type(e).__name__}: {e}"}
        # in a worker: into shared memory here, where a full /dev/shm is an error, not a lost clip
        return share_in_worker({"seq": it.seq, "clip": clip, "info": info.as_meta()}, WORKER_FIX)


def _worker_init(_):
    torch.set_num_threads(1)
    die_with_parent()  # a decode worker dies with its rank (under the launcher)


def _identity(x):
    return x


def decoded_stream(items: list[WorkItem], spec: EncodeSpec, workers: int, pin_memory: bool = False):
    """Decoded clips in plan order; `workers` > 0 decodes ahead in background processes (a worker that
    fails or dies raises `LoaderWorkerError` here or at the main thread's next line, see loader_guard)."""
    ds = ClipDataset(items, spec)
    if workers <= 0:
        yield from (ds[i] for i in range(len(ds)))
        return
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        worker_init_fn=_worker_init,
        prefetch_factor=2,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    it = iter(loader)
    watch_workers(WORKER_FIX)
    try:
        for x in it:
            yield x
    except (RuntimeError, ConnectionError, EOFError) as e:
        err = loader_error(e, WORKER_FIX, getattr(it, "_workers", ()))
        if err is None:
            raise
        raise err from None
    finally:
        getattr(it, "_shutdown_workers")()  # noqa: B009 (private to torch) now, not when the iterator is collected


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


class Encoders:
    """CausalVAE + mT5 on one device; batched forward of clips and captions. Each model loads on first
    use, so a run whose captions are all in the text cache never loads the text encoder, and a
    re-captioning run never loads the VAE."""

    def __init__(self, vae_dir: str, text_dir: str, device: str, vae_dtype: str, tiling: bool, text_pad_to_max: bool):
        from osp.common.device import pick_device

        self.dev = pick_device(device)
        self.device = self.dev.set_current()
        self.vae_dir, self.text_dir = vae_dir, text_dir
        self.vae_dtype = getattr(torch, vae_dtype)
        self.text_dtype = self.dev.autocast_dtype
        self.tiling = TILING_TRAIN if tiling else None
        self.text_pad_to_max = text_pad_to_max
        self.batch_size = 8  # captions per text forward in the text-cache pass (the run sets --batch-size)
        self._vae = self._text = None

    @property
    def vae(self):
        if self._vae is None:
            from osp.common.models.vae import load_vae

            self._vae = load_vae(self.vae_dir).to(self.device, self.vae_dtype).eval().requires_grad_(False)
        return self._vae

    @property
    def vae_identity(self) -> dict:
        from osp.common.models.vae import vae_identity

        return vae_identity(self.vae_dir)

    @property
    def text(self):
        if self._text is None:
            from osp.common.models.text import TextEncoder

            self._text = TextEncoder.from_pretrained(self.text_dir, device=self.device, dtype=self.text_dtype)
        return self._text

    def text_id(self) -> str:
        """The text encoder's identity without loading it (files only)."""
        from osp.common.config import TEXT_MAX_LENGTH
        from osp.common.models.text import text_encoder_id

        return text_encoder_id(self.text_dir, self.text_dtype, TEXT_MAX_LENGTH)

    @torch.no_grad()
    def encode_clips(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """[3, T, H, W] clips of one shape -> moments [B, 8, t, h, w] on the CPU (float32)."""
        x = torch.stack(clips).to(self.device, self.vae_dtype, non_blocking=True)
        moments = self.vae.encode_moments(x, tiling=self.tiling)
        return moments.float().cpu()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> list[torch.Tensor]:
        return [t.cpu() for t in self.text.encode_unpadded(captions, pad_to_max=self.text_pad_to_max)]


# --------------------------------------------------------------------------------------------------
# one shard
# --------------------------------------------------------------------------------------------------


def sample_meta(it: WorkItem, caption_clean: str, spec: EncodeSpec, info: dict) -> dict:
    frames = it.frames or spec.num_frames
    return {
        "key": it.key,
        "input": it.seq,
        "source": it.rel,
        "kind": it.kind,
        "caption": it.caption,
        "caption_clean": caption_clean,
        "caption_index": it.caption_index,
        "clip": it.clip,
        "clips": it.clips,
        "num_frames": frames if it.kind == "video" else 1,
        "height": spec.height,
        "width": spec.width,
        "fps": spec.fps,
        **info,
    }


def _decode_error(it: WorkItem, reason: str, stage: str = "decode") -> dict:
    return {
        "input": it.seq,
        "key": it.key,
        "file": it.rel,
        "root": it.root,
        "annotation": it.annotation,
        "record": it.record,
        "stage": stage,
        "reason": reason,
    }


class ShardEncoder:
    """Consumes the decoded clips of one shard in plan order, batches them, writes and publishes."""

    def __init__(
        self,
        out: str,
        shard: ShardPlan,
        spec: EncodeSpec,
        enc: Encoders,
        batch_size: int,
        latent_dtype: str,
        on_done=None,
        texts: "TextKeys | None" = None,
    ):
        from osp.common.models.text import clean_caption

        self.clean = clean_caption
        self.texts = texts  # a text cache: samples refer to it by key, no text forward here
        self.shard, self.spec, self.enc, self.batch_size = shard, spec, enc, batch_size
        self.writer = S.ShardWriter(out, shard.id, latent_dtype=latent_dtype)
        self.items = {it.seq: it for it in shard.items}
        self.latent_max = torch.finfo(getattr(torch, latent_dtype)).max
        # seq -> ("sample", latent, text, meta) | ("error", row) | None (waiting in a bucket); in seq order
        self.pending: OrderedDict[int, tuple | None] = OrderedDict()
        self.plan_errors = deque(sorted(shard.errors, key=lambda e: e["input"]))
        self.buckets: dict[tuple, list[tuple[int, torch.Tensor, dict]]] = {}
        self.on_done = on_done or (lambda n_samples, n_errors: None)
        self.n_samples = self.n_errors = 0

    def add(self, result: dict) -> None:
        seq = result["seq"]
        it = self.items[seq]
        self._insert(seq)
        if "error" in result:
            self.pending[seq] = ("error", _decode_error(it, result["error"]))
        elif "latent" in result:  # re-captioning: the moments of another cache
            cap = self.clean(it.caption)
            self.pending[seq] = ("sample", result["latent"], None, {**result["meta"], **self._meta(seq, cap, {})})
        else:
            clip = result["clip"]
            bucket = self.buckets.setdefault(tuple(clip.shape), [])
            bucket.append((seq, clip, result["info"]))
            if len(bucket) >= self.batch_size:
                self._run(self.buckets.pop(tuple(clip.shape)))
        self._emit()

    def _insert(self, seq: int | None) -> None:
        """Queue input `seq` (results arrive in seq order) after the plan errors that precede it."""
        while self.plan_errors and (seq is None or self.plan_errors[0]["input"] < seq):
            e = self.plan_errors.popleft()
            self.pending[e["input"]] = ("error", e)
        if seq is not None:
            self.pending[seq] = None

    def _run(self, batch: list[tuple[int, torch.Tensor, dict]]) -> None:
        moments = self.enc.encode_clips([c for _, c, _ in batch])
        captions = [self.clean(self.items[s].caption) for s, _, _ in batch]
        texts = self.enc.encode_text(captions) if self.texts is None else [None] * len(batch)
        for (seq, _, info), m, t, cap in zip(batch, moments, texts, captions):
            if not torch.isfinite(m).all():
                self.pending[seq] = (
                    "error",
                    _decode_error(self.items[seq], "VAE produced non-finite moments", "encode"),
                )
            elif m.abs().max() > self.latent_max:
                self.pending[seq] = (
                    "error",
                    _decode_error(
                        self.items[seq],
                        "moments exceed the latent dtype's range; re-encode with --latent-dtype float32",
                        "encode",
                    ),
                )
            else:
                self.pending[seq] = ("sample", m, t, self._meta(seq, cap, info))

    def _meta(self, seq: int, cap: str, info: dict) -> dict:
        meta = sample_meta(self.items[seq], cap, self.spec, info)
        if self.texts is not None:
            meta[S.TEXT_KEY_FIELD] = self.texts.key(cap)
        return meta

    def _emit(self, final: bool = False) -> None:
        while self.pending:
            seq, entry = next(iter(self.pending.items()))
            if entry is None:
                if final:
                    raise AssertionError(f"shard {self.shard.id}: input {seq} never encoded")
                return
            self.pending.popitem(last=False)
            if entry[0] == "error":
                self.writer.add_error(entry[1])
                self.n_errors += 1
                self.on_done(0, 1)
            else:
                _, m, t, meta = entry
                text_len = self.texts.length(meta[S.TEXT_KEY_FIELD]) if t is None and self.texts else None
                self.writer.write(meta["key"], m, t, meta, text_len=text_len)
                self.n_samples += 1
                self.on_done(1, 0)

    def finish(self) -> list[dict]:
        self._insert(None)  # trailing plan errors
        for shape in list(self.buckets):
            self._run(self.buckets.pop(shape))
        self._emit(final=True)
        return self.writer.publish()

    def abort(self) -> None:
        self.writer.abort()


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _rank_world(opts: EncodeOptions) -> tuple[int, int]:
    rank = opts.rank if opts.rank is not None else int(os.environ.get("RANK", 0))
    world = opts.world_size if opts.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise EncodeError(f"rank {rank} outside world size {world}; check RANK / WORLD_SIZE")
    return rank, world


def _model_dirs(opts: EncodeOptions) -> tuple[str, str]:
    vae, text = opts.vae, opts.text_encoder
    if vae and text:
        return vae, text
    if get_preset(opts.preset).vae != "tiny":
        raise EncodeError(
            f"preset {opts.preset} needs --vae DIR (the released vae/ folder) and --text-encoder DIR (a local google/mt5-xxl)"
        )
    demo = Path(DEFAULT_DEMO_MODELS)
    if not ((demo / "vae").is_dir() and (demo / "text_encoder").is_dir()):
        from osp.common.demo_models import write_demo_models

        write_demo_models(demo)
    return vae or str(demo / "vae"), text or str(demo / "text_encoder")


def _check_model_dirs(vae_dir: str, text_dir: str) -> None:
    """The weight folders exist and hold what loading needs (a missing one fails in seconds, not
    after the dataset is listed and planned)."""
    from osp.common.models.vae import CONFIG_NAME, weight_file

    weights = weight_file(vae_dir)  # the folder and a weight file
    if not (weights.parent / CONFIG_NAME).is_file():
        raise EncodeError(
            f"{weights.parent}: no {CONFIG_NAME}; --vae must be a CausalVAE folder (config.json + weights)"
        )
    text = Path(text_dir)
    if not (text / "config.json").is_file():
        raise EncodeError(
            f"{text}/config.json not found: --text-encoder must be a local mT5 folder (e.g. a download of google/mt5-xxl)"
        )
    if not any(p.suffix in (".safetensors", ".bin") for p in text.iterdir()):
        raise EncodeError(f"{text}: no *.safetensors or *.bin weights; --text-encoder must hold the mT5 weights")


def build_plan(opts: EncodeOptions) -> Plan:
    try:
        sources = resolve_sources(opts.data)
    except ValueError as e:
        raise EncodeError(str(e)) from None
    return make_plan(list_records(sources), opts.spec(), opts.samples_per_shard)


def _plan_summary(plan: Plan, opts: EncodeOptions) -> dict:
    return {
        "digest": plan.digest(),
        "data": str(Path(opts.data).resolve()),
        "spec": asdict(plan.spec),
        "samples_per_shard": plan.samples_per_shard,
        "shards": len(plan.shards),
        "records": plan.n_records,
        "inputs": plan.n_inputs,
        "planned_samples": plan.n_valid,
        "plan_errors": plan.n_plan_errors,
        "latent_dtype": opts.latent_dtype,
        "vae_dtype": opts.vae_dtype,
        "tiling": opts.tiling,
        "text_pad_to_max": opts.text_pad_to_max,
        "text_cache": str(Path(opts.text_cache).resolve()) if opts.text_cache else None,
        "latents_from": str(Path(opts.latents_from).resolve()) if opts.latents_from else None,
        "vae": _vae_sha(opts.vae),
        "text_encoder": str(Path(opts.text_encoder).resolve()) if opts.text_encoder else None,
        "caption_cleaner": cleaner_identity(),  # a resume must clean captions the same way
    }


def _vae_sha(vae_dir: str | None) -> str | None:
    from osp.common.models.vae import vae_identity

    return vae_identity(vae_dir)["weights_sha256"] if vae_dir else None


def _check_plan_file(out: Path, summary: dict, rank: int) -> None:
    """The output folder belongs to one plan: refuse to mix shards of different plans/options."""
    path = out / PLAN_NAME
    body = json.dumps(summary, sort_keys=True, indent=2) + "\n"
    if path.exists():
        old = json.loads(path.read_text())
        if old != summary:
            diff = sorted(k for k in summary if old.get(k) != summary[k])
            raise EncodeError(
                f"{out}: holds shards of a different plan (differs in {', '.join(diff)}); "
                f"use a new --out or delete {out}"
            )
        return
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{PLAN_NAME}.tmp-{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, path)


def _progress(enabled: bool, rank: int, world: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]encode[/] r{rank}/{world}" if world > 1 else "[bold]encode[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]} clips/s"),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def encode(opts: EncodeOptions) -> dict:
    """Run (or resume) the encode of this rank; rank 0 also merges. Returns a summary dict."""
    die_with_parent()  # under the launcher: this rank dies with it, however it dies
    rank, world = _rank_world(opts)
    _check_text_options(opts)
    # an object-store --out: shards are written in a local staging folder and uploaded as they are
    # published (sidecar, tar), the index and manifest.json last (osp.common.remote_cache)
    remote = opts.out if opts.out and storage.is_url(opts.out) else None
    staging = Path(opts.staging or remote_cache.default_staging(remote)) if remote else None
    out = staging or Path(opts.out or opts.text_cache or ".")
    if opts.batch_size < 1:
        raise EncodeError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.latent_dtype not in ("float16", "float32"):
        raise EncodeError(f"--latent-dtype must be float16 or float32, got {opts.latent_dtype}")
    if opts.vae_dtype not in ("float32", "bfloat16", "float16"):
        raise EncodeError(f"--vae-dtype must be float32, bfloat16 or float16, got {opts.vae_dtype}")
    vae_dir, text_dir = _model_dirs(opts)
    _check_model_dirs(vae_dir, text_dir)  # seconds, before planning a large dataset
    opts.vae, opts.text_encoder = vae_dir, text_dir
    plan = build_plan(opts)  # before loading the models: a bad --data fails fast
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit: an error naming the file, not a kill
    try:
        return _encode_planned(opts, plan, rank, world, vae_dir, text_dir, staging, remote)
    except (OSError, RuntimeError) as e:
        err = _failure_line(e, out, len(plan.shards))
        if err is None:
            raise
        raise err from None


def _check_text_options(opts: EncodeOptions) -> None:
    if opts.text_only and not opts.text_cache:
        raise EncodeError("--text-only needs --text-cache DIR (the captions' embeddings go there)")
    if opts.latents_from and not opts.text_only:
        raise EncodeError("--latents-from is for re-captioning; pass it with --text-only --text-cache DIR")
    if opts.latents_from and not opts.out:
        raise EncodeError("--latents-from needs --out: the re-captioned latent cache to write")
    if not opts.out and not opts.text_only:
        raise EncodeError("--out is required (the latent cache to write); only --text-only may leave it out")
    if opts.latents_from:
        old = S.read_manifest(opts.latents_from).get("geometry", {})
        spec = opts.spec()
        if [old.get(k) for k in ("num_frames", "height", "width")] != [spec.num_frames, spec.height, spec.width]:
            raise EncodeError(
                f"{opts.latents_from}: encoded at {old.get('num_frames')}x{old.get('height')}x{old.get('width')}, this "
                f"plan is {spec.num_frames}x{spec.height}x{spec.width}; pass the same --preset/--frames/--height/--width"
            )
    if opts.text_cache and storage.is_url(opts.text_cache):
        raise EncodeError("--text-cache must be a local folder; upload it next to the latent cache when it is done")
    if opts.text_cache and opts.out and storage.is_url(opts.out):
        raise EncodeError(
            "--text-cache with an object-store --out: encode both into local folders side by side, then upload "
            "them side by side (the latent cache finds its text cache by relative path)"
        )
    if opts.text_cache and opts.out and Path(opts.text_cache).resolve() == Path(opts.out).resolve():
        raise EncodeError("--text-cache and --out must be different folders")


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts: list[str] = []
    for i in ids:
        if parts and int(parts[-1].rsplit("-", 1)[-1]) == i - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ", ".join(parts)


def _failure_line(e: BaseException, out: Path, n_shards: int) -> OspError | None:
    """One line for a full disk (or a file-size limit) and for a failed decode worker; None otherwise."""
    if isinstance(e, S.StorageFullError):
        what = str(e)
    elif (reason := S.storage_full_reason(e, getattr(e, "filename", None) or out)) is not None:
        name = getattr(e, "filename", None)
        what = f"{name} not written: {reason}" if name else f"{out}: a file could not be written: {reason}"
    else:
        return loader_error(e, WORKER_FIX)
    done = sorted(S.published_shards(out))
    kept = (
        f"shards {_ranges(done)} of {n_shards} are complete" if done else f"none of the {n_shards} shards is complete"
    )
    return EncodeError(f"{what}; {kept}; free some space, then {RERUN}")


def _encode_planned(
    opts: EncodeOptions,
    plan: Plan,
    rank: int,
    world: int,
    vae_dir: str,
    text_dir: str,
    staging: Path | None = None,
    remote: str | None = None,
) -> dict:
    """`remote`: the object-store URL of --out, written through the local `staging` folder."""
    out = staging or Path(opts.out or ".")
    summary = _plan_summary(plan, opts)
    if not (opts.text_only and not opts.latents_from):
        if remote:
            remote_cache.pull_file(remote, PLAN_NAME, out)
        _check_plan_file(out, summary, rank)
        if remote and rank == 0 and (out / PLAN_NAME).exists():
            remote_cache.upload_plan(out / PLAN_NAME, remote)
        if remote:
            remote_cache.upload_shards(out, remote, rank, world)  # published by a run killed before upload

    done = (S.published_shards(out) | (S.published_shards(remote) if remote else set())) if opts.out else set()
    mine = [s for s in plan.shards if s.id % world == rank and s.id not in done]
    t0 = time.perf_counter()
    stats: dict[str, float] = {
        "samples": 0,
        "errors": 0,
        "shards": 0,
        "skipped_shards": sum(1 for s in plan.shards if s.id % world == rank) - len(mine),
    }
    enc = Encoders(vae_dir, text_dir, opts.device, opts.vae_dtype, opts.tiling, opts.text_pad_to_max)
    enc.batch_size = opts.batch_size  # the text pass batches captions as clips are batched
    texts = _text_pass(opts, plan, enc, rank, stats) if opts.text_cache else None
    stats["load_seconds"] = round(time.perf_counter() - t0, 3)
    result = {"rank": rank, "world_size": world, "out": str(remote or out), "plan": summary["digest"]}
    if opts.text_only and not opts.latents_from:
        return {**result, **stats}  # the text cache is filled: nothing else to write
    t1 = time.perf_counter()
    if mine:
        _encode_shards(mine, plan.spec, enc, opts, rank, world, stats, texts, out, remote)
        enc.dev.synchronize()
    stats["encode_seconds"] = round(time.perf_counter() - t1, 3)
    result.update(stats)
    if rank == 0:
        _wait_for_shards(remote or out, len(plan.shards), opts.merge_timeout, world)
        result["manifest"] = finalize(out, plan, opts, enc, texts, source=remote)
        if remote:
            remote_cache.upload_final(out, remote)
    return result


def _text_pass(opts: EncodeOptions, plan: Plan, enc: Encoders, rank: int, stats: dict) -> TextKeys:
    """Rank 0 fills the text cache with the plan's captions; the other ranks wait for it."""
    from osp.common.models.text import clean_caption

    assert opts.text_cache is not None
    captions = [clean_caption(it.caption) for s in plan.shards for it in s.items]
    text_dir = Path(opts.text_cache)
    if rank == 0:
        stats.update(fill_text_cache(text_dir, captions, enc, per_shard=max(opts.samples_per_shard, 64)))
        print(
            f"text cache {text_dir}: {stats['text_encoded']} captions encoded, {stats['text_reused']} reused",
            file=sys.stderr,
        )
    else:
        text_id = enc.text_id()
        wait_for_text(text_dir, {S.text_key(c, text_id, TEXT_MAX_LENGTH) for c in captions}, opts.merge_timeout)
    return TextKeys(S.TextCache.open(text_dir), enc.text_id())


def _encode_shards(
    mine: list[ShardPlan],
    spec: EncodeSpec,
    enc: Encoders,
    opts: EncodeOptions,
    rank: int,
    world: int,
    stats: dict,
    texts: TextKeys | None = None,
    out: Path | None = None,
    remote: str | None = None,
) -> None:
    out = out or Path(opts.out or ".")
    items = [it for s in mine for it in s.items]
    total = len(items) + sum(len(s.errors) for s in mine)
    prog = _progress(opts.progress, rank, world)
    t_start = time.perf_counter()
    with prog:
        task = prog.add_task("encode", total=total, speed="-", errors=0)

        def on_done(n_samples: int, n_errors: int) -> None:
            stats["samples"] += n_samples
            stats["errors"] += n_errors
            done = stats["samples"] + stats["errors"]
            rate = stats["samples"] / max(time.perf_counter() - t_start, 1e-9)
            prog.update(task, completed=done, speed=f"{rate:.2f}", errors=stats["errors"])

        if opts.latents_from:  # re-captioning: the latents of another cache, no decode, no VAE
            stream = iter(reused_latents(items, opts.latents_from))
        else:
            stream = iter(decoded_stream(items, spec, opts.workers, pin_memory=enc.dev.type == "cuda"))
        for shard in mine:
            se = ShardEncoder(str(out), shard, spec, enc, opts.batch_size, opts.latent_dtype, on_done, texts)
            try:
                for _ in range(len(shard.items)):
                    se.add(next(stream))
                se.finish()
            except BaseException:
                se.abort()
                raise
            if remote:
                remote_cache.upload_shard(out, remote, shard.id)
            stats["shards"] += 1


def _wait_for_shards(out: Path | str, n_shards: int, timeout: float, world: int) -> None:
    t0 = time.monotonic()
    while True:
        missing = sorted(set(range(n_shards)) - S.published_shards(out))
        if not missing:
            return
        if time.monotonic() - t0 > timeout:
            raise EncodeError(
                f"{out}: after {timeout:.0f} s, shards {missing[:10]}{'...' if len(missing) > 10 else ''} are still "
                f"missing (ranks {sorted({m % world for m in missing})}); rerun those ranks or rerun osp encode "
                f"single-process (published shards are skipped)"
            )
        time.sleep(2.0)


def finalize(
    out: Path,
    plan: Plan,
    opts: EncodeOptions,
    enc: Encoders,
    texts: TextKeys | None = None,
    source: str | None = None,
) -> dict:
    """uncond + index + errors + manifest; idempotent (a rerun on a finished folder rewrites the same bytes)."""
    assert opts.vae is not None  # encode() resolved the model folders
    for p in out.iterdir():  # leftovers of a run killed while merging (all shards are published by now)
        if ".tmp-" in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if texts is None:
        uncond = enc.encode_text([""])[0]
        S.write_uncond(out, uncond)
    else:  # the text cache holds "" (and every caption): no text bytes here
        uncond = texts.cache.uncond()
    n_samples = S.merge_index(out, source)
    n_errors = sum(1 for line in (out / S.ERRORS_NAME).read_bytes().splitlines() if line.strip())
    if n_samples + n_errors != plan.n_inputs:
        raise EncodeError(
            f"{out}: {n_samples} samples + {n_errors} errors != {plan.n_inputs} inputs; "
            f"the folder holds foreign shards, delete it and re-encode"
        )
    spec = plan.spec
    old = S.read_manifest(opts.latents_from) if opts.latents_from else None
    manifest = {
        "tool": TOOL,
        "tool_version": _tool_version(),
        "plan_digest": plan.digest(),
        "vae": old["vae"]
        if old
        else {
            **enc.vae_identity,
            "path": str(Path(opts.vae).resolve()),
            "dtype": opts.vae_dtype,
            "tiling": asdict(TILING_TRAIN) if opts.tiling else None,
            "scale_factor": VAE_SCALE_FACTOR,
        },
        "text_encoder": {**enc.text.identity(), "pad_to_max": opts.text_pad_to_max}
        if texts is None
        else texts.cache.manifest["text_encoder"],
        "caption_cleaner": cleaner_identity(),
        "geometry": {
            "num_frames": spec.num_frames,
            "height": spec.height,
            "width": spec.width,
            "fps": spec.fps,
            "clips_per_video": spec.clips_per_video,
            "all_captions": spec.all_captions,
            "drop_long": spec.drop_long,
            "frame_stride": spec.frame_stride,
            "speed_factor": spec.speed_factor,
            "short_clips": spec.short_clips,
            "min_frames": spec.min_frames,
            "frame_counts": sorted(
                {it.frames or spec.num_frames for s in plan.shards for it in s.items if it.kind == "video"}
            ),
            "preset": opts.preset,
        },
        "latent": {
            "kind": "moments",
            "shape": [2 * LATENT_CHANNELS, latent_frames(spec.num_frames), spec.height // 8, spec.width // 8],
            "image_shape": [2 * LATENT_CHANNELS, 1, spec.height // 8, spec.width // 8],
            "dtype": opts.latent_dtype,
            "scale_factor": VAE_SCALE_FACTOR,
        },
        "text": {
            "dtype": str(uncond.dtype).removeprefix("torch."),
            "dim": int(uncond.shape[1]),
            "unpadded": True,
            "max_length": enc.text.max_length if texts is None else texts.max_length,
            "uncond_len": int(uncond.shape[0]),
        },
        "counts": {
            "records": plan.n_records,
            "inputs": plan.n_inputs,
            "samples": n_samples,
            "errors": n_errors,
            "shards": len(plan.shards),
        },
    }
    if texts is not None:
        manifest["text_id"] = texts.text_id
        manifest["text_refs"] = [S.make_text_ref(out, texts.cache.root, texts.text_id)]
        manifest["latents_from"] = str(Path(opts.latents_from).resolve()) if opts.latents_from else None
    S.write_manifest(out, manifest)
    return manifest


def reused_latents(items: list[WorkItem], latents_from: str):
    """Re-captioning: the moments and metadata of each planned key from an earlier latent cache (an error
    row for a key it lacks); the same order and form as decoded_stream, without decoding anything."""
    index = S.ShardIndex.open(latents_from)
    rows = {str(k): i for i, k in enumerate(index.key)}
    for it in items:
        i = rows.get(it.key)
        if i is None:
            yield {"seq": it.seq, "error": f"not in the latent cache {latents_from} (--latents-from)"}
            continue
        try:
            sample = S.read_sample(latents_from, index, i)
        except S.ShardError as e:
            yield {"seq": it.seq, "error": f"latent unreadable in {latents_from}: {e}"}
            continue
        keep = (
            "src_frames",
            "src_fps",
            "src_size",
            "clip_start",
            "clip_stride",
            "clip_frames",
            "frame_indices",
            "crop",
            "decoder",
        )
        yield {
            "seq": it.seq,
            "latent": sample.latent.float(),
            "meta": {k: sample.meta[k] for k in keep if k in sample.meta},
        }


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("osp")
    except Exception:
        return "unknown"
