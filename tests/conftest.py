"""Shared fixtures: random-weight checkpoints and models, and the original-path references."""
import contextlib
import dataclasses
import os
import types
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # the original T3 loop's progress bar
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STOP_AFTER = 16  # the test checkpoint's T3 stops after ~16 speech tokens (see checkpoints.py)
MTL_STOP_AFTER = 4  # speech tokens; the alignment analyzer may add or cut a few
TURBO_STOP_AFTER = 6  # text + speech tokens (GPT-2 has absolute positions only): "Hi." -> ~4 speech tokens
VOICE_SECONDS = 1.0  # the built-in voice of every test checkpoint (see ckpt_dir)
TURBO_PROMPT_TOKENS = 150  # ... for a 150-token voice prompt: the built-in one and a 6 s reference


def pytest_collection_modifyitems(config, items):
    """The Ray Serve tests first: their two replica processes (~3.5 GB each) fit beside a test
    process that holds no models yet; later, the session's full-size models (~18 GB in this
    process) leave too little for them, and Ray's memory monitor kills the replicas."""
    items.sort(key=lambda item: item.path.name != "test_ray_serve.py")  # stable: the rest keep their order


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """A full-size random English checkpoint in the official layout (written once per session)."""
    from chatterbox_accel.checkpoints import write_english_checkpoint

    path = os.environ.get("CHATTERBOX_ACCEL_TEST_CKPT") or tmp_path_factory.mktemp("ckpt-english")
    # A 1 s built-in voice: S3Gen re-processes it on every generate() (its 10 CFG steps run over
    # prompt + new frames: 1 s instead of 3 s halves each call), so tests stay quick.
    return write_english_checkpoint(path, stop_after=STOP_AFTER, voice_seconds=VOICE_SECONDS)


from chatterbox_accel.checkpoints import (  # noqa: E402
    write_multilingual_checkpoint, write_turbo_checkpoint, write_vc_checkpoint,
)


# The other families' checkpoints (~3 GB each): written once per session into a temporary
# folder, or reused from $CHATTERBOX_ACCEL_TEST_FAMILIES_DIR when set (the writers skip a
# folder that is complete with the same settings).
@pytest.fixture(scope="session")
def families_dir(tmp_path_factory):
    base = os.environ.get("CHATTERBOX_ACCEL_TEST_FAMILIES_DIR")
    return Path(base) if base else tmp_path_factory.mktemp("ckpt-families")


@pytest.fixture(scope="session")
def mtl_ckpt(families_dir):
    return write_multilingual_checkpoint(families_dir / "multilingual", stop_after=MTL_STOP_AFTER,
                                        voice_seconds=VOICE_SECONDS)


@pytest.fixture(scope="session")
def turbo_ckpt(families_dir):
    return write_turbo_checkpoint(families_dir / "turbo", stop_after=TURBO_STOP_AFTER, voice_seconds=VOICE_SECONDS,
                                  prompt_tokens=TURBO_PROMPT_TOKENS)


@pytest.fixture(scope="session")
def vc_ckpt(families_dir):
    return write_vc_checkpoint(families_dir / "vc", voice_seconds=VOICE_SECONDS)


@pytest.fixture(scope="session")
def _tiny_template(ckpt_dir):
    from chatterbox_accel.checkpoints import TEST_ESTIMATOR, tiny_english_model

    return tiny_english_model(ckpt_dir, stop_after=STOP_AFTER, estimator_blocks=TEST_ESTIMATOR)


@pytest.fixture
def tiny_model(_tiny_template):
    """A fresh ChatterboxTTS with a 2-layer T3 and a small S3Gen estimator (TEST_ESTIMATOR; the rest
    of S3Gen, the VE, tokenizer and voice full size): a deep copy of one loaded, never-patched
    model per session (~0.4 s instead of ~1.5 s to build and load one per test)."""
    import copy

    return copy.deepcopy(_tiny_template)


@pytest.fixture
def tiny_t3():
    from chatterbox_accel.checkpoints import tiny_t3

    return tiny_t3(seed=0, layers=2)


def holder(t3, conds=None):
    """The smallest object accelerate() accepts: anything with a `.t3`."""
    return types.SimpleNamespace(t3=t3, conds=conds)


def probe(t3, steps=10, cfg_weight=0.5):
    from chatterbox_accel.check import probe_inputs

    return probe_inputs(t3, None, steps, cfg_weight)


def fresh(t3_cond):
    return dataclasses.replace(t3_cond, cond_prompt_speech_emb=None)


def original_forced_logits(t3, t3_cond, text, forced, cfg_weight=0.5, monkeypatch=None):
    """Per-step CFG logits of the ORIGINAL `T3.inference` loop, teacher-forced: its
    `torch.multinomial` returns the forced tokens and a hook on `speech_head` records logits."""
    records = []
    hook = t3.speech_head.register_forward_hook(lambda m, i, o: records.append(o[:, -1].detach().clone()))
    tokens = iter(forced.tolist())
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: torch.tensor([[next(tokens)]]))
    try:
        out = type(t3).inference(t3, t3_cond=fresh(t3_cond), text_tokens=text,
                                 max_new_tokens=forced.numel(), cfg_weight=cfg_weight)
    finally:
        hook.remove()
        monkeypatch.undo()
    assert out[0].tolist() == forced.tolist()
    # The original runs one forward per sampled token, plus a last one whose logits it ignores.
    logits = torch.stack([r[0] + cfg_weight * (r[0] - r[1]) for r in records])
    return logits[: forced.numel()]


_MISSING = object()


@contextlib.contextmanager
def s3gen_tokens(model):
    """Record the speech tokens `model.s3gen.inference` is given (1-D copies), whatever wraps it."""
    seen, s3gen = [], model.s3gen
    inner, previous = s3gen.inference, s3gen.__dict__.get("inference", _MISSING)

    def recording(*args, **kwargs):
        tokens = kwargs.get("speech_tokens", args[0] if args else None)
        seen.append(tokens.detach().reshape(-1).clone())
        return inner(*args, **kwargs)

    s3gen.__dict__["inference"] = recording
    try:
        yield seen
    finally:
        if previous is _MISSING:
            s3gen.__dict__.pop("inference", None)
        else:
            s3gen.__dict__["inference"] = previous


def streamed_tokens(monkeypatch):
    """The speech tokens every S3GenStreamer is given (push or push_many: both plan), in order
    (a list filled as they come)."""
    from chatterbox_accel.s3gen_stream import S3GenStreamer

    seen, plan = [], S3GenStreamer.plan

    def recording(self, ids, final):
        seen.append(ids.detach().reshape(-1).clone())
        return plan(self, ids, final)

    monkeypatch.setattr(S3GenStreamer, "plan", recording)
    return seen


# ---- the server (tests/test_server.py, the page test): one real process per session ----------
@pytest.fixture(scope="session")
def server(ckpt_dir, tmp_path_factory):
    pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install '.[serve]'")
    pytest.importorskip("av", reason="the server tests need the serve extra: pip install '.[serve]'")
    import openai

    from server_support import API_KEY, start_test_server

    server = start_test_server(ckpt_dir, tmp_path_factory.mktemp("server"))
    server.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def voice_wav(tmp_path_factory):
    """A 2 s reference voice (a synthetic voice-like signal)."""
    import soundfile as sf

    from chatterbox_accel.checkpoints import synthetic_voice

    path = tmp_path_factory.mktemp("voice") / "ref.wav"
    sf.write(path, synthetic_voice(2.0, seed=2).numpy(), 24000)
    return path
