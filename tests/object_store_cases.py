"""Training cases of tests/test_object_store.py, run in one subprocess (one torch/megatron import).

    python tests/object_store_cases.py WORKDIR LOCAL_SHARDS CASES_JSON   ->  WORKDIR/cases.json

CASES_JSON: a list of {"name", "shards", "extra": [overrides]}. Each case calls the real entry point
`osp.stage2_train.run.rank_main` (a rank's entry: the demo config, tiny preset, one process, TP=1) and records its exit
code, its stderr and the metrics it wrote. The S3 server and the fault proxy run in the test process.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def main() -> None:
    work, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    from osp.stage2_train import run

    base = [
        str(ROOT / "stage2_train" / "configs" / "demo.toml"),
        "parallel.tp=1",
        "parallel.sp=false",
        "run.log_every=0",
        "run.tensorboard=false",
        "run.async_ckpt=false",
        "data.batch_size=2",
    ]
    results = {}
    for case in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = run.rank_main(
                    [*base, f"data.shards={case['shards']}", f"run.dir={work / case['run']}", *case["extra"]]
                )
            except Exception:  # a bug: its traceback, and the other cases still run
                rc = "exception"
                err.write(traceback.format_exc())
        results[case["name"]] = {"rc": rc, "stderr": err.getvalue(), "metrics": metrics(work / case["run"])}
        (work / "cases.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
