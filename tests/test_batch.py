"""generate_batch(): rows against themselves alone, S3Gen rows against upstream's flow, the
unseeded batch of one against upstream generate(), input errors, and the model left as found.

On `tiny_model` (2-layer T3, S3Gen with the small test estimator, full-size voice encoder and tokenizer), random weights."""
import pytest
import soundfile as sf
import torch

import chatterbox_accel
from chatterbox_accel import accelerate, restore
from chatterbox_accel.checkpoints import synthetic_voice
from chatterbox_accel.engine import generate_batch
from chatterbox_accel.s3gen_batch import flow_mels, on_device, row_noise

TEXTS = ["Hello there.", "A somewhat longer sentence, with a comma.", "Short."]


@pytest.fixture(scope="module")
def tiny_model(ckpt_dir):
    """One tiny-T3 model for the module (loading S3Gen and the voice encoder costs seconds);
    every test leaves it unpatched, with its own conditionals."""
    from chatterbox_accel.checkpoints import TEST_ESTIMATOR, tiny_english_model

    from conftest import STOP_AFTER

    model = tiny_english_model(ckpt_dir, stop_after=STOP_AFTER, estimator_blocks=TEST_ESTIMATOR)
    yield model
    restore(model)


@pytest.fixture
def voice_file(tmp_path):
    path = tmp_path / "voice.wav"
    sf.write(str(path), synthetic_voice(seconds=1.5, sr=24000, seed=3).numpy(), 24000)
    return str(path)


def test_rows_equal_the_same_requests_alone(tiny_model, voice_file):
    """Guards per-row independence end to end: a batch with two voices, different options,
    lengths and seeds gives each row the tokens and the audio that request gives alone
    (same seed); the audio within 1e-4 of its peak (the flow runs at another batch size)."""
    kwargs = dict(audio_prompt_path=[None, voice_file, None], seed=[11, 12, 13],
                  max_new_tokens=[12, 16, 6], temperature=[0.8, 1.0, 0.7], cfg_weight=[0.5, 0.0, 0.3],
                  exaggeration=[0.5, 0.7, 0.5])
    batch = generate_batch(tiny_model, TEXTS, max_batch=2, **kwargs)
    assert batch.metrics.path == "batch" and [r.metrics.index for r in batch] == [0, 1, 2]
    for i, text in enumerate(TEXTS):
        alone = generate_batch(tiny_model, [text], **{k: [v[i]] for k, v in kwargs.items()})[0]
        got = batch[i]
        assert torch.equal(got.speech_tokens, alone.speech_tokens), i
        assert got.wav.shape == alone.wav.shape and got.sample_rate == tiny_model.sr
        assert (got.wav - alone.wav).abs().max() <= 1e-4 * alone.wav.abs().max(), i
    assert len({r.speech_tokens.numel() for r in batch}) == 3  # three lengths in one flow batch


def test_seed_changes_the_audio(tiny_model):
    a = generate_batch(tiny_model, [TEXTS[0]], seed=1, max_new_tokens=8)[0]
    b = generate_batch(tiny_model, [TEXTS[0]], seed=2, max_new_tokens=8)[0]
    assert not torch.equal(a.speech_tokens, b.speech_tokens)
    assert not torch.equal(a.wav, b.wav)


def test_flow_rows_match_upstream_flow_with_the_same_noise(tiny_model, voice_file, monkeypatch):
    """Guards batched S3Gen across voices and lengths: each row's mel equals upstream's own
    `S3Gen.flow_inference` for that utterance alone with the same CFM noise (injected through
    torch.randn_like) within 1e-4 of its peak. Without the encoder's pad fix the shorter rows
    miss by ~1e-2."""
    s3gen = tiny_model.s3gen
    voice_a = on_device(tiny_model.conds.gen, s3gen.device, s3gen.dtype)
    saved = tiny_model.conds
    tiny_model.prepare_conditionals(voice_file)
    voice_b = on_device(tiny_model.conds.gen, s3gen.device, s3gen.dtype)
    tiny_model.conds = saved
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 6561, (n,), generator=g) for n in (15, 31, 9)]
    refs = [voice_a, voice_b, voice_a]
    noises = [row_noise(ref, t.numel(), 2, False, g, "cpu", torch.float32) for ref, t in zip(refs, tokens)]
    mels = flow_mels(s3gen.flow, tokens, refs, noises, 10, False)
    for t, ref, noise, mel in zip(tokens, refs, noises, mels):
        monkeypatch.setattr(torch, "randn_like", lambda mu, noise=noise: noise[:, :, : mu.shape[2]].clone())
        with torch.inference_mode():
            want = s3gen.flow_inference(t[None], ref_dict=ref, finalize=True)
        monkeypatch.undo()
        assert mel.shape == want.shape
        assert (mel - want).abs().max() <= 1e-4 * want.abs().max()


