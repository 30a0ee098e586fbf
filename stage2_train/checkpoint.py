"""Training checkpoints, and every reader of DiT weights: the one checkpoint module.

    <run>/checkpoints/step-0000100/
        .metadata, __<rank>_0.distcp   torch DCP: every tensor below as ONE global tensor (chunks + offsets)
        config.json                    the DiT config (diffusers field names)
        trainer.json                   format, step, saved layout, the run's config (for people and tools)
    <run>/checkpoints/latest           the name of the newest complete checkpoint (`read_latest`)

Keys (released/diffusers names: what `model.state_dict()` returns at any TP size, TP-split by the
rule table `osp.stage2_train.state_dict_adapter.tp_split_dim`):

    model.<key>                 weights            DTensor on the (replica, tp) mesh: Shard(split dim) or Replicate
    ema.<key>                   EMA weights        same placement
    optim.exp_avg.<key>         AdamW moments      same placement, written by the DP rank that owns them (ZeRO-1)
    optim.exp_avg_sq.<key>                          or deduplicated over DP replicas (plain AdamW)
    optim.step.<key>            AdamW step count   0-dim tensor
    state.<name>                counters           int64 0-dim: step, ema_updates, loader_epoch, loader_samples, ...
    rng.<kind>.rank<r>          RNG state of rank r (restored when the new run has that rank)

Nothing depends on the saved layout: a resume at another DP size, TP size, SP or ZeRO-1 setting reads
the slices it needs (DCP's planner), the optimizer state goes to whichever rank owns the parameter
now. The data position is the number of samples consumed in the epoch (`ShardLoader.load_state_dict`).

Publication: every rank writes into `checkpoints/.tmp-step-0000100/`; when DCP has finished (its
coordinator writes `.metadata` after all ranks' data), rank 0 adds config.json + trainer.json,
renames the folder to its final name and then rewrites `latest` (temp file + rename). A killed save
therefore never becomes `latest`. Retention (`run.keep_last`, `run.keep_every`): after a checkpoint is
published and `latest` names it, rank 0 deletes the step folders that are neither among the newest
`keep_last` nor a multiple of `keep_every` (kept permanently), never the one `latest` names. A
deletion first renames the folder to `.deleting-step-*` (one atomic rename: a step folder is either
whole or gone), then removes it; a kill during the removal leaves a `.deleting-*` folder that the next
start removes, and `latest` untouched. With `async_save` the write runs in a background thread on its own
gloo group while training continues; the state is copied first (host copy, the only stall). A save
that the file system refuses (disk full, file-size limit) is a `CheckpointError` naming the folder,
the free space and the checkpoint `latest` still names; the partial folder is removed and training
stops (an asynchronous save reports it at the next `poll`/`wait`). Multi-node runs need the run
directory on a shared filesystem.

Reading never runs code from a file: DCP's `.metadata` is a pickle, read here by an unpickler that
resolves only the classes DCP metadata is made of (`read_metadata`), checked to describe tensors in
`.distcp` files of the folder; tensor data is read by torch's `weights_only` loader and DCP's
arbitrary-object path (bytes entries) is refused. Released / osp-dit weights are safetensors
(`state_dict_adapter`). Every refusal is one line naming the file.

Readers: `load` / `load_weights` / `load_init` fill a (TP-sharded) model inside a training job
(collective); `load_dit_checkpoint` / `open_dit` read any accepted form offline into full TP=1
weights (`osp convert`, `osp sample`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor, Replicate, Shard

from osp.common.errors import MissingFileError, one_line
from osp.common.hashing import sha256_files
from osp.common.models.dit import DiTConfig
from osp.stage2_train.lora import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoraSpec,
    check_base,
    has_lora,
    is_adapter_key,
    is_peft_folder,
    merge_state_dict,
    read_peft,
    write_peft,
)
from osp.stage2_train.state_dict_adapter import (
    CONFIG_FILE,
    DIFFUSERS_WEIGHTS,
    META_FILE,
    CheckpointError,
    SliceReader,
    check_keys,
    is_diffusers_folder,
    is_osp_checkpoint,
    load_diffusers_state_dict,
    load_dit_shards,
    merge_state_dicts,
    read_checkpoint_meta,
    save_dit_checkpoint,
    save_tensors,
    split_state_dict,
    tensor_shapes,
    tp_split_dim,
)

CHECKPOINTS = "checkpoints"  # <run>/checkpoints
LATEST = "latest"
TRAINER_FILE = "trainer.json"  # a training checkpoint's format, step, layout and run config
DCP_METADATA = ".metadata"
FORMAT = "torch-dcp"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
RNG_KINDS = ("torch", "cuda")
SLOW_SAVE_ENV = "OSP_TEST_SLOW_SAVE_S"  # tests: seconds each rank's writer sleeps before writing its data
SLOW_DELETE_ENV = "OSP_TEST_SLOW_DELETE_S"  # tests: seconds a retention deletion sleeps half-way through
DELETING = ".deleting-"  # prefix of a step folder being deleted by retention


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------
# reading DCP without running code
# ------------------------------------------------------------------------------------------------
# every global DCP's FileSystemWriter pickles into .metadata (torch 2.x), by module
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",  # resolved so that the refusal below can name the entry
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # and the dtypes (below)
    "torch.serialization": {"_get_layout"},  # a lookup of torch.strided & co. by name
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes of DCP metadata, torch.Size and dtypes; anything else is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.path}: refused: it asks for {module}.{name}, which checkpoint metadata never holds (loading it "
            "would run code); use a checkpoint from a source you trust, or delete this step folder"
        )


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: damaged ({why}); the checkpoint cannot be read: delete this step folder and use an earlier step "
        "(or copy it again)"
    )


def read_metadata(folder: str | Path) -> Metadata:
    """The DCP metadata of a checkpoint folder, unpickled by the restricted unpickler and checked to
    describe tensors only, stored in `.distcp` files of the folder itself."""
    path = Path(folder) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, path).load()
    except FileNotFoundError:
        raise MissingFileError(
            f"{path}: missing; {folder} is not a complete training checkpoint: pass a step-XXXXXXX folder"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # truncated / garbled pickle, or classes called with nonsense
        raise _damaged(path, f"{type(e).__name__}: {one_line(e)[:120]}") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise _damaged(path, f"holds a {type(md).__name__}, not DCP metadata")
    for key, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            raise CheckpointError(
                f"{path}: refused: entry {key!r} is a {type(m).__name__}, not a tensor (osp checkpoints hold tensors "
                "only, other entries would be unpickled); use a checkpoint from a source you trust"
            )
        if not isinstance(m.size, torch.Size) or not isinstance(m.properties.dtype, torch.dtype):
            raise _damaged(path, f"entry {key!r} has no tensor size/dtype")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or not rel.endswith(".distcp") or rel.startswith("."):
            raise CheckpointError(
                f"{path}: refused: it points at {rel!r}, not a .distcp file of the folder; use a checkpoint from a "
                "source you trust"
            )
        if getattr(info, "transform_descriptors", None):
            raise _damaged(
                path, f"{rel} is stored with transforms {info.transform_descriptors}, which osp never writes"
            )
    return md


class _SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by `read_metadata` (once, before DCP asks) and every
    read failure turned into a one-line CheckpointError naming the file."""

    def __init__(self, folder: str | Path):
        super().__init__(str(folder))
        self.folder = Path(folder)
        self.metadata = read_metadata(folder)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = self.metadata
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        assert md.storage_meta is not None
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        per_file: dict[str, list] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:  # DCP would unpickle it without restriction
                raise CheckpointError(
                    f"{self.folder / DCP_METADATA}: refused: entry {item.dest_index.fqn!r} is not a tensor; use a "
                    "checkpoint from a source you trust"
                )
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for rel, items in per_file.items():
            f = self.folder / rel
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner)
            except pickle.UnpicklingError as e:  # torch's weights_only loader refused an object
                raise CheckpointError(
                    f"{f}: refused: it holds more than tensors ({one_line(e)[:120]}); use a "
                    "checkpoint from a source you trust"
                ) from None
            except FileNotFoundError:
                raise MissingFileError(
                    f"{f}: missing; the checkpoint is incomplete: delete this step folder and use an earlier step"
                ) from None
            except (RuntimeError, OSError, EOFError, ValueError, IndexError, AssertionError) as e:
                raise _damaged(f, f"{type(e).__name__}: {one_line(e)[:120]}") from None
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(None)
        return fut


