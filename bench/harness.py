"""Pieces every HTTP benchmark in bench/ needs: loopback ports, server subprocesses, a bare echo server as the
HTTP ceiling, and percentile summaries. Kept apart from any one benchmark so they can share it.

    .venv/bin/python bench/harness.py echo --port 8099 --path /v2/bulkevents   # the echo baseline alone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/<name>.py`: make the project importable
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarize(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": percentile(ordered, 50), "p90": percentile(ordered, 90),
            "p99": percentile(ordered, 99), "max": ordered[-1] if ordered else float("nan"),
            "mean": statistics.fmean(ordered) if ordered else float("nan")}


def remove_database(path: Path) -> None:
    for companion in (path, Path(f"{path}.wal"), Path(f"{path}.master-key")):
        companion.unlink(missing_ok=True)


class ServerProcess:
    """A server started as a child process, its output going to a log file; stop() is a graceful SIGINT
    (uvicorn then runs the app's shutdown, which for idmesh closes the store cleanly)."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("w") as log_file:
            self.process = subprocess.Popen(command, cwd=cwd, env=env or dict(os.environ), stdout=log_file,
                                            stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 120.0, path: str = "/healthz") -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: {self.name} exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"bench: {self.name} at {self.url} not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that speaks just enough of the protocol to POST pre-built bodies and
    read Content-Length answers. httpx measured at 170-250 requests/s with 16 connections on 210 KB bodies, its
    CPU well below a core, where wrk reached 1,000 against the same echo server: for large bodies the client
    would have been the bottleneck, so the load generator writes the bytes itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer, f"{host}:{port}")

    def head(self, method: str, path: str, headers: dict[str, str], length: int) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {length}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        self.writer.writelines((self.head("POST", path, headers, len(body)), body))
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                raise RuntimeError("chunked answers are not supported by this benchmark client")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def echo_command(port: int, paths: Sequence[str]) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "echo", "--port", str(port)]
    for path in paths:
        command += ["--path", path]
    return command


def serve_echo(port: int, paths: Sequence[str]) -> None:
    """The HTTP ceiling: the thinnest FastAPI POST route on the same uvicorn stack as idmesh (uvloop +
    httptools), reading the whole body and answering a small JSON object."""
    import uvicorn
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    app = FastAPI()

    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(b'{"received":%d}' % len(body), media_type="application/json")

    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    # Postponed annotations are strings that FastAPI would resolve in this module's globals, where these
    # locally imported classes are not: hand it the classes.
    echo.__annotations__ = {"request": Request, "return": Response}
    healthz.__annotations__ = {"return": Response}
    for path in paths:
        app.add_api_route(path, echo, methods=["POST"])
    app.add_api_route("/healthz", healthz, methods=["GET"])
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning", loop="uvloop",
                http="httptools")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser("echo", help="serve the bare FastAPI echo baseline")
    echo.add_argument("--port", type=int, required=True)
    echo.add_argument("--path", action="append", default=[], help="POST route(s) to answer (repeatable)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    serve_echo(args.port, args.path or ["/echo"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
