"""Losing a node: one line naming it, and (launch.nnodes=MIN:MAX) continuing on the nodes that remain.

A lost peer. Every rank beats a counter in the job's rendezvous store (its own TCP client, a daemon
thread, every 0.25 s). When a step's collective fails because a peer went away (gloo "Connection
closed/reset by peer", an NCCL/HCCL communicator error), the rank reads the counters twice, 1.5 s
apart: the ranks whose counter stood still (and that did not leave on their own, after seeing the same
loss) stopped answering. `PeerWatch.guard` turns the collective's exception into one `PeerLostError`
line naming their node(s), the step and the command that resumes; the rank exits with
`EXIT_PEER_LOST` and writes the same line to torchrun's error file, so the launcher names the node too.

Elastic runs (`osp.stage2_train.launch` starts torchrun with its c10d rendezvous, --nnodes MIN:MAX and
--max-restarts). torchrun restarts the ranks whenever the set of nodes changes: a node lost (the ranks
fail as above) or a node that joins (the ranks get SIGTERM: checkpoint at the step boundary, exit 0).
When the store itself stops answering, the lost node is the one that hosted it (the node of rank 0).
The launcher checks the run folder as for a fixed job (a new run is refused in a folder with
checkpoints unless --resume auto), except on a node that joins a live job (the run lock is held).
Each start of the ranks (`prepare`, before the trainer is built, the same answer on every rank):
  * resumes from the latest complete checkpoint when the run has one (run.resume otherwise);
  * takes the run's global batch, data.batch_size x optim.grad_accum x DP at MAX nodes, recorded in
    <run>/elastic.json by the start without a checkpoint, and derives optim.grad_accum = global batch /
    (data.batch_size x DP) for the nodes present: the global batch, the data order and the per-sample
    noise stay those of the uninterrupted run;
  * (rank 0) writes an `elastic_start` event to metrics.jsonl and one line on the console: the nodes,
    world, DP and grad_accum before and after, the checkpoint it resumes and the number of steps lost.
`check_elastic` refuses, at launch, a MIN:MAX whose nodes cannot hold one TP x CP group or whose
smaller layouts cannot reach the global batch with whole micro-batches.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from osp.common.errors import ConfigError, OspError

EXIT_PEER_LOST = 4  # a rank that stopped because a peer was lost (the watchdog's is 3)
RESUME_ENV = "OSP_RESUME_COMMAND"  # set by the launcher: the command line that resumes this job
STATE_FILE = "elastic.json"  # <run>/elastic.json: the target global batch of an elastic run
BEAT_S = 0.25
SILENT_S = 1.5  # a rank whose beat stands still this long after a failed collective stopped answering

# what a collective raises when its peer went away (and nothing else: a bug keeps its traceback)
_PEER_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "ncclremoteerror",
    "nccl communicator was aborted",
    "ncclsystemerror",
    "hccl",
    "process group watchdog",
)


class PeerLostError(OspError, RuntimeError):
    """A peer node or rank stopped answering during training (the message names it and the fix)."""


def is_peer_failure(e: BaseException) -> str | None:
    """The communication library's own first line when `e` (or an exception it came from) says a peer
    went away; None for anything else."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        text = str(x)
        low = text.lower()
        if any(s in low for s in _PEER_SIGNS):
            line = next(ln for ln in text.splitlines() if any(s in ln.lower() for s in _PEER_SIGNS))
            return line.split("] ", 1)[-1].split(". This is typically", 1)[0].strip()
        todo += [x.__cause__, x.__context__]
    return None