def _first_osp_error(e: CheckpointException):
    for exc, _trace in e.failures.values():
        if isinstance(exc, (CheckpointError, MissingFileError)):
            return exc
    return None


def _read(sd: dict, folder: str | Path, *, process_group=None, no_dist: bool = False) -> None:
    """dcp.load through the safe reader: fills `sd` in place; refusals arrive as one-line errors."""
    reader = _SafeReader(folder)
    try:
        with warnings.catch_warnings():  # offline: "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(sd, storage_reader=reader, process_group=process_group, no_dist=no_dist)
    except CheckpointException as e:
        err = _first_osp_error(e)
        if err is None:
            raise
        raise err from None


def saved_keys(path: str | Path) -> dict:
    """Key -> DCP metadata (global size and dtype) of a checkpoint's tensors."""
    return read_metadata(path).state_dict_metadata


# ------------------------------------------------------------------------------------------------
# global tensors of this rank's local pieces
# ------------------------------------------------------------------------------------------------
def make_mesh(device_type: str, world: int, tp: int):
    """(replica, tp) device mesh over the world; TP ranks are contiguous (megatron's order), every
    other dimension (DP, CP) replicates. Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("replica", "tp"))


def _placements(key: str, tp: int):
    dim = tp_split_dim(key) if tp > 1 else None
    return [Replicate(), Replicate() if dim is None else Shard(dim)]


def _global(key: str, local: torch.Tensor, mesh, tp: int) -> DTensor:
    return DTensor.from_local(local, mesh, _placements(key, tp), run_check=False)


def _tensor_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def trained_state(model) -> dict[str, torch.Tensor]:
    """What a training checkpoint holds of the model: every tensor, or only the adapters of a LoRA
    model (its frozen base comes from model.init and is never saved)."""
    sd = _tensor_state(model)
    return {k: v for k, v in sd.items() if is_adapter_key(k)} if has_lora(model) else sd


def _base_state(model) -> dict[str, torch.Tensor]:
    """The DiT weights model.init fills (a LoRA model's adapters left out)."""
    return {k: v for k, v in _tensor_state(model).items() if not is_adapter_key(k)}


def _adamw(optimizer):
    """The torch optimizer holding this rank's AdamW state (None when this rank owns no parameter)."""
    return getattr(optimizer, "optim", None)


def _owned(optimizer, model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter whose AdamW state lives on this rank."""
    opt = _adamw(optimizer)
    if opt is None:
        return []
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [(name_of[id(p)], p) for g in opt.param_groups for p in g["params"]]


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def state_dict(*, model, ema, optimizer, counters: dict[str, int], mesh, tp: int, rank: int) -> dict:
    """This rank's view of the training state as DCP global tensors (sharing storage with the live
    tensors: load fills them in place)."""
    sd: dict = {}
    for k, v in trained_state(model).items():
        sd[f"model.{k}"] = _global(k, v, mesh, tp)
    if ema is not None:
        for k, v in ema.shadow.items():
            sd[f"ema.{k}"] = _global(k, v, mesh, tp)
    opt = _adamw(optimizer)
    for name, p in _owned(optimizer, model):
        assert opt is not None  # _owned is empty without it
        st = opt.state.get(p) or {}
        if "exp_avg" not in st:
            continue  # no optimizer step yet (or a skipped one)
        for m in ADAM_MOMENTS:
            sd[f"optim.{m}.{name}"] = _global(name, st[m], mesh, tp)
        sd[f"optim.step.{name}"] = st["step"]
    for k, v in counters.items():
        sd[f"state.{k}"] = torch.tensor(int(v), dtype=torch.int64)
    for kind, t in _rng_state().items():
        sd[f"rng.{kind}.rank{rank:05d}"] = t
    return sd


class _CopyStager(AsyncStager):
    """Stage = a host copy of every local piece (so training may change the live tensors at once)."""

    _synchronize_after_execute = False

    def stage(self, sd: dict) -> dict:
        out = {}
        for k, v in sd.items():
            if isinstance(v, DTensor):
                local = v.to_local().detach().to("cpu", copy=True)
                out[k] = DTensor.from_local(local, v.device_mesh, v.placements, run_check=False)
            else:
                out[k] = v.detach().to("cpu", copy=True)
        return out

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _writer(path: Path):
    """DCP's file writer; tests may make it pause before writing (to kill a save mid-way)."""
    delay = float(os.environ.get(SLOW_SAVE_ENV, "0") or 0)
    if not delay:
        return FileSystemWriter(str(path))

    class _SlowWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            time.sleep(delay)
            return super().write_data(plan, planner)

    return _SlowWriter(str(path))


def _remove_slowly(folder: Path) -> None:
    """shutil.rmtree; tests may make it pause half-way (to kill a deletion in the middle)."""
    delay = float(os.environ.get(SLOW_DELETE_ENV, "0") or 0)
    if delay:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        time.sleep(delay)
    shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------------
# save + publish
# ------------------------------------------------------------------------------------------------
def _storage_error(e: BaseException) -> OSError | None:
    """The OSError under a failed write (DCP wraps it in CheckpointException, torch's stream writer in
    a RuntimeError whose context is the OSError), if the failure is one of the file system's."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        if isinstance(x, CheckpointException):
            todo += [exc for exc, _ in x.failures.values()]
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]
    return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


def retained(steps: list[int], latest: int | None, keep_last: int, keep_every: int) -> set[int]:
    """The steps retention keeps: the newest `keep_last` (0 = all), the multiples of `keep_every`
    (0 = none) and `latest`."""
    if keep_last <= 0:
        return set(steps)
    keep = set(sorted(steps)[-keep_last:])
    keep |= {s for s in steps if keep_every > 0 and s % keep_every == 0}
    return keep | ({latest} if latest is not None else set())


def published_steps(ckroot: Path) -> dict[int, Path]:
    """Step -> folder of the published step-XXXXXXX folders (a `.tmp-`/`.deleting-` folder is not one)."""
    out = {}
    for p in ckroot.glob("step-*") if ckroot.is_dir() else []:
        tail = p.name[len("step-") :]
        if p.is_dir() and tail.isdigit():
            out[int(tail)] = p
    return out


class Checkpointer:
    """Saves (optionally asynchronously) and publishes training checkpoints of one run; deletes the
    ones retention does not keep (`keep_last`, `keep_every`) once a newer one is published."""

    def __init__(
        self,
        run_dir: Path,
        *,
        mesh,
        tp: int,
        rank: int,
        is_main: bool,
        async_save: bool,
        keep_last: int = 0,
        keep_every: int = 0,
        log=None,
    ):
        self.ckroot = Path(run_dir) / CHECKPOINTS
        self.mesh, self.tp, self.rank, self.is_main = mesh, tp, rank, is_main
        self.async_save = async_save
        self.keep_last, self.keep_every = keep_last, keep_every
        self.log = log or (lambda line: None)  # where each deletion is reported (rank 0)
        # DCP's own collectives run on a separate gloo group: a background save never interleaves
        # with the training collectives (and gloo serves CPU staging on any accelerator)
        self.group = cast("dist.ProcessGroup", dist.new_group(backend="gloo"))  # every rank is a member
        if is_main and self.ckroot.is_dir():  # leftovers of saves killed before they were published
            for stale in self.ckroot.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.ckroot.glob(f"{DELETING}step-*"):  # retention deletions cut short by a kill
                shutil.rmtree(stale, ignore_errors=True)
                self.log(f"removed {stale.name} (a checkpoint deletion interrupted earlier)")
        self.pending: tuple[Future, Path, Path, dict] | None = None

    def save(self, step: int, *, model, ema, optimizer, counters: dict[str, int], meta: dict, dit_config) -> Path:
        """Collective over the world (every rank at the same step). Returns the final folder name;
        with async saving it is published later (`poll`, `wait`). A write the file system refuses
        raises a CheckpointError (every rank)."""
        self.wait()  # at most one save in flight
        final, tmp = self.ckroot / step_name(step), self.ckroot / f".tmp-{step_name(step)}"
        try:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                dit_config.to_json(tmp / CONFIG_FILE)
        except OSError as e:
            raise self._not_written(final, tmp, e) from None
        dist.barrier()
        sd = state_dict(
            model=model, ema=ema, optimizer=optimizer, counters=counters, mesh=self.mesh, tp=self.tp, rank=self.rank
        )
        info = {"format": FORMAT, **meta, "step": step}
        try:
            if self.async_save:
                fut = dcp_async_save(
                    sd, storage_writer=_writer(tmp), process_group=self.group, async_stager=_CopyStager()
                )
                assert isinstance(fut, Future)  # a stager that returns the staged dict itself: the upload future
                self.pending = (fut, tmp, final, info)
            else:
                dcp_save(sd, storage_writer=_writer(tmp), process_group=self.group)
                self._publish(tmp, final, info)
        except (CheckpointException, OSError, RuntimeError) as e:
            self._raise_if_storage(e, final, tmp)
            raise
        return final

    def poll(self) -> None:
        """Publish a finished background save (rank 0); cheap, call it every step."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is written, then publish it (a refused write: CheckpointError)."""
        if self.pending is None:
            return
        fut, tmp, final, info = self.pending
        self.pending = None
        try:
            fut.result()  # re-raises a failed write
            self._publish(tmp, final, info)
        except (CheckpointException, OSError, RuntimeError) as e:
            self._raise_if_storage(e, final, tmp)
            raise

    def _raise_if_storage(self, e: BaseException, final: Path, tmp: Path) -> None:
        err = _storage_error(e)
        if err is not None:
            raise self._not_written(final, tmp, err) from None

    def _not_written(self, final: Path, tmp: Path, err: OSError) -> CheckpointError:
        """One line: what was not written, why, the free space and the checkpoint that is still latest.
        The partial folder is removed (it would never be published)."""
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{_size(shutil.disk_usage(self.ckroot).free)} free at {self.ckroot}"
        except OSError:
            free = f"free space at {self.ckroot} unknown"
        try:
            latest = read_latest(self.ckroot)
        except MissingFileError:
            latest = None
        kept = f"latest is still {latest.name}" if latest is not None else "no checkpoint of this run exists yet"
        cause = err.strerror or type(err).__name__
        fix = "free disk space" if err.errno == errno.ENOSPC else "free disk space or raise the file-size limit"
        return CheckpointError(
            f"checkpoint {final.name} not written ({cause}; {free}); {kept}; {fix}, then resume with --resume auto"
        )

    def _publish(self, tmp: Path, final: Path, info: dict) -> None:
        # DCP's coordinator (rank 0 of self.group = global rank 0) writes .metadata only after
        # every rank reported its data written: on rank 0 the folder is complete here
        if not self.is_main:
            return
        (tmp / TRAINER_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if final.exists():  # a re-run of the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.ckroot)
        latest_tmp = self.ckroot / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.ckroot / LATEST)
        _fsync(self.ckroot)
        self.prune()

    def prune(self) -> list[Path]:
        """Rank 0, after a publication: delete the step folders retention does not keep (never the one
        `latest` names). Each deletion: rename to `.deleting-step-*`, fsync the folder, remove, log."""
        if not self.is_main or self.keep_last <= 0:
            return []
        latest = read_latest(self.ckroot)
        steps = published_steps(self.ckroot)
        latest_step = next((s for s, p in steps.items() if latest is not None and p.name == latest.name), None)
        keep = retained(list(steps), latest_step, self.keep_last, self.keep_every)
        deleted = []
        for step in sorted(set(steps) - keep):
            folder = steps[step]
            doomed = self.ckroot / f"{DELETING}{folder.name}"
            os.replace(folder, doomed)
            _fsync(self.ckroot)
            _remove_slowly(doomed)
            deleted.append(folder)
            self.log(
                f"deleted checkpoint {folder.name} (run.keep_last={self.keep_last}, run.keep_every={self.keep_every}; "
                f"latest is {latest.name if latest is not None else '-'})"
            )
        return deleted

    def close(self, failing: bool = False) -> None:
        """Finish the save in flight and publish it. `failing` (the job stops on an error): a save that
        cannot finish is abandoned unpublished (`latest` keeps the previous checkpoint; the next start
        removes its folder) instead of raising over the error that stopped the job."""
        try:
            self.wait()
        except Exception:
            if not failing:
                raise


# ------------------------------------------------------------------------------------------------
# which checkpoint: `latest` and the accepted path forms
# ------------------------------------------------------------------------------------------------
def read_latest(ckroot: str | Path) -> Path | None:
    """The step folder `<ckroot>/latest` names (None without that file); a name of a missing folder
    is an error."""
    f = Path(ckroot) / LATEST
    if not f.is_file():
        return None
    name = f.read_text().strip()
    target = Path(ckroot) / name
    if not name or Path(name).name != name or not target.is_dir():
        raise MissingFileError(f"{f} names {name!r} but {target} is missing; fix the file or pass a step-* folder")
    return target


def is_training_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / DCP_METADATA).is_file() and (p / TRAINER_FILE).is_file() and (p / CONFIG_FILE).is_file()


