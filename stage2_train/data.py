"""The stage-2 reader: cached shards (index.zarr + tars) -> equal-shape batches per data-parallel rank.

Plan of one epoch (identical on every rank, a pure function of (seed, epoch, index)):
    permute all rows with numpy's generator seeded by (seed, epoch)
    -> group the permuted rows by latent shape (T, H, W), keeping the permuted order
    -> cut every group into global batches of batch_size * dp rows (a short tail is dropped)
    -> shuffle the list of global batches with the same generator
Data-parallel rank r reads rows [r * batch_size, (r + 1) * batch_size) of each global batch, so all
ranks of one tensor-parallel group (same dp rank) see the same samples. The loader's position is
(epoch, cursor = global batches handed to the train loop in this epoch); it goes into every
checkpoint and a resumed loader starts with exactly the next batch.

Samples are read by byte offset in DataLoader workers (`osp.common.shards.read_sample`: the checks of
`osp shards verify` for that row); the workers get the index as numpy columns, never a zarr handle.
Text is padded to the batch's longest caption with its mask.

A corrupt sample never raises inside a worker (an exception there reaches the main process as a
re-raised copy without the key, and the loader can then wait forever on its workers at exit): the
worker returns a structured record {"corrupt", key, row, tar, error} that rides in `Batch.skipped`.
The main process decides: `skip_corrupt` counts and skips it, otherwise `ShardLoader` raises
`CorruptSampleError` (one line: shard, key, reason) after shutting its workers down.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from osp.common import shards as S
from osp.common.errors import ConfigError, OspError


class CorruptSampleError(OspError, RuntimeError):
    """A sample failed the integrity checks and data.skip_corrupt is off (message: shard, key, reason)."""


def corrupt_message(item: dict, root: str | Path) -> str:
    return (f"{item['tar']}: sample {item['key']!r} is corrupt ({item['error']}); re-encode that shard "
            f"(osp shards verify {root}), or set data.skip_corrupt=true to skip such samples")


# ------------------------------------------------------------------------------------------------
# epoch plan
# ------------------------------------------------------------------------------------------------
def epoch_plan(shapes: np.ndarray, seed: int, epoch: int, global_batch: int) -> list[np.ndarray]:
    """shapes [N, 3] latent (T, H, W) per row -> list of global batches (row ids, equal shapes)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shapes))
    groups: dict[tuple, list[int]] = {}
    for i in order:
        groups.setdefault(tuple(int(v) for v in shapes[i]), []).append(int(i))
    batches = []
    for key in sorted(groups):
        rows = groups[key]
        for j in range(0, len(rows) - global_batch + 1, global_batch):
            batches.append(np.asarray(rows[j : j + global_batch], dtype=np.int64))
    perm = rng.permutation(len(batches))
    return [batches[k] for k in perm]


class PlanSampler(Sampler):
    """Yields this dp rank's row ids for the batches [start, end) of one epoch's plan."""

    def __init__(self, plan: list[np.ndarray], dp_rank: int, batch_size: int, start: int = 0):
        self.plan, self.dp_rank, self.batch_size, self.start = plan, dp_rank, batch_size, start

    def __len__(self) -> int:
        return max(0, len(self.plan) - self.start)

    def __iter__(self):
        lo = self.dp_rank * self.batch_size
        for gb in self.plan[self.start :]:
            yield [int(i) for i in gb[lo : lo + self.batch_size]]


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

    def __init__(self, root: str | Path, index: "S.ShardIndex"):
        self.root = str(root)
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        """(row, Sample), or for a sample that fails its checks a dict {"corrupt", key, row, tar, error}
        (never an exception: see the module docstring)."""
        try:
            return int(i), S.read_sample(self.root, self.index, i)
        except (S.ShardError, OSError) as e:  # failed check, truncated tar, bad header, missing file ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            tar = str(S.shard_path(self.root, int(self.index.shard[i])))
            reason = reason.removeprefix(f"{tar}: ").split("; ")[0]  # the fix is said once, by corrupt_message
            return {"corrupt": True, "key": str(self.index.key[i]), "row": int(i), "tar": tar, "error": reason}


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
        return Batch(moments, text, mask, [s.key for s in good], rows, skipped, tuple(moments.shape[2:]))


