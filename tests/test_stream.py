"""generate_stream(): parity with the one-shot path, seamless joins, lifecycle and bad input.

The model here has a 2-layer T3 and a 1 s S3Gen voice prompt (the checkpoint's) so
the many S3Gen passes of a stream stay quick; S3Gen itself is full size.
"""
import pytest
import torch

import chatterbox_accel
from chatterbox_accel.stream import S3GenStreamer, StreamMetrics
from conftest import s3gen_tokens, streamed_tokens

TEXT = "Hello there, streaming world."
N_TOKENS = 30
SPF = 480  # samples per mel frame


def short_ref(gen: dict, tokens: int = 25) -> dict:
    ref = dict(gen)
    ref["prompt_token"] = gen["prompt_token"][:, :tokens]
    ref["prompt_token_len"] = torch.tensor([tokens])
    ref["prompt_feat"] = gen["prompt_feat"][:, : 2 * tokens]
    return ref


@pytest.fixture(scope="module")
def model(ckpt_dir):
    from chatterbox_accel.checkpoints import TEST_ESTIMATOR, tiny_english_model

    m = tiny_english_model(ckpt_dir, stop_after=16, estimator_blocks=TEST_ESTIMATOR)
    m.conds.gen = short_ref(m.conds.gen)
    return m


@pytest.fixture(scope="module")
def one_shot(model):
    """Fixed tokens; upstream's S3Gen mel and audio for them; the noise upstream drew."""
    s3, ref = model.s3gen, model.conds.gen
    torch.manual_seed(1)
    tokens = torch.randint(0, 6561, (N_TOKENS,))
    prompt = ref["prompt_feat"].shape[1]
    torch.manual_seed(5)
    mel = s3.flow_inference(tokens[None], ref_dict=ref, finalize=True)
    torch.manual_seed(5)
    noise = torch.randn(1, 80, prompt + 2 * N_TOKENS)  # what flow's randn_like(mu) drew above
    wav, _ = s3.inference(speech_tokens=tokens, ref_dict=ref)
    return tokens, noise, mel, wav[0]


def stream_tokens(model, tokens, noise, sizes, context_tokens=None):
    streamer = S3GenStreamer(model.s3gen, model.conds.gen, tokens.numel(), noise=noise,
                             context_tokens=context_tokens)
    chunks, start = [], 0
    for size in sizes:
        chunks.append(streamer.push(tokens[start : start + size], start + size >= tokens.numel()))
        start += size
    return streamer, chunks


def test_single_pass_mel_is_upstream_flow_exactly(model, one_shot):
    tokens, noise, mel, _ = one_shot
    streamer, _ = stream_tokens(model, tokens, noise, [N_TOKENS])
    assert torch.allclose(streamer.mel, mel, rtol=0, atol=1e-5)


def test_stream_matches_one_shot_and_joins_are_seamless(model, one_shot):
    tokens, noise, mel, wav = one_shot
    sizes = [12, 9, 9]
    streamer, chunks = stream_tokens(model, tokens, noise, sizes)
    audio = torch.cat(chunks)
    # Length: every token's audio is there, as in one shot (S3Gen: 2 frames of 480 per token).
    assert abs(audio.numel() - wav.numel()) <= SPF and audio.numel() == 2 * N_TOKENS * SPF
    assert all(c.numel() > 0 for c in chunks) and chunks[-1].abs().max() > 0  # last chunk kept
    # Mel: the last pass sees every token, so its new frames are upstream's exactly; frames
    # made earlier lacked the later tokens, which S3Gen's full attention would have seen. With
    # random weights that attention is diffuse, so the difference is large; it is measured:
    first_new = 2 * (sum(sizes[:-1]) - 3)
    assert torch.allclose(streamer.mel[:, :, first_new:], mel[:, :, first_new:], atol=1e-4)
    rel = ((streamer.mel - mel).norm() / mel.norm()).item()
    assert rel < 0.5, f"streamed mel differs from one-shot by relative L2 {rel:.3f}"
    # Vocoder: the stitched stream vs vocoding the streamed mel with the stream's own
    # excitation in one pass; only the cross-faded joins (80 ms each) may differ.
    with torch.inference_mode():
        whole = model.s3gen.mel2wav.decode(x=streamer.mel, s=streamer.source)[0]
        whole[: model.s3gen.trim_fade.numel()] *= model.s3gen.trim_fade
    stitch = ((audio - whole).norm() / whole.norm()).item()
    assert stitch < 0.1, f"stitched audio differs from one-pass vocoding by {stitch:.3f}"
    # Joins: no step at a chunk boundary larger than the one-shot's largest sample step.
    limit = wav.diff().abs().max()
    bounds = torch.tensor([c.numel() for c in chunks]).cumsum(0)[:-1]
    steps = torch.stack([(audio[b] - audio[b - 1]).abs() for b in bounds])
    assert (steps <= limit).all(), (steps, limit)


