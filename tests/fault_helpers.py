"""Helpers of tests/test_faults.py: the kinds of damage a cache meets, applied to a real shard directory."""

from __future__ import annotations

from pathlib import Path

from osp.common import shards as S


def _set(out: Path, column: str, i: int, value) -> None:
    import zarr

    zarr.open_group(str(Path(out) / S.INDEX_NAME), mode="r+")[column][i] = value


def swap_rows(out: Path, i: int, j: int) -> list[str]:
    """Swap where two index rows point (offsets, sizes, checksums); keys stay: each key would read the
    other key's data, and a bytes-only checksum would still pass."""
    index = S.ShardIndex.open(out)
    assert index.shard[i] == index.shard[j]
    for c in ("st_offset", "st_size", "json_offset", "json_size", "checksum"):
        a, b = index.columns[c][i], index.columns[c][j]
        _set(out, c, i, b)
        _set(out, c, j, a)
    return [str(index.key[i]), str(index.key[j])]


def damage(out: Path, kind: str) -> list[str]:
    """Apply one damage kind; returns the keys it makes unreadable."""
    out = Path(out)
    index = S.ShardIndex.open(out)
    keys1 = [str(k) for k, s in zip(index.key, index.shard) if int(s) == 1]
    tar1 = S.shard_path(out, 1)
    if kind == "swap_rows":
        return swap_rows(out, 4, 5)
    if kind == "edit_shape":  # latent_t 3 -> 1: would pass for an image and be left out of video training
        _set(out, "latent_t", 6, 1)
        return [str(index.key[6])]
    if kind == "flip_tar_header":  # the mtime field of the header in front of row 5's safetensors member
        data = bytearray(tar1.read_bytes())
        data[int(index.st_offset[5]) - 512 + 140] ^= 0x01
        tar1.write_bytes(bytes(data))
        return [str(index.key[5])]
    if kind == "strip_padding":  # drop the end-of-archive blocks
        data = tar1.read_bytes()
        tar1.write_bytes(data[:-1024])
        return keys1
    if kind == "delete_sidecar":
        S.rows_path(out, 1).unlink()
        return keys1
    if kind == "flip_byte":
        from train_helpers import corrupt_sample

        corrupt_sample(out, str(index.key[7]))
        return [str(index.key[7])]
    if kind == "truncate":
        data = tar1.read_bytes()
        tar1.write_bytes(data[: len(data) // 2])
        return keys1
    raise ValueError(kind)
