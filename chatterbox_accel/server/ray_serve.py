"""The speech server on Ray Serve: N replicas, each owning one model and one engine, behind
Serve's HTTP proxy (pip install 'chatterbox-accel[ray]').

Each replica builds exactly what `chatterbox-accel serve` builds (`run.build`: model, accelerate,
engine, the FastAPI app of app.py) and serves it as Serve's ASGI ingress, so the routes, errors,
streaming and voices are the single-process server's. Serve adds routing over the replicas,
replica restarts and health checks (`check_health` -> the engine's readiness); the T3 batching
is the engine's continuous batching, not `@serve.batch`.

    chatterbox-accel serve --ray --replicas 2 --gpus-per-replica 1 --voices /shared/voices
    serve run chatterbox_accel.server.ray_serve:app_builder checkpoint=DIR     # or a config file:
    serve deploy deploy/ray-serve.yaml                                         # docs/SCALING.md

Voices: every replica registers the files of one voices folder and re-reads it (a directory
scan) at each request, so a voice uploaded through any replica is usable on all, and a deleted
one is gone from all; on a cluster the folder must be a shared volume (NFS, a PVC).

Admission: `max_ongoing_requests` per replica is the engine's batch + queue, so Serve's router
never hands a replica more than its engine admits and spreads the load (a replica's engine says
429 only on a routing race); requests past every replica's capacity wait in Serve's queue,
bounded by `max_queued_requests` (one more round of every replica's capacity: Serve counts a
burst's requests there before it routes them, so a smaller bound would refuse requests that
replicas have room for), and past it Serve answers 429 with `Retry-After` (its
`backpressure_config`, Ray >= 2.56) or, on older Rays, 503. Beside chatterbox-tts 0.1.7 pip
resolves Ray 2.55 (2.56+ needs starlette >= 1.0, gradio 6.8 < 1.0): 503 there.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

DEPLOYMENT = "Chatterbox"
APP = "chatterbox"
GRACE_S = 30          # a stopping replica's in-flight requests get this long to finish
RETRY_AFTER_S = 1     # Serve's Retry-After when its own queue is full
# `serve` defaults, for `serve run ...:app_builder key=value` and config files
DEFAULTS = dict(model="english", language=None, checkpoint=None, device=None, option=[], voices=None,
                api_key=None, max_batch=8, max_queue=32, max_new_tokens=1000, timeout=300.0, no_accel=False,
                model_factory=None, replicas=1, gpus_per_replica=None, cpus_per_replica=None)

IGNORED = {"host", "port", "ray", "ray_address", "wyoming", "wyoming_uri", "no_http", "verbose", "command", "run"}

_replica: dict = {}    # this replica process's app and engine (one replica per Ray actor process)


def _require_ray():
    from ..cli import CliError

    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise CliError("--ray needs Ray Serve: pip install 'chatterbox-accel[ray]'") from None


def _supports_backpressure_config() -> bool:
    """Serve's 429 + Retry-After for its own queue (Ray >= 2.56); older Rays answer 503."""
    try:
        from ray.serve.config import BackpressureConfig  # noqa: F401
    except ImportError:
        return False
    return True


def _replica_app():
    """Serve's ingress builder, called in the replica after `Chatterbox.__init__`: its app."""
    return _replica["app"]