def resolve(path: str | Path) -> Path:
    """An osp run folder (its latest checkpoint), a checkpoints/ folder, one step-XXXXXXX folder, an
    osp-dit folder or a released diffusers folder -> the folder holding the DiT weights. Without a
    `latest` file the newest published step-* folder is taken."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(
            f"checkpoint {path} does not exist; pass an osp run dir (runs/<name>), a checkpoint dir or a diffusers folder"
        )
    for ckroot in (path / CHECKPOINTS, path):
        latest = read_latest(ckroot)
        if latest is not None:
            return latest
        steps = sorted(p for p in ckroot.glob("step-*") if (p / TRAINER_FILE).is_file()) if ckroot.is_dir() else []
        if steps:
            return steps[-1]
    return path


def find(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a training run resumes from: `auto` -> the latest complete checkpoint of the run
    (None if there is none); else a step folder or a run folder (`resolve`)."""
    if not resume:
        return None
    path = read_latest(Path(run_dir) / CHECKPOINTS) if resume == "auto" else resolve(resume)
    if path is None:
        return None
    if not (path / TRAINER_FILE).is_file():
        raise MissingFileError(
            f"{path}: not a complete training checkpoint (no {TRAINER_FILE}); pass --resume auto or a step-XXXXXXX folder"
        )
    fmt = read_trainer_state(path).get("format")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path}: not a resumable checkpoint ({TRAINER_FILE} names format {fmt!r}, not {FORMAT!r}); pass a "
            f"step-XXXXXXX folder that osp train wrote, or start a new run with model.init={path / 'model'} (weights only)"
        )
    return path