def _worker_init(_worker_id: int) -> None:
    # A SIGTERM to the whole process group must reach the trainer only: it checkpoints at the next
    # step boundary and the loader then shuts its workers down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from osp.stage2_train.launch import die_with_parent

    die_with_parent()  # and it dies with its rank (under the launcher)


# ------------------------------------------------------------------------------------------------
# the resumable loader
# ------------------------------------------------------------------------------------------------
class ShardLoader:
    """Endless iterator of this rank's batches with a checkpointable position (epoch, cursor)."""

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        pad_multiple: int = 1,
        shapes: set[tuple[int, int, int]] | None = None,
    ):
        """`shapes`: the latent (T, H, W) shapes to train on (None = all); other rows are left out."""
        self.root = Path(root)
        index = S.ShardIndex.open(self.root)
        self.shapes = np.stack([np.asarray(index.latent_t), np.asarray(index.latent_h), np.asarray(index.latent_w)], 1).astype(np.int64)
        self.keys = np.asarray(index.key)
        keep = np.ones(len(self.shapes), bool) if shapes is None else np.array([tuple(int(v) for v in r) in shapes for r in self.shapes], bool)
        self.rows = np.nonzero(keep)[0]  # the rows that take part in the plan
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.global_batch = batch_size * dp_size
        self.num_workers = num_workers
        self.skip_corrupt = skip_corrupt  # False: a corrupt sample raises CorruptSampleError here, in the main process
        self.dataset = ShardDataset(self.root, index)
        self.collate = Collate(pad_multiple)
        self.epoch, self.cursor = 0, 0
        self._it: Iterator[Batch] | None = None
        self._check_left_out(np.nonzero(~keep)[0])
        if not self._plan(0):
            counts = {tuple(int(x) for x in k): int(v) for k, v in zip(*np.unique(self.shapes[self.rows], axis=0, return_counts=True))} if len(self.rows) else {}
            raise ConfigError(
                f"{self.root}: no latent shape has enough samples for one global batch of {self.global_batch} "
                f"(data.batch_size {batch_size} x {dp_size} data-parallel ranks; samples per shape {counts}); "
                "lower data.batch_size or encode more clips"
            )

    def _check_left_out(self, rows: np.ndarray) -> None:
        """Rows the shape filter leaves out are never read by the plan, so they are checked here once:
        an index row edited into another shape (latent_t 3 -> 1) must stop training as `verify` does,
        not vanish as a "single-frame sample". Costs one read per left-out row (none in a video-only cache)."""
        if self.skip_corrupt:
            return
        for i in rows:
            item = self.dataset[int(i)]
            if isinstance(item, dict):
                raise CorruptSampleError(corrupt_message(item, self.root))

    def _plan(self, epoch: int) -> list[np.ndarray]:
        return [self.rows[b] for b in epoch_plan(self.shapes[self.rows], self.seed, epoch, self.global_batch)]

    # position ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ConfigError(
                f"checkpoint loader position is for a global batch of {state['global_batch']}, this run has "
                f"{self.global_batch}; resume with the same data.batch_size and data-parallel size"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._it = None

    # iteration -----------------------------------------------------------------------------
    def _start_epoch(self) -> None:
        plan = self._plan(self.epoch)
        sampler = PlanSampler(plan, self.dp_rank, self.batch_size, self.cursor)
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None,
            worker_init_fn=_worker_init if self.num_workers else None,
        )
        self._plan_len = len(plan)
        self._it = iter(loader)

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
            self.cursor += 1
            if batch.skipped and not self.skip_corrupt:
                self.close()
                raise CorruptSampleError(corrupt_message(batch.skipped[0], self.root))
            return batch

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # joins (or terminates) the workers now, not at interpreter exit
