"""The real server process for tests and benchmarks: `chatterbox-accel serve` on 127.0.0.1 on a
random-weight checkpoint (a 2-layer T3 by default, through --model-factory), a free port, a
voices folder with one reference voice, an API key. Started once per test session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
MAX_BATCH, MAX_QUEUE = 2, 1
TINY_FACTORY = "chatterbox_accel.checkpoints:tiny_english_model"


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
    api_key: str | None = API_KEY
    client: object = None
    auth: dict = field(default_factory=dict)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(checkpoint, workdir: Path, *, factory: str | None = TINY_FACTORY, api_key: str | None = API_KEY,
                 max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE, extra=(), timeout: float = 300) -> Server:
    """Start `chatterbox-accel serve` and wait until /ready answers (or fail with its log)."""
    from chatterbox_accel.checkpoints import synthetic_voice
    import soundfile as sf

    voices = workdir / "voices"
    voices.mkdir(parents=True, exist_ok=True)
    sf.write(voices / "sample.wav", synthetic_voice(2.0, seed=1).numpy(), 24000)
    port = free_port()
    cmd = [sys.executable, "-m", "chatterbox_accel.cli", "serve", "--checkpoint", str(checkpoint),
           "--port", str(port), "--voices", str(voices), "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), *extra]
    if factory:
        cmd += ["--model-factory", factory]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CHATTERBOX_ACCEL_API_KEY", None)
    log = workdir / "server.log"
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
    server = Server(url, process, log, voices, api_key)
    server.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return server


def metric(server: Server, name: str) -> float:
    """The value of an unlabelled metric (or the sum over its labels) from /metrics."""
    total, found = 0.0, False
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"no metric {name}")
    return total