def streams_of(model, specs):
    """One S3GenStreamer per (prompt tokens, seed, context, chunk sizes): its own voice prompt
    length, noise and vocoder draws; its chunks of fixed random tokens."""
    out = []
    for prompt, seed, context, sizes in specs:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 6561, (sum(sizes),), generator=g)
        streamer = S3GenStreamer(model.s3gen, short_ref(model.conds.gen, prompt), tokens.numel(),
                                 context_tokens=context, generator=torch.Generator().manual_seed(seed))
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        chunks = [(tokens[a:b], b == tokens.numel()) for a, b in zip(bounds, bounds[1:])]
        out.append((streamer, chunks))
    return out


SPECS = [(25, 1, 100, (7, 9, 14)),   # ends at chunk 2 while the others go on (per-row finalize)
         (20, 2, 100, (5, 12, 8, 5)),  # a shorter voice prompt: padded beside the others
         (25, 3, 8, (6, 6, 6, 6, 6))]  # a short context: its window starts after the prompt's


def test_push_many_rows_equal_each_stream_alone(model):
    """Guards S3Gen batched across streams (the engine's chunks): streams with different voice
    prompts, noise, context and chunking, some finishing while others go on, pushed together
    through `push_many` give each stream the audio it gets pushed alone, within 1e-4 of its
    peak (float32 rounding of the padded batch), and their flows share calls: all windows in one
    call (max_frames None), and cut by a frame budget (150: some calls of two windows, some of one)."""
    from chatterbox_accel.s3gen_stream import push_many

    alone = [[streamer.push(ids, final) for ids, final in chunks] for streamer, chunks in streams_of(model, SPECS)]
    for max_frames in (None, 150):
        together, stats = [[] for _ in SPECS], {}
        streams = streams_of(model, SPECS)
        for k in range(max(len(c) for _, c in streams)):
            live = [(i, s, c[k]) for i, (s, c) in enumerate(streams) if k < len(c)]
            outs = push_many([(s, ids, final) for _, s, (ids, final) in live], max_frames, stats)
            for (i, _, _), audio in zip(live, outs):
                assert torch.is_tensor(audio), audio
                together[i].append(audio)
        assert stats["flow_rows"] > stats["flow_calls"], (max_frames, stats)
        for want, got in zip(alone, together):
            want, got = torch.cat(want), torch.cat(got)
            assert got.shape == want.shape and want.abs().max() > 0
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), max_frames


