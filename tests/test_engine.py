"""The serving engine (chatterbox_accel/engine/core.py) on a 2-layer T3 and a small S3Gen estimator:
events, cancellation, the queue bound, failures that stay with their request, concurrent
callers, and a front end that never writes `model.conds`. Each test names the defect it guards."""
import threading

import pytest
import soundfile as sf
import torch

from chatterbox_accel.checkpoints import synthetic_voice
from chatterbox_accel.engine import (AudioChunk, Done, Engine, EngineBusy, EngineClosed, Failed, SpeechRequest)
from chatterbox_accel.engine.batch import _runner

TEXTS = ["Hello there.", "A second, different sentence.", "And a third one, longer than the others."]


@pytest.fixture(scope="module")
def model(ckpt_dir):
    from chatterbox_accel.checkpoints import TEST_ESTIMATOR, tiny_english_model

    from conftest import STOP_AFTER

    return tiny_english_model(ckpt_dir, stop_after=STOP_AFTER, estimator_blocks=TEST_ESTIMATOR)


def request(text=TEXTS[0], seed=1, **kw):
    kw.setdefault("first_chunk_size", 12)  # one S3Gen pass per request: the tests' time is S3Gen's
    kw.setdefault("chunk_size", 12)
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("watermark", False)  # Perth costs ~1 s per chunk on a CPU; the stream's tests cover it
    return SpeechRequest(text, seed=seed, **kw)


def run(engine, req):
    """(events, Done or Failed) of one request."""
    events = list(engine.submit(req))
    return events, events[-1]


def alone(model, req):
    with Engine(model, max_batch=1, max_new_tokens=64, max_prompt=128) as engine:
        _, done = run(engine, req)
    assert isinstance(done, Done), done
    return done


def test_events_come_in_order_and_end_with_usage(model):
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128) as engine:
        events, done = run(engine, request(first_chunk_size=4, chunk_size=4, watermark=True))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2
    assert isinstance(done, Done) and chunks and events[:-1] == chunks
    assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].final
    assert sum(c.audio.numel() for c in chunks) == chunks[-1].samples_so_far > 0
    assert done.usage.speech_tokens >= len(done.speech_tokens) > 0 and done.usage.text_tokens > 0
    assert done.usage.audio_seconds == pytest.approx(chunks[-1].samples_so_far / model.sr)
    assert 0 < done.usage.time_to_first_chunk <= done.usage.total_seconds


def test_cancel_frees_the_slot_at_the_next_step(model):
    with Engine(model, max_batch=1, max_new_tokens=64, max_prompt=128) as engine:
        long = engine.submit(request(max_new_tokens=60, first_chunk_size=2, chunk_size=30))
        first = long.get(timeout=120)
        assert isinstance(first, AudioChunk)
        long.cancel()
        _, done = run(engine, request(TEXTS[1]))  # the only slot is free again
        assert isinstance(done, Done)
        rest = list(long)
        assert isinstance(rest[-1], Failed) and "cancelled" in str(rest[-1].error)
        assert engine.running == 0 and engine.in_flight == 0


def test_the_queue_is_bounded(model):
    engine = Engine(model, max_batch=1, max_queue=1, max_new_tokens=64, max_prompt=128, start=False)
    try:
        handles = [engine.submit(request()), engine.submit(request(TEXTS[1]))]
        with pytest.raises(EngineBusy, match="full"):
            engine.submit(request(TEXTS[2]))
        engine.start()
        assert all(isinstance(list(h)[-1], Done) for h in handles)
        assert engine.in_flight == 0
    finally:
        engine.close()


