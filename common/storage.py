"""Where a shard cache lives: a local folder (the default) or an object store behind a URL.

    store = open_store("shards/demo")             # LocalStore: today's files, fsync + rename publication
    store = open_store("s3://bucket/prefix")      # ObjectStore over obstore (S3 and S3-compatible stores)
    store = open_store("gs://bucket/prefix")      # ... any other fsspec URL through fsspec
    store.read_ranges("shard-000000.tar", [(off, size), ...])   # coalesced ranged reads
    store.read_bytes(name); store.size(name); store.exists(name); store.list(prefix)
    store.put_atomic(name, data); store.put_file(name, local_path); store.delete(name)

Object stores: every request has a connect and a total timeout (`configure(timeout_s=...)`), so a
stalled connection surfaces as an error within seconds, never as a hung loader worker. Transient
errors (HTTP 5xx, throttling / SlowDown, connection resets, timeouts, truncated bodies) are retried
with bounded exponential backoff (`retries` attempts after the first, delays `backoff_s` doubling up to
`backoff_max_s`) and counted; permanent ones raise at once: `ObjectMissing` (404, also a
FileNotFoundError), `ObjectForbidden` (403, also a PermissionError); retries used up raise
`StoreUnavailable` (also a ConnectionError). All three are OspErrors naming the object.
`counters()` returns this process's counts, including its forked DataLoader workers'.

Credentials come from the standard AWS chain only (environment, ~/.aws config and credential files,
instance / container roles, via botocore) and never pass through osp's settings, logs or files; the
endpoint of an S3-compatible store is `configure(endpoint_url=...)` or AWS_ENDPOINT_URL.

Local read cache (`configure(cache_dir=..., cache_bytes=...)`): the byte ranges read from an object
store are kept as files named by (object URL, ETag, range), each ending in its own CRC-32C; a hit is
checked against it (a damaged entry is dropped and fetched again), least recently used entries are
evicted beyond `cache_bytes`.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import random
import re
import struct
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable

import google_crc32c

from osp.common.errors import OspError, UnavailableError

COUNTERS = (
    "requests",  # requests sent to the object store (every attempt)
    "bytes",  # body bytes received
    "retries",  # transient failures retried (the sum of the retry_* counters)
    "retry_5xx",
    "retry_throttle",
    "retry_reset",
    "retry_timeout",
    "retry_truncated",
    "cache_hits",
    "cache_misses",
    "cache_evictions",
    "cache_dropped",  # cache entries that failed their checksum and were fetched again
)
_COUNTS = multiprocessing.RawArray("q", len(COUNTERS))  # shared with forked DataLoader workers
_COUNT_LOCK = multiprocessing.Lock()
_INDEX = {n: i for i, n in enumerate(COUNTERS)}


def counters() -> dict[str, int]:
    """Object-store request, retry and cache counts of this process and its forked workers."""
    with _COUNT_LOCK:
        return {n: int(_COUNTS[i]) for n, i in _INDEX.items()}


def reset_counters() -> None:
    with _COUNT_LOCK:
        for i in range(len(COUNTERS)):
            _COUNTS[i] = 0


def _count(name: str, n: int = 1) -> None:
    with _COUNT_LOCK:
        _COUNTS[_INDEX[name]] += n


class StoreError(OspError):
    """An object-store failure a user can act on (message: the object's URL, the cause, the fix)."""


class ObjectMissing(StoreError, FileNotFoundError):
    """HTTP 404: the object is not there."""


class ObjectForbidden(StoreError, PermissionError):
    """HTTP 401/403: the credentials may not read (or write) the object."""


class StoreUnavailable(StoreError, ConnectionError):
    """Transient failures went on past the retry budget."""


@dataclass(frozen=True)
class Settings:
    endpoint_url: str | None = None  # S3-compatible store (MinIO, R2, ...); None: AWS_ENDPOINT_URL or AWS itself
    cache_dir: str | None = None  # local read cache for object-store ranges; None = off
    cache_bytes: int = 0  # size bound of the cache (0 = unbounded)
    timeout_s: float = 30.0  # per request (connect: min(timeout_s, 10 s))
    retries: int = 8  # transient failures retried per request
    backoff_s: float = 0.05  # first retry delay; doubles per retry
    backoff_max_s: float = 2.0
    coalesce_bytes: int = 1 << 20  # ranges of one object less than this apart become one request
    client: str = "fsspec"  # s3:// through "fsspec" (s3fs) or "obstore" (not fork-safe: single-process tools only)


_SETTINGS = Settings()
_STORES: dict[tuple[int, str], "Store"] = {}


def configure(**changes: Any) -> Settings:
    """Set process-wide object-store settings (inherited by forked workers); returns them."""
    global _SETTINGS
    names = {f.name for f in fields(Settings)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown storage settings {sorted(unknown)}")
    _SETTINGS = replace(_SETTINGS, **changes)
    _STORES.clear()
    return _SETTINGS


def settings() -> Settings:
    return _SETTINGS


_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


def is_url(location: str | os.PathLike) -> bool:
    """True for an object-store URL (s3://..., gs://...); local paths and file:// are folders."""
    m = _URL.match(str(location))
    return bool(m) and m.group(1).lower() != "file"


def join(location: str | os.PathLike, name: str) -> str:
    """The display form of `name` inside `location` (a URL or a local path)."""
    if is_url(location):
        return f"{str(location).rstrip('/')}/{name}"
    return str(Path(location) / name)


def open_store(location: str | os.PathLike) -> "Store":
    """The store of a cache location; one per process and location (stores are not shared across forks)."""
    raw = str(location)
    if raw.startswith("file://"):
        raw = raw[len("file://") :]
    if not is_url(raw):
        return LocalStore(Path(raw))
    key = (os.getpid(), raw.rstrip("/"))
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = ObjectStore(raw.rstrip("/"), _SETTINGS)
    return store


# --------------------------------------------------------------------------------------------------
# ranges
# --------------------------------------------------------------------------------------------------


def coalesce(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int, list[int]]]:
    """(offset, size) ranges -> spans (start, end, [range ids]) joining ranges less than `gap` apart
    (overlapping or adjacent ranges always join)."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    spans: list[tuple[int, int, list[int]]] = []
    for i in order:
        off, size = ranges[i]
        if spans and off - spans[-1][1] <= gap:
            s, e, ids = spans[-1]
            spans[-1] = (s, max(e, off + size), ids + [i])
        else:
            spans.append((off, off + size, [i]))
    return spans


def _split(ranges: list[tuple[int, int]], spans, bufs: list[bytes]) -> list[bytes]:
    out: list[bytes] = [b""] * len(ranges)
    for (start, _end, ids), buf in zip(spans, bufs):
        for i in ids:
            off, size = ranges[i]
            out[i] = buf[off - start : off - start + size]
    return out


# --------------------------------------------------------------------------------------------------
# stores
# --------------------------------------------------------------------------------------------------


class Store:
    url: str

    def where(self, name: str) -> str:
        return join(self.url, name)

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, size); a range past the end comes back short, as a file read."""
        raise NotImplementedError

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        return self.read_ranges(name, [(offset, size)])[0]

    def size(self, name: str) -> int:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        """Names (relative to the store, '/'-separated) of every object under `prefix`, sorted."""
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        """A seekable binary reader of one object (sequential scans: verify, inspect)."""
        raise NotImplementedError

    def put_atomic(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, name: str, path: str | os.PathLike) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError


class LocalStore(Store):
    """A folder: plain reads, writes published by fsync + rename (a reader never sees a partial file)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        spans = coalesce(ranges, 0)
        with open(self.root / name, "rb", buffering=0) as f:
            bufs = [os.pread(f.fileno(), end - start, start) for start, end, _ in spans]
        return _split(ranges, spans, bufs)

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        if base.is_file():
            return [prefix]
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")

    def put_atomic(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_file(self, name: str, path: str | os.PathLike) -> None:
        self.put_atomic(name, Path(path).read_bytes())

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


# --- error classification ----------------------------------------------------------------------------

_STATUS = re.compile(r"\b([1-5]\d\d) [A-Z][A-Za-z ]+|status(?: code)?[:= ]+([1-5]\d\d)|\(([1-5]\d\d)\)")
_THROTTLE = re.compile(r"SlowDown|Throttl|TooManyRequests|RequestLimitExceeded|\b429\b")
_5XX_CODES = re.compile(r"ServiceUnavailable|InternalError|Service Unavailable|Internal Server Error|Bad Gateway")
_TRANSIENT_TEXT = (  # obstore reports reqwest/hyper error kinds, s3fs botocore/aiohttp exception names
    (
        "retry_timeout",
        re.compile(r"kind: Timeout|TimedOut|timed out|Timeout on|ReadTimeout|ConnectTimeout|TimeoutError"),
    ),
    (
        "retry_truncated",
        re.compile(
            r"response body error|kind: Body|IncompleteRead|ContentLengthError|payload is not completed|"
            r"end of file before message length|Response ended prematurely"
        ),
    ),
    (
        "retry_reset",
        re.compile(
            r"ConnectionReset|reset by peer|error sending request|connection closed|IncompleteMessage|broken pipe|"
            r"ServerDisconnected|ClientOSError|EndpointConnectionError|Could not connect|Connection refused",
            re.I,
        ),
    ),
)


def classify(e: BaseException) -> str:
    """'missing' | 'forbidden' | a retry_* counter name (transient) | 'permanent'."""
    try:
        import obstore.exceptions as oe

        missing, forbidden = (oe.NotFoundError,), (oe.PermissionDeniedError, oe.UnauthenticatedError)
    except ImportError:
        missing, forbidden = (), ()
    if isinstance(e, (FileNotFoundError, *missing)):
        return "missing"
    if isinstance(e, (PermissionError, *forbidden)):
        return "forbidden"
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or e.__context__
    if cause is not None:
        text += f" | {type(cause).__name__}: {cause!r}"
    text = re.sub(r"retry_timeout: \S+", "", text)  # obstore's retry settings, not the error
    if _THROTTLE.search(text):
        return "retry_throttle"
    statuses = [int(next(g for g in m.groups() if g)) for m in _STATUS.finditer(text)]
    if any(s >= 500 for s in statuses) or _5XX_CODES.search(text):
        return "retry_5xx"
    if any(s in (401, 403) for s in statuses):
        return "forbidden"
    if 404 in statuses:
        return "missing"
    for kind, pattern in _TRANSIENT_TEXT:
        if pattern.search(text):
            return kind
    if isinstance(e, TimeoutError):
        return "retry_timeout"
    if isinstance(e, ConnectionError):
        return "retry_reset"
    return "permanent"


class _Truncated(Exception):
    """A ranged body shorter than asked while the object is long enough (a cut connection)."""


# --- backends ------------------------------------------------------------------------------------------


class _Obstore:
    """S3 and S3-compatible stores through obstore (Rust object_store), its own retries off."""

    def __init__(self, url: str, s: Settings):
        try:
            import obstore
            from obstore.store import S3Store
        except ImportError:
            raise UnavailableError(
                f"{url}: reading object storage needs obstore; pip install 'osp[s3]' (or set data.shards to a local folder)"
            ) from None
        from datetime import timedelta

        self.obs = obstore
        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        endpoint = s.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        session = _boto_session()
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint"] = endpoint
        self.store = S3Store(
            bucket,
            prefix=prefix or None,
            region=session.get_config_variable("region") or "us-east-1",
            credential_provider=_credential_provider(session),
            client_options={
                "timeout": timedelta(seconds=s.timeout_s),
                "connect_timeout": timedelta(seconds=min(s.timeout_s, 10.0)),
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
            },
            retry_config={
                "max_retries": 0,
                "backoff": {"init_backoff": timedelta(milliseconds=10), "max_backoff": timedelta(seconds=1), "base": 2},
                "retry_timeout": timedelta(seconds=s.timeout_s),
            },
            **kwargs,
        )

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return bytes(self.obs.get_range(self.store, key, start=start, end=end))

    def get(self, key: str) -> bytes:
        return bytes(self.obs.get(self.store, key).bytes())

    def head(self, key: str) -> tuple[int, str]:
        meta = self.obs.head(self.store, key)
        return int(meta["size"]), str(meta.get("e_tag") or "")

    def list(self, prefix: str) -> list[str]:
        out = []
        for batch in self.obs.list(self.store, prefix or None):
            out += [m["path"] for m in batch]
        return out

    def put(self, key: str, data: bytes) -> None:
        self.obs.put(self.store, key, data)

    def put_file(self, key: str, path: Path) -> None:
        self.obs.put(self.store, key, path, chunk_size=8 << 20)

    def delete(self, key: str) -> None:
        self.obs.delete(self.store, key)


class _Fsspec:
    """Any fsspec URL (s3fs for s3://), its own retries off."""

    def __init__(self, url: str, s: Settings):
        try:
            import fsspec
        except ImportError:
            raise UnavailableError(f"{url}: reading this URL needs fsspec; pip install 'osp[s3]'") from None
        scheme, rest = url.split("://", 1)
        options: dict[str, Any] = {}
        if scheme in ("s3", "s3a"):
            endpoint = s.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            options = {
                "endpoint_url": endpoint,
                "config_kwargs": {
                    "retries": {"total_max_attempts": 1, "mode": "standard"},  # retried (and counted) here
                    "connect_timeout": min(s.timeout_s, 10.0),
                    "read_timeout": s.timeout_s,
                },
                "skip_instance_cache": True,
            }
        self.fs = fsspec.filesystem(scheme, **options)
        if hasattr(self.fs, "retries"):
            self.fs.retries = 1  # s3fs: one attempt per call; retries are counted here
        self.root = rest.rstrip("/")
        self.s3 = scheme in ("s3", "s3a")

    def _p(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self._p(key), start=start, end=end)

    def get(self, key: str) -> bytes:
        if self.s3:  # one GET (s3fs would HEAD first to split a large object into parallel ranges)
            return self.fs.cat_file(self._p(key), max_concurrency=1)
        return self.fs.cat_file(self._p(key))

    def head(self, key: str) -> tuple[int, str]:
        if self.s3:  # one HEAD (fs.info falls back to a LIST of its own after a failed HEAD)
            bucket, _, path = self._p(key).partition("/")
            r = self.fs.call_s3("head_object", Bucket=bucket, Key=path)
            return int(r["ContentLength"]), str(r.get("ETag") or "")
        info = self.fs.info(self._p(key))
        return int(info["size"]), str(info.get("ETag") or info.get("etag") or "")

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.root + "/"
        return [p[len(root) :] if p.startswith(root) else p for p in found]

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)

    def put_file(self, key: str, path: Path) -> None:
        self.fs.put_file(str(path), self._p(key))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            pass


def _boto_session():
    try:
        import botocore.session
    except ImportError:
        raise UnavailableError(
            "object storage needs botocore for the AWS credential chain; pip install 'osp[s3]'"
        ) from None
    return botocore.session.get_session()


def _credential_provider(session):
    """The standard AWS chain (env, config files, instance / container roles) through botocore,
    refreshed before expiry. None when the chain finds nothing (anonymous requests)."""
    from obstore.auth.boto3 import Boto3CredentialProvider

    if session.get_credentials() is None:
        return None
    return Boto3CredentialProvider(session)


class ObjectStore(Store):
    """An object-store prefix: retried, counted, optionally cached reads; whole-object writes."""

    def __init__(self, url: str, s: Settings):
        self.url = url
        self.settings = s
        scheme = url.split("://", 1)[0].lower()
        self.backend = _Obstore(url, s) if scheme in ("s3", "s3a") and s.client == "obstore" else _Fsspec(url, s)
        self._stat: dict[str, tuple[int, str]] = {}
        self.cache = RangeCache(Path(s.cache_dir), s.cache_bytes) if s.cache_dir else None

    # one request, retried --------------------------------------------------------------------
    def _call(self, name: str, what: str, fn: Callable[[], Any]) -> Any:
        s = self.settings
        last = ""
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(min(s.backoff_max_s, s.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            _count("requests")
            try:
                return fn()
            except _Truncated as e:
                kind, err = "retry_truncated", e
            except Exception as e:
                kind, err = classify(e), e
            where = self.where(name)
            if kind == "missing":
                raise ObjectMissing(f"{where}: no such object ({what}); re-run the osp encode that writes it") from None
            if kind == "forbidden":
                raise ObjectForbidden(
                    f"{where}: access denied ({what}); check the AWS credentials (environment, ~/.aws, instance role) "
                    "and the bucket policy"
                ) from None
            if kind == "permanent":
                raise StoreError(f"{where}: {what} failed ({_first_line(err)}); check the URL and endpoint") from None
            _count("retries")
            _count(kind)
            last = f"{kind.removeprefix('retry_')}: {_first_line(err)}"
        raise StoreUnavailable(
            f"{self.where(name)}: {what} failed {s.retries + 1} times (last: {last}); check the endpoint and network "
            "(data.endpoint_url, AWS_ENDPOINT_URL)"
        )

    # Store ----------------------------------------------------------------------------------
    def stat(self, name: str) -> tuple[int, str]:
        if name not in self._stat:
            self._stat[name] = self._call(name, "HEAD", lambda: self.backend.head(name))
        return self._stat[name]

    def size(self, name: str) -> int:
        return self.stat(name)[0]

    def read_bytes(self, name: str) -> bytes:
        data = self._call(name, "GET", lambda: self.backend.get(name))
        _count("bytes", len(data))
        return data

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        spans = coalesce(ranges, self.settings.coalesce_bytes)
        size = self.size(name)
        bufs = []
        for start, end, _ in spans:
            end = min(end, size)
            if end <= start:
                bufs.append(b"")
                continue
            bufs.append(self._get_span(name, start, end))
        return _split(ranges, spans, bufs)

    def _get_span(self, name: str, start: int, end: int, cached: bool = True) -> bytes:
        key = None
        if self.cache is not None and cached:
            key = self.cache.key(self.where(name), self.stat(name)[1], start, end)
            hit = self.cache.get(key)
            if hit is not None:
                return hit

        def fetch() -> bytes:
            data = self.backend.get_range(name, start, end)
            if len(data) != end - start:
                raise _Truncated(f"{len(data)} of {end - start} bytes")
            return data

        data = self._call(name, f"GET bytes {start}-{end - 1}", fetch)
        _count("bytes", len(data))
        if self.cache is not None and key is not None:
            self.cache.put(key, data)
        return data

    def open(self, name: str) -> BinaryIO:
        """Buffered 8 MiB ranged reads of the object as stored (never through the local cache)."""
        return io.BufferedReader(_ObjectReader(self, name), buffer_size=8 << 20)  # pyright: ignore[reportReturnType]

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._call(prefix or ".", "LIST", lambda: self.backend.list(prefix)))

    def put_atomic(self, name: str, data: bytes) -> None:
        """One PUT: an object store shows a whole object or none."""
        self._stat.pop(name, None)
        self._call(name, "PUT", lambda: self.backend.put(name, data))

    def put_file(self, name: str, path: str | os.PathLike) -> None:
        self._stat.pop(name, None)
        self._call(name, "PUT", lambda: self.backend.put_file(name, Path(path)))

    def delete(self, name: str) -> None:
        self._stat.pop(name, None)
        try:
            self._call(name, "DELETE", lambda: self.backend.delete(name))
        except ObjectMissing:
            pass


class _ObjectReader(io.RawIOBase):
    """A seekable raw reader of one object: each read is one ranged GET (retried, counted)."""

    def __init__(self, store: ObjectStore, name: str):
        self.store, self.name, self.pos = store, name, 0
        self.length = store.size(name)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        end = min(self.pos + len(b), self.length)
        if end <= self.pos:
            return 0
        data = self.store._get_span(self.name, self.pos, end, cached=False)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


# --------------------------------------------------------------------------------------------------
# local read cache
# --------------------------------------------------------------------------------------------------


class RangeCache:
    """Size-bounded LRU of byte ranges on local disk; each entry = data + its CRC-32C (4 bytes, big endian)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._total: int | None = None  # this process's estimate of the cache's size

    @staticmethod
    def key(url: str, etag: str, start: int, end: int) -> str:
        return hashlib.sha256(f"{url}\0{etag}\0{start}\0{end}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.bin"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            _count("cache_misses")
            return None
        data, tail = raw[:-4], raw[-4:]
        if len(raw) < 4 or struct.pack(">I", google_crc32c.value(data)) != tail:
            path.unlink(missing_ok=True)
            _count("cache_dropped")
            _count("cache_misses")
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        _count("cache_hits")
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(struct.pack(">I", google_crc32c.value(data)))
            os.replace(tmp, path)
        except OSError:  # a full or read-only cache disk costs speed, not the run
            tmp.unlink(missing_ok=True)
            return
        if self.max_bytes:
            if self._total is None:
                self._total = sum(e.stat().st_size for e in self._entries())
            else:
                self._total += len(data) + 4
            if self._total > self.max_bytes:
                self._evict()

    def _entries(self) -> list[Path]:
        return [p for p in self.root.glob("*/*.bin")]

    def _evict(self) -> None:
        """Drop least recently used entries until the cache is at 90 % of its bound."""
        entries = []
        for p in self._entries():
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, p))
        entries.sort()
        total = sum(e[1] for e in entries)
        target = int(self.max_bytes * 0.9)
        for _, size, p in entries:
            if total <= target:
                break
            p.unlink(missing_ok=True)
            total -= size
            _count("cache_evictions")
        self._total = total
