"""Object-storage bench: samples/s and requests per sample reading 93x480p-sized samples (latent
moments [8, 24, 60, 80] fp16, text ~150 x 4096 bf16: ~3.1 MB each) from an S3-compatible server on
loopback (moto, in its own process) vs from local disk, in one run: both S3 clients (s3fs through fsspec, the
default, and obstore), with and without the local read cache (cold, then warm).

    python bench/object_store.py [--samples 24] [--passes 2]

Each sample is read with `read_sample` (checksum verified, tensors decoded) in a shuffled order, one
ranged GET per sample. Requests are counted at a pass-through proxy in front of the server (every
HTTP request, including the client's own), so "requests/sample" is what the store sees. Loopback
numbers measure client and server overhead, not a network; moto (a Python server) serves from memory.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from s3_fault_proxy import FaultProxy, S3Server  # noqa: E402
from shard_io import write_dir  # noqa: E402

from osp.common import remote_cache, storage  # noqa: E402
from osp.common import shards as S  # noqa: E402


def read_all(root: str, order: list[int], index: S.ShardIndex) -> float:
    t0 = time.perf_counter()
    for i in order:
        S.read_sample(root, index, i)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--passes", type=int, default=2, help="timed passes per setting (best is reported)")
    args = ap.parse_args()

    server = S3Server(process=True).start()
    os.environ.update(server.env)
    proxy = FaultProxy(server.port).start()  # no faults: it counts requests
    with tempfile.TemporaryDirectory(prefix="osp-bench-s3-") as tmp:
        local = Path(tmp) / "local"
        write_dir(local, args.samples, "float16", per_shard=12)
        index = S.ShardIndex.open(local)
        mb = float((index.st_size + index.json_size).mean()) / 1e6
        url = f"s3://{server.bucket}/bench"
        storage.configure(endpoint_url=server.endpoint)
        remote_cache.upload_cache(local, url)
        order = list(range(len(index)))
        random.Random(0).shuffle(order)
        n = len(order)

        def run(endpoint: str, client: str, cache: Path | None) -> tuple[float, int]:
            """One pass over every sample with a fresh client: (seconds, requests seen by the proxy)."""
            storage.configure(endpoint_url=endpoint, client=client, cache_dir=str(cache) if cache else None)
            rindex = S.ShardIndex.open(url)
            proxy.reset_counts()
            return read_all(url, order, rindex), sum(proxy.requests.values())

        rows: list[tuple[str, float, float]] = []
        best_local = min(read_all(str(local), order, index) for _ in range(args.passes))
        rows.append(("local disk (page cache)", n / best_local, 0.0))
        for client in ("fsspec", "obstore"):
            # timed straight against the server; requests counted in one more pass through the proxy
            best = min(run(server.endpoint, client, None)[0] for _ in range(args.passes))
            rows.append((f"s3 loopback, {client}", n / best, run(proxy.endpoint, client, None)[1] / n))
        cache = Path(tmp) / "cache"
        cold = run(proxy.endpoint, "fsspec", cache)
        rows.append(("s3 loopback, fsspec, cache cold", n / cold[0], cold[1] / n))
        warm = min(run(proxy.endpoint, "fsspec", cache) for _ in range(args.passes))
        rows.append(("s3 loopback, fsspec, cache warm", n / warm[0], warm[1] / n))
        storage.configure(cache_dir=None, client="fsspec", endpoint_url=None)

    proxy.stop()
    server.stop()
    local_rate = rows[0][1]
    print(f"object store bench: {n} samples of {mb:.2f} MB (93x480p moments + mT5 text), shuffled, checksums verified")
    print(f"{'setting':<36} {'samples/s':>10} {'MB/s':>8} {'req/sample':>11} {'vs local':>9}")
    for name, rate, rps in rows:
        print(f"{name:<36} {rate:>10.1f} {rate * mb:>8.0f} {rps:>11.2f} {rate / local_rate:>8.2f}x")


if __name__ == "__main__":
    main()
