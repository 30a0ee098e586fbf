"""The stage-2 training entry point (the Trainer itself: `osp.stage2_train.trainer`).

    osp train --config stage2_train/configs/demo.toml [--resume auto] [--init DIR] [k=v ...]
    (the ranks run `python -m osp.stage2_train.run RESOLVED.toml`: the config osp train resolved)

Stage 2 never imports transformers, the VAE or stage 1.
"""

from __future__ import annotations

import os
import sys

from osp.common.errors import OspError, one_line
from osp.common.process import DIE_WITH_PARENT_ENV, die_with_parent
from osp.stage2_train import dist as D
from osp.stage2_train.config import TrainConfig
from osp.stage2_train import elastic
from osp.stage2_train.elastic import EXIT_PEER_LOST, PeerLostError
from osp.stage2_train.rundir import claim_run_dir
from osp.stage2_train.trainer import build_trainer, catch_early_sigterm


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def main(cfg: TrainConfig, *, restart: bool = False) -> int:
    """Train with `cfg` in this process (one rank; under torchrun, every rank calls it). A user error is one
    line on stderr and exit code 1; a bug keeps its traceback. `restart`: move an earlier run aside first."""
    die_with_parent()  # under the launcher: this rank dies with it, however it dies
    restore_sigterm = catch_early_sigterm()  # held back until fit() can act on it (launcher: blocked since exec)
    rank = os.environ.get("RANK", "0")
    trainer, finished = None, False
    try:
        if cfg.launch.min_nodes and "TORCHELASTIC_RESTART_COUNT" in os.environ:  # an elastic job's (re)start
            world, nproc = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
            cfg = elastic.prepare(cfg, world=world, nproc=nproc, rank=int(rank))
        elif rank == "0":  # one rank decides; the others wait for it in the process group's set-up
            claim_run_dir(cfg.run.path, cfg.run.resume, restart)
        trainer = build_trainer(cfg, resume=cfg.run.resume)
        trainer.fit()  # also after a SIGTERM: every rank stops after the same step, its checkpoint written
        finished = True
        return 0
    except OspError as e:  # a user error: one line (OSP_TRACEBACK=1 adds the traceback); bugs keep theirs
        sys.stderr.write(f"error (rank {rank}): {one_line(e)}\n")  # one write: ranks sharing a pipe keep whole lines
        sys.stderr.flush()
        if os.environ.get("OSP_TRACEBACK"):
            raise
        return EXIT_PEER_LOST if isinstance(e, PeerLostError) else 1
    finally:
        if trainer is not None:
            trainer.close(failing=not finished)
        D.shutdown()
        if not os.environ.get(DIE_WITH_PARENT_ENV):  # an in-process run (not a launcher's rank) lives on:
            restore_sigterm()  # its later DataLoader workers must not inherit a blocked SIGTERM


def rank_main(argv: list[str]) -> int:
    """A rank started by the launcher: `python -m osp.stage2_train.run RESOLVED.toml [section.key=value ...]`
    (the config `osp train` resolved, read by the same loader)."""
    try:
        cfg = TrainConfig.load(argv[0] if argv else None, argv[1:])
    except OspError as e:
        sys.stderr.write(f"error (rank {os.environ.get('RANK', '0')}): {one_line(e)}\n")
        return 1
    return main(cfg)


if __name__ == "__main__":
    code = rank_main(sys.argv[1:])
    if code == EXIT_PEER_LOST:  # the process group is broken: no teardown that could wait on a dead peer
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
