"""What the CLI tests share: `run_cli`, and real servers on loopback ports.

The CLI under test talks HTTP exactly as in production (kvctl.client.connect, httpx) to
real uvicorn servers started in a thread of the test process: the real controller app, the
real engine and monitor apps, or a small FastAPI app that plays a server kvctl meets in the
field (upstream LMCache's controller, a broken one) where the real one is not available.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from typer.testing import CliRunner

SEED_PROMPT = "Explain the significance of KV cache in language models."
SEED_IDS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
INSTANCE = "lmcache_default_instance"


def run_cli(*args: str, expected_exit_code: int = 0, input: str | None = None) -> Any:
    """Run `kvctl ARGS` in-process; on an unexpected exit code, fail showing its output."""
    from kvctl.cli import app

    r = CliRunner().invoke(app, list(args), input=input)
    if r.exit_code != expected_exit_code:
        pytest.fail(f"kvctl {' '.join(args)}: exit {r.exit_code}, expected "
                    f"{expected_exit_code}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n"
                    f"{r.stderr}\n--- exception ---\n{r.exception!r}", pytrace=False)
    return r


@contextmanager
def serve_app(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise AssertionError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
