"""Run the HTTP front end with uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks),
always on an address the caller chose; port 0 takes a free port, which `ServerThread.port` then reports."""

from __future__ import annotations

import threading
import time

import uvicorn


class ServerThread:
    """`with ServerThread(app) as server: ... server.url ...`: uvicorn in a daemon thread, stopped on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.host, self.start_timeout = host, start_timeout
        self.thread = threading.Thread(target=self.server.run, name="http-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host} within {self.start_timeout}s")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