def test_a_failing_prefill_fails_its_request_only(model, monkeypatch):
    """Old: an exception while admitting left the slot taken (its rows sampled garbage until
    max_new_tokens) and broke the whole call."""
    want = alone(model, request(TEXTS[1], seed=3))
    runner = _runner(model)
    real = runner.prefill_slots

    def prefill(admitted, cache):
        if any(r.key.request.text == "boom" for _, r in admitted):
            raise RuntimeError("injected prefill failure")
        return real(admitted, cache)

    monkeypatch.setattr(runner, "prefill_slots", prefill)
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128) as engine:
        bad = engine.submit(request("boom", seed=2))
        good = engine.submit(request(TEXTS[1], seed=3))
        bad_events, good_events = list(bad), list(good)
        assert isinstance(bad_events[-1], Failed) and "injected prefill failure" in str(bad_events[-1].error)
        assert isinstance(good_events[-1], Done) and good_events[-1].speech_tokens == want.speech_tokens
        assert engine.failures["admission"] == 1 and engine.running == 0


def test_a_failing_step_fails_its_rows_and_the_engine_keeps_serving(model, monkeypatch):
    runner = _runner(model)
    real = runner.step
    calls = {"n": 0}

    def step(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected step failure")
        return real(*args)

    monkeypatch.setattr(runner, "step", step)
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128) as engine:
        events, last = run(engine, request())
        assert isinstance(last, Failed) and "injected step failure" in str(last.error)
        _, done = run(engine, request(TEXTS[1]))
        assert isinstance(done, Done) and engine.failures["step"] == 1


def audio_of(events) -> torch.Tensor:
    return torch.cat([e.audio for e in events if isinstance(e, AudioChunk)])


def alone_events(model, req):
    with Engine(model, max_batch=1, max_new_tokens=64, max_prompt=128) as engine:
        events = list(engine.submit(req))
    assert isinstance(events[-1], Done), events[-1]
    return events


def test_chunks_ready_in_one_step_share_a_flow_call_and_match_alone(model):
    """Guards S3Gen batched across streams: two requests admitted together fill their chunk
    schedules at the same steps, so their flow windows go through shared calls, and each gets
    its alone tokens and its alone audio within 1e-4 of its peak."""
    reqs = [request(TEXTS[0], seed=21, first_chunk_size=4, chunk_size=4),
            request(TEXTS[2], seed=22, first_chunk_size=4, chunk_size=4)]
    want = [alone_events(model, r) for r in reqs]
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128) as engine:
        handles = [engine.submit(r) for r in reqs]
        got = [list(h) for h in handles]
        stats = dict(engine.s3gen_stats)
    assert stats["flow_rows"] > stats["flow_calls"] > 0
    for events, alone_ in zip(got, want):
        assert isinstance(events[-1], Done) and events[-1].speech_tokens == alone_[-1].speech_tokens
        a, b = audio_of(events), audio_of(alone_)
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_an_s3gen_failure_in_a_shared_flow_call_fails_that_request_only(model, monkeypatch):
    """Guards the engine's S3Gen isolation once flows are shared: the call that holds a failing
    request's window raises; that request fails, its batch-mate (retried alone) finishes with
    its alone tokens and audio, and the failure is counted."""
    from chatterbox_accel import s3gen_stream
    from chatterbox_accel.stream import S3_SEED_OFFSET

    good_req = request(TEXTS[1], seed=3, first_chunk_size=4, chunk_size=4)
    want = alone_events(model, good_req)
    real = s3gen_stream._flow

    def flow(part):
        if any(w.streamer.rng.initial_seed() == 2 + S3_SEED_OFFSET for _, w in part):
            raise RuntimeError("injected flow failure")
        return real(part)

    monkeypatch.setattr(s3gen_stream, "_flow", flow)
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128) as engine:
        bad = engine.submit(request(TEXTS[0], seed=2, first_chunk_size=4, chunk_size=4))
        good = engine.submit(good_req)
        bad_events, good_events = list(bad), list(good)
        assert isinstance(bad_events[-1], Failed) and "injected flow failure" in str(bad_events[-1].error)
        assert isinstance(good_events[-1], Done) and good_events[-1].speech_tokens == want[-1].speech_tokens
        assert torch.allclose(audio_of(good_events), audio_of(want), rtol=0, atol=1e-4 * audio_of(want).abs().max())
        assert engine.failures["s3gen"] == 1 and engine.s3gen_stats["flow_retries"] == 2
        _, done = run(engine, request(TEXTS[2]))  # and the engine goes on serving
        assert isinstance(done, Done)