def test_a_failing_row_of_a_shared_flow_call_fails_alone(model):
    """Guards push_many's isolation: a stream whose flow raises (here an x-vector of the wrong
    size, which breaks the batched call) gets its exception; its batch-mates, retried row by row,
    get the audio they get alone."""
    from chatterbox_accel.s3gen_stream import push_many

    (a, ca), (b, cb) = streams_of(model, SPECS[:2])
    want = a.push(*ca[0])
    (a, ca), (b, cb) = streams_of(model, SPECS[:2])
    b.ref["embedding"] = b.ref["embedding"][..., :-1]
    stats = {}
    got, failed = push_many([(a, *ca[0]), (b, *cb[0])], None, stats)
    assert isinstance(failed, RuntimeError)
    assert torch.is_tensor(got) and (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (stats["flow_calls"], stats["flow_rows"], stats["flow_retries"]) == (1, 2, 2)


def test_same_seed_same_tokens_as_generate(model, monkeypatch):
    chatterbox_accel.accelerate(model)
    pushed = streamed_tokens(monkeypatch)
    torch.manual_seed(0)
    chunks = list(model.generate_stream(TEXT, chunk_size=8, first_chunk_size=8))
    with s3gen_tokens(model) as generated:
        torch.manual_seed(0)
        wav = model.generate(TEXT)
    assert torch.equal(torch.cat(pushed), generated[0])  # the stream synthesized generate()'s tokens
    audio = torch.cat([c for c, _ in chunks])
    metrics = [m for _, m in chunks]
    assert isinstance(metrics[0], StreamMetrics) and metrics[-1].final and len(chunks) >= 2
    assert [m.chunk_index for m in metrics] == list(range(len(chunks)))
    assert metrics[-1].samples_so_far == audio.numel() == wav.shape[-1]
    assert metrics[-1].time_to_first_chunk == metrics[0].elapsed  # the first chunk's own clock
    assert metrics[-1].t3_tokens == generated[0].numel()  # the speech tokens (EOS not counted)
    assert torch.isfinite(audio).all() and audio.dtype == torch.float32 and audio.dim() == 1


def test_a_seeded_stream_owns_its_generators_and_decodes_the_engines_tokens(model, monkeypatch):
    from chatterbox_accel.engine import Done, Engine, SpeechRequest

    chatterbox_accel.accelerate(model)
    pushed = streamed_tokens(monkeypatch)
    state = torch.get_rng_state()
    first = torch.cat([c for c, _ in model.generate_stream(TEXT, seed=11, chunk_size=16, first_chunk_size=16)])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG neither read nor moved
    tokens = torch.cat(pushed)
    pushed.clear()
    torch.manual_seed(123)  # whatever the global RNG holds, the seed decides
    again = torch.cat([c for c, _ in model.generate_stream(TEXT, seed=11, chunk_size=16, first_chunk_size=16)])
    assert torch.equal(again, first) and torch.equal(torch.cat(pushed), tokens)
    pushed.clear()
    list(model.generate_stream(TEXT, seed=12, chunk_size=16, first_chunk_size=16))
    assert not torch.equal(torch.cat(pushed), tokens)  # another seed, other tokens (the test can fail)
    with Engine(model, max_batch=2) as engine:  # the engine's request with that seed: the same speech tokens
        events = list(engine.submit(SpeechRequest(TEXT, seed=11)))
    assert isinstance(events[-1], Done) and events[-1].speech_tokens == tokens.tolist()


def test_stream_carries_the_watermark(model):
    """Each chunk is marked behind 1 s of the audio already sent. Perth's detector scores
    random-weight audio low and very noisily from one audio to the next: measured on this test
    model (small S3Gen estimator), stream / stream without watermark, seeds 0, 1, 2: 0.0036 /
    0.00018, 0.55 / 0.00073, 0.77 / 0.00088 (generate(): 0.12, 0.44, 0.037). So the test asserts
    the mark is present in each (above unmarked) and, over the three, far above unmarked; not
    that it scores like one-shot."""
    chatterbox_accel.accelerate(model)
    detect = lambda audio: model.watermarker.get_watermark(  # noqa: E731
        audio.numpy(), sample_rate=model.sr, round=False).mean()
    runs = {True: [], False: []}
    for seed in (0, 1, 2):
        for watermark in (True, False):
            torch.manual_seed(seed)
            runs[watermark].append(detect(torch.cat([c for c, _ in model.generate_stream(
                TEXT, chunk_size=8, first_chunk_size=8, watermark=watermark)])))
    assert all(marked > unmarked for marked, unmarked in zip(runs[True], runs[False])), runs
    assert sum(runs[True]) > 20 * sum(runs[False]), runs


def test_break_early_leaves_model_usable_and_interleaving_is_refused(model):
    chatterbox_accel.accelerate(model)
    stream = model.generate_stream(TEXT, chunk_size=6, first_chunk_size=8)
    next(stream)
    stream.close()  # what `break` in a for loop does once the generator is dropped
    assert model.generate(TEXT).shape[-1] > 0  # (a whole stream after a break: the tests above)
    paused = model.generate_stream(TEXT, chunk_size=4, first_chunk_size=8)
    next(paused)
    model.generate(TEXT)  # takes the T3 cache over
    with pytest.raises(RuntimeError, match="paused"):
        next(paused)
    model.generate(TEXT)  # and the model still works


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(text=""), ValueError, "text is empty"),
    (dict(text="   "), ValueError, "text is empty"),
    (dict(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
    (dict(first_chunk_size=-2), ValueError, "first_chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(chunk_sise=10), TypeError, "unknown option.*chunk_sise"),
    (dict(seed="7"), ValueError, "seed must be an int"),
    (dict(audio_prompt_path="/no/such/voice.wav"), FileNotFoundError, "voice.wav"),
])
def test_bad_input_fails_before_any_work(model, monkeypatch, kwargs, error, match):
    chatterbox_accel.accelerate(model)
    for obj, name in ((model.t3, "inference"), (model, "prepare_conditionals")):
        monkeypatch.setattr(obj, name, "must not be touched")
    kwargs = {"text": TEXT, **kwargs}
    with pytest.raises(error, match=match):
        model.generate_stream(kwargs.pop("text"), **kwargs)


def test_unaccelerated_model_streams_through_the_original_t3(model):
    chatterbox_accel.restore(model)
    assert not hasattr(model, "generate_stream") or "generate_stream" not in model.__dict__
    torch.manual_seed(0)
    chunks = list(chatterbox_accel.generate_stream(model, TEXT, chunk_size=8, first_chunk_size=8))
    torch.manual_seed(0)
    wav = model.generate(TEXT)
    assert sum(c.numel() for c, _ in chunks) == wav.shape[-1] and len(chunks) >= 2


def test_fast_t3_failure_before_the_first_block_falls_back(model, monkeypatch):
    chatterbox_accel.accelerate(model)
    runner = chatterbox_accel.api.runner_of(model)
    monkeypatch.setattr(runner, "prefill_slots", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    torch.manual_seed(0)
    chunks = list(model.generate_stream(TEXT, chunk_size=8, first_chunk_size=8))
    fast = chatterbox_accel.api.fast_inference_of(model)
    assert fast.disabled and "boom" in fast.disabled
    torch.manual_seed(0)
    wav = model.generate(TEXT)  # now the original T3, as the stream was
    assert sum(c.numel() for c, _ in chunks) == wav.shape[-1]