def read_trainer_state(path: str | Path) -> dict:
    f = Path(path) / TRAINER_FILE
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise _damaged(f, f"not JSON: {e}") from None


# ------------------------------------------------------------------------------------------------
# loading inside a training job (collective, resharded to this layout)
# ------------------------------------------------------------------------------------------------
def load(path: Path, *, model, ema, optimizer, mesh, tp: int, rank: int) -> dict[str, int]:
    """Fill model, EMA and the AdamW state this rank owns from `path`, resharded to this layout, and
    restore this rank's RNG if the checkpoint has it. Returns the `state.*` counters. Collective."""
    path = Path(path)
    have = saved_keys(path)
    sd = {}
    for k, v in trained_state(model).items():
        sd[f"model.{k}"] = _global(k, v, mesh, tp)
    if ema is not None:
        if not any(k.startswith("ema.") for k in have):
            raise CheckpointError(f"{path}: has no EMA weights but optim.ema_decay > 0; resume with optim.ema_decay=0")
        for k, v in ema.shadow.items():
            sd[f"ema.{k}"] = _global(k, v, mesh, tp)
    _check_present(path, sd, have, "resume with the model.preset / config.json it was trained with")
    opt, moments = _adamw(optimizer), {}
    for name, p in _owned(optimizer, model):
        if f"optim.exp_avg.{name}" not in have:
            continue
        st = {m: torch.zeros_like(p, memory_format=torch.contiguous_format) for m in ADAM_MOMENTS}
        st["step"] = torch.zeros((), dtype=have[f"optim.step.{name}"].properties.dtype)
        for m in ADAM_MOMENTS:
            sd[f"optim.{m}.{name}"] = _global(name, st[m], mesh, tp)
        sd[f"optim.step.{name}"] = st["step"]
        moments[p] = st
    counters = {k[len("state.") :]: torch.zeros((), dtype=torch.int64) for k in have if k.startswith("state.")}
    sd.update({f"state.{k}": v for k, v in counters.items()})
    rng = {kind: f"rng.{kind}.rank{rank:05d}" for kind in RNG_KINDS if f"rng.{kind}.rank{rank:05d}" in have}
    rng_t = {kind: torch.zeros(have[key].size, dtype=have[key].properties.dtype) for kind, key in rng.items()}
    sd.update({rng[kind]: t for kind, t in rng_t.items()})

    _read(sd, path)

    for p, st in moments.items():
        assert opt is not None  # moments come from _owned, empty without it
        opt.state[p] = st
    if "torch" in rng_t:
        torch.set_rng_state(rng_t["torch"])
    if "cuda" in rng_t and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng_t["cuda"])
    return {k: int(v) for k, v in counters.items()}


