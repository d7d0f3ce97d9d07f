"""`chatterbox-accel`: speak, benchmark, check and make checkpoints from the command line.

    chatterbox-accel say "Hello there." -o hello.wav [--voice ref.wav] [--checkpoint DIR] [--no-accel]
    chatterbox-accel bench [--lengths 1,3] [--repeats 3] [--chart bench.png] [--json-only]
    chatterbox-accel check [--checkpoint DIR] [--option check_steps=16]
    chatterbox-accel make-checkpoint DIR [--stop-after 75] [--seed 0]

Each takes `--model english|multilingual|turbo` (make-checkpoint: `--family`); Multilingual
also `--language xx` (default en). Models load from the Hugging Face hub (chatterbox's own
`from_pretrained`) unless `--checkpoint DIR` names a local folder in the official layout.

Exit codes: 0 ok; 1 the output check failed (check, bench); 2 bad arguments, missing files or
an unsupported model; 3 the Hugging Face hub is unreachable (pass --checkpoint DIR instead).
Progress goes to stderr; stdout carries results only (bench: the table, then ONE JSON line last).
Arguments are validated before torch is imported, so mistakes fail in well under a second.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from .families import FAMILIES as FAMILY_TABLE, FAMILY_CLASSES

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_HUB = 0, 1, 2, 3
_RESULTS = sys.stdout  # where results go: main() keeps the real stdout here
FAMILIES = ("english", "multilingual", "turbo")
DEFAULT_CHART = "chatterbox_accel_bench.png"
HUB_HINT = ("pass --checkpoint DIR with a local copy of the weights, or write random weights "
            "(for speed tests) with `chatterbox-accel make-checkpoint DIR`")


class CliError(Exception):
    """A user-facing error: one line on stderr, then exit with `code` (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    global _RESULTS
    _RESULTS = sys.stdout
    try:
        # chatterbox prints progress of its own (PerthNet loading, "S3 Token -> Mel Inference...")
        # to stdout; stdout is for results only, so everything else goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            return args.run(args)
    except CliError as exc:
        print(f"chatterbox-accel {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("chatterbox-accel: interrupted", file=sys.stderr)
        return 130


# ---- argument types ---------------------------------------------------------------------------
def _option(text: str):
    """`KEY=VALUE` -> (key, value); values are JSON where they parse (16, 1e-3, [..]), else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (e.g. --option check_steps=16)")
    raw = raw.strip()
    if raw.lower() in ("true", "false"):
        return key.strip(), raw.lower() == "true"
    if raw.lower() in ("none", "null"):
        return key.strip(), None
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        return key.strip(), raw


def _lengths(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds like 1,3, got {text!r}") from None
    if not values or any(not (0 < v <= 40) for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be seconds in (0, 40] (1000 tokens max), got {text!r}")
    return values


def _number(minimum: float, strict: bool, kind=float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value
    return parse


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatterbox-accel", description="Speak, benchmark, check and make checkpoints for accelerated "
        "Chatterbox TTS. Exit codes: 0 ok, 1 output check failed, 2 bad arguments or files, 3 hub unreachable.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the accelerator does (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_say, _add_bench, _add_check, _add_make_checkpoint, _add_serve):
        add(sub)
    return parser


def _add_say(sub):
    say = sub.add_parser("say", help="speak TEXT into a WAV file")
    say.add_argument("text", metavar="TEXT")
    say.add_argument("-o", "--output", required=True, help="audio file to write (.wav, .flac, ...)")
    say.add_argument("--voice", help="reference audio of the voice to clone (default: the built-in voice)")
    say.add_argument("--no-accel", action="store_true", help="run chatterbox's original code")
    say.add_argument("--exaggeration", type=_number(0, False), help="default 0.5 (not for turbo)")
    say.add_argument("--cfg-weight", type=_number(0, False), help="default 0.5 (not for turbo)")
    say.add_argument("--temperature", type=_number(0, True), default=0.8)
    say.add_argument("--seed", type=_number(0, False, int), help="torch seed, for repeatable sampling")
    _add_model_args(say, cmd_say)


def _add_bench(sub):
    bench = sub.add_parser("bench", help="end-to-end generate(): original vs accelerated, side by side")
    bench.add_argument("--lengths", type=_lengths, default=[1.0, 3.0],
                       help="seconds of audio, e.g. 1,3 (default)")
    bench.add_argument("--repeats", type=_number(1, False, int), default=3, help="timed runs per path (3)")
    bench.add_argument("--warmup", type=_number(0, False, int), default=1, help="unrecorded runs per path (1)")
    bench.add_argument("--voice", help="reference audio: times voice conditioning too")
    chart = bench.add_mutually_exclusive_group()
    chart.add_argument("--chart", help=f"PNG chart to write (default: ./{DEFAULT_CHART})")
    chart.add_argument("--no-chart", action="store_true", help="write no chart")
    bench.add_argument("--json-only", action="store_true", help="print only the JSON line on stdout")
    _add_model_args(bench, cmd_bench, "checkpoint to time (default: random-weight ones, one per length, "
                    "written once to $CHATTERBOX_ACCEL_CACHE or ~/.cache/chatterbox_accel)")


def _add_check(sub):
    check = sub.add_parser("check", help="accelerate a model and print the report (exit 1 if the check fails)")
    _add_model_args(check, cmd_check)


def _add_make_checkpoint(sub):
    make = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official layout")
    make.add_argument("dir", metavar="DIR")
    make.add_argument("--family", choices=FAMILIES, default="english")
    make.add_argument("--seed", type=_number(0, False, int), default=0)
    make.add_argument("--stop-after", type=_number(1, False, int), default=75,
                      help="T3 stops after about N speech tokens (25 = 1 s of audio; default 75); "
                           "turbo: text + speech tokens, with the built-in voice")
    make.add_argument("--voice-seconds", type=_number(1, False), default=10.0,
                      help="length of the built-in voice (10, as chatterbox's; S3Gen re-reads it every call)")
    make.add_argument("--small", action="store_true", help="a small T3 (refused: from_local cannot load it)")
    make.add_argument("--overwrite", action="store_true", help="rewrite a checkpoint chatterbox-accel wrote")
    make.set_defaults(run=cmd_make_checkpoint)


def _add_serve(sub):
    serve = sub.add_parser("serve", help="an OpenAI-compatible speech server on 127.0.0.1 (pip install .[serve])")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_number(0, False, int), default=8000)
    serve.add_argument("--voices", metavar="DIR", help="reference audio / voice profiles to register; uploads "
                       "are kept here (default: a temporary folder)")
    serve.add_argument("--api-key", default=os.environ.get("CHATTERBOX_ACCEL_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $CHATTERBOX_ACCEL_API_KEY, else none)")
    serve.add_argument("--max-batch", type=_number(1, False, int), default=8, help="requests decoded at once (8)")
    serve.add_argument("--max-queue", type=_number(0, False, int), default=32,
                       help="requests waiting beyond them before 429 (32)")
    serve.add_argument("--max-new-tokens", type=_number(1, False, int), default=1000,
                       help="longest speech per text piece, in tokens (25 = 1 s; default 1000)")
    serve.add_argument("--timeout", type=_number(1, False), default=300.0, help="per-request deadline, s (300)")
    serve.add_argument("--no-accel", action="store_true", help="serve without accelerate() (the engine's own "
                       "batching still runs)")
    serve.add_argument("--wyoming", action="store_true", help="also serve Wyoming TTS (Home Assistant) on the "
                       "same engine")
    serve.add_argument("--wyoming-uri", default="tcp://127.0.0.1:10200", help="where Wyoming listens "
                       "(default tcp://127.0.0.1:10200)")
    serve.add_argument("--no-http", action="store_true", help="Wyoming only: no HTTP server (needs --wyoming)")
    serve.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas, one engine each "
                       "(pip install .[ray]; docs/SCALING.md)")
    serve.add_argument("--replicas", type=_number(1, False, int), default=1, help="with --ray: replicas (1)")
    serve.add_argument("--gpus-per-replica", type=_number(0, True), help="with --ray: GPUs each replica "
                       "reserves (e.g. 1, or 0.5 for two per GPU; default none)")
    serve.add_argument("--cpus-per-replica", type=_number(0, False), help="with --ray: CPUs each replica "
                       "reserves (default 1)")
    serve.add_argument("--ray-address", help="with --ray: join this Ray cluster (default $RAY_ADDRESS, else "
                       "start one on this machine)")
    serve.add_argument("--model-factory", metavar="MODULE:FUNC",
                       help="build the model with FUNC(checkpoint, device) instead of loading a checkpoint")
    _add_model_args(serve, cmd_serve, "local checkpoint folder (default: the official weights from the hub; "
                    "offline, write random weights with `chatterbox-accel make-checkpoint DIR` to try the API)")


def cmd_serve(args) -> int:
    from .server.run import serve

    return serve(args)


def _add_model_args(p, run, checkpoint_help="local checkpoint folder (default: the official weights "
                                             "from the Hugging Face hub)"):
    p.add_argument("--model", choices=FAMILIES, default="english", help="model family (default english)")
    p.add_argument("--language", help="language id for --model multilingual (default en)")
    p.add_argument("--checkpoint", metavar="DIR", help=checkpoint_help)
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), help="default: cuda, else mps, else cpu")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="accelerate() option, repeatable (e.g. --option check_steps=16)")
    p.set_defaults(run=run)


# ---- commands ---------------------------------------------------------------------------------
def cmd_say(args) -> int:
    if not args.text.strip():
        raise CliError("TEXT is empty; pass the words to speak")
    generate_kwargs = _generate_kwargs(args)
    out = _output_file(args.output)
    voice = _input_file(args.voice, "--voice") if args.voice else None
    if args.no_accel and args.option:
        raise CliError("--option has no effect with --no-accel; drop one of them")
    options = _options(args.option)
    device = _device(args.device)
    model = _load(args.model, args.checkpoint, device)
    if not args.no_accel:
        _accelerate(model, options)
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    _progress(f"generating speech for {len(args.text)} characters")
    start = time.perf_counter()
    wav = model.generate(args.text, audio_prompt_path=voice, temperature=args.temperature, **generate_kwargs)
    _write_audio(out, wav, model.sr)
    _progress(f"wrote {out} ({wav.shape[-1] / model.sr:.2f} s of audio at {model.sr} Hz) "
              f"in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def cmd_bench(args) -> int:
    from . import e2e

    generate_kwargs = _generate_kwargs(args, sampling=False)
    options = _options(args.option)
    voice = _input_file(args.voice, "--voice") if args.voice else None
    chart = _chart_path(args)
    device = _device(args.device)
    results = []
    model_class = FAMILY_CLASSES[args.model][1]
    for folder, lengths in _bench_plan(args.checkpoint, args.lengths, args.model, voice):
        model = _load(args.model, str(folder), device)
        for seconds in lengths:
            results.append(_bench_one(model, seconds, voice, options, args, generate_kwargs))
        del model
    bench = e2e.E2EBenchmark(results, device=device, options=options, memory=e2e.memory_method(device),
                             family=args.model, model_class=model_class)
    if not args.json_only:
        _result(bench.table())
    if chart is not None:
        e2e.write_chart(bench, chart)
        _progress(f"chart written to {chart.resolve()}")
    from .benchmark import json_line

    _result(json_line(bench.summary()))
    return EXIT_OK


def cmd_check(args) -> int:
    options = _options(args.option)
    if options.get("check") is False or options.get("t3") is False:
        raise CliError("check runs the output check of the T3 fast path; drop --option check=false / t3=false")
    _generate_kwargs(args, sampling=False)  # --language only with multilingual
    device = _device(args.device)
    model = _load(args.model, args.checkpoint, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a failed check: the report says it
        report = _accelerate(model, options, show=False)
    _result(str(report))
    return EXIT_OK if report.check is not None and report.check.passed else EXIT_CHECK_FAILED


def cmd_make_checkpoint(args) -> int:
    if args.small:
        raise CliError("--small is refused: chatterbox's ChatterboxTTS.from_local always builds the full-size "
                       "T3 (520M Llama), so a small checkpoint would not load; omit --small (or, in Python, "
                       "use chatterbox_accel.checkpoints.tiny_english_model for a 2-layer T3)")
    if args.family == "turbo" and args.voice_seconds < 5:
        raise CliError("--voice-seconds must be >= 5 for turbo (its prepare_conditionals refuses shorter voices)")
    folder = Path(args.dir).expanduser()
    settings = dict(seed=args.seed, stop_after=args.stop_after, voice_seconds=args.voice_seconds)
    described = ", ".join(f"{k}={v}" for k, v in settings.items())
    if _existing_checkpoint(folder, settings, args.overwrite, args.family) and not args.overwrite:
        _result(f"{folder} already holds this checkpoint ({described}); left as is")
        return EXIT_OK
    _progress(f"writing a random-weight {args.family} checkpoint to {folder} (about 3 GB; takes a minute)")
    _writer(args.family)(folder, overwrite=True, **settings)
    use = "" if args.family == "english" else f" --model {args.family}"
    _result(f"wrote a random-weight {args.family} checkpoint to {folder} ({described}); "
            f"use it with{use} --checkpoint {folder}")
    return EXIT_OK


# ---- helpers: validation ----------------------------------------------------------------------
def _generate_kwargs(args, sampling: bool = True) -> dict:
    """generate() options the family takes, from --language (and say's --exaggeration,
    --cfg-weight); an option the family does not take is an error."""
    kwargs = {}
    if args.model == "multilingual":
        from chatterbox.mtl_tts import SUPPORTED_LANGUAGES  # noqa: PLC0415 (light: no torch model)

        language = (args.language or "en").lower()
        if language not in SUPPORTED_LANGUAGES:
            raise CliError(f"--language {args.language!r} is not supported; use one of "
                           f"{', '.join(SUPPORTED_LANGUAGES)}")
        kwargs["language_id"] = language
    elif args.language is not None:
        raise CliError(f"--language applies only to --model multilingual; drop it for --model {args.model}")
    if sampling:
        for name in ("exaggeration", "cfg_weight"):
            value = getattr(args, name)
            if value is not None and args.model == "turbo":
                raise CliError(f"--{name.replace('_', '-')} does not apply to --model turbo (it has no CFG "
                               "or exaggeration); drop it")
            if args.model != "turbo":
                kwargs[name] = 0.5 if value is None else value
    return kwargs


def _options(pairs) -> dict:
    from .config import AccelConfig

    options = dict(pairs)
    try:
        AccelConfig.from_options(options)  # bad options fail before seconds of loading
    except ValueError as exc:
        raise CliError(f"--option: {exc}") from None
    return options


def _input_file(path: str, flag: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CliError(f"{flag} file {p} does not exist; pass the path to a WAV/FLAC/MP3 recording")
    return str(p)


def _output_file(path: str) -> Path:
    import soundfile

    out = Path(path).expanduser()
    if not out.parent.is_dir():
        raise CliError(f"output folder {out.parent} does not exist; create it or choose another -o path")
    if out.suffix.lstrip(".").upper() not in soundfile.available_formats():
        raise CliError(f"cannot write audio as {out.suffix or 'a file without extension'!r}: "
                       f"end -o with .wav or .flac ({out})")
    return out


def _chart_path(args) -> Path | None:
    if args.no_chart:
        return None
    chart = Path(args.chart or DEFAULT_CHART).expanduser()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if args.chart:
            raise CliError("--chart needs matplotlib: pip install matplotlib (or pass --no-chart)") from None
        _progress("matplotlib is not installed: no chart (pip install matplotlib to get one)")
        return None
    if not chart.parent.is_dir():
        raise CliError(f"chart folder {chart.parent} does not exist; create it or choose another --chart path")
    return chart


def _device(requested: str | None) -> str:
    import torch

    mps = torch.backends.mps.is_available()
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                       "use --device cpu or install a CUDA build of torch")
    if requested == "mps" and not mps:
        raise CliError("--device mps, but torch.backends.mps.is_available() is False; use --device cpu")
    return requested


def _checkpoint_folder(path: str, family: str = "english") -> Path:
    files, repo = _files_of(family), FAMILY_REPOS[family]
    folder = Path(path).expanduser()
    family_flag = "" if family == "english" else f" --family {family}"
    make = f"write random weights there with: chatterbox-accel make-checkpoint {folder}{family_flag}"
    if not folder.is_dir():
        raise CliError(f"checkpoint folder {folder} does not exist; pass a folder holding "
                       f"{', '.join(files)}, or {make}")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise CliError(f"checkpoint folder {folder} lacks {', '.join(missing)} (a {family} checkpoint); copy "
                       f"the official files there (huggingface.co/{repo}), or {make}")
    meta_family = _checkpoint_meta(folder).get("family")
    if meta_family and meta_family != family:
        raise CliError(f"checkpoint folder {folder} holds a {meta_family} checkpoint; pass --model {meta_family}")
    return folder


def _checkpoint_meta(folder: Path) -> dict:
    """What make-checkpoint recorded (chatterbox_accel.json); {} for a checkpoint it did not write."""
    try:
        return json.loads((folder / "chatterbox_accel.json").read_text())
    except (OSError, ValueError):
        return {}


def _existing_checkpoint(folder: Path, settings: dict, overwrite: bool, family: str = "english") -> bool:
    """True when `folder` already holds the checkpoint asked for; raise when it holds another one."""
    files = _files_of(family)
    present = [name for name in files if (folder / name).exists()]
    if not present:
        return False
    meta = _checkpoint_meta(folder)
    if not meta.get("random_weights"):
        raise CliError(f"{folder} holds checkpoint files ({', '.join(present)}) that chatterbox-accel did not "
                       "write (official weights?); refusing to overwrite them: choose an empty folder")
    held = {**meta, "voice_seconds": meta.get("voice_seconds", 10.0)}  # older ones: always 10 s
    held = {key: held.get(key) for key in settings}
    if len(present) == len(files) and held == settings and meta.get("family", "english") == family:
        return True
    if not overwrite:
        described = ", ".join(f"{k}={v}" for k, v in held.items())
        raise CliError(f"{folder} holds a random {meta.get('family', 'english')} checkpoint with {described} "
                       f"({len(present)}/{len(files)} files); pass --overwrite to rewrite it, or choose "
                       "another folder")
    return False


# ---- helpers: loading and running ---------------------------------------------------------------
FAMILY_REPOS = {name: FAMILY_TABLE[name].repo for name in FAMILIES}


def _files_of(family: str) -> tuple:
    from . import checkpoints

    return {"english": checkpoints.ENGLISH_FILES, "multilingual": checkpoints.MULTILINGUAL_FILES,
            "turbo": checkpoints.TURBO_FILES}[family]


def _writer(family: str):
    from . import checkpoints

    return {"english": checkpoints.write_english_checkpoint,
            "multilingual": checkpoints.write_multilingual_checkpoint,
            "turbo": checkpoints.write_turbo_checkpoint}[family]


def _load(family: str, checkpoint: str | None, device: str):
    """The family's model: `from_local(DIR)` with --checkpoint, else as chatterbox's own
    `from_pretrained` gets it (English: its files, via the hub cache)."""
    import importlib

    module, name = FAMILY_CLASSES[family]
    if family == "english" and not checkpoint:
        return _load_english(None, device)
    if not checkpoint:
        return _from_pretrained(family, device)
    folder = _checkpoint_folder(checkpoint, family)
    if family == "english":
        return _load_english(str(folder), device)
    cls = getattr(importlib.import_module(module), name)
    return _timed_load(f"the {family} model", folder, device, lambda: _from_local(cls, family, folder, device))


def _from_local(cls, family: str, folder: Path, device: str):
    if family != "multilingual":
        return cls.from_local(folder, device)
    try:
        return cls.from_local(folder, device)
    except Exception as exc:  # its tokenizer builds spacy_pkuseg's segmenter, which downloads a model
        if "pkuseg" not in _traceback_text(exc):
            raise
        from .families import pkuseg_unavailable

        _progress(f"spacy_pkuseg could not load its model ({type(exc).__name__}); Chinese word "
                  "segmentation is off for this run (other languages are unaffected)")
        with pkuseg_unavailable():
            return cls.from_local(folder, device)


def _traceback_text(exc) -> str:
    import traceback

    return "".join(traceback.format_exception(exc))


def _from_pretrained(family: str, device: str):
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    module, name = FAMILY_CLASSES[family]
    cls = getattr(importlib.import_module(module), name)
    _progress(f"fetching {FAMILY_REPOS[family]} ({name}) from the Hugging Face hub (or its local cache)")
    try:
        return cls.from_pretrained(device)
    except (OSError, HfHubHTTPError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"cannot get {FAMILY_REPOS[family]} from the Hugging Face hub ({type(exc).__name__}: "
                       f"{reason}); {HUB_HINT.replace('DIR`', f'DIR --family {family}`')}", EXIT_HUB) from None


def _timed_load(what: str, folder: Path, device: str, load):
    meta = _checkpoint_meta(folder)
    kind = " (random weights: the audio is noise-like)" if meta.get("random_weights") else ""
    _progress(f"loading {what} from {folder} on {device}{kind}")
    start = time.perf_counter()
    model = load()
    _progress(f"loaded in {time.perf_counter() - start:.1f} s")
    return model


def _load_english(checkpoint: str | None, device: str):
    folder = _checkpoint_folder(checkpoint) if checkpoint else _download_english()
    from chatterbox.tts import ChatterboxTTS

    return _timed_load("the English model", folder, device, lambda: ChatterboxTTS.from_local(folder, device))


def _download_english() -> Path:
    """The official files, from the local hub cache or the hub (as ChatterboxTTS.from_pretrained)."""
    from huggingface_hub.errors import HfHubHTTPError

    from .checkpoints import HUB_REPO, download_english

    _progress(f"fetching {HUB_REPO} from the Hugging Face hub (or its local cache)")
    try:
        return download_english()
    except (OSError, HfHubHTTPError) as exc:  # offline / unreachable: LocalEntryNotFoundError (an OSError)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"cannot get {HUB_REPO} from the Hugging Face hub ({type(exc).__name__}: {reason}); "
                       f"{HUB_HINT}", EXIT_HUB) from None


def _accelerate(model, options: dict, show: bool = True):
    from .api import accelerate

    _progress("accelerating (patch + output check)")
    try:
        report = accelerate(model, **options)
    except ValueError as exc:  # e.g. dtype=bfloat16 on a CPU: known only once the device is
        raise CliError(f"--option: {exc}") from None
    if show:
        _progress(str(report))
    return report


def _bench_plan(checkpoint: str | None, lengths: list, family: str = "english", voice=None) -> list:
    """[(folder, [seconds, ...])]: one random checkpoint per length (stop_after is baked into
    it), or every length on the given checkpoint (its text sets a trained model's length)."""
    from .e2e import stop_after_for

    if checkpoint:
        folder = _checkpoint_folder(checkpoint, family)
        meta = _checkpoint_meta(folder)
        stop = meta.get("stop_after")
        if meta.get("random_weights") and stop is None:
            raise CliError(f"{folder} has random weights and no stop_after: its T3 never stops, every run "
                           "would decode 1000 tokens; write one with: chatterbox-accel make-checkpoint DIR "
                           "--stop-after 25")
        if stop:
            _progress(f"note: {folder} stops after ~{stop} tokens (~{stop / 25:g} s of audio) whatever "
                      "the --lengths; they only set the text")
        return [(folder, lengths)]
    plan = []
    for seconds in lengths:
        stop, extra = stop_after_for(seconds), {}
        if family == "turbo":  # GPT-2 stops at an absolute position: text + speech after the voice prompt
            stop += _turbo_text_tokens(seconds)
            extra["prompt_tokens"] = _turbo_prompt_tokens(voice)
        prompt = extra.get("prompt_tokens", 375)
        folder = _cache_dir() / (f"{family}-stop{stop}" + (f"-prompt{prompt}" if prompt != 375 else ""))
        if not _existing_random(folder, family):
            _progress(f"writing a random-weight {family} checkpoint for {seconds:g} s (stop_after={stop}) to "
                      f"{folder} (about 3 GB, once; reused next time)")
        _writer(family)(folder, stop_after=stop, **extra)  # a no-op when written with these settings
        plan.append((folder, [seconds]))
    return plan


def _existing_random(folder: Path, family: str) -> bool:
    return all((folder / name).is_file() for name in _files_of(family)) and bool(_checkpoint_meta(folder))


def _turbo_text_tokens(seconds: float) -> int:
    """Text tokens Turbo's T3 reads for the benchmark text of `seconds` (the random checkpoint's
    tokenizer is built offline, the same every time)."""
    import tempfile

    from chatterbox.tts_turbo import punc_norm
    from transformers import AutoTokenizer

    from .checkpoints import write_turbo_tokenizer
    from .e2e import text_for_seconds

    with tempfile.TemporaryDirectory() as tmp:
        write_turbo_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    return len(tokenizer(punc_norm(text_for_seconds(seconds))).input_ids)


def _turbo_prompt_tokens(voice) -> int:
    """Voice-prompt tokens Turbo's T3 gets: 375 with the built-in voice, else 25 per second of
    the reference, at most 375."""
    if voice is None:
        return 375
    import soundfile

    return min(375, int(25 * soundfile.info(voice).duration))


def _bench_one(model, seconds: float, voice, options: dict, args, generate_kwargs=None):
    from tqdm import tqdm

    from .api import OutputCheckError
    from .e2e import bench_generate, text_for_seconds

    # One tick per finished generate(); TQDM_DISABLE=1 turns the bar off.
    with tqdm(total=2 * (args.repeats + args.warmup), desc=f"bench {seconds:g} s", unit="run",
              file=sys.stderr) as bar:
        def tick(message):
            bar.set_postfix_str(message)
            bar.update(1)

        try:
            return bench_generate(model, text_for_seconds(seconds), voice=voice, repeats=args.repeats,
                                  warmup=args.warmup, options=options, label=f"{seconds:g} s",
                                  target_s=seconds, progress=tick, **(generate_kwargs or {}))
        except OutputCheckError as exc:
            raise CliError(f"output check failed, nothing to benchmark: {exc}", EXIT_CHECK_FAILED) from None


def _cache_dir() -> Path:
    return Path(os.environ.get("CHATTERBOX_ACCEL_CACHE") or "~/.cache/chatterbox_accel").expanduser()


def _random_english(stop_after: int, voice_seconds: float) -> Path:
    """A random-weight English checkpoint in the cache, written once (the demo's and the server
    benchmarks'): T3 stops after ~stop_after tokens; a voice_seconds built-in voice."""
    from .checkpoints import write_english_checkpoint

    folder = _cache_dir() / f"english-stop{stop_after}-voice{voice_seconds:g}"
    write_english_checkpoint(folder, stop_after=stop_after, voice_seconds=voice_seconds)  # no-op when there
    return folder


def _write_audio(path: Path, wav, sr: int) -> None:
    import soundfile

    soundfile.write(str(path), wav.squeeze(0).detach().cpu().float().numpy(), sr)


def _result(text: str) -> None:
    print(text, file=_RESULTS, flush=True)


def _progress(message: str) -> None:
    print(f"chatterbox-accel: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    # `python -m chatterbox_accel.cli`: run the package's module, not this __main__ copy, so the
    # CliError that server/ modules import from it is the one main() catches
    from chatterbox_accel.cli import main as _main

    sys.exit(_main())
