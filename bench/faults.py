"""Fault-handling costs: what the integrity checks add to a training read, and the plan's memory for
absurd annotation values.

    python bench/faults.py [--samples 24]

1. reader: `read_sample` with every check `osp shards verify` makes for a row (sidecar/size once per
   shard, both tar headers, CRC-32C over the row's index fields and bytes) ÷ the same reads with no
   check at all (verify=False), 93x480x640 sample sizes, page cache, best of 3 interleaved rounds.
   Target: >= 0.5 (the checks may at most double a read).
2. plan: peak traced memory of planning a record that claims 1e12 s / 1e308 fps (an error row) ÷
   planning a normal 5 s record. Target: <= 2 (no memory in proportion to the claimed duration).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from osp.common import shards as S


def bench_reader(n: int) -> tuple[float, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    from shard_io import write_dir  # the same 93x480p sample sizes as the shard I/O bench

    tmp = Path(tempfile.mkdtemp(prefix="osp-bench-faults-"))
    try:
        write_dir(tmp, n, "float16")
        S.merge_index(tmp)
        index = S.ShardIndex.open(tmp)
        order = list(range(n))
        random.Random(0).shuffle(order)
        best = {True: float("inf"), False: float("inf")}
        for _ in range(3):
            for verify in (False, True):
                fresh = S.ShardIndex(index.columns, index.out_dir)  # no cached per-shard result
                t0 = time.perf_counter()
                for i in order:
                    S.read_sample(tmp, fresh, i, verify=verify)
                best[verify] = min(best[verify], time.perf_counter() - t0)
        return best[True], best[False]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_plan() -> tuple[int, int]:
    from osp.stage1_encode.dataset import list_records, resolve_sources
    from osp.stage1_encode.plan import EncodeSpec, make_plan

    peaks = []
    for fps, duration in ((24.0, 5.0), (1e308, 1e12)):
        tmp = Path(tempfile.mkdtemp(prefix="osp-bench-plan-"))
        rec = {
            "path": "a.mp4",
            "cap": "x",
            "fps": fps,
            "duration": duration,
            "resolution": {"height": 480, "width": 640},
        }
        (tmp / "annotation.json").write_text(json.dumps([rec]))
        records = list_records(resolve_sources(tmp))
        tracemalloc.start()
        make_plan(records, EncodeSpec(93, 480, 640), 64)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return peaks[1], peaks[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=24)
    a = p.parse_args()
    checked, raw = bench_reader(a.samples)
    ratio = raw / checked
    print(
        f"reader with verify's checks: {checked / a.samples * 1e3:.2f} ms/sample, without checks {raw / a.samples * 1e3:.2f} ms/sample; "
        f"throughput ratio {ratio:.2f} (target >= 0.5) {'ok' if ratio >= 0.5 else 'MISSED'}"
    )
    bad, good = bench_plan()
    print(
        f"plan peak memory: 1e12 s / 1e308 fps record {bad / 1024:.1f} KiB, normal record {good / 1024:.1f} KiB; "
        f"ratio {bad / good:.2f} (target <= 2) {'ok' if bad <= 2 * good else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
