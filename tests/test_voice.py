"""The voice-conditioning cache, voice profiles and reference-audio validation."""
import shutil

import pytest
import soundfile as sf
import torch

from chatterbox_accel import accelerate, load_voice, restore, save_voice
from chatterbox_accel.checkpoints import synthetic_voice
from chatterbox_accel.patching import get_registry


def write_voice(path, seconds=3.0, sr=24000, seed=0, scale=1.0):
    wav = synthetic_voice(seconds=seconds, sr=sr, seed=seed).numpy() * scale
    sf.write(str(path), wav, sr)
    return path


def conds_tensors(conds):
    t3 = {k: v for k, v in vars(conds.t3).items() if torch.is_tensor(v)}
    gen = {f"gen.{k}": v for k, v in conds.gen.items() if torch.is_tensor(v)}
    return {**t3, **gen}


def assert_same_conds(a, b, skip=()):
    ta, tb = conds_tensors(a), conds_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if k not in skip:
            assert torch.equal(ta[k], tb[k]), f"conditionals differ in {k}"


def cache_of(model):
    return get_registry(model).state["voice_cache"]


def test_cache_hits_by_content_and_matches_the_original(tiny_model, tmp_path):
    ref = write_voice(tmp_path / "ref.wav")
    tiny_model.prepare_conditionals(str(ref), exaggeration=0.5)  # original, unpatched
    original = tiny_model.conds
    report = accelerate(tiny_model, check=False)
    assert "voice_cache" in report.applied
    tiny_model.prepare_conditionals(str(ref), exaggeration=0.5)
    assert_same_conds(tiny_model.conds, original)
    renamed = shutil.copy(ref, tmp_path / "other-name.wav")
    tiny_model.prepare_conditionals(renamed, exaggeration=0.7)
    cache = cache_of(tiny_model)
    assert (cache.misses, cache.hits) == (1, 1), "same bytes under another name must hit"
    assert_same_conds(tiny_model.conds, original, skip=("emotion_adv",))
    assert torch.allclose(tiny_model.conds.t3.emotion_adv, torch.full((1, 1, 1), 0.7))


def test_changed_file_is_recomputed_and_lru_is_bounded(tiny_model, tmp_path):
    accelerate(tiny_model, check=False, voice_cache_size=2)
    ref = write_voice(tmp_path / "ref.wav", seed=0)
    tiny_model.prepare_conditionals(str(ref))
    first = tiny_model.conds
    write_voice(ref, seed=1, scale=0.5)  # same name, new content
    tiny_model.prepare_conditionals(str(ref))
    cache = cache_of(tiny_model)
    assert cache.misses == 2
    assert not torch.equal(tiny_model.conds.gen["prompt_feat"], first.gen["prompt_feat"])
    tiny_model.prepare_conditionals(str(write_voice(tmp_path / "third.wav", seed=2)))
    assert len(cache.entries) == 2 and cache.misses == 3


def test_generate_reuses_the_cached_voice(tiny_model, tmp_path):
    ref = write_voice(tmp_path / "ref.wav")
    accelerate(tiny_model, check=False)
    tiny_model.prepare_conditionals(str(ref))
    wav = tiny_model.generate("Hi.", audio_prompt_path=str(ref))
    cache = cache_of(tiny_model)
    assert (cache.misses, cache.hits) == (1, 1) and wav.shape[-1] > 0


def write_file(path, content):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.wav", "does not exist"),
    (lambda p: write_file(p / "empty.wav", b""), "is empty"),
    (lambda p: write_file(p / "notes.wav", b"not audio at all"), "could not read"),
    (lambda p: write_voice(p / "silent.wav", scale=0.0), "is silent"),
    (lambda p: write_voice(p / "short.wav", seconds=0.3), r"0.30 s long; use at least 1 s"),
    (lambda p: write_voice(p / "phone.wav", sr=8000), "sampled at 8000 Hz"),
])
def test_bad_reference_audio_gets_a_clear_error(tiny_model, tmp_path, make, match):
    accelerate(tiny_model, check=False)
    path = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        tiny_model.generate("Hi.", audio_prompt_path=str(path))


def test_voice_profile_round_trip_and_wrong_model(tiny_model, tmp_path, ckpt_dir):
    from chatterbox_accel.checkpoints import TEST_ESTIMATOR, tiny_english_model

    ref = write_voice(tmp_path / "ref.wav")
    accelerate(tiny_model, check=False)
    profile = save_voice(tiny_model, ref, tmp_path / "voice.pt")
    expected = tiny_model.conds
    tiny_model.conds = None
    load_voice(tiny_model, profile, exaggeration=0.5)
    assert_same_conds(tiny_model.conds, expected)

    other = tiny_english_model(ckpt_dir, estimator_blocks=TEST_ESTIMATOR)
    with torch.no_grad():
        next(other.ve.parameters()).add_(1.0)  # a different voice encoder
    with pytest.raises(ValueError, match="was made with a different model"):
        load_voice(other, profile)
    junk = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk)
    with pytest.raises(ValueError, match="not a chatterbox_accel voice profile"):
        load_voice(tiny_model, junk)
    with pytest.raises(FileNotFoundError, match="create it with save_voice"):
        load_voice(tiny_model, tmp_path / "nope.pt")


def test_restore_removes_the_cache(tiny_model):
    accelerate(tiny_model, check=False)
    assert "prepare_conditionals" in tiny_model.__dict__
    restore(tiny_model)
    assert "prepare_conditionals" not in tiny_model.__dict__


def test_concurrent_misses_cache_each_voice_under_its_own_key(tmp_path):
    """Two threads preparing different voices on one model: without the cache's lock, a miss
    read `instance.conds` after the other thread's call had set it, and kept voice B under voice
    A's hash for good (the interleaving is forced here with a slow original)."""
    import threading
    import time
    import types

    from chatterbox_accel.voice import CachedPrepareConditionals, VoiceCache, file_sha256

    paths = [write_voice(tmp_path / f"v{i}.wav", 1.5, seed=i) for i in range(2)]
    model = types.SimpleNamespace(conds=None, device="cpu")

    def original(wav_fpath, exaggeration=0.5):  # upstream's prepare_conditionals sets conds, then returns
        marker = torch.full((1, 1), float(str(wav_fpath).endswith("v1.wav")))
        model.conds = types.SimpleNamespace(t3=types.SimpleNamespace(speaker_emb=marker, cond_prompt_speech_tokens=marker),
                                            gen={})
        time.sleep(0.3)  # the window between its assignment and the wrapper's read, widened

    cache = VoiceCache()
    wrapper = CachedPrepareConditionals(cache)
    threads = [threading.Thread(target=wrapper, args=(original, model, (str(p),), {})) for p in paths]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    for i, path in enumerate(paths):
        (voice,) = [v for k, v in cache.entries.items() if k[0] == file_sha256(path)]
        assert voice.speaker_emb.item() == i