def _check_present(path: Path, sd: dict, have: dict, fix: str) -> None:
    missing = sorted(k for k in sd if k not in have)
    if missing:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(missing)} tensors of this model ({', '.join(missing[:4])} ...); {fix}"
        )
    shapes = sorted(k for k, v in sd.items() if tuple(have[k].size) != tuple(v.shape))
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"{path}: {len(shapes)} tensors have other shapes than this model's ({k}: saved {tuple(have[k].size)}, "
            f"model {tuple(sd[k].shape)}); {fix}"
        )


def load_weights(path: str | Path, *, model, mesh, tp: int, prefer_ema: bool = True) -> None:
    """Only the weights (EMA if present and preferred) of a training checkpoint into `model`, resharded:
    `model.init=<run>/checkpoints/step-*` starts a new run from them. Collective."""
    path = Path(path)
    have = saved_keys(path)
    prefix = "ema." if prefer_ema and any(k.startswith("ema.") for k in have) else "model."
    sd = {f"{prefix}{k}": _global(k, v, mesh, tp) for k, v in _base_state(model).items()}
    _check_present(path, sd, have, "use the model.preset / config.json it was trained with")
    _read(sd, path)


@torch.no_grad()
def fill_from_folder(
    model: torch.nn.Module, folder: str | Path, tp: int, rank: int, prefer_ema: bool = True, progress: bool = False
) -> None:
    """Copy this rank's slices of a released diffusers folder or an osp-dit checkpoint (any saved TP
    size) into the materialised model. Strict: keys and full shapes are checked first."""
    from osp.common.models.dit import build_dit

    reader = SliceReader(folder, prefer_ema)
    full = tensor_shapes(build_dit(reader.config, device="meta"))
    on_disk = {k: torch.empty(reader.shape(k), device="meta") for k in reader.keys()}
    check_keys(full, on_disk, str(folder))
    items = list(_base_state(model).items())
    if progress:
        from rich.progress import track

        items = track(items, description=f"load {Path(folder).name}")
    for k, dst in items:
        dst.copy_(reader.read(k, tp, rank))


