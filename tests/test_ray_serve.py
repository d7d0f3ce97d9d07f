"""`chatterbox-accel serve --ray --replicas 2`: the real CLI starts a local Ray cluster, Serve's
proxy on 127.0.0.1 and two replicas (a 2-layer T3 on the session's random-weight checkpoint), torn
down at the end; the real `openai` client drives it through the proxy. One deployment for the
module: spread, voices across replicas, 429, and a replica killed through Ray's API."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("ray", reason="the Ray Serve tests need the ray extra: pip install '.[ray]'")
pytest.importorskip("fastapi", reason="the Ray Serve tests need the serve extra: pip install '.[serve]'")

from server_support import assert_pcm_close  # noqa: E402

MAX_BATCH, MAX_QUEUE = 2, 0   # two requests at once per replica's engine, a third gets 429
TOKENS = 8                     # speech tokens per request: the test needs audio, not length
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_server(ckpt_dir, tmp_path_factory):
    from chatterbox_accel.checkpoints import synthetic_voice
    from chatterbox_accel.server.launch import TEST_FACTORY, start_server

    server = start_server(ckpt_dir, tmp_path_factory.mktemp("ray"), factory=TEST_FACTORY, max_batch=MAX_BATCH,
                          max_queue=MAX_QUEUE, voices={"sample": synthetic_voice(2.0, seed=1).numpy()},
                          extra=["--ray", "--replicas", "2"], timeout=300)
    match = re.search(r"on Ray \(([^)]+)\)", server.log.read_text())
    assert match, server.log.read_text()[-2000:]
    server.gcs = match.group(1)
    try:
        yield server
    finally:
        server.stop()
        text = server.log.read_text()
        assert "stopped" in text[-4000:], f"the server did not shut down cleanly:\n{text[-3000:]}"


def _speak(url: str, text: str, *, voice="sample", seed=1, fmt="pcm", max_new_tokens=TOKENS):
    """One request through the real openai client; (replica, status, body bytes)."""
    import openai

    async def go():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        extra = {"seed": seed, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})}
        try:
            async with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice=voice, input=text, response_format=fmt, extra_body=extra) as r:
                return r.headers.get("x-replica"), r.status_code, await r.read()
        except openai.APIStatusError as exc:
            return exc.response.headers.get("x-replica"), exc.status_code, exc.response
    return go()


def _gather(*coros):
    async def run():
        return await asyncio.gather(*coros)
    return asyncio.run(run())


def _ray(gcs: str, code: str, **popen) -> subprocess.Popen:
    """A Ray driver attached to the server's cluster running `code` (Ray's API, not HTTP); it
    prints 'attached' once connected."""
    prelude = (f"import ray, json, sys\nray.init(address={gcs!r}, logging_level='ERROR', log_to_driver=False)\n"
               "from ray import serve\nprint('attached', flush=True)\n")
    env = dict(os.environ)
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token):  # a cluster with token auth: its token is here
        env.setdefault("RAY_AUTH_MODE", "token")
    # (forcing token mode where no token exists failed the driver: "Token authentication is enabled
    # but no authentication token was found", on a fresh machine whose local cluster has no auth)
    return subprocess.Popen([sys.executable, "-c", prelude + code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **popen)


def _ray_run(gcs: str, code: str) -> str:
    driver = _ray(gcs, code)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, err[-3000:]
    return out


def test_spread_over_both_replicas_with_a_voice_uploaded_through_one(ray_server, voice_wav):
    up = httpx.post(f"{ray_server.url}/v1/audio/voices", data={"name": "shared"},
                    files={"audio_sample": ("ref.wav", voice_wav.read_bytes(), "audio/wav")}, timeout=60)
    assert up.status_code == 200, up.text
    results = _gather(*[_speak(ray_server.url, "A shared voice.", voice="shared", seed=3) for _ in range(4)])
    assert [status for _, status, _ in results] == [200] * 4, results
    assert len({replica for replica, _, _ in results}) == 2, results  # spread; each response names its replica
    bodies = [body for _, _, body in results]
    for body in bodies[1:]:  # same weights, voice, seed: the same audio from either replica (within
        assert_pcm_close(body, bodies[0])  # rounding: requests decoded together share S3Gen's flow calls)
    pcm = np.frombuffer(bodies[0], "<i2")  # 16-bit mono at 24 kHz, as the single-process server's
    assert pcm.size > 0.2 * 24000 and np.abs(pcm).max() > 100
    gone = httpx.delete(f"{ray_server.url}/v1/audio/voices/shared", timeout=30)
    assert gone.status_code == 200, gone.text
    after = []  # until both replicas have answered (400s are quick: the router may pick one several times)
    while len({replica for replica, _, _ in after}) < 2 and len(after) < 24:
        after += _gather(*[_speak(ray_server.url, "Gone.", voice="shared") for _ in range(4)])
    assert {status for _, status, _ in after} == {400} and len({replica for replica, _, _ in after}) == 2, after
    assert "shared" not in {v["id"] for v in httpx.get(f"{ray_server.url}/v1/audio/voices").json()["voices"]}


def test_past_capacity_requests_are_refused_at_once(ray_server):
    # 2 replicas x (batch 2 + queue 0) = 4 in the replicas, Serve's queue as many again; 12 at once:
    # the rest get 429 with Retry-After at once (from Serve's queue, or a replica's engine on a
    # routing race). The admitted ones are dropped after 3 s (the replicas cancel their work).
    async def burst():
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=120) as http:
            async def one(i):
                body = {"model": "tts-1", "voice": "sample", "input": f"Busy number {i}.", "response_format": "pcm",
                        "max_new_tokens": TOKENS}
                async with http.stream("POST", "/v1/audio/speech", json=body) as r:
                    return r.status_code, r.headers.get("retry-after")
            tasks = [asyncio.create_task(one(i)) for i in range(12)]
            done, pending = await asyncio.wait(tasks, timeout=3)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return [task.result() for task in done], len(pending)
    from chatterbox_accel.server.ray_serve import _supports_backpressure_config

    answered, pending = asyncio.run(burst())
    statuses = sorted(status for status, _ in answered)
    # Serve's own refusal is 429 where it has backpressure_config (Ray >= 2.56, which needs
    # starlette >= 1.0: not installable beside chatterbox-tts 0.1.7's gradio), else its 503
    refused = {429} if _supports_backpressure_config() else {429, 503}
    assert set(statuses) <= {200} | refused and len([s for s in statuses if s != 200]) >= 2, statuses
    assert statuses.count(200) + pending >= 4, (statuses, pending)  # within capacity: admitted, not refused
    assert all(int(after) >= 1 for status, after in answered if status == 429), answered


def test_a_killed_replica_fails_its_stream_cleanly_and_comes_back(ray_server):
    import openai

    killer = _ray(ray_server.gcs, """
