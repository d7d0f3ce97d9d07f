"""The `chatterbox-accel` command line, driven in subprocesses, and the end-to-end benchmark.

The subprocesses run the INSTALLED package (cwd is a temporary folder): after editing the
package, `pip install /work/main` first. The heavy runs (bench, say, check) use the session's
full-size random checkpoint, which stops after ~STOP_AFTER speech tokens.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import wrapt

from conftest import STOP_AFTER

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli_environ(tmp_path) -> dict:
    """The environment every CLI run here gets: none of the caller's CHATTERBOX_ACCEL* settings,
    the hub offline, no progress bars, a voice cache of its own."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHATTERBOX_ACCEL")}
    environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", CHATTERBOX_ACCEL_CACHE=str(tmp_path / "cache"))
    return environ


def cli(tmp_path, *args, env=None, prefix=("-m", "chatterbox_accel.cli"), timeout=900):
    environ = {**cli_environ(tmp_path), **(env or {})}
    return subprocess.run([sys.executable, *prefix, *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env=environ, timeout=timeout)


def failed(proc) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"


# ---- the heavy runs: one of each ----------------------------------------------------------------
def test_bench_prints_table_then_one_json_line_and_writes_the_chart(tmp_path, ckpt_dir, preloaded, capsys,
                                                                   monkeypatch):
    """In process, on the preloaded model (the entry point itself runs as a subprocess in the
    bad-argument tests below; upstream's loading in the drop-in and family tests)."""
    from chatterbox_accel.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    rc = main(["bench", "--checkpoint", str(ckpt_dir), "--lengths", "0.5", "--repeats", "1",
               "--warmup", "0", "--option", "check_steps=4"])
    captured = capsys.readouterr()
    proc = types.SimpleNamespace(stdout=captured.out, stderr=captured.err)
    assert rc == 0, captured.err[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])  # the JSON line comes LAST
    table = "\n".join(lines[:-1])
    assert "original" in table and "accelerated" in table and "RTF" in table, table
    assert summary["benchmark"] == "e2e_generate" and summary["device"] == "cpu"
    assert summary["hardware"] and summary["torch"] and summary["chatterbox-tts"] == "0.1.7"
    assert "output check passed" in summary["check"] and "t3.static_kv_cache" in summary["applied"]
    (result,) = summary["results"]
    assert result["target_s"] == 0.5 and result["runs"] == 1 and result["t3_fallback_calls"] == 0
    # The original path ran chatterbox's own code; the accelerated one the patched T3.
    assert result["patched_stages"]["original"] == [] and "t3" in result["patched_stages"]["accelerated"]
    for path in ("original", "accelerated"):
        m = result[path]
        stages = m["conditioning"] + m["t3"] + m["s3gen"] + m["watermark"]
        assert m["t3"] > 0 and m["s3gen"] > 0 and m["conditioning"] == 0  # built-in voice
        assert stages <= m["total_s"] * 1.001, m
        assert m["audio_s"] > 0 and m["rtf"] == pytest.approx(m["total_s"] / m["audio_s"], rel=1e-2)
        assert abs(m["speech_tokens"] - STOP_AFTER) <= 3, m  # the checkpoint's stop_after held
        assert m["peak_mem_mb"] > 2000 and m["mem_growth_mb"] >= 0, m  # 3 GB of weights are resident
    assert result["speedup"] == pytest.approx(result["original"]["total_s"] / result["accelerated"]["total_s"],
                                              rel=1e-2)
    chart = tmp_path / "chatterbox_accel_bench.png"  # the default: in the working directory
    assert str(chart) in proc.stderr
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(chart) as image:
        image.load()
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_bench_takes_the_other_families(tmp_path, turbo_ckpt, capsys, monkeypatch):
    """--model turbo: its own class, its own T3 method (inference_turbo) timed and patched.
    In process (the subprocess path is the English bench's test above)."""
    from chatterbox_accel.cli import main

    monkeypatch.setenv("TQDM_DISABLE", "1")
    rc = main(["bench", "--model", "turbo", "--checkpoint", str(turbo_ckpt), "--lengths", "0.5",
               "--repeats", "1", "--warmup", "0", "--no-chart", "--option", "check_steps=4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert "ChatterboxTurboTTS.generate()" in lines[0] and summary["model"] == "turbo"
    assert "output check passed" in summary["check"] and "t3.static_kv_cache" in summary["applied"]
    (result,) = summary["results"]
    assert result["patched_stages"]["original"] == [] and "t3" in result["patched_stages"]["accelerated"]
    for path in ("original", "accelerated"):
        assert result[path]["t3"] > 0 and result[path]["s3gen"] > 0 and result[path]["speech_tokens"] > 0


@pytest.mark.parametrize("argv,expected", [
    (["say", "hi", "-o", "x.wav"], {"exaggeration": 0.5, "cfg_weight": 0.5}),
    (["say", "hi", "-o", "x.wav", "--model", "multilingual", "--language", "FR", "--cfg-weight", "0.3"],
     {"language_id": "fr", "exaggeration": 0.5, "cfg_weight": 0.3}),
    (["say", "hi", "-o", "x.wav", "--model", "turbo"], {}),
])
def test_generate_options_follow_the_family(argv, expected):
    from chatterbox_accel.cli import _generate_kwargs, build_parser

    assert _generate_kwargs(build_parser().parse_args(argv)) == expected


@pytest.fixture(scope="module")
def loaded(ckpt_dir):
    """The test checkpoint's ChatterboxTTS, loaded once for the in-process bench/say/check tests
    (upstream's `from_local`, which the CLI's loader calls, runs in the drop-in and family tests)."""
    from chatterbox.tts import ChatterboxTTS

    from chatterbox_accel import restore

    model = ChatterboxTTS.from_local(ckpt_dir, "cpu")
    yield model
    restore(model)


@pytest.fixture
def preloaded(loaded, ckpt_dir, monkeypatch):
    from chatterbox_accel import cli as cli_module

    def load(checkpoint, device):
        assert Path(checkpoint) == Path(ckpt_dir) and device == "cpu"
        return loaded

    monkeypatch.setattr(cli_module, "_load_english", load)
    return loaded


def test_say_writes_a_wav_with_the_accelerated_model(tmp_path, ckpt_dir, preloaded, capsys):
    """In process, on the preloaded model."""
    import soundfile

    from chatterbox_accel.cli import main

    rc = main(["say", "Hello there.", "-o", str(tmp_path / "hello.wav"), "--checkpoint", str(ckpt_dir),
               "--seed", "0", "--option", "check_steps=4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "output check passed" in captured.err and "wrote" in captured.err and captured.out == ""
    wav, sr = soundfile.read(tmp_path / "hello.wav")
    assert sr == 24000 and wav.ndim == 1
    assert 0.2 < len(wav) / sr < 2.0  # ~STOP_AFTER tokens at 25 per second
    assert abs(wav).max() > 0 and not (wav != wav).any()


def test_check_prints_the_report_and_exits_0(ckpt_dir, preloaded, capsys):
    from chatterbox_accel.cli import main

    rc = main(["check", "--checkpoint", str(ckpt_dir), "--option", "check_steps=4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "applied   t3.static_kv_cache" in out and "output check passed" in out
    assert out.strip().splitlines()[0].startswith("chatterbox_accel on cpu")  # results only on stdout


def test_check_exits_1_when_the_output_check_fails(monkeypatch, capsys):
    from chatterbox_accel import cli as cli_module
    from chatterbox_accel.checkpoints import tiny_t3

    model = types.SimpleNamespace(t3=tiny_t3(seed=0, layers=2), conds=None)
    monkeypatch.setattr(cli_module, "_load_english", lambda checkpoint, device: model)
    rc = cli_module.main(["check", "--device", "cpu", "--option", "check_steps=4",
                          "--option", "check_tolerance=1e-15"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "output check FAILED" in out and "restored" in out
    assert "inference" not in model.t3.__dict__  # every patch was reverted


# ---- make-checkpoint ----------------------------------------------------------------------------
def test_make_checkpoint_writes_what_it_is_asked(monkeypatch, tmp_path, capsys):
    import chatterbox_accel.checkpoints as checkpoints
    from chatterbox_accel.cli import main

    calls = []
    monkeypatch.setattr(checkpoints, "write_english_checkpoint",
                        lambda folder, **kw: calls.append((folder, kw)))
    assert main(["make-checkpoint", str(tmp_path / "new"), "--seed", "3", "--stop-after", "30"]) == 0
    assert calls == [(tmp_path / "new", dict(seed=3, overwrite=True, stop_after=30, voice_seconds=10.0))]
    assert "--checkpoint" in capsys.readouterr().out


def test_make_checkpoint_keeps_an_identical_checkpoint_and_refuses_a_different_one(tmp_path, ckpt_dir):
    voice = json.loads((ckpt_dir / "chatterbox_accel.json").read_text())["voice_seconds"]
    same = cli(tmp_path, "make-checkpoint", ckpt_dir, "--stop-after", STOP_AFTER, "--voice-seconds", voice)
    assert same.returncode == 0 and "already holds" in same.stdout, failed(same)
    for args in (["--stop-after", STOP_AFTER + 1, "--voice-seconds", voice],
                 ["--stop-after", STOP_AFTER, "--voice-seconds", voice + 1]):
        other = cli(tmp_path, "make-checkpoint", ckpt_dir, *args)
        assert other.returncode == 2 and "--overwrite" in other.stderr, failed(other)


def test_make_checkpoint_never_overwrites_files_it_did_not_write(tmp_path):
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "t3_cfg.safetensors").write_bytes(b"not ours")
    proc = cli(tmp_path, "make-checkpoint", "official", "--overwrite")
    assert proc.returncode == 2 and "did not write" in proc.stderr, failed(proc)
    assert (tmp_path / "official" / "t3_cfg.safetensors").read_bytes() == b"not ours"


# ---- errors: one line, the fix in it, the right exit code, no traceback ---------------------------
@pytest.mark.parametrize("args,match", [
    ([], "required: COMMAND"),
    (["say", "hi"], "required: -o/--output"),
    (["say", "hi", "-o", "x.wav", "--model", "turbo", "--cfg-weight", "0.3"],
     "--cfg-weight does not apply to --model turbo"),
    (["say", "hi", "-o", "x.wav", "--model", "multilingual", "--language", "xx"],
     "--language 'xx' is not supported; use one of ar, da"),
    (["say", "hi", "-o", "x.wav", "--language", "fr"], "--language applies only to --model multilingual"),
    (["bench", "--model", "turbo", "--checkpoint", "partial"],
     "partial lacks t3_turbo_v1.safetensors.*a turbo checkpoint.*make-checkpoint partial --family turbo"),
    (["say", "hi", "-o", "x.wav", "--voice", "missing.wav"], "--voice file missing.wav does not exist"),
    (["say", "hi", "-o", "nodir/x.wav"], "output folder nodir does not exist"),
    (["say", "hi", "-o", "x.mp9"], "end -o with .wav"),
    (["say", "hi", "-o", "x.wav", "--temperature", "0"], "--temperature: must be > 0"),
    (["say", "hi", "-o", "x.wav", "--checkpoint", "nowhere"],
     "checkpoint folder nowhere does not exist.*make-checkpoint nowhere"),
    (["say", "hi", "-o", "x.wav", "--checkpoint", "partial"],
     "checkpoint folder partial lacks t3_cfg.safetensors, s3gen.safetensors, tokenizer.json, conds.pt"),
    (["bench", "--lengths", "abc"], "--lengths: expected comma-separated seconds"),
    (["bench", "--lengths", "0,1"], "lengths must be seconds in"),
    (["bench", "--repeats", "0"], "--repeats: must be >= 1"),
    (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["check", "--option", "turbo=1"], r"unknown option\(s\) \['turbo'\]"),
    (["check", "--option", "check_steps"], "expected KEY=VALUE"),
    (["check", "--option", "check=false"], "drop --option check=false"),
    (["make-checkpoint", "small", "--small"], "--small is refused.*from_local"),
    (["make-checkpoint", "ml", "--family", "turbo", "--voice-seconds", "3"], "must be >= 5 for turbo"),
    (["serve", "--replicas", "2"], "--replicas applies to Ray Serve; add --ray"),
    (["serve", "--ray", "--wyoming"], "--wyoming runs in the single-process server"),
])
def test_bad_arguments_exit_2_with_the_fix_in_the_message(tmp_path, args, match, capsys, monkeypatch):
    """In process (`main(argv)`, as the console script calls it): an interpreter per case cost
    ~2.5 s each; the subprocess entry point is the unreachable-hub and chart tests' below."""
    import re

    from chatterbox_accel.cli import main

    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "ve.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    environ = cli_environ(tmp_path)
    for name in set(os.environ) - set(environ):
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert re.search(match, err), err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "small").exists() and not (tmp_path / "ml").exists()


@pytest.mark.parametrize("command", [["say", "Hello.", "-o", "out.wav"], ["check"]])
def test_unreachable_hub_exits_3_with_the_checkpoint_hint(tmp_path, command):
    # No retry loop against the hub: cli()'s 120 s timeout fails the test if it hangs.
    proc = cli(tmp_path, *command, env={"HF_HOME": str(tmp_path / "empty-hf-home")}, timeout=120)
    assert proc.returncode == 3, failed(proc)
    assert "--checkpoint DIR" in proc.stderr and "make-checkpoint DIR" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.wav").exists()


def test_chart_without_matplotlib_is_a_clear_error_before_any_work(tmp_path):
    block = ("import sys; sys.modules['matplotlib'] = None; from chatterbox_accel.cli import main; "
             "sys.exit(main(sys.argv[1:]))")
    proc = cli(tmp_path, "bench", "--chart", "c.png", prefix=("-c", block), timeout=120)
    assert proc.returncode == 2 and "pip install matplotlib" in proc.stderr, failed(proc)


def test_hub_repo_matches_chatterbox():
    from chatterbox.tts import REPO_ID

    from chatterbox_accel.checkpoints import ENGLISH_FILES, HUB_REPO

    assert HUB_REPO == REPO_ID and len(ENGLISH_FILES) == 5


# ---- e2e building blocks, in process ------------------------------------------------------------
def fake_result(label, original_total, accelerated_total):
    from chatterbox_accel.e2e import E2EResult, Run

    def run(total, t3):
        stages = {"conditioning": 0.0, "t3": t3, "s3gen": total - t3 - 0.1, "watermark": 0.1}
        return Run(stages=stages, total_s=total, audio_s=2.0, speech_tokens=50, peak_mem_mb=10.0)

    return E2EResult(label=label, text="Hi.", check="output check passed",
                     original=[run(original_total, 3), run(original_total + 2, 5)],
                     accelerated=[run(accelerated_total, 1), run(accelerated_total, 1)])


def test_results_report_medians_rtf_and_speedup(tmp_path):
    from chatterbox_accel.e2e import E2EBenchmark, write_chart

    bench = E2EBenchmark([fake_result("1 s", 6.0, 2.0), fake_result("3 s", 12.0, 4.0)], device="cpu")
    first = bench.results[0]
    assert first.medians("original")["total_s"] == 7.0 and first.medians("original")["t3"] == 4.0
    assert first.medians("accelerated")["rtf"] == 1.0 and first.speedup() == 3.5
    summary = json.loads(json.dumps(bench.summary()))
    assert [r["label"] for r in summary["results"]] == ["1 s", "3 s"]
    assert summary["results"][1]["speedup"] == 3.25  # 13 s / 4 s: medians of (12, 14) and (4, 4)
    assert "hardware" in summary and "torch" in summary
    table = bench.table()
    assert "3.50x" in table and table.count("accelerated") >= 2
    chart = write_chart(bench, tmp_path / "c.png")
    assert chart.read_bytes()[:8] == PNG_SIGNATURE


def test_write_chart_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    from chatterbox_accel.e2e import write_chart

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        write_chart([fake_result("1 s", 6.0, 2.0)], tmp_path / "c.png")


def test_original_runs_lift_every_patch_and_put_it_back(tiny_t3):
    from chatterbox_accel import accelerate, restore
    from chatterbox_accel.e2e import lifted_patches

    model = types.SimpleNamespace(t3=tiny_t3, conds=None)
    accelerate(model, check_steps=4)
    patched = tiny_t3.__dict__["inference"]
    assert isinstance(patched, wrapt.FunctionWrapper)
    with lifted_patches(model) as count:
        assert count == 1 and "inference" not in tiny_t3.__dict__  # the class's own T3.inference runs
    assert tiny_t3.__dict__["inference"] is patched
    restore(model)


def test_rtf_is_the_ratio_of_the_medians_shown_beside_it():
    """The RTF column is total / audio of the medians printed beside it; a median of per-run
    ratios (10, 6, 60 -> 10 here) once contradicted the totals it sat next to."""
    from chatterbox_accel.e2e import E2EResult, Run

    runs = [Run({}, 10.0, 1.0, 10, 0.0), Run({}, 12.0, 2.0, 10, 0.0), Run({}, 30.0, 0.5, 10, 0.0)]
    result = E2EResult(label="x", text="Hi.", original=runs, accelerated=runs)
    m = result.medians("original")
    assert (m["total_s"], m["audio_s"]) == (12.0, 1.0) and m["rtf"] == 12.0


def test_the_chart_says_slower_when_slower():
    from chatterbox_accel.e2e import speed_words

    assert speed_words(1.46) == "1.46x faster"
    assert speed_words(0.8) == "1.25x slower"
    assert speed_words(0.99) == "0.99x: about the same"
