"""The stage-2 reader: cached shards (index.zarr + tars) -> equal-shape batches per data-parallel rank.

Plan of one epoch (identical on every rank, a pure function of (seed, epoch, index)):
    permute all rows with numpy's generator seeded by (seed, epoch)
    -> group the permuted rows by latent shape (T, H, W), keeping the permuted order
    -> cut every group into global batches of batch_size * dp * grad_accum rows (the samples of one
       optimizer step; a short tail is dropped)
    -> shuffle the list of global batches with the same generator
Micro-step m of a global batch gives data-parallel rank r the rows [(m * dp + r) * batch_size, +
batch_size), so all ranks of one tensor-parallel group (same dp rank) see the same samples, and the
samples of each optimizer step depend only on the global batch size, not on how it is split.

Several caches (`data.sources`, each with a weight): the rows of all sources get global ids (source
after source). Each source yields global batches from its own shape buckets as above (its generator
seeded by (seed, epoch, source, pass); a source that runs out starts another pass, reshuffled), and the
epoch's plan interleaves the sources' batches so that the samples drawn stay in proportion to the
weights: the next batch is the one of the source whose drawn samples, with it, are lowest per unit
weight (ties: the first source). An epoch ends after as many samples as the sources hold together.
Every global batch comes from one source and one shape, so all ranks of a step (and every rank of a
TP/SP/CP group, which share a dp rank) get the same shape and the same batch size.

Batch size per bucket: `batch_size` samples per rank per micro-step, or with `tokens_per_batch` > 0,
max(1, tokens_per_batch // video tokens of the bucket's shape), so image buckets get proportionally
larger batches (upstream's image stages); the global batch of a bucket is that x dp x grad_accum.

The loader's position is (epoch, samples consumed in this epoch); it goes into every checkpoint. A
resume with the same global batch (any DP size, batch_size, grad_accum that multiply to it) continues
with exactly the next sample. With another global batch the epoch's plan is cut anew: the run goes on
in the same epoch after ceil(samples / new global batch) of its global batches (within that epoch some
samples may then be seen twice or not at all; later epochs are exact); `notice` says so for the log.

Samples are read by byte offset in DataLoader workers (`osp.common.shards.read_sample`: the checks of
`osp shards verify` for that row); the workers get the index as numpy columns, never a zarr handle.
Text is padded to the batch's longest caption with its mask.

A corrupt sample never raises inside a worker (an exception there reaches the main process as a
re-raised copy without the key, and the loader can then wait forever on its workers at exit): the
worker returns a structured record {"corrupt", key, row, tar, error} that rides in `Batch.skipped`.
The main process decides: `skip_corrupt` counts and skips it, otherwise `ShardLoader` raises
`CorruptSampleError` (one line: shard, key, reason) after shutting its workers down. A row that the
shape filter leaves out is read once at start-up, so an edited shape is corrupt, never "left out".

A worker that cannot put its batch into shared memory (a full /dev/shm) or dies (SIGKILL, SIGBUS)
stops the loader with one `LoaderWorkerError` line naming the cause and the fix, never a wait without
end (`osp.common.loader_guard`).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from osp.common import shards as S
from osp.common import storage
from osp.common.errors import ConfigError, OspError
from osp.common.process import die_with_parent
from osp.common.loader_guard import WorkerFix, loader_error, share_in_worker, watch_workers

WORKER_FIX = WorkerFix(no_workers="set data.num_workers=0", rerun="resume with --resume auto")


class CorruptSampleError(OspError, RuntimeError):
    """A sample failed the integrity checks and data.skip_corrupt is off (message: shard, key, reason)."""


def corrupt_message(item: dict, root: str | Path) -> str:
    return (
        f"{item['tar']}: sample {item['key']!r} is corrupt ({item['error']}); re-encode that shard "
        f"(osp shards verify {root}), or set data.skip_corrupt=true to skip such samples"
    )


# ------------------------------------------------------------------------------------------------
# epoch plan
# ------------------------------------------------------------------------------------------------
def epoch_plan(
    shapes: np.ndarray, seed: int, epoch: int, global_batch: "int | Callable[[tuple], int]", stream: tuple = ()
) -> list[np.ndarray]:
    """shapes [N, 3] latent (T, H, W) per row -> list of global batches (row ids, equal shapes).
    `global_batch`: one size, or the size of a shape's bucket; `stream` extends the generator's seed
    (a source and its pass)."""
    rng = np.random.default_rng([seed, epoch, *stream])
    size = global_batch if callable(global_batch) else (lambda _shape, n=global_batch: n)
    order = rng.permutation(len(shapes))
    groups: dict[tuple, list[int]] = {}
    for i in order:
        groups.setdefault(tuple(int(v) for v in shapes[i]), []).append(int(i))
    batches = []
    for key in sorted(groups):
        rows, gb = groups[key], size(key)
        for j in range(0, len(rows) - gb + 1, gb):
            batches.append(np.asarray(rows[j : j + gb], dtype=np.int64))
    perm = rng.permutation(len(batches))
    return [batches[k] for k in perm]


def mixed_plan(
    sources: list[np.ndarray], weights: list[float], seed: int, epoch: int, global_batch: Callable[[tuple], int]
) -> tuple[list[np.ndarray], list[int]]:
    """Several sources' shapes [N_s, 3] -> (global batches of row ids within their source, the source of
    each) for one epoch; see the module docstring. Sources with no batch must be refused by the caller.

    The sources' batches are merged on one clock counted in samples: the j-th batch of source s is due at
    (j + 1) x stride_s, stride_s = (mean global batch of s) / (normalised weight of s), so over any span
    the samples drawn per source follow the weights to within a batch; epoch e is the span
    [e, e + 1) x (samples of all sources), so it continues the previous epoch's mix exactly. Source s's
    batches are its passes one after another, pass p shuffled by (seed, p, s): a pure function of
    (seed, epoch, the sources' shapes)."""
    total = sum(len(x) for x in sources)
    wsum = sum(Fraction(w) for w in weights)
    per_pass, strides = [], []
    for k, shapes in enumerate(sources):
        first = epoch_plan(shapes, seed, 0, global_batch, stream=(k,))
        if not first:
            raise AssertionError(f"source {k} has no global batch")
        per_pass.append(len(first))
        mean_gb = Fraction(sum(len(b) for b in first), len(first))
        strides.append(mean_gb / (Fraction(weights[k]) / wsum))
    lo, hi = Fraction(epoch * total), Fraction((epoch + 1) * total)
    due: list[tuple[Fraction, int, int]] = []  # (due time, source, batch number)
    for k, stride in enumerate(strides):
        for j in range(math.floor(lo / stride), math.floor(hi / stride)):
            due.append(((j + 1) * stride, k, j))
    due.sort()
    passes: dict[tuple[int, int], list[np.ndarray]] = {}
    plan, origin = [], []
    for _, k, j in due:
        p = j // per_pass[k]
        if (k, p) not in passes:
            passes[(k, p)] = epoch_plan(sources[k], seed, p, global_batch, stream=(k,))
        plan.append(passes[(k, p)][j % per_pass[k]])
        origin.append(k)
    return plan, origin


class PlanSampler(Sampler):
    """Yields this dp rank's row ids for the micro-batches [start, end) of one epoch's plan
    (`accum` micro-batches per global batch; a global batch of B rows gives each rank B / (dp x accum))."""

    def __init__(
        self, plan: list[np.ndarray], dp_rank: int, batch_size: int, start: int = 0, dp_size: int = 1, accum: int = 1
    ):
        self.plan, self.dp_rank, self.batch_size, self.start = plan, dp_rank, batch_size, start
        self.dp_size, self.accum = dp_size, accum

    def __len__(self) -> int:
        return max(0, len(self.plan) * self.accum - self.start)

    def __iter__(self):
        for i in range(self.start, len(self.plan) * self.accum):
            gb, m = self.plan[i // self.accum], i % self.accum
            bs = len(gb) // (self.dp_size * self.accum)
            lo = (m * self.dp_size + self.dp_rank) * bs
            yield [int(j) for j in gb[lo : lo + bs]]


# ------------------------------------------------------------------------------------------------
# dataset + collate
# ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    moments: torch.Tensor  # [B, 2C, T, H, W] posterior moments as stored (float16 by default)
    text: torch.Tensor  # [B, L, D] padded to the longest caption of the batch
    text_mask: torch.Tensor  # [B, L] 1 = real token
    keys: list[str]
    rows: list[int]
    skipped: list[dict] = field(default_factory=list)  # corrupt samples dropped from this batch
    shape: tuple = ()  # (T, H, W) of the batch


class ShardDataset(Dataset):
    """Map-style: row id -> (row, Sample), read by byte offset with its checksum checked.

    Holds the index as plain numpy columns (`ShardIndex` keeps no zarr handle), so DataLoader workers
    never touch zarr's event loop after a fork."""

    def __init__(self, root: str | Path, index: "S.ShardIndex", texts: "S.TextLookup | None" = None):
        self.root = str(root)
        self.index = index
        self.texts = texts  # the text caches a latent cache refers to (None: text inline)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        """(row, Sample), or for a sample that fails its checks a dict {"corrupt", key, row, tar, error}
        (never an exception: see the module docstring)."""
        try:
            return self._with_text(i, S.read_sample(self.root, self.index, i))
        except (S.ShardError, OSError) as e:  # failed check, truncated tar, bad header, missing file ...
            return self._corrupt(i, e)

    def __getitems__(self, rows: list[int]) -> list:
        """A micro-batch at once (DataLoader's batched fetch): rows of one shard are read together, so
        an object store serves adjacent samples with one request. Same items as __getitem__."""
        try:
            got = S.read_samples(self.root, self.index, rows)
        except (S.ShardError, OSError):  # a failure of the shard as a whole: per row, as __getitem__
            return [self[i] for i in rows]
        out = []
        for i, s in zip(rows, got):
            try:
                out.append(self._corrupt(i, s) if isinstance(s, Exception) else self._with_text(i, s))
            except (S.ShardError, OSError) as e:
                out.append(self._corrupt(i, e))
        return out

    def _with_text(self, i: int, sample: "S.Sample") -> tuple:
        """(row, sample) with the text of a sample that refers to a text cache looked up there."""
        if sample.text is None:
            if self.texts is None:
                raise S.ShardError(f"{self.root}: sample without text and no text cache referred to")
            sample.text = self.texts.get(sample.meta[S.TEXT_KEY_FIELD])
        return int(i), sample

    def _corrupt(self, i: int, e: Exception) -> dict:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        tar = S.shard_location(self.root, int(self.index.shard[i]))
        reason = reason.removeprefix(f"{tar}: ").split("; ")[0]  # the fix is said once, by corrupt_message
        return {"corrupt": True, "key": str(self.index.key[i]), "row": int(i), "tar": tar, "error": reason}


class MixedDataset(Dataset):
    """Global row id -> (global row id, Sample) over several sources' datasets (rows source after source)."""

    def __init__(self, parts: list[ShardDataset]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        item = self.parts[s][int(i - self.offsets[s])]
        if isinstance(item, dict):
            return {**item, "row": int(i)}
        return int(i), item[1]

    def __getitems__(self, rows: list[int]) -> list:
        """Batched fetch: the rows of each source read together (`ShardDataset.__getitems__`)."""
        src = np.searchsorted(self.offsets, np.asarray(rows, dtype=np.int64), side="right") - 1
        out: list = [None] * len(rows)
        for s in np.unique(src).tolist():
            js = [j for j in range(len(rows)) if src[j] == s]
            got = self.parts[s].__getitems__([int(rows[j] - self.offsets[s]) for j in js])
            for j, item in zip(js, got):
                out[j] = {**item, "row": int(rows[j])} if isinstance(item, dict) else (int(rows[j]), item[1])
        return out


class Collate:
    """Stack moments, pad text to the batch's longest (multiple of `pad_multiple`) with its mask."""

    def __init__(self, pad_multiple: int = 1):
        self.pad_multiple = max(1, pad_multiple)

    def __call__(self, items) -> Batch:
        good = [s for _, s in (it for it in items if not isinstance(it, dict))]
        rows = [r for r, _ in (it for it in items if not isinstance(it, dict))]
        skipped = [it for it in items if isinstance(it, dict)]
        if not good:
            return Batch(torch.empty(0), torch.empty(0), torch.empty(0), [], [], skipped)
        moments = torch.stack([s.latent for s in good])
        lens = [int(s.text.shape[0]) for s in good]
        L = -(-max(lens) // self.pad_multiple) * self.pad_multiple
        D = good[0].text.shape[1]
        text = torch.zeros(len(good), L, D, dtype=good[0].text.dtype)
        mask = torch.zeros(len(good), L, dtype=torch.long)
        for j, s in enumerate(good):
            text[j, : lens[j]] = s.text
            mask[j, : lens[j]] = 1
        batch = Batch(moments, text, mask, [s.key for s in good], rows, skipped, tuple(moments.shape[2:]))
        return share_in_worker(batch, WORKER_FIX)  # a full /dev/shm: an error here, not a batch lost in transit


def _worker_init(_worker_id: int) -> None:
    # A SIGTERM to the whole process group must reach the trainer only: it checkpoints at the next
    # step boundary and the loader then shuts its workers down. The worker was forked with SIGTERM
    # blocked (`_start_epoch`), so one sent before this line stays pending and is discarded here.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    die_with_parent()  # and it dies with its rank (under the launcher)


# ------------------------------------------------------------------------------------------------
# the resumable loader
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One cache of a run: its folder, its weight in the mix and a name for the logs."""

    root: Path | str  # a folder, or an object-store URL (s3://bucket/prefix) kept as a string
    weight: float = 1.0
    name: str = ""


def _location(root) -> Path | str:
    return str(root) if storage.is_url(root) else Path(root)


def as_sources(root) -> list[Source]:
    """A folder or URL, or a list of Source / (folder, weight) / {"shards", "weight"} -> Sources (named)."""
    if isinstance(root, (str, Path)):
        items = [Source(_location(root))]
    else:
        items = []
        for x in root:
            if isinstance(x, Source):
                items.append(x)
            elif isinstance(x, dict):
                items.append(Source(_location(x["shards"]), float(x.get("weight", 1.0))))
            else:
                items.append(Source(_location(x[0]), float(x[1])))
    names: list[str] = []
    out = []
    for i, src in enumerate(items):
        if not src.weight > 0:
            raise ConfigError(f"data.sources[{i}] ({src.root}): weight {src.weight:g} must be > 0")
        base = src.root.rstrip("/").rsplit("/", 1)[-1] if isinstance(src.root, str) else src.root.name
        name = src.name or base or f"source{i}"
        name = name if name not in names else f"{name}#{i}"
        names.append(name)
        out.append(Source(src.root, src.weight, name))
    return out


class ShardLoader:
    """Endless iterator of this rank's batches with a checkpointable position (epoch, cursor)."""

    def __init__(
        self,
        root,  # a cache folder or object-store URL (s3://bucket/prefix), or several (see `as_sources`)
        *,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        pad_multiple: int = 1,
        shapes: set[tuple[int, int, int]] | None = None,
        grad_accum: int = 1,
        tokens_per_batch: int = 0,
        tokens_of: Callable[[tuple], int] | None = None,
    ):
        """`root`: a cache folder, or several (see `as_sources`). `shapes`: the latent (T, H, W) shapes to
        train on (None = all); other rows are left out. `tokens_per_batch` > 0 sizes each bucket's batch
        by `tokens_of(shape)` (video tokens per sample) instead of `batch_size`."""
        self.sources = as_sources(root)
        self.root = self.sources[0].root
        parts, shapes_, keys, origin = [], [], [], []
        for k, src in enumerate(self.sources):
            index = S.ShardIndex.open(src.root)
            manifest = S.read_manifest(src.root) if storage.open_store(src.root).exists(S.MANIFEST_NAME) else {}
            texts = S.TextLookup(S.open_text_refs(src.root, manifest)) if S.text_refs(manifest) else None
            parts.append(ShardDataset(src.root, index, texts))
            shapes_.append(
                np.stack([np.asarray(index.latent_t), np.asarray(index.latent_h), np.asarray(index.latent_w)], 1)
                .astype(np.int64)
                .reshape(-1, 3)
            )
            keys.append(np.asarray(index.key))
            origin.append(np.full(len(index), k, dtype=np.int64))
        self.shapes = np.concatenate(shapes_)
        self.keys = np.concatenate(keys)
        self.source_of = np.concatenate(origin)  # global row -> source
        keep = (
            np.ones(len(self.shapes), bool)
            if shapes is None
            else np.array([tuple(int(v) for v in r) in shapes for r in self.shapes], bool)
        )
        self.rows = np.nonzero(keep)[0]  # the rows that take part in the plan
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.accum = grad_accum
        self.tokens_per_batch, self.tokens_of = tokens_per_batch, tokens_of
        if tokens_per_batch and tokens_of is None:
            raise ConfigError("data.tokens_per_batch needs the DiT's tokens per shape (tokens_of)")
        self.micro_batch = batch_size * dp_size  # samples of one micro-step over the DP group (fixed batch_size)
        # the plan's identity across layouts: samples (or video tokens) of one optimizer step
        self.global_batch = (tokens_per_batch if tokens_per_batch else batch_size) * dp_size * grad_accum
        self.notice = ""  # set when a resume had to re-cut the epoch (another global batch)
        self.num_workers = num_workers
        self.skip_corrupt = skip_corrupt  # False: a corrupt sample raises CorruptSampleError here, in the main process
        self.dataset = parts[0] if len(parts) == 1 else MixedDataset(parts)
        self.collate = Collate(pad_multiple)
        self.epoch, self.cursor = 0, 0
        self.source_samples = [0] * len(self.sources)  # samples this rank read per source (since start)
        self._step_samples = [0] * len(self.sources)
        self._it: Iterator[Batch] | None = None
        self._plans: dict[int, tuple[list[np.ndarray], list[int]]] = {}
        self._check_left_out(np.nonzero(~keep)[0])
        self._check_sources()

    def bucket_batch(self, shape: tuple) -> int:
        """Samples per rank per micro-step for a bucket of `shape`."""
        if self.tokens_per_batch:
            assert self.tokens_of is not None
            return max(1, self.tokens_per_batch // max(1, int(self.tokens_of(tuple(int(v) for v in shape)))))
        return self.batch_size

    def _global_of(self, shape: tuple) -> int:
        return self.bucket_batch(shape) * self.dp_size * self.accum

    def _check_sources(self) -> None:
        """Every source must give at least one global batch (one line naming it and the counts)."""
        for k, src in enumerate(self.sources):
            rows = self.rows[self.source_of[self.rows] == k]
            if epoch_plan(
                self.shapes[rows], self.seed, 0, self._global_of, stream=(k,) if len(self.sources) > 1 else ()
            ):
                continue
            counts = (
                {
                    tuple(int(x) for x in key): int(v)
                    for key, v in zip(*np.unique(self.shapes[rows], axis=0, return_counts=True))
                }
                if len(rows)
                else {}
            )
            need = {sh: self._global_of(sh) for sh in counts} or self._global_of((1, 1, 1))
            per = "data.tokens_per_batch" if self.tokens_per_batch else f"data.batch_size {self.batch_size}"
            raise ConfigError(
                f"{src.root}: no latent shape has enough samples for one global batch (samples per shape {counts}, "
                f"global batch per shape {need}: {per} x {self.dp_size} data-parallel ranks x {self.accum} "
                "accumulation steps); lower the batch size, encode more clips or drop this source"
            )

    def step_stats(self) -> dict:
        """Samples per source of the micro-batches since the last call, over the DP group (every rank
        of a step reads the same source), and this rank's totals since start (for metrics.jsonl)."""
        step = {src.name: n * self.dp_size for src, n in zip(self.sources, self._step_samples)}
        self._step_samples = [0] * len(self.sources)
        return {
            "source_samples": step,
            "source_samples_total": {s.name: n * self.dp_size for s, n in zip(self.sources, self.source_samples)},
        }

    def _check_left_out(self, rows: np.ndarray) -> None:
        """Rows the shape filter leaves out are never read by the plan, so they are checked here once:
        an index row edited into another shape (latent_t 3 -> 1) is corrupt, not a "single-frame sample"
        to leave out. Without skip_corrupt it stops training as `verify` does; with it, it rides in the
        `skipped` list of the first batch of every epoch (counted once per epoch, as a corrupt row of the
        plan is when its epoch reads it). Costs one read per left-out row (none in a video-only cache)."""
        self.left_out_corrupt: list[dict] = []
        for i in rows:
            item = self.dataset[int(i)]
            if isinstance(item, dict):
                if not self.skip_corrupt:
                    raise CorruptSampleError(corrupt_message(item, self.root))
                self.left_out_corrupt.append(item)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            if len(self.sources) == 1:
                plan = [self.rows[b] for b in epoch_plan(self.shapes[self.rows], self.seed, epoch, self._global_of)]
                self._plans = {epoch: (plan, [0] * len(plan))}
            else:
                per = [self.rows[self.source_of[self.rows] == k] for k in range(len(self.sources))]
                plan, origin = mixed_plan(
                    [self.shapes[r] for r in per], [s.weight for s in self.sources], self.seed, epoch, self._global_of
                )
                plan = [per[k][gb] for gb, k in zip(plan, origin)]  # back to global row ids
                self._plans = {epoch: (plan, origin)}
        return self._plans[epoch][0]

    def _micro_samples(self, epoch: int) -> list[int]:
        """Samples over the DP group of each micro-step of the epoch's plan."""
        return [len(gb) // self.accum for gb in self._plan(epoch) for _ in range(self.accum)]

    # position ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position: `samples` consumed in `epoch` (`cursor` = this loader's micro-batches of it)."""
        return {
            "epoch": self.epoch,
            "samples": int(sum(self._micro_samples(self.epoch)[: self.cursor])),
            "cursor": self.cursor,
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after `samples` of `epoch` (see the module docstring for another global batch)."""
        epoch, samples = int(state["epoch"]), int(state["samples"])
        saved = int(state.get("global_batch", self.global_batch))
        self.notice = ""
        if int(state.get("seed", self.seed)) != self.seed:
            self.notice = f"data order: run.seed changed ({state['seed']} -> {self.seed}), epoch {epoch} is reshuffled"
        bounds = np.cumsum([0] + self._micro_samples(epoch))
        exact = np.nonzero(bounds == samples)[0]
        if saved == self.global_batch and len(exact):
            cursor = int(exact[0])
        else:
            gb_bounds = bounds[:: self.accum]
            cursor = int(np.searchsorted(gb_bounds, samples, side="left")) * self.accum
            self.notice = (
                f"data order: the global batch changed ({saved} -> {self.global_batch} samples per step); epoch "
                f"{epoch} is re-cut and continues after {cursor // self.accum} of its new global batches "
                f"({samples} samples were consumed), so some samples of this epoch may repeat or be left out; "
                f"from epoch {epoch + 1} on the order is exact"
            )
        self.epoch, self.cursor = epoch, cursor
        self._it = None

    # iteration -----------------------------------------------------------------------------
    def _start_epoch(self) -> None:
        plan = self._plan(self.epoch)
        sampler = PlanSampler(plan, self.dp_rank, self.batch_size, self.cursor, self.dp_size, self.accum)
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None,
            worker_init_fn=_worker_init if self.num_workers else None,
        )
        if not self.num_workers:
            self._it = iter(loader)
            return
        # workers are forked here (one set per epoch): SIGTERM stays blocked until they exist, so a
        # scheduler's SIGTERM to every process cannot kill a worker before _worker_init ignores it;
        # one that arrives meanwhile reaches this process when it is unblocked
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            self._it = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        watch_workers(WORKER_FIX)  # a worker that dies: one line wherever the main thread is

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        while True:
            if self._it is None:
                self._start_epoch()
            assert self._it is not None
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.cursor, self._it = self.epoch + 1, 0, None
                continue
            except (RuntimeError, ConnectionError, EOFError) as e:  # a worker failed or died: one line
                err = loader_error(e, WORKER_FIX, getattr(self._it, "_workers", ()))
                if err is None:
                    raise
                self.close()
                raise err from None
            if batch.rows:
                k = int(self.source_of[batch.rows[0]])
                self.source_samples[k] += len(batch.rows)
                self._step_samples[k] += len(batch.rows)
            if self.cursor == 0 and self.left_out_corrupt:  # after the plan's own (Batch.skipped[0] is of the batch)
                batch.skipped = batch.skipped + self.left_out_corrupt
            self.cursor += 1
            if batch.skipped and not self.skip_corrupt:
                self.close()
                raise CorruptSampleError(corrupt_message(batch.skipped[0], self.root))
            return batch

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # None for it = None, too
        if shutdown is not None:
            shutdown()  # joins (or terminates) the workers now, not at interpreter exit
