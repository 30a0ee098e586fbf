"""An in-process S3-compatible server on loopback (moto) and a fault-injecting HTTP proxy in front of it.

    server = S3Server().start()                  # moto's ThreadedMotoServer on 127.0.0.1:<free port>
    proxy = FaultProxy(server.port, seed=3, rates={"503": 0.05, "slowdown": 0.05}, stall_rate=0.01).start()
    ... point AWS_ENDPOINT_URL / data.endpoint_url at proxy.endpoint ...
    proxy.injected            # {"503": n, "slowdown": n, "reset": n, "stall": n, "truncate": n}
    proxy.surfaced            # the same faults minus the resets the HTTP client replays by itself (below)
    proxy.requests            # {"GET": n, "HEAD": n, "PUT": n, ...} requests that reached the proxy

Faults (drawn per request, in arrival order, from random.Random(seed)):
    503       HTTP 503 ServiceUnavailable (S3's XML error body)
    slowdown  HTTP 503 SlowDown (S3's throttling reply)
    reset     the connection is reset (RST) without a reply
    stall     nothing is sent for `stall_s` seconds, then the connection closes
    truncate  the upstream reply with its full Content-Length, but only half of its body, then a reset
`hold`: a predicate on (method, path); a matching request is held (never answered) and `held` is set,
so a test can kill a client at that exact moment (e.g. before the manifest is uploaded).
Keep-alive works as in a real server, so a client's connection reuse is what it would be.

aiohttp (under s3fs) replays an idempotent request once when its connection fails before the reply
(RFC 9112, "retrying requests"), so a reset on a first attempt never reaches osp; a reset of the
replay does. `surfaced` applies that rule to the request stream, which is exact for one client
issuing one request at a time (a replay follows its reset at once).
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import socketserver
import struct
import threading
from http.server import BaseHTTPRequestHandler
from typing import Callable

FAULTS = ("503", "slowdown", "reset", "stall", "truncate")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's threaded S3-compatible server on 127.0.0.1 with one bucket; test credentials in `env`."""

    def __init__(self, bucket: str = "osp-test", *, process: bool = False):
        """`process`: run moto in a child process (a bench's client then does not share the GIL with it)."""
        self.bucket = bucket
        self.process = process
        self.port = 0
        self._server = None
        self._proc = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs (fake credentials: moto accepts any)."""
        return {
            "AWS_ACCESS_KEY_ID": "osp-test-key",
            "AWS_SECRET_ACCESS_KEY": "osp-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = _free_port()
        if self.process:
            import subprocess
            import sys
            import time

            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or self._proc.poll() is not None:
                        raise RuntimeError("moto server did not start") from None
                    time.sleep(0.1)
        else:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **self._keys())

    def _keys(self) -> dict:
        e = self.env
        return {"aws_access_key_id": e["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": e["AWS_SECRET_ACCESS_KEY"]}

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under `prefix` (key relative to it) with its bytes."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix.rstrip("/") + "/"):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix.rstrip("/")) + 1 :]] = c.get_object(Bucket=self.bucket, Key=o["Key"])[
                    "Body"
                ].read()
        return out

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._proc = None


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int = 0,
        rates: dict[str, float] | None = None,
        stall_s: float = 3.0,
        hold: Callable[[str, str], bool] | None = None,
    ):
        self.upstream_port = upstream_port
        self.rates = {k: float(v) for k, v in (rates or {}).items()}
        unknown = set(self.rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
        self.stall_s = stall_s
        self.hold = hold
        self.held = threading.Event()
        self.injected = {k: 0 for k in FAULTS}
        self.surfaced = {k: 0 for k in FAULTS}
        self._replay_next = False  # the previous request was reset on its first attempt
        self.requests: dict[str, int] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_counts(self) -> None:
        with self._lock:
            self.injected = {k: 0 for k in FAULTS}
            self.surfaced = {k: 0 for k in FAULTS}
            self.requests = {}

    def _draw(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1
            if self.hold is not None and self.hold(method, path):
                return "hold"
            u, acc = self._rng.random(), 0.0
            drawn = None
            for kind in FAULTS:
                acc += self.rates.get(kind, 0.0)
                if u < acc:
                    drawn = kind
                    break
            if drawn == "reset" and not self._replay_next:
                self._replay_next = True  # replayed by the client itself
            else:
                self._replay_next = False
                if drawn is not None and drawn != "truncate":  # a truncation is counted once applied
                    # a HEAD reply has no body to say SlowDown in: the client sees a plain HTTP 503
                    self.surfaced["503" if drawn == "slowdown" and method == "HEAD" else drawn] += 1
            return drawn

    def _count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, format, *args):  # quiet
                pass

            def _reset(self) -> None:
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                self.close_connection = True
                try:
                    self.connection.close()
                except OSError:
                    pass

            def _error(self, code: str, message: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<RequestId>osp-fault</RequestId></Error>"
                ).encode()
                self.send_response(503, "Service Unavailable" if code != "SlowDown" else "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> tuple[int, str, list[tuple[str, str]], bytes]:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                for attempt in (0, 1):  # a kept-alive upstream connection may have closed meanwhile
                    if self.upstream is None:
                        self.upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                    try:
                        self.upstream.request(self.command, self.path, body=body, headers=headers)
                        resp = self.upstream.getresponse()
                        data = resp.read()
                        return resp.status, resp.reason, resp.getheaders(), data
                    except (http.client.HTTPException, OSError):
                        self.upstream.close()
                        self.upstream = None
                        if attempt:
                            raise
                raise AssertionError("unreachable")

            def _proxy(self) -> None:
                kind = proxy._draw(self.command, self.path)
                if kind == "hold":
                    proxy.held.set()
                    proxy._stop.wait()
                    self._reset()
                    return
                if kind in ("503", "slowdown"):
                    n = int(self.headers.get("Content-Length") or 0)
                    if n:
                        self.rfile.read(n)
                    proxy._count(kind)
                    if kind == "503":
                        self._error("ServiceUnavailable", "Service is unable to handle request.")
                    else:
                        self._error("SlowDown", "Please reduce your request rate.")
                    return
                if kind == "reset":
                    proxy._count(kind)
                    self._reset()
                    return
                if kind == "stall":
                    proxy._count(kind)
                    proxy._stop.wait(proxy.stall_s)
                    self.close_connection = True
                    return
                status, reason, headers, data = self._forward()
                truncate = kind == "truncate" and self.command == "GET" and len(data) >= 2
                self.send_response(status, reason)
                for k, v in headers:  # a HEAD reply keeps the object's Content-Length
                    if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if truncate:
                    proxy._count(kind)
                    with proxy._lock:
                        proxy.surfaced["truncate"] += 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass
                if self.upstream is not None:
                    self.upstream.close()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):  # client resets after a fault: expected
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
