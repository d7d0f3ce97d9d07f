"""The real server process for the tests: `chatterbox-accel serve` on 127.0.0.1 (server/launch.py)
on the session's random-weight checkpoint with a 2-layer T3, one reference voice, an API key."""
from __future__ import annotations

import httpx

from chatterbox_accel.server.launch import TEST_FACTORY, Server, start_server  # noqa: F401

API_KEY = "test-key"
MAX_BATCH, MAX_QUEUE = 2, 1


def start_test_server(checkpoint, workdir) -> Server:
    """HTTP and Wyoming in one process on one engine (as `serve --wyoming` runs)."""
    from chatterbox_accel.checkpoints import synthetic_voice
    from chatterbox_accel.server.launch import free_port

    wyoming_port = free_port()
    server = start_server(checkpoint, workdir, factory=TEST_FACTORY, api_key=API_KEY, max_batch=MAX_BATCH,
                          max_queue=MAX_QUEUE, voices={"sample": synthetic_voice(2.0, seed=1).numpy()}, timeout=300,
                          extra=["--wyoming", "--wyoming-uri", f"tcp://127.0.0.1:{wyoming_port}"])
    server.wyoming_port = wyoming_port
    return server


def metric(server: Server, name: str) -> float:
    """The value of a metric (summed over its labels) from /metrics."""
    total, found = 0.0, False
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"no metric {name}")
    return total


def assert_pcm_close(got: bytes, want: bytes) -> None:
    """16-bit PCM that is a request's alone audio: the same length, and each sample within
    1e-4 of the peak (+1 for int16 rounding). Requests decoded at the same time share S3Gen's
    flow calls, so their audio differs from alone by float32 rounding (docs/parity.md)."""
    import numpy as np

    a, b = np.frombuffer(got, "<i2").astype(np.int32), np.frombuffer(want, "<i2").astype(np.int32)
    assert a.shape == b.shape and b.size and np.abs(b).max() > 0, (a.shape, b.shape)
    diff = int(np.abs(a - b).max())
    assert diff <= 1 + 1e-4 * np.abs(b).max(), f"max |difference| {diff} of peak {np.abs(b).max()}"
