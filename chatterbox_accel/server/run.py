"""`chatterbox-accel serve`: load a model, accelerate it, start one engine and the API on uvicorn."""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import time


def _require_serve_extra():
    from ..cli import CliError

    missing = [name for name in ("fastapi", "uvicorn", "av", "prometheus_client", "multipart")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise CliError(f"serve needs {', '.join(missing)}: pip install 'chatterbox-accel[serve]'")


def _factory(spec: str):
    from ..cli import CliError

    module, _, name = spec.partition(":")
    if not module or not name:
        raise CliError(f"--model-factory takes MODULE:FUNC, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"--model-factory {spec}: {exc}") from None


def _with_wyoming(app, engine, uri: str) -> None:
    """Start the Wyoming listener with the HTTP server's event loop, stop it with it."""
    from .wyoming import start_wyoming

    state = {}

    async def start():
        state["server"] = await start_wyoming(engine, uri)

    async def stop():
        if "server" in state:
            await state["server"].stop()

    app.router.on_startup.append(start)
    app.router.on_shutdown.append(stop)


async def _wyoming_only(engine, uri: str) -> None:
    from .wyoming import start_wyoming

    server = await start_wyoming(engine, uri)
    try:
        await asyncio.Event().wait()  # until interrupted
    finally:
        await server.stop()


def build(args, show: bool = True):
    """The model, its accelerate() report (None with --no-accel), the engine on it and the API on
    the engine, from `serve`'s arguments: the single-process server and every Ray Serve replica
    build theirs here."""
    from ..cli import CliError, _accelerate, _device, _load, _options, _progress
    from ..engine import Engine
    from .app import create_app

    options = _options(args.option)
    device = _device(args.device)
    if args.model_factory:
        make = _factory(args.model_factory)
        if show:
            _progress(f"building the model with {args.model_factory}({args.checkpoint!r}, {device!r})")
        model = make(args.checkpoint, device)
    else:
        model = _load(args.model, args.checkpoint, device)
    report = None if args.no_accel else _accelerate(model, options, show=False)
    try:
        engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue,
                        max_new_tokens=args.max_new_tokens)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        app = create_app(engine, voices_dir=args.voices, api_key=args.api_key, request_timeout=args.timeout,
                         max_new_tokens=args.max_new_tokens)
    except BaseException:
        engine.close()
        raise
    return model, report, engine, app


def check_args(args) -> None:
    """What `serve` refuses before loading anything."""
    from ..cli import CliError, _generate_kwargs, _options

    _require_serve_extra()
    _generate_kwargs(args, sampling=False)  # --language only with multilingual
    if args.no_http and not args.wyoming:
        raise CliError("--no-http leaves nothing to serve; add --wyoming")
    if args.wyoming and importlib.util.find_spec("wyoming") is None:
        raise CliError("--wyoming needs the wyoming package: pip install 'chatterbox-accel[serve]'")
    _options(args.option)
    ray_only = [flag for flag, value in (("--replicas", args.replicas != 1), ("--gpus-per-replica",
                args.gpus_per_replica is not None), ("--cpus-per-replica", args.cpus_per_replica is not None),
                ("--ray-address", args.ray_address is not None)) if value]
    if ray_only and not args.ray:
        raise CliError(f"{', '.join(ray_only)} applies to Ray Serve; add --ray (pip install 'chatterbox-accel[ray]')")
    if args.no_accel and args.option:
        raise CliError("--option has no effect with --no-accel; drop one of them")


def serve(args) -> int:
    from ..cli import EXIT_OK, _progress

    check_args(args)
    if getattr(args, "ray", False):
        from .ray_serve import run as run_ray

        return run_ray(args)
    # The engine's thread runs Python between torch calls; a 1 ms GIL switch interval (5 ms by
    # default) lets the event loop answer /health and stream bytes promptly while it works.
    sys.setswitchinterval(0.001)
    model, report, engine, app = build(args)

    import uvicorn

    try:
        accel = "not accelerated" if report is None else (
            f"accelerated: {', '.join(report.applied) or 'nothing applied'}")
        voices = ", ".join(engine.voices.names())
        _progress(f"serving {type(model).__name__} on {model.device} ({accel}); voices: {voices}")
        if not args.no_http:
            _progress(f"listening on http://{args.host}:{args.port} (OpenAI API at /v1, a page to try it at /)"
                      + ("" if args.api_key else "; no API key required"))
        if args.wyoming:
            _progress(f"Wyoming TTS on {args.wyoming_uri} (Home Assistant: add the Wyoming integration, "
                      "with this host and port)")
        started = time.perf_counter()
        if args.wyoming:
            _with_wyoming(app, engine, args.wyoming_uri)
        if args.no_http:
            asyncio.run(_wyoming_only(engine, args.wyoming_uri))
        else:
            config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
            uvicorn.Server(config).run()
        _progress(f"stopped after {time.perf_counter() - started:.0f} s")
    finally:
        engine.close()
    sys.stdout.flush()
    return EXIT_OK