def test_two_threads_on_one_model_each_get_their_alone_tokens(model):
    """Old: two concurrent generate_stream() calls on one model corrupted or hung each other.
    Two threads stream seeded requests while a third request with other options shares the
    steps: each seeded one gets the tokens and the audio length it gets alone."""
    reqs = [request(TEXTS[0], seed=11), request(TEXTS[2], seed=12)]
    want = [alone(model, r) for r in reqs]
    got = [None, None]
    with Engine(model, max_batch=3, max_new_tokens=64, max_prompt=128) as engine:
        other = engine.submit(request(TEXTS[1], seed=None, options={"temperature": 0.6, "cfg_weight": 0.0}))

        def reader(i):
            got[i] = engine.submit(reqs[i]).result()

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert isinstance(list(other)[-1], Done)
    for (audio, usage), done in zip(got, want):
        assert usage.speech_tokens == done.usage.speech_tokens
        assert audio.numel() == round(done.usage.audio_seconds * model.sr)


def test_voices_come_from_the_registry_and_model_conds_never_change(model, tmp_path):
    """Old: streams and batches prepared a voice by writing model.conds, which another caller
    could read in between."""
    path = tmp_path / "voice.wav"
    sf.write(str(path), synthetic_voice(seconds=1.5, sr=24000, seed=5).numpy(), 24000)
    before = model.conds
    t3_before = before.t3.speaker_emb.clone()
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128) as engine:
        engine.voices.add("me", path)
        assert engine.voices.names() == ["default", "me"]
        _, done = run(engine, request(voice="me"))
        _, builtin = run(engine, request())
        assert isinstance(done, Done) and isinstance(builtin, Done)
        with pytest.raises(KeyError, match="unknown voice 'nobody'"):
            engine.submit(request(voice="nobody"))
        with pytest.raises((ValueError, FileNotFoundError)):
            engine.voices.add("bad", tmp_path / "missing.wav")
    assert model.conds is before and torch.equal(model.conds.t3.speaker_emb, t3_before)


def test_close_ends_what_is_in_flight(model):
    engine = Engine(model, max_batch=1, max_new_tokens=64, max_prompt=128, start=False)
    handle = engine.submit(request())
    engine.start()
    engine.close()
    events = list(handle)
    assert isinstance(events[-1], (Done, Failed))
    if isinstance(events[-1], Failed):
        assert isinstance(events[-1].error, EngineClosed)
    with pytest.raises(EngineClosed):
        engine.submit(request())


def test_a_generate_while_the_engine_is_idle_costs_its_next_request_nothing(model):
    """Old: a generate() on the engine's accelerated model, even between requests, took the T3
    decoder, and the engine failed the next request it admitted (an AttributeError from the
    decoder's dropped cache)."""
    from chatterbox_accel import accelerate, restore

    accelerate(model)  # generate() then decodes on the runner the engine uses
    try:
        want = alone(model, request(TEXTS[1], seed=5))
        with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128) as engine:
            assert engine.runner is _runner(model) and engine.runner is not None
            _, first = run(engine, request(seed=4))
            assert isinstance(first, Done)
            model.generate(TEXTS[0])  # the decoder is the generate()'s now
            assert not engine.runner.owns(engine._owner)
            _, done = run(engine, request(TEXTS[1], seed=5))
            assert isinstance(done, Done), done
            assert done.speech_tokens == want.speech_tokens and engine.failures["taken_over"] == 0
    finally:
        restore(model)


def test_the_engines_prefill_budget_stays_with_the_engine(model):
    """Old: the engine set its prefill budget on the runner's shared decoder, and a generate_batch
    with the same slot count after it admitted under the engine's budget. Any other claim of the
    decoder starts with no budget; the engine's own claim sets it again."""
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=128, prefill_budget=7) as engine:
        _, done = run(engine, request())
        assert isinstance(done, Done) and engine._decoder.prefill_budget == 7
        decoder = engine._decoder
        engine.runner.claim()  # what generate_batch and generate() do first
        assert decoder.prefill_budget is None
        _, done = run(engine, request(TEXTS[1]))  # the engine takes its decoder back, with its budget
        assert isinstance(done, Done) and engine._decoder.prefill_budget == 7