def load_init(path: str | Path, *, model, mesh, tp: int, tp_rank: int, progress: bool = False) -> None:
    """`model.init`: this rank's piece of the weights of a training checkpoint (EMA preferred, read by
    DCP, collective) or of a released / osp-dit folder (safetensors slices)."""
    if is_training_checkpoint(path):
        load_weights(path, model=model, mesh=mesh, tp=tp, prefer_ema=True)
    else:
        fill_from_folder(model, path, tp, tp_rank, prefer_ema=True, progress=progress)


# ------------------------------------------------------------------------------------------------
# the offline reader (no process group): full TP=1 weights of any accepted form
# ------------------------------------------------------------------------------------------------
def _full_shapes(config: DiTConfig) -> dict[str, torch.Size]:
    from osp.common.models.dit import build_dit

    return tensor_shapes(build_dit(config, device="meta"))


def load_training_weights(ckpt_dir: str | Path, prefer_ema: bool = True) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """(config, full TP=1 state dict) of a training checkpoint, read offline: DCP assembles each global
    tensor from the chunks every rank wrote. EMA if present and preferred. Keys and shapes are checked
    against the config before anything is allocated."""
    d = Path(ckpt_dir)
    if lora_run_config(d) is not None:
        raise CheckpointError(
            f"{d}: holds LoRA adapters only (their base is the run's model.init); sample with --checkpoint <base> "
            f"--lora {d}, or write merged weights with osp convert export --merge-lora"
        )
    config = DiTConfig.from_json(d / CONFIG_FILE)
    have = saved_keys(d)
    prefix = "ema." if prefer_ema and any(k.startswith("ema.") for k in have) else "model."
    mine = {k[len(prefix) :]: m for k, m in have.items() if k.startswith(prefix)}
    check_keys(_full_shapes(config), {k: torch.empty(tuple(m.size), device="meta") for k, m in mine.items()}, str(d))
    sd = {f"{prefix}{k}": torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in mine.items()}
    _read(sd, d, no_dist=True)
    return config, {k[len(prefix) :]: v for k, v in sd.items()}