def test_unseeded_single_request_is_upstream_generate_bit_for_bit(tiny_model):
    torch.manual_seed(5)
    want = tiny_model.generate(TEXTS[0])
    torch.manual_seed(5)
    got = generate_batch(tiny_model, [TEXTS[0]])
    assert got.metrics.path == "generate"
    assert torch.equal(got[0].wav, want)
    assert got[0].speech_tokens.numel() > 0


def test_accelerated_model_batches_through_its_runner(tiny_model):
    """Guards the adapter on an accelerated model: model.generate_batch exists, runs on the
    installed runner and gives the same rows as the unpatched model's generate_batch; restore()
    removes it."""
    plain = generate_batch(tiny_model, TEXTS[:2], seed=[1, 2], max_new_tokens=10)
    report = accelerate(tiny_model, check=True)
    assert "generate_batch" in report.applied
    fast = tiny_model.generate_batch(TEXTS[:2], seed=[1, 2], max_new_tokens=10)
    from chatterbox_accel.api import runner_of

    assert runner_of(tiny_model).cache is not None and runner_of(tiny_model).cache.batch >= 4
    for a, b in zip(plain, fast):
        assert torch.equal(a.speech_tokens, b.speech_tokens)
        assert (a.wav - b.wav).abs().max() <= 1e-4 * a.wav.abs().max()
    restore(tiny_model)
    assert not hasattr(tiny_model, "generate_batch")


def test_conds_are_left_as_found(tiny_model, voice_file):
    before = tiny_model.conds
    generate_batch(tiny_model, TEXTS[:2], audio_prompt_path=voice_file, seed=1, max_new_tokens=4)
    assert tiny_model.conds is before


@pytest.mark.parametrize("texts, kwargs, match", [
    ([], {}, "texts is empty"),
    ("Hello.", {}, "list of strings"),
    (["Hi.", "  "], {}, r"texts\[1\]"),
    (["Hi.", "Yo."], {"seed": [1]}, "seed has 1 values for 2 texts"),
    (["Hi."], {"temprature": 0.5}, "unknown options"),
    (["Hi."], {"temperature": 0.0}, "temperature"),
    (["Hi."], {"max_new_tokens": 0}, "max_new_tokens"),
    (["Hi."], {"audio_prompt_path": "/nonexistent.wav"}, "does not exist"),
    (["Hi."], {"max_batch": 0}, "max_batch"),
    (["Hi."], {"seed": 1.5}, "seed"),
])
def test_bad_input_is_refused_before_any_work(tiny_model, monkeypatch, texts, kwargs, match):
    import chatterbox_accel.engine.batch as engine

    monkeypatch.setattr(engine, "_run", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(engine, "_generate_alone", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=match):
        generate_batch(tiny_model, texts, **kwargs)


def test_package_exports_generate_batch():
    assert chatterbox_accel.generate_batch is generate_batch


def test_reserve_batch_allocates_the_cache_generate_batch_uses(tiny_model):
    """A service reserves its batch's KV cache at start: allocated and touched for max_batch
    slots, then used by generate_batch as is (not reallocated mid-request)."""
    from chatterbox_accel import reserve_batch
    from chatterbox_accel.engine.batch import _runner

    nbytes = reserve_batch(tiny_model, 3, max_new_tokens=64, prompt_len=128)
    cache = _runner(tiny_model).cache
    assert nbytes == cache.nbytes > 0 and cache.batch == 2 * 3 and cache.ready == cache.max_len >= 192
    generate_batch(tiny_model, TEXTS, seed=[1, 2, 3], max_new_tokens=8, max_batch=3)
    assert _runner(tiny_model).cache is cache
    with pytest.raises(ValueError, match="max_batch"):
        reserve_batch(tiny_model, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        reserve_batch(tiny_model, 2, max_new_tokens=0)