def replicas():
    return {a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if a['name'].startswith('SERVE_REPLICA')}
print(json.dumps(sorted(replicas())), flush=True)
victim = sys.stdin.readline().strip()
name = next(n for n in replicas() if n.endswith(victim))
ray.kill(ray.get_actor(name, namespace='serve'), no_restart=True)
print('killed', name, flush=True)
""", stdin=subprocess.PIPE)
    errors = (httpx.HTTPError, openai.APIError)
    if _has("httpx2"):  # newer openai SDKs ride on httpx2
        import httpx2

        errors += (httpx2.HTTPError,)
    try:
        assert killer.stdout.readline().strip() == "attached", killer.stderr.read()[-3000:]
        before = {name.rsplit("#", 1)[-1] for name in json.loads(killer.stdout.readline())}
        assert len(before) == 2, before
        client = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        long_text = " ".join(f"This is sentence number {i} of a long request." for i in range(40))
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            while True:  # the previous test's dropped requests may still hold slots for a step or two
                try:
                    r = stack.enter_context(client.audio.speech.with_streaming_response.create(
                        model="tts-1", voice="sample", input=long_text, response_format="pcm", extra_body={"seed": 1}))
                    break
                except openai.RateLimitError:
                    assert time.monotonic() - started < 60, "the replicas stayed full for a minute"
                    time.sleep(1)
            victim = r.headers["x-replica"]
            assert victim in before
            killer.stdin.write(victim + "\n")
            killer.stdin.flush()
            assert killer.stdout.readline().startswith("killed"), killer.stderr.read()[-3000:]
            with pytest.raises(errors):  # its stream ends in an error, never hangs
                for _ in r.iter_bytes():
                    pass
        assert time.monotonic() - started < 120
    finally:
        killer.kill()
    # meanwhile the other replica answers; Serve starts a new one in place of the dead one
    seen, statuses, deadline = set(), [], time.monotonic() + 180
    while time.monotonic() < deadline:
        replica, status, _ = _gather(_speak(ray_server.url, "Still here.", seed=2))[0]
        statuses.append(status)
        seen.add(replica)
        if seen - before - {None}:
            break
    assert statuses.count(200) >= len(statuses) - 1, statuses  # at most one routed to the dead replica
    assert victim not in seen
    assert seen - before - {None}, f"no new replica within 180 s (saw {seen})"
    for _ in range(60):  # the deployment is whole again
        states = _ray_run(ray_server.gcs, "d = serve.status().applications['chatterbox'].deployments['Chatterbox']\n"
                                          "print(json.dumps(dict(d.replica_states)))").splitlines()[-1]
        if '"RUNNING": 2' in states:
            break
        time.sleep(2)
    assert '"RUNNING": 2' in states, states


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- the deployment as configured (no cluster) --------------------------------------------------
def test_the_documented_config_file_builds_the_deployment_it_describes():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from chatterbox_accel.server import ray_serve

    path = __import__("pathlib").Path(__file__).resolve().parents[1] / "deploy" / "ray-serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text())) \
        if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "chatterbox_accel.server.ray_serve:app_builder"
    built = ray_serve.app_builder(app.args)
    dep = built._bound_deployment
    assert dep.name == ray_serve.DEPLOYMENT == app.deployments[0].name
    capacity = int(app.args["max_batch"]) + int(app.args["max_queue"])
    assert dep.max_ongoing_requests == capacity  # the router never hands a replica more than its engine admits
    assert dep.num_replicas == int(app.args["replicas"])
    assert dep.ray_actor_options["num_gpus"] == float(app.args["gpus_per_replica"])


def test_unknown_options_are_refused_before_anything_starts():
    from chatterbox_accel.server import ray_serve

    with pytest.raises(ValueError, match="unknown option.*max_batchh"):
        ray_serve.app_builder({"max_batchh": 4})
