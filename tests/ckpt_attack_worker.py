"""Worker of tests/test_ckpt_faults.py: every crafted checkpoint through the training entry point, in one
process (one interpreter start for all of them).

    python tests/ckpt_attack_worker.py SHARDS WORK OUT.json NAME=STEP_DIR ...

For each NAME: `osp.stage2_train.run.main` with `run.resume=STEP_DIR` and with `model.init=STEP_DIR` on a fresh
run folder; OUT.json: {NAME: {"resume": [exit code, stderr], "init": [exit code, stderr]}}.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from osp.stage2_train import run
from osp.stage2_train.config import TrainConfig


def main() -> None:
    shards, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    base = [
        f"data.shards={shards}",
        "run.steps=1",
        "run.ckpt_every=0",
        "data.num_workers=0",
        "run.log_every=0",
        "run.tensorboard=false",
        "parallel.tp=1",
        "parallel.sp=false",
    ]
    results: dict = {}
    for arg in sys.argv[4:]:
        name, step_dir = arg.split("=", 1)
        results[name] = {}
        for how, extra in (("resume", [f"run.resume={step_dir}"]), ("init", [f"model.init={step_dir}"])):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                cfg = TrainConfig.load(None, [*base, *extra, f"run.dir={work / f'{name}-{how}'}"])
                rc = run.main(cfg)
            results[name][how] = [rc, err.getvalue()]
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
