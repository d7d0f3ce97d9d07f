"""The engine on the full-size random English checkpoint (30-layer T3, full S3Gen, the 1 s
built-in voice), accelerated as a server runs it: a seeded request among seven others (other
voices, options and seeds, some unseeded) gets the speech tokens and audio it gets alone, where
"alone" is an engine of one slot (2-row products instead of 16)."""
import pytest
import torch

from chatterbox_accel.engine import Done, Engine, SpeechRequest

TEXTS = ["Hello there, how are you today?", "The weather is lovely this morning.",
         "Please send me the report by Friday.", "This is a quick test of the server.",
         "A second, different sentence.", "And a third one, longer than the others.",
         "Numbers like 3.5 and 42 are read out.", "Goodbye for now."]


@pytest.fixture(scope="module")
def model(ckpt_dir):
    from chatterbox.tts import ChatterboxTTS

    from chatterbox_accel import accelerate, restore

    model = ChatterboxTTS.from_local(ckpt_dir, "cpu")
    report = accelerate(model, check_steps=4)
    assert "t3.static_kv_cache" in report.applied, str(report)
    yield model
    restore(model)


def request(text, seed, **kw):
    # 8 tokens, one S3Gen pass per request, no watermark (Perth is per request and not batched)
    return SpeechRequest(text, seed=seed, max_new_tokens=8, first_chunk_size=8, chunk_size=8, watermark=False, **kw)


def collect(handle):
    events = list(handle)
    assert isinstance(events[-1], Done), events[-1]
    return events[-1].speech_tokens, torch.cat([e.audio for e in events[:-1]])


def test_a_seeded_request_among_seven_others_is_as_alone(model, voice_wav):
    target = request(TEXTS[0], 7, voice="ref", options={"exaggeration": 0.7, "temperature": 0.9})
    others = [request(TEXTS[1], 1), request(TEXTS[2], None, options={"cfg_weight": 0.0}),
              request(TEXTS[3], 3, voice="ref"), request(TEXTS[4], 4, options={"top_p": 0.9, "min_p": 0.1}),
              request(TEXTS[5], None, voice="ref", options={"repetition_penalty": 2.0}),
              request(TEXTS[6], 6, options={"temperature": 0.5}), request(TEXTS[7], 8, voice="ref")]
    with Engine(model, max_batch=1, max_new_tokens=16, max_prompt=192) as engine:
        engine.voices.add("ref", voice_wav)
        tokens_alone, audio_alone = collect(engine.submit(target))
    with Engine(model, max_batch=8, max_new_tokens=16, max_prompt=192) as engine:
        engine.voices.add("ref", voice_wav)
        handles = [engine.submit(r) for r in others[:3]] + [engine.submit(target)] + [
            engine.submit(r) for r in others[3:]]
        results = [collect(h) for h in handles]
        assert engine.steps < 8 * 8  # they shared steps
    tokens, audio = results[3]
    assert len(tokens_alone) >= 8 and tokens == tokens_alone
    assert audio.shape == audio_alone.shape and audio_alone.abs().max() > 0
    assert (audio - audio_alone).abs().max() <= 1e-4 * audio_alone.abs().max()
    assert len({tuple(t) for t, _ in results}) == 8  # the others sampled tokens of their own
