"""Serve an ASGI app with uvicorn on a loopback port, in a background thread of the test process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import uvicorn

from .faults import FaultInjector, FaultMiddleware, FaultPlan, FaultResponses, LoggedRequest, RequestLog


class FakeServer:
    """`FakeServer(app).start()` binds 127.0.0.1 (port 0: any free port), serves until `stop()`.

    The socket is bound here and handed to uvicorn, so the port is known before the server runs and no other process
    can take it in between. The event loop is asyncio's (not uvloop): connection-reset faults need its transports
    (see `fakes.faults.reset_connection`). `on_stop` callables run on the server's loop when it is asked to stop, so
    a fake can end the timeouts it is sleeping through instead of holding the shutdown up.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, on_stop: list[Callable[[], None]] | None = None
                 ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.on_stop = on_stop or []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, timeout: float = 20.0) -> FakeServer:
        if self._server is not None:
            raise RuntimeError("the server runs already")
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for sockets that say TCP,
        # and without it every answer waits ~40 ms for a delayed ACK (Nagle)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, loop="asyncio", http="httptools", lifespan="off", log_level="warning",
                                access_log=False, proxy_headers=False, server_header=False,
                                timeout_graceful_shutdown=2, backlog=1024)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"fake-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self._server = None
                raise RuntimeError(f"fake server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def _run(self, sock: socket.socket) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await self._server.serve(sockets=[sock])

        try:
            asyncio.run(serve())
        finally:
            sock.close()

    def stop(self, timeout: float = 20.0) -> None:
        if self._server is None:
            return
        if self._loop is not None:
            for callback in self.on_stop:
                self._loop.call_soon_threadsafe(callback)
        self._server.should_exit = True
        self._thread.join(timeout=timeout)
        self._server = None
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FakeDestination:
    """What both fakes share: fault injection in front of the app, the request log, start/stop on a loopback port.

    The ASGI app (`asgi`) can also be mounted in-process with `httpx.ASGITransport` (no sockets; reset faults then
    raise `ConnectionResetError` into the client instead of resetting a connection).
    """

    def __init__(self, app: Any, responses: FaultResponses, faults: FaultPlan | None, log_limit: int,
                 keep_bodies: bool) -> None:
        self.faults = FaultInjector(faults)
        self.log = RequestLog(log_limit, keep_bodies)
        self.asgi = FaultMiddleware(app, self.faults, self.log, responses)
        self._server: FakeServer | None = None
        self._port = 0

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake is not started")
        return self._server.base_url

    def start(self, port: int | None = None) -> Self:
        """Serve on 127.0.0.1; a restart keeps the previous port unless `port` says otherwise."""
        self.asgi.stopping = asyncio.Event()  # a fresh one per run: an event belongs to the loop that first waits
        self._server = FakeServer(self.asgi, port=self._port if port is None else port,
                                  on_stop=[self.asgi.stopping.set])
        self._server.start()
        self._port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def requests(self) -> list[LoggedRequest]:
        """The logged requests (the last `log_limit`), oldest first, faults included."""
        return self.log.entries()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
