"""Start `chatterbox-accel serve` as a child process on 127.0.0.1 and wait until it is ready
(for benchmarks, load tests and the test suite: the server as its users run it)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TINY_FACTORY = "chatterbox_accel.checkpoints:tiny_english_server_model"  # a 2-layer T3 on a full checkpoint
TEST_FACTORY = "chatterbox_accel.checkpoints:tiny_english_test_model"  # ... and a small S3Gen estimator (tests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    voices_dir: Path
    api_key: str | None = None
    client: object = None
    auth: dict = field(default_factory=dict)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(checkpoint, workdir: Path, *, factory: str | None = None, api_key: str | None = None,
                 max_batch: int = 8, max_queue: int = 32, voices: dict | None = None, extra=(),
                 timeout: float = 600) -> Server:
    """Start the server on a free port; `voices`: {name: 1-D float32 24 kHz samples} written to
    its --voices folder. Waits until /ready answers (or raises with the server's log)."""
    import httpx
    import soundfile as sf

    workdir = Path(workdir)
    voices_dir = workdir / "voices"
    voices_dir.mkdir(parents=True, exist_ok=True)
    for name, samples in (voices or {}).items():
        sf.write(voices_dir / f"{name}.wav", samples, 24000)
    port = free_port()
    cmd = [sys.executable, "-m", "chatterbox_accel.cli", "serve", "--checkpoint", str(checkpoint),
           "--port", str(port), "--voices", str(voices_dir), "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), *extra]
    if factory:
        cmd += ["--model-factory", factory]
    if api_key:
        cmd += ["--api-key", api_key]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CHATTERBOX_ACCEL_API_KEY", None)
    log = workdir / "server.log"
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            process.kill()
            raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    server = Server(url, process, log, voices_dir, api_key)
    server.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return server