# ------------------------------------------------------------------------------------------------
# who stopped answering
# ------------------------------------------------------------------------------------------------
class PeerWatch:
    """This rank's heartbeat in the rendezvous store and the map rank -> node, for naming a lost peer.
    Collective to make (every rank, once the process group is up); `off()` where there is no torchrun."""

    def __init__(self, *, rank: int, nodes: list[tuple[int, str]], store, prefix: str, elastic: bool):
        self.rank, self.nodes, self.store, self.prefix, self.elastic = rank, nodes, store, prefix, elastic
        self._stop = threading.Event()
        self._thread = None
        if store is not None:
            store.add(self._key("beat", rank), 1)
            self._thread = threading.Thread(target=self._beat, name="osp-peer-beat", daemon=True)
            self._thread.start()

    @classmethod
    def off(cls) -> PeerWatch:
        return cls(rank=0, nodes=[], store=None, prefix="", elastic=False)

    @classmethod
    def start(cls, node_rank: int, elastic: bool) -> PeerWatch:
        """Under torchrun with a real process group: gather (node, host) of every rank and start beating."""
        import torch.distributed as dist

        if (
            not dist.is_initialized()
            or dist.get_world_size() == 1
            or "TORCHELASTIC_RUN_ID" not in os.environ
            or dist.get_backend() == "meta:fake"
        ):
            return cls.off()
        me = (node_rank, socket.gethostname(), uuid.uuid4().hex)
        table: list = [None] * dist.get_world_size()
        dist.all_gather_object(table, me)
        store = None
        try:
            store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=5),
            )
        except (RuntimeError, OSError, KeyError, ValueError):
            store = None  # no naming of a lost peer then; the failure is still one line
        return cls(
            rank=dist.get_rank(),
            nodes=[(int(n), str(h)) for n, h, _ in table],
            store=store,
            prefix=f"osp/peers/{table[0][2]}",
            elastic=elastic,
        )

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}"

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.store.add(self._key("beat", self.rank), 1)
            except Exception:  # the store's host is gone: the failed collective says the rest
                return

    def close(self) -> None:
        self._stop.set()

    def silent_ranks(self) -> list[int] | None:
        """The ranks whose beat stood still for SILENT_S (None: the store itself does not answer)."""
        try:
            ranks = [r for r in range(len(self.nodes)) if r != self.rank]
            before = [self.store.add(self._key("beat", r), 0) for r in ranks]
            time.sleep(SILENT_S)
            after = [self.store.add(self._key("beat", r), 0) for r in ranks]
            left = [self.store.check([self._key("left", r)]) for r in ranks]
        except Exception:
            return None
        return [r for r, a, b, gone in zip(ranks, before, after, left) if a == b and not gone]

    def describe(self, ranks: list[int]) -> str:
        """ "node 1 (ranks 2, 3)", with host names when the nodes have different ones."""
        hosts = {h for _, h in self.nodes}
        by_node: dict[tuple[int, str], list[int]] = {}
        for r in ranks:
            by_node.setdefault(self.nodes[r], []).append(r)
        parts = []
        for (node, host), rs in sorted(by_node.items()):
            on = f" on {host}" if len(hosts) > 1 else ""
            every = [r for r, nh in enumerate(self.nodes) if nh == (node, host)]
            what = "ranks" if len(rs) > 1 else "rank"
            some = "" if rs == every else f" of its {len(every)}"
            parts.append(f"node {node}{on} ({what} {', '.join(map(str, rs))}{some})")
        return " and ".join(parts)

    def lost_error(self, where: str, cause: str) -> PeerLostError:
        """The one line of a rank that saw a peer go away while `where` (the watchdog's words)."""
        silent = self.silent_ranks() if self.store is not None else None
        if silent is None and self.store is not None:  # the store lives on the node of rank 0: that node is gone
            host = [r for r, nh in enumerate(self.nodes) if nh == self.nodes[0]]
            who = self.describe([r for r in host if r != self.rank]) if self.rank not in host else "the job's store"
        elif silent is None:
            who = "a peer"
        elif silent:
            who = self.describe(silent)
        else:
            who = "a peer rank"
        if self.store is not None:
            try:
                self.store.set(self._key("left", self.rank), "1")  # ranks that see it later do not name us
            except Exception:
                pass
        if self.elastic:
            fix = "torchrun restarts the job on the nodes that remain from the latest complete checkpoint"
        else:
            cmd = os.environ.get(RESUME_ENV) or "osp train <the same arguments> --resume auto"
            fix = (
                f"resume from the latest checkpoint with `{cmd}` on every node, each with its --node-rank (bring the node back, or set "
                "--nnodes to the nodes left), or launch with --nnodes MIN:MAX to continue on the remaining nodes"
            )
        return PeerLostError(f"{who} stopped answering {where} ({cause}); {fix}")

    @contextmanager
    def guard(self, where: Callable[[], str], on_lost: Callable[[], None] = lambda: None) -> Iterator[None]:
        """A collective failure inside becomes one PeerLostError line; any other error passes unchanged."""
        try:
            yield
        except PeerLostError:
            raise
        except Exception as e:
            cause = is_peer_failure(e)
            if cause is None:
                raise
            on_lost()
            err = self.lost_error(where(), cause)
            write_error_file(str(err))
            raise err from None


