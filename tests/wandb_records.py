"""Reads the records of an offline wandb run file (run-<id>.wandb) for tests: the file is a `:W&B`
header followed by a LevelDB log (32 KiB blocks of CRC-framed fragments) of protobuf `Record`s."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    pos, buf, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and n == 0:
            pos += left
            continue
        buf += data[pos + HEADER : pos + HEADER + n]
        pos += HEADER + n
        if kind in (FULL, LAST):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def history(wandb_dir: str | Path, run_id: str) -> list[dict]:
    """Every history row ({key: value}) of every offline run folder of `run_id` under `wandb_dir`, in order."""
    rows = []
    for f in sorted(Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for r in records(f):
            if r.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows
