"""The stage-2 training entry point (the Trainer itself: `osp.stage2_train.trainer`).

    python -m osp.stage2_train.run --config stage2_train/configs/demo.toml [--resume auto] [--init DIR] [k=v ...]
    torchrun --nproc_per_node 2 -m osp.stage2_train.run --config ...           (TP/DP over processes)

Stage 2 never imports transformers, the VAE or stage 1.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

from osp.common.errors import OspError, one_line
from osp.common.process import die_with_parent
from osp.stage2_train import dist as D
from osp.stage2_train.config import TrainConfig
from osp.stage2_train.trainer import build_trainer, catch_early_sigterm


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    from osp.stage2_train.config import config_keys_help

    p = argparse.ArgumentParser(
        prog="python -m osp.stage2_train.run",
        description="Train the OpenSoraT2V DiT on cached shards.",
        epilog=config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="TOML config (stage2_train/configs/demo.toml)")
    p.add_argument("--resume", default="", help="'auto' (latest checkpoint of the run, if any) or a checkpoint folder")
    p.add_argument("--init", default="", help="converted released DiT checkpoint (or osp checkpoint) to start from")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. run.steps=10 parallel.tp=1")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    die_with_parent()  # under the launcher: this rank dies with it, however it dies
    catch_early_sigterm()  # until fit() installs its own handler
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    trainer = None
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        if args.init:
            cfg.model.init = args.init
        trainer = build_trainer(cfg, resume=args.resume)
        trainer.fit()
        return 0
    except pickle.UnpicklingError as e:  # a resume file holding more than tensors (weights_only load refused it)
        what = next((x.strip() for x in str(e).splitlines() if "GLOBAL" in x), "objects beyond tensors")
        sys.stderr.write(
            f"error (rank {rank}): a checkpoint file was refused ({what}); it would run code when unpickled. "
            "Resume from a checkpoint this osp wrote (--resume DIR)\n"
        )
        return 1
    except OspError as e:  # a user error: one line (OSP_TRACEBACK=1 adds the traceback); bugs keep theirs
        sys.stderr.write(f"error (rank {rank}): {one_line(e)}\n")  # one write: ranks sharing a pipe keep whole lines
        sys.stderr.flush()
        if os.environ.get("OSP_TRACEBACK"):
            raise
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
