"""accelerate()/restore() on the other model classes of chatterbox-tts 0.1.7:
ChatterboxMultilingualTTS, ChatterboxTurboTTS and ChatterboxVC, each loaded by its own
`from_local` from a full-size random checkpoint in its official file layout.

What accelerate() applies: the voice-conditioning cache to all three, the fast T3 loop (with
chatterbox's alignment analyzer fed from three heads) to Multilingual, and the fast GPT-2 loop
(`inference_turbo`) to Turbo; VC has no T3. Parity here means: generate() of
the accelerated model, on a voice-cache hit and under the same seed, gives the original's
audio bit for bit (on CPU, torch.multinomial draws as the fast sampler's exponential race does,
so the same seed samples the same tokens when the logits agree to rounding).

The checkpoints (~3 GB each) are written once per session into a temporary folder, or reused
from $CHATTERBOX_ACCEL_TEST_FAMILIES_DIR when that is set (the writers skip a folder that is
complete with the same settings). Models are class-scoped, so one family is in memory at a time.
"""

import pytest
import torch

import chatterbox_accel
from chatterbox_accel import accelerate, is_accelerated, load_voice, restore, save_voice
from chatterbox_accel.checkpoints import (
    MULTILINGUAL_FILES, TURBO_FILES, TURBO_TEXT_VOCAB, VC_FILES, synthetic_voice,
    write_tokenizer,
)
from chatterbox_accel.engine import generate_batch
from chatterbox_accel.families import pkuseg_unavailable
from chatterbox_accel.patching import get_registry
from chatterbox_accel.voice import PROFILE_FORMAT, model_fingerprint
from conftest import TURBO_PROMPT_TOKENS, s3gen_tokens, streamed_tokens


# ---- checkpoints and audio ---------------------------------------------------------------------
def write_wav(path, seconds, seed):
    import soundfile as sf

    sf.write(str(path), synthetic_voice(seconds, seed=seed).numpy(), 24000)
    return str(path)


@pytest.fixture(scope="session")
def audio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-audio")
    # Turbo's prepare_conditionals asserts more than 5 s of reference audio (6 s: 150 prompt
    # tokens, where the turbo test checkpoint stops); the others get 2 s (less S3Gen work).
    return {"turbo_ref": write_wav(folder / "ref6.wav", 6.0, seed=5), "ref": write_wav(folder / "ref2.wav", 2.0, seed=5),
            "src": write_wav(folder / "src.wav", 1.0, seed=3), "folder": folder}


# ---- helpers ----------------------------------------------------------------------------------
MODULES = ("t3", "s3gen", "ve")
METHODS = {"t3": ("inference", "inference_turbo", "forward"),
           "model": ("generate", "prepare_conditionals", "set_target_voice")}


def snapshot(model):
    """Everything restore() must put back: each weight tensor (same storage, no in-place write:
    `_version` counts them), the instance attributes, and which function each method is."""
    parts = {name: getattr(model, name) for name in MODULES if getattr(model, name, None) is not None}
    weights = {f"{p}.{k}": (v.data_ptr(), v._version, v.dtype, tuple(v.shape))
               for p, module in parts.items() for k, v in module.state_dict().items()}
    objects = {"model": model, **parts}
    attrs = {name: sorted(obj.__dict__) for name, obj in objects.items()}
    methods = {}
    for owner, names in METHODS.items():
        obj = objects.get(owner)
        for name in names:
            if obj is not None and hasattr(obj, name):
                bound = getattr(obj, name)
                methods[f"{owner}.{name}"] = (name in obj.__dict__, getattr(bound, "__func__", bound))
    return {"weights": weights, "attrs": attrs, "methods": methods}


def assert_no_t3_patch(model):
    t3 = getattr(model, "t3", None)
    if t3 is not None:
        assert not {"inference", "inference_turbo"} & set(t3.__dict__)


def cache_of(model):
    return get_registry(model).state["voice_cache"]