class Chatterbox:
    """One replica: the single-process server's model, engine and app (`run.build`), plus an
    `X-Replica` header on every response naming the replica that served it."""

    def __init__(self, config: dict):
        import torch
        from ray import serve

        from ..cli import _progress
        from .run import build

        sys.setswitchinterval(0.001)  # as `serve`: the event loop answers while the engine thread works
        args = argparse.Namespace(**{**DEFAULTS, **config})
        if args.api_key is None:  # as the CLI: from the environment (a runtime_env's env_vars)
            args.api_key = os.environ.get("CHATTERBOX_ACCEL_API_KEY")
        model, _, engine, app = build(args, show=False)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - built outside a replica
            replica = f"pid{os.getpid()}"

        @app.middleware("http")
        async def _name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers["X-Replica"] = replica
            return response

        self.engine, self.replica = engine, replica
        _replica.update(app=app, engine=engine)
        _progress(f"replica {replica}: {type(model).__name__} on {model.device}, {torch.get_num_threads()} torch "
                  f"thread(s), voices {', '.join(engine.voices.names())}")

    def check_health(self):
        """Serve's periodic health check: a replica whose engine died is restarted."""
        if not self.engine.ready():
            raise RuntimeError(f"the engine is not ready: {self.engine.error or 'closed'}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def deployment(config: dict):
    """The Serve deployment and its constructor argument for `config` (serve's arguments as a
    dict): replicas, GPUs/CPUs per replica, `max_ongoing_requests` from the engine's capacity."""
    from ray import serve

    config = {**DEFAULTS, **config}
    unknown = sorted(set(config) - set(DEFAULTS) - IGNORED)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    replica_config = {k: config[k] for k in DEFAULTS}
    actor_options = {"num_cpus": config["cpus_per_replica"] if config["cpus_per_replica"] is not None else 1}
    if config["gpus_per_replica"]:
        actor_options["num_gpus"] = config["gpus_per_replica"]
    capacity = config["max_batch"] + config["max_queue"]
    extra = {}
    if _supports_backpressure_config():
        extra["backpressure_config"] = {"status_code": 429, "retry_after_s": RETRY_AFTER_S}
    ingress = serve.ingress(_replica_app)(Chatterbox)
    dep = serve.deployment(
        ingress, name=DEPLOYMENT, num_replicas=config["replicas"], ray_actor_options=actor_options,
        max_ongoing_requests=capacity, max_queued_requests=capacity * config["replicas"],
        health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=GRACE_S, **extra)
    return dep, replica_config


def app_builder(args: dict):
    """For `serve run chatterbox_accel.server.ray_serve:app_builder checkpoint=DIR ...` and
    Serve config files (`import_path` + `args`): the application, options as `serve`'s flags
    with '_' for '-' (e.g. max_batch, gpus_per_replica); a config file's `deployments` entry
    for `Chatterbox` overrides replicas and resources."""
    config = dict(args or {})
    for key in ("max_batch", "max_queue", "max_new_tokens", "replicas"):
        if key in config:
            config[key] = int(config[key])
    for key in ("timeout", "gpus_per_replica", "cpus_per_replica"):
        if config.get(key) is not None:
            config[key] = float(config[key])
    if isinstance(config.get("option"), dict):
        config["option"] = list(config["option"].items())
    dep, replica_config = deployment(config)
    return dep.bind(replica_config)


def run(args) -> int:
    """`chatterbox-accel serve --ray`: start (or join, with --ray-address / $RAY_ADDRESS) a Ray
    cluster, deploy the replicas, serve on --host:--port until interrupted, then tear down."""
    import signal

    from ..cli import EXIT_OK, CliError, _progress

    _require_ray()
    if args.wyoming:
        raise CliError("--wyoming runs in the single-process server; serve Wyoming from one "
                       "`chatterbox-accel serve --wyoming` beside the Ray deployment")
    import ray
    from ray import serve

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # a local cluster, gone when this process ends (its own ports: see docs/SCALING.md)
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "request_timeout_s": args.timeout + 30})
        config = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
        config["voices"] = os.path.abspath(args.voices) if args.voices else None
        config["checkpoint"] = os.path.abspath(args.checkpoint) if args.checkpoint else None
        started = time.perf_counter()
        _progress(f"deploying {args.replicas} replica(s) on Ray ({ray.get_runtime_context().gcs_address})")
        dep, replica_config = deployment(config)
        serve.run(dep.bind(replica_config), name=APP, route_prefix="/", blocking=False)
        _progress(f"{args.replicas} replica(s) ready in {time.perf_counter() - started:.0f} s; listening on "
                  f"http://{args.host}:{args.port} (OpenAI API at /v1)"
                  + ("" if args.api_key else "; no API key required"))
        sys.stdout.flush()
        stop = {"now": False}

        def _stop(*_):
            stop["now"] = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    _progress("stopped")
    return EXIT_OK
