"""`vptq serve` in a subprocess on a free loopback port, returned once /health answers: for the tests,
`bench/serve_load.py` and scripts that drive a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(source: str | Path, *options: str, log: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `vptq serve SOURCE --port P OPTIONS...`, its output in log; RuntimeError with
    the log's tail (the process killed) when it exits or /health does not answer within timeout seconds."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vptq_service.cli.main", "serve", str(source), "--port",
                                 str(port), *options], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