def has_ema(ckpt_dir: str | Path) -> bool:
    """Whether a training checkpoint holds EMA weights."""
    return any(k.startswith("ema.") for k in saved_keys(ckpt_dir))


def load_dit_checkpoint(ckpt_dir: str | Path, prefer_ema: bool = True) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """(config, full TP=1 state dict, checked against the config) from a training checkpoint (DCP), an
    osp-dit checkpoint (TP shards merged) or a released diffusers folder."""
    d = Path(ckpt_dir)
    if is_training_checkpoint(d):
        return load_training_weights(d, prefer_ema)
    if is_osp_checkpoint(d):
        config, shards, _ = load_dit_shards(d, prefer_ema)
        sd = merge_state_dicts(shards)
    elif is_diffusers_folder(d):
        config, sd = DiTConfig.from_json(d / CONFIG_FILE), load_diffusers_state_dict(d)
    else:
        raise MissingFileError(
            f"{d}: neither an osp DiT checkpoint ({META_FILE}), a training checkpoint (step-* with {DCP_METADATA}) "
            f"nor a diffusers folder ({CONFIG_FILE} + {DIFFUSERS_WEIGHTS}); pass the checkpoint folder itself"
        )
    check_keys(_full_shapes(config), sd, str(d))
    return config, sd


def load_dit(ckpt_dir: str | Path, prefer_ema: bool = True, device=None, dtype=None):
    """An OpenSoraT2V built from a checkpoint folder of any accepted form, weights loaded strictly."""
    from osp.common.models.dit import build_dit

    config, sd = load_dit_checkpoint(ckpt_dir, prefer_ema)
    model = build_dit(config, device="meta").to_empty(device=device or "cpu")
    model.load_state_dict(sd, strict=True)
    return model if dtype is None else model.to(dtype)


def _weight_files_sha256(folder: Path) -> str:
    suffixes = (".safetensors", ".pt", ".bin", ".ckpt", ".distcp")
    return sha256_files([p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes], folder)