def write_error_file(line: str) -> None:
    """torchrun's per-rank error file (its agent reads it into the failure it reports)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------
# elastic layouts: the global batch at every node count of MIN:MAX
# ------------------------------------------------------------------------------------------------
def dp_at(nodes: int, nproc: int, tp: int, cp: int) -> int:
    return nodes * nproc // (tp * cp)


def check_elastic(cfg) -> None:
    """One-line ConfigError for a MIN:MAX that cannot run: MIN (any node) not holding one TP x CP group,
    or a node count whose layout cannot reach the global batch with whole micro-batches."""
    la, p = cfg.launch, cfg.parallel
    lo, hi, group = la.min_nodes, la.nnodes, p.tp * p.cp
    if cfg.nproc % group:
        raise ConfigError(
            f"launch.nnodes={lo}:{hi}: a node runs {cfg.nproc} processes, which do not hold whole TP x CP groups of "
            f"{p.tp} x {p.cp} (TP and CP stay within a node); set --nproc to a multiple of {group} or change parallel.tp / parallel.cp"
        )
    bs, ga = cfg.data.batch_size, cfg.optim.grad_accum
    target = bs * ga * dp_at(hi, cfg.nproc, p.tp, p.cp)
    for n in range(lo, hi + 1):
        per_step = bs * dp_at(n, cfg.nproc, p.tp, p.cp)
        if target % per_step:
            need = math.lcm(*(m // math.gcd(m, hi) for m in range(lo, hi + 1)))
            raise ConfigError(
                f"launch.nnodes={lo}:{hi}: the global batch {target} (data.batch_size {bs} x optim.grad_accum {ga} x "
                f"DP {dp_at(hi, cfg.nproc, p.tp, p.cp)} on {hi} nodes) is not a whole number of micro-batches of "
                f"{per_step} on {n} nodes; set optim.grad_accum to a multiple of {need}, or narrow MIN:MAX"
            )


def grad_accum_for(global_batch: int, batch_size: int, dp: int) -> int:
    per_step = batch_size * dp
    if global_batch % per_step:
        raise ConfigError(
            f"the elastic run's global batch {global_batch} is not a whole number of micro-batches of data.batch_size "
            f"{batch_size} x DP {dp}; restart it with a launch.nnodes MIN:MAX that osp train accepts"
        )
    return global_batch // per_step


# ------------------------------------------------------------------------------------------------
# each start of an elastic job's ranks
# ------------------------------------------------------------------------------------------------
def _read_records(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a killed rank 0
            continue
    return out


def target_global_batch(cfg, has_checkpoint: bool) -> int:
    """The run's global batch: recorded in <run>/elastic.json by the job's first start (data.batch_size x
    optim.grad_accum x DP at MAX nodes); read back by every start that resumes a checkpoint."""
    f = cfg.run.path / STATE_FILE
    if has_checkpoint and f.is_file():
        return int(json.loads(f.read_text())["global_batch"])
    p = cfg.parallel
    return cfg.data.batch_size * cfg.optim.grad_accum * dp_at(cfg.launch.nnodes, cfg.nproc, p.tp, p.cp)


def prepare(cfg, *, world: int, nproc: int, rank: int, say: Callable[[str], None] = print):
    """An elastic start of the ranks (every rank, the same answer from the same files): resume from the
    latest complete checkpoint when the run has one (run.resume otherwise: the launcher checked the
    folder), optim.grad_accum for the nodes present, and on rank 0 the record of this start.
    Returns the config the trainer is built with."""
    from osp.stage2_train import checkpoint as ckpt

    p, run_dir = cfg.parallel, cfg.run.path
    latest = ckpt.find(run_dir, "auto") if (run_dir / ckpt.CHECKPOINTS).is_dir() else None
    resume = "auto" if latest is not None else cfg.run.resume
    target = target_global_batch(cfg, latest is not None)
    dp = world // (p.tp * p.cp)
    accum = grad_accum_for(target, cfg.data.batch_size, dp)
    cfg.run.resume, cfg.optim.grad_accum = resume, accum
    if rank != 0:
        return cfg
    if latest is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STATE_FILE).write_text(
            json.dumps({"global_batch": target, "nnodes": f"{cfg.launch.min_nodes}:{cfg.launch.nnodes}"}) + "\n"
        )
    records = _read_records(run_dir)
    starts = [r for r in records if r.get("event") == "elastic_start"]
    steps = [r["step"] for r in records if "event" not in r and "step" in r]
    resumed = int(ckpt.read_trainer_state(latest).get("step", 0)) if latest is not None else 0
    lost = max(0, steps[-1] - resumed) if steps and starts else 0
    prev = starts[-1] if starts else None
    event = {
        "event": "elastic_start",
        "start": len(starts) + 1,
        "step": resumed,
        "resumed_from": latest.name if latest is not None else None,
        "steps_lost": lost,
        "nodes": world // nproc,
        "world": world,
        "dp": dp,
        "grad_accum": accum,
        "global_batch": target,
        "previous": {k: prev[k] for k in ("nodes", "world", "dp", "grad_accum")} if prev else None,
        "time": time.time(),
    }
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
    if prev is None and latest is None:
        say(
            f"elastic start on {event['nodes']} node(s): world {world}, DP {dp}, optim.grad_accum {accum} (global batch {target})"
        )
        return cfg
    change = (
        f"{prev['nodes']} -> {event['nodes']} node(s), world {prev['world']} -> {world}, DP {prev['dp']} -> {dp}, "
        f"optim.grad_accum {prev['grad_accum']} -> {accum}"
        if prev
        else f"{event['nodes']} node(s), world {world}, DP {dp}, optim.grad_accum {accum}"
    )
    where = f"from {latest.name}" if latest is not None else "from step 0 (no checkpoint yet)"
    say(
        f"elastic restart {event['start'] - 1}: {change} (global batch {target}); resuming {where}, {lost} step(s) lost"
    )
    return cfg


def run_is_live(run_dir: Path) -> bool:
    """A job holds the run folder's lock (a node joining a running elastic job)."""
    from osp.stage2_train.lock import LOCK_NAME, RunLock, RunLockedError

    if not (Path(run_dir) / LOCK_NAME).is_file():
        return False
    try:
        RunLock(run_dir).acquire().release()
    except RunLockedError:
        return True
    return False