def generate(model, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(**kwargs)


def stream(model, seed=0, text="Hi.", **kwargs):
    """generate_stream() under the seed generate() gets: the same T3 tokens."""
    torch.manual_seed(seed)
    return model.generate_stream(text, **kwargs)


# ---- multilingual -----------------------------------------------------------------------------
@pytest.fixture(scope="class")
def mtl(mtl_ckpt):
    from chatterbox.mtl_tts import ChatterboxMultilingualTTS

    with pkuseg_unavailable():
        model = ChatterboxMultilingualTTS.from_local(mtl_ckpt, "cpu")
    yield model
    restore(model)


class TestMultilingual:
    def test_loads_with_upstream_from_local(self, mtl, mtl_ckpt):
        assert all((mtl_ckpt / name).exists() for name in MULTILINGUAL_FILES)
        assert mtl.t3.hp.is_multilingual and not mtl.t3.is_gpt and mtl.conds is not None
        ids = mtl.tokenizer.text_to_tokens("Hi.", language_id="en")[0].tolist()
        vocab = mtl.tokenizer.tokenizer.get_vocab()
        assert ids[0] == vocab["[en]"] and max(vocab.values()) < 2454 and vocab["[UNK]"] not in ids

    def test_accelerate_generate_parity_and_exact_restore(self, mtl, audio):
        text = dict(text="Hi.", language_id="en", audio_prompt_path=audio["ref"])
        reference = generate(mtl, **text)  # original code, conditionals computed from the file
        assert reference.ndim == 2 and 0 < reference.shape[1] < 24000 * 2  # stopped early
        before = snapshot(mtl)

        report = accelerate(mtl)
        assert report.ok and is_accelerated(mtl)
        assert {"voice_cache", "t3.static_kv_cache", "generate_stream"} <= set(report.applied)
        assert "t3" not in report.fallbacks  # the fast loop runs the alignment analyzer itself
        assert report.check.passed and report.check.attention_diff < 1e-4

        mtl.prepare_conditionals(audio["ref"])  # miss: the original runs and is cached
        mtl.prepare_conditionals(audio["ref"], exaggeration=0.7)  # hit: same audio, new exaggeration
        assert (cache_of(mtl).misses, cache_of(mtl).hits) == (1, 1)
        assert float(mtl.conds.t3.emotion_adv) == pytest.approx(0.7)
        assert type(mtl.conds).__module__ == "chatterbox.mtl_tts"

        accelerated = generate(mtl, **text)  # a cache hit inside generate()
        assert cache_of(mtl).hits == 2
        assert torch.equal(accelerated, reference)

        restore(mtl)
        assert not is_accelerated(mtl) and snapshot(mtl) == before
        assert_no_t3_patch(mtl)

    def test_voice_profile_is_refused_by_another_family(self, mtl, audio, tmp_path):
        from chatterbox.models.tokenizers import EnTokenizer
        from chatterbox.tts import ChatterboxTTS

        from chatterbox_accel.checkpoints import tiny_t3

        profile = save_voice(mtl, audio["ref"], tmp_path / "mtl.voice.pt")
        load_voice(mtl, profile, exaggeration=0.6)  # its own family: fine
        assert type(mtl.conds).__module__ == "chatterbox.mtl_tts"

        # An English model with the multilingual model's own voice encoder and S3Gen (as the
        # official repos ship them): the weight fingerprint matches, the family does not.
        write_tokenizer(tmp_path / "tokenizer.json")
        english = ChatterboxTTS(tiny_t3(layers=1), mtl.s3gen, mtl.ve,
                                EnTokenizer(str(tmp_path / "tokenizer.json")), "cpu")
        assert model_fingerprint(english) == model_fingerprint(mtl)
        with pytest.raises(ValueError, match=r"made with a multilingual model.*but this model is english"):
            load_voice(english, profile)


    def test_generate_stream_serves_generate_tokens_and_checks_its_options(self, mtl, monkeypatch):
        accelerate(mtl)
        with pytest.raises(TypeError, match="needs \\['language_id'\\]"):
            mtl.generate_stream("Hi.")
        with pytest.raises(ValueError, match="unsupported language_id 'xx'"):
            mtl.generate_stream("Hi.", language_id="xx")
        with pytest.raises(TypeError, match="unknown option.*top_k"):
            mtl.generate_stream("Hi.", language_id="en", top_k=5)  # a Turbo option
        pushed = streamed_tokens(monkeypatch)
        chunks = list(stream(mtl, text="Hi.", language_id="en", chunk_size=2, first_chunk_size=4))
        with s3gen_tokens(mtl) as generated:
            reference = generate(mtl, text="Hi.", language_id="en")
        assert torch.equal(torch.cat(pushed), generated[0])  # generate()'s tokens, streamed
        assert sum(c.numel() for c, _ in chunks) == reference.shape[1] and chunks[-1][1].final
        restore(mtl)

    def test_generate_batch_rows_are_the_requests_alone(self, mtl):
        """Per-row language, text and seed through the batched decoder (each row with its own
        alignment analyzer; the analyzer's per-row state is tested on a tiny backbone in
        test_batch_t3.py) and batched S3Gen: a row as that request alone."""
        # capped at 8 tokens: the analyzer holds the French row's EOS back to ~28 on this checkpoint
        texts, languages, seeds = ["Hi.", "Bonjour à tous."], ["en", "fr"], [1, 2]
        batch = generate_batch(mtl, texts, language_id=languages, seed=seeds, max_new_tokens=8)
        alone = generate_batch(mtl, texts[1:], language_id=languages[1:], seed=seeds[1:], max_new_tokens=8)[0]
        assert torch.equal(batch[1].speech_tokens, alone.speech_tokens)
        assert (batch[1].wav - alone.wav).abs().max() <= 1e-4 * alone.wav.abs().max()
        assert not torch.equal(batch[0].speech_tokens, batch[1].speech_tokens)
        with pytest.raises(ValueError, match="language_id"):
            generate_batch(mtl, ["Hi."])


# ---- turbo ------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def turbo(turbo_ckpt):
    from chatterbox.tts_turbo import ChatterboxTurboTTS

    model = ChatterboxTurboTTS.from_local(turbo_ckpt, "cpu")
    yield model
    restore(model)


class TestTurbo:
    def test_loads_with_upstream_from_local(self, turbo, turbo_ckpt):
        assert all((turbo_ckpt / name).exists() for name in TURBO_FILES)
        assert turbo.t3.is_gpt and not hasattr(turbo.t3.tfmr, "wte") and turbo.conds is not None
        assert len(turbo.tokenizer) == TURBO_TEXT_VOCAB and turbo.tokenizer.pad_token is not None
        assert turbo.t3.hp.speech_cond_prompt_len == 375
        assert turbo.conds.t3.cond_prompt_speech_tokens.shape[1] == TURBO_PROMPT_TOKENS

    def test_accelerate_generate_parity_and_exact_restore(self, turbo, audio):
        reference = generate(turbo, text="Hi.", audio_prompt_path=audio["turbo_ref"])
        assert reference.ndim == 2 and 0 < reference.shape[1] < 24000 * 2  # stopped early
        before = snapshot(turbo)

        report = accelerate(turbo)
        assert report.ok and {"voice_cache", "t3.static_kv_cache", "generate_stream"} <= set(report.applied)
        assert "t3" not in report.fallbacks and report.check.passed

        # generate() passes norm_loudness=True explicitly; the key fills in the default, so a
        # plain prepare_conditionals(path) call is the same entry, and norm_loudness=False is not.
        turbo.prepare_conditionals(audio["turbo_ref"])
        turbo.prepare_conditionals(audio["turbo_ref"], norm_loudness=False)
        assert (cache_of(turbo).misses, cache_of(turbo).hits) == (2, 0)
        accelerated = generate(turbo, text="Hi.", audio_prompt_path=audio["turbo_ref"])
        assert (cache_of(turbo).misses, cache_of(turbo).hits) == (2, 1)
        assert torch.equal(accelerated, reference)
        assert type(turbo.conds).__module__ == "chatterbox.tts_turbo"

        restore(turbo)
        assert not is_accelerated(turbo) and snapshot(turbo) == before
        assert_no_t3_patch(turbo)

    def test_drop_in_class_loads_accelerated_through_upstreams_from_pretrained(self, turbo_ckpt, monkeypatch):
        """OptimizedChatterboxTurboTTS.from_pretrained: upstream's download (here: the local
        checkpoint) and from_local, accelerated with the options given, same audio."""
        import chatterbox.tts_turbo as tts_turbo

        from chatterbox_accel import OptimizedChatterboxTurboTTS

        monkeypatch.setattr(tts_turbo, "snapshot_download", lambda **kwargs: str(turbo_ckpt))
        model = OptimizedChatterboxTurboTTS.from_pretrained("cpu", optimizations={"check_steps": 3})
        report = model.accel_report
        assert report.ok and report.check.steps == 4 and "t3.static_kv_cache" in report.applied
        assert isinstance(model, tts_turbo.ChatterboxTurboTTS) and callable(model.generate_stream)
        accelerated = generate(model, text="Hi.")
        model.restore()  # the same object on chatterbox's own code
        assert torch.equal(accelerated, generate(model, text="Hi."))
        with pytest.raises(ValueError, match="unknown option"):
            OptimizedChatterboxTurboTTS.from_pretrained("cpu", optimizations={"turbo": True})

    def test_a_short_reference_is_refused_up_front(self, turbo, audio):
        """Upstream asserts > 5 s inside prepare_conditionals, after its work began; accelerated,
        generate(), the stream and the batch refuse it first with a ValueError naming the fix."""
        short = write_wav(audio["folder"] / "short.wav", 3.0, seed=7)
        restore(turbo)
        with pytest.raises(AssertionError, match="longer than 5 seconds"):
            turbo.prepare_conditionals(short)  # the original's own error
        accelerate(turbo)
        with pytest.raises(ValueError, match="Turbo needs more than 5 s"):
            turbo.prepare_conditionals(short)
        with pytest.raises(ValueError, match="Turbo needs more than 5 s"):
            turbo.generate_stream("Hi.", audio_prompt_path=short)
        with pytest.raises(ValueError, match="Turbo needs more than 5 s"):
            chatterbox_accel.generate_batch(turbo, ["Hi."], audio_prompt_path=short)
        restore(turbo)

    def test_voice_profile_keeps_turbo_options_and_family(self, turbo, audio, tmp_path):
        accelerate(turbo)
        profile = save_voice(turbo, audio["turbo_ref"], tmp_path / "turbo.voice.pt")
        payload = torch.load(profile, weights_only=True)
        assert payload["family"] == "turbo" and tuple(payload["options"]) == (("norm_loudness", True),)

        accelerate(turbo)  # a fresh, empty cache
        load_voice(turbo, profile)
        turbo.prepare_conditionals(audio["turbo_ref"])  # the profile's entry: a hit
        assert (cache_of(turbo).misses, cache_of(turbo).hits) == (0, 1)

        payload["family"] = "multilingual"
        torch.save(payload, tmp_path / "other.voice.pt")
        with pytest.raises(ValueError, match=r"made with a multilingual model .*ChatterboxTurboTTS"):
            load_voice(turbo, tmp_path / "other.voice.pt")
        restore(turbo)


    def test_streamed_meanflow_mel_is_upstreams_in_one_pass(self, turbo):
        """The streamer's flow for Turbo's meanflow S3Gen (2 steps, no CFG) is upstream's: one
        final pass with upstream's noise gives upstream's mel."""
        from chatterbox_accel.stream import S3GenStreamer

        s3, ref = turbo.s3gen, turbo.conds.gen
        tokens = torch.randint(0, 6561, (12,), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(3)
        mel = s3.flow_inference(tokens[None], ref_dict=ref, finalize=True)
        torch.manual_seed(3)  # upstream draws the generated part's noise first, then the whole
        generated = torch.randn(1, 80, 2 * tokens.numel())
        whole = torch.randn(1, 80, ref["prompt_feat"].shape[1] + 2 * tokens.numel())
        noise = torch.cat([whole[:, :, : ref["prompt_feat"].shape[1]], generated], dim=2)
        streamer = S3GenStreamer(s3, ref, tokens.numel(), noise=noise, context_tokens=None)
        streamer.push(tokens, final=True)
        assert torch.allclose(streamer.mel, mel, rtol=0, atol=1e-5)

    def test_generate_stream_serves_generate_tokens_and_checks_its_options(self, turbo, monkeypatch):
        accelerate(turbo)
        with pytest.raises(TypeError, match="unknown option.*language_id"):
            turbo.generate_stream("Hi.", language_id="en")
        with pytest.raises(ValueError, match="max_new_tokens applies to English"):
            turbo.generate_stream("Hi.", max_new_tokens=50)
        # The fast GPT-2 loop decodes while the stream runs. This checkpoint stops after ~4
        # speech tokens, fewer than a chunk needs past the 3-token lookahead and the held frames,
        # so all the audio comes in the final chunk: its length is generate()'s.
        pushed = streamed_tokens(monkeypatch)
        chunks = list(stream(turbo, text="Hi.", chunk_size=2, first_chunk_size=4))
        with s3gen_tokens(turbo) as generated:
            reference = generate(turbo, text="Hi.")  # its T3 tokens plus 3 silence tokens, meanflow S3Gen
        assert torch.equal(torch.cat(pushed), generated[0])  # generate()'s tokens, streamed
        assert sum(c.numel() for c, _ in chunks) == reference.shape[1] and chunks[-1][1].final
        assert all(torch.isfinite(c).all() for c, _ in chunks)
        assert chunks[-1][1].t3_tokens * 960 == reference.shape[1]  # 2 mel frames x 480 samples per token
        pushed.clear()  # a seeded stream: its own generators, the global RNG untouched
        state = torch.get_rng_state()
        seeded = [torch.cat([c for c, _ in turbo.generate_stream("Hi.", seed=3)]) for _ in range(2)]
        assert torch.equal(*seeded) and torch.equal(torch.get_rng_state(), state) and pushed
        restore(turbo)

    def test_generate_batch_rows_are_the_requests_alone(self, turbo):
        """Turbo's T3 batched on the decoder (one row per slot, each row's seed), S3Gen (meanflow)
        batched: each row as that request alone; an unseeded single request is generate() bit for
        bit."""
        texts, seeds = ["Hi.", "Hello there, friend."], [1, 2]
        batch = generate_batch(turbo, texts, seed=seeds)
        for text, seed, got in zip(texts, seeds, batch):
            alone = generate_batch(turbo, [text], seed=seed)[0]
            assert torch.equal(got.speech_tokens, alone.speech_tokens)
            assert (got.wav - alone.wav).abs().max() <= 1e-4 * alone.wav.abs().max()
        want = generate(turbo, text="Hi.")
        torch.manual_seed(0)
        assert torch.equal(generate_batch(turbo, ["Hi."])[0].wav, want)


# ---- voice conversion -------------------------------------------------------------------------
@pytest.fixture(scope="class")
def vc(vc_ckpt):
    from chatterbox.vc import ChatterboxVC

    model = ChatterboxVC.from_local(vc_ckpt, "cpu")
    yield model
    restore(model)


class TestVC:
    def test_loads_with_upstream_from_local(self, vc, vc_ckpt):
        assert sorted(p.name for p in vc_ckpt.iterdir() if p.name in VC_FILES) == sorted(VC_FILES)
        assert vc.ref_dict is not None and not hasattr(vc, "t3")

    def test_accelerate_generate_parity_and_exact_restore(self, vc, audio):
        reference = generate(vc, audio=audio["src"], target_voice_path=audio["ref"])
        assert reference.ndim == 2 and reference.shape[1] > 0
        before = snapshot(vc)

        report = accelerate(vc)
        assert report.ok and report.applied == ["voice_cache"] and report.device == "cpu"
        assert "no T3" in report.fallbacks["t3"] and report.check is None
        assert "set_target_voice" in vc.__dict__

        vc.set_target_voice(audio["ref"])  # miss
        accelerated = generate(vc, audio=audio["src"], target_voice_path=audio["ref"])  # hit
        assert (cache_of(vc).misses, cache_of(vc).hits) == (1, 1)
        assert torch.equal(accelerated, reference)

        restore(vc)
        assert not is_accelerated(vc) and snapshot(vc) == before

    def test_voice_profiles_are_refused_clearly(self, vc, audio, tmp_path):
        with pytest.raises(ValueError, match="ChatterboxVC has no T3"):
            save_voice(vc, audio["ref"], tmp_path / "vc.voice.pt")
        torch.save({"format": PROFILE_FORMAT, "family": "english", "model_fingerprint": "0" * 16},
                   tmp_path / "english.voice.pt")
        with pytest.raises(ValueError, match="ChatterboxVC has no T3"):
            load_voice(vc, tmp_path / "english.voice.pt")

    def test_bad_options_and_objects_still_get_clear_errors(self, vc):
        with pytest.raises(ValueError, match="dtype='bfloat16' needs a GPU"):
            accelerate(vc, dtype="bfloat16")
        with pytest.raises(TypeError, match=r"ChatterboxTurboTTS\) or a ChatterboxVC, got object"):
            accelerate(object())
        assert not is_accelerated(vc)
