"""Start ``miniinfer serve`` as a real subprocess on a free port (the server tests, the load benchmark).

    server = ServerProcess("--max-num-seqs", "8")
    ... requests to server.url ...
    server.stop()          # SIGTERM: a graceful shutdown
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, startup_timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"miniinfer-serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "miniinfer", "serve", "--port", str(self.port), "--device", "cpu", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start in {startup_timeout} s:\n{self.read_log()}")
            time.sleep(0.1)

    def read_log(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def engine_stats(self) -> dict:
        return httpx.get(self.url + "/debug/engine", timeout=5).json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Until no request is in flight and no KV block is held; returns the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine_stats()
            if stats["num_in_flight"] == 0 and stats["kv_blocks_used"] == 0 and stats["num_running"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not go idle in {timeout} s: {stats}")
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


class InProcessServer:
    """The HTTP server in a background thread of this process (a notebook, a test): the same app as
    ``miniinfer serve``, around an :class:`~miniinfer.LLM` you already have, with optional seams.

        with InProcessServer(llm, deliver=my_deliver, format_sse=my_format_sse) as server:
            httpx.post(server.url + "/v1/completions", json={...})
    """

    def __init__(self, llm, *, model_name: str = "shakespeare", bundled: bool = True, max_waiting: int = 256,
                 request_timeout: float | None = None, deliver=None, format_sse=None, admission=None):
        import threading

        import uvicorn

        from miniinfer.server.api import create_app
        from miniinfer.server.serve import build_state

        state = build_state(llm, model_name=model_name, bundled=bundled, max_waiting=max_waiting,
                            request_timeout=request_timeout)
        if deliver is not None:
            state.engine._deliver = deliver
        if admission is not None:
            state.engine._admission = admission
        if format_sse is not None:
            state.format_sse = format_sse
        self.state = state
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_config=None, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="miniinfer-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