def test_bad_requests_are_refused_at_submit(model):
    with Engine(model, max_batch=1, max_new_tokens=64, max_prompt=128) as engine:
        with pytest.raises(ValueError, match="text is empty"):
            SpeechRequest("  ")
        with pytest.raises(ValueError, match="over this engine's limit"):
            engine.submit(request(max_new_tokens=65))
        _, failed = run(engine, request(options={"temperature": 0}))
        assert isinstance(failed, Failed) and "temperature" in str(failed.error)
        _, failed = run(engine, request(options={"speed": 2}))
        assert isinstance(failed, Failed) and "unknown option" in str(failed.error)
        assert engine._decoder.prefill_budget == 256  # the default budget reached the decoder
    with pytest.raises(ValueError, match="prefill_budget must be a positive int"):
        Engine(model, prefill_budget=0, start=False)


def test_a_decode_whose_request_was_dropped_raises_instead_of_spinning(tiny_t3):
    """Old: SlotDecoder.blocks looped forever on a request a reset had dropped."""
    from chatterbox_accel.check import probe_inputs
    from chatterbox_accel.t3.decode import T3Runner
    from chatterbox_accel.t3.model import sdpa_attention

    runner = T3Runner(tiny_t3, attention=sdpa_attention)
    t3_cond, text, _ = probe_inputs(tiny_t3, None, 1)
    options = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
    with torch.inference_mode():
        req = runner.request(t3_cond, text, options, 40)
        blocks = runner.decoder(1).blocks(req, 2, 2)
        next(blocks)
        runner.decoder(1).reset()  # what another decode on the same runner does
        with pytest.raises(RuntimeError, match="dropped"):
            next(blocks)


def test_a_long_text_is_split_decoded_in_parallel_and_joined_in_order(model):
    """Each piece's audio, in order, is what that piece gives alone (seed + its index; within
    1e-4 of the peak, as pieces share flow calls), with the fade and pause between pieces; the
    usage adds up; more pieces than slots still all run."""
    from chatterbox_accel.engine.split import FADE_SECONDS, PAUSE_SECONDS, _fade_out, split_text

    text = " ".join(f"Sentence {i} of a long text, which goes on for a while." for i in range(8))
    pieces = split_text(text)
    assert len(pieces) == 3
    with Engine(model, max_batch=2, max_new_tokens=64, max_prompt=384) as engine:
        events = list(engine.submit(request(text, seed=10)))
        alone = [engine.submit(request(p, seed=10 + i)).result() for i, p in enumerate(pieces)]
    done = events[-1]
    assert isinstance(done, Done), done
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].final
    assert not any(c.final for c in chunks[:-1])
    expected = []
    for i, (audio, _) in enumerate(alone):
        if i < len(alone) - 1:
            audio = torch.cat([_fade_out(audio, int(FADE_SECONDS * model.sr)),
                               torch.zeros(int(PAUSE_SECONDS * model.sr))])
        expected.append(audio)
    want = torch.cat(expected)  # pieces decoded together share flow calls: float32 rounding apart
    torch.testing.assert_close(torch.cat([c.audio for c in chunks]), want, rtol=0, atol=1e-4 * want.abs().max().item())
    assert done.usage.speech_tokens == sum(u.speech_tokens for _, u in alone)


def test_chunks_grow_after_the_first():
    """Each chunk re-runs S3Gen over the voice and context: later chunks double (to 100 tokens)."""
    from chatterbox_accel.engine.requests import chunk_target

    growing = SpeechRequest("Hi.")
    assert [chunk_target(growing, i) for i in range(6)] == [12, 25, 50, 100, 100, 100]
    fixed = SpeechRequest("Hi.", max_chunk_size=None)
    assert [chunk_target(fixed, i) for i in range(3)] == [12, 25, 25]
    with pytest.raises(ValueError, match="max_chunk_size"):
        SpeechRequest("Hi.", max_chunk_size=0)