@dataclass
class DiTCheckpoint:
    """A DiT checkpoint of any accepted form, resolved (`resolve`): what `osp sample` loads. Implements
    `osp.common.sampling.DiTWeights` (config, identity, state_dict())."""

    path: Path  # as given
    folder: Path  # the folder holding the weights
    config: DiTConfig
    prefer_ema: bool = True
    _identity: dict | None = field(default=None, init=False, repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (TP=1) weights, checked against the config."""
        return load_dit_checkpoint(self.folder, self.prefer_ema)[1]

    @property
    def identity(self) -> dict:
        """What the sample sidecar records about the weights (hashed once)."""
        if self._identity is None:
            self._identity = self._read_identity()
        return self._identity

    def _read_identity(self) -> dict:
        if is_osp_checkpoint(self.folder):
            meta = read_checkpoint_meta(self.folder)
        elif is_training_checkpoint(self.folder):
            info = read_trainer_state(self.folder)
            meta = {k: info[k] for k in ("format", "step", "layout") if k in info}
        else:
            meta = None
        return {
            "path": str(self.path.resolve()),
            "resolved": str(self.folder.resolve()),
            "weights_sha256": _weight_files_sha256(self.folder),
            "prefer_ema": self.prefer_ema,
            "meta": meta,
            "config": self.config.to_dict(),
        }

    def encoders(self) -> tuple[Path | None, Path | None]:
        """(VAE, text encoder) folders that encoded the run's training shards: trainer.json names the
        shard folder (config.data.shards), whose manifest.json records both. (None, None) where any link
        of that chain is missing."""
        from osp.common.shards import ShardError, read_manifest

        f = self.folder / TRAINER_FILE
        if not f.is_file():
            return None, None
        try:
            data = read_trainer_state(self.folder)["config"]["data"]
            manifest = read_manifest((data.get("sources") or [{}])[0].get("shards") or data["shards"])  # first cache
        except (KeyError, TypeError, ValueError, ShardError):
            return None, None
        vae, text = ((manifest.get(k) or {}).get("path") for k in ("vae", "text_encoder"))
        return (Path(vae) if vae else None), (Path(text) if text else None)


def open_dit(path: str | Path, prefer_ema: bool = True) -> DiTCheckpoint:
    """Resolve a checkpoint path of any accepted form (`resolve`); the weights are read on `state_dict()`."""
    folder = resolve(path)
    f = folder / CONFIG_FILE
    if not f.is_file():
        raise MissingFileError(
            f"{folder}: no {CONFIG_FILE}; pass an osp run dir, a step-* folder, an osp DiT checkpoint or a diffusers folder"
        )
    return DiTCheckpoint(Path(path), folder, DiTConfig.from_json(f), prefer_ema)


# ------------------------------------------------------------------------------------------------
# `osp convert`
# ------------------------------------------------------------------------------------------------
def convert_import(src: str | Path, out: str | Path, tp: int = 1) -> Path:
    """Released diffusers folder -> osp-dit checkpoint sharded for TP `tp` (strict key check first)."""
    if not is_diffusers_folder(src):
        raise MissingFileError(
            f"{src}: not a diffusers DiT folder ({CONFIG_FILE} + {DIFFUSERS_WEIGHTS}); pass e.g. Open-Sora-Plan-v1.2.0/93x480p"
        )
    config, sd = load_dit_checkpoint(src)
    return save_dit_checkpoint(out, split_state_dict(sd, tp, config), config, extra={"source": str(src)})


def convert_merge(src: str | Path, out: str | Path) -> Path:
    """osp-dit checkpoint at any TP, or a training checkpoint -> osp-dit checkpoint at TP 1 (model and EMA)."""
    if is_training_checkpoint(src):
        config, full = load_training_weights(src, prefer_ema=False)
        ema = [load_training_weights(src, prefer_ema=True)[1]] if has_ema(src) else None
        return save_dit_checkpoint(out, [full], config, ema_per_rank=ema, extra={"source": str(src)})
    config, full = load_dit_checkpoint(src, prefer_ema=False)
    meta = read_checkpoint_meta(src)
    ema = [load_dit_checkpoint(src, prefer_ema=True)[1]] if meta.get("ema") else None
    return save_dit_checkpoint(out, [full], config, ema_per_rank=ema, extra=meta.get("extra"))


def convert_export(
    src: str | Path,
    out: str | Path,
    prefer_ema: bool = True,
    *,
    merge_lora: bool = False,
    lora_only: bool = False,
    base: str | Path | None = None,
) -> Path:
    """Any accepted checkpoint -> diffusers layout (config.json + diffusion_pytorch_model.safetensors).
    LoRA adapters (a LoRA run / step folder, or an adapter folder): `merge_lora` folds them into their
    base (`base`, default the run's model.init) in fp32; `lora_only` writes the adapters in peft's layout."""
    if merge_lora or lora_only:
        a = open_adapters(src, prefer_ema)
        base_path = str(base) if base else a.base
        if lora_only:
            return write_peft(out, a.tensors, a.spec, base_path)
        if not base_path:
            raise MissingFileError(f"{src}: records no base model for its adapters; pass --base <base DiT folder>")
        config, sd = load_dit_checkpoint(base_path, prefer_ema=True)  # the base as model.init loads it
        check_base(a.tensors, {k: v.shape for k, v in sd.items()}, str(a.source))
        sd = merge_state_dict(sd, a.tensors, a.spec.scale)
    else:
        config, sd = load_dit_checkpoint(src, prefer_ema)
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    config.to_json(o / CONFIG_FILE)
    save_tensors(sd, o / DIFFUSERS_WEIGHTS)
    return o


# ------------------------------------------------------------------------------------------------
# LoRA adapters offline: a LoRA run's training checkpoint, or a peft-layout adapter folder
# ------------------------------------------------------------------------------------------------
@dataclass
class Adapters:
    spec: LoraSpec
    tensors: dict[str, torch.Tensor]  # full (TP=1) adapters under osp's names
    base: str | None  # the base model they were trained on (the run's model.init), when recorded
    source: Path


def lora_run_config(folder: str | Path) -> dict | None:
    """The run config of a training checkpoint written with lora.enabled (None for any other folder)."""
    if not is_training_checkpoint(folder):
        return None
    c = read_trainer_state(folder).get("config") or {}
    return c if (c.get("lora") or {}).get("enabled") else None


def open_adapters(path: str | Path, prefer_ema: bool = True) -> Adapters:
    """The adapters of a LoRA run (run dir or step folder: EMA if present and preferred) or of an
    adapter folder in peft's layout (`osp convert export --lora-only`)."""
    p = Path(path)
    if is_peft_folder(p):
        spec, tensors = read_peft(p)
        base = json.loads((p / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
        return Adapters(spec, tensors, base, p)
    folder = resolve(p)
    c = lora_run_config(folder)
    if c is None:
        raise MissingFileError(
            f"{path}: neither a LoRA run's checkpoint (trained with lora.enabled=true) nor an adapter folder "
            f"({PEFT_CONFIG} + {PEFT_WEIGHTS}); pass the run dir, a step-* folder or an osp convert export --lora-only folder"
        )
    have = saved_keys(folder)
    prefix = "ema." if prefer_ema and any(k.startswith("ema.") for k in have) else "model."
    mine = {k: m for k, m in have.items() if k.startswith(prefix) and is_adapter_key(k[len(prefix) :])}
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in mine.items()}
    _read(sd, folder, no_dist=True)
    lo = c["lora"]
    spec = LoraSpec(int(lo["rank"]), float(lo["alpha"]), float(lo.get("dropout", 0.0)), tuple(lo.get("targets", ())))
    base = (c.get("model") or {}).get("init") or None
    return Adapters(spec, {k[len(prefix) :]: v for k, v in sd.items()}, base, folder)
