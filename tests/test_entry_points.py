"""The drop-in class, the CHATTERBOX_ACCEL=1 hook (in subprocesses) and the checkpoints."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from chatterbox_accel.checkpoints import ENGLISH_FILES, english_vocab, tiny_t3

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An app that never imports chatterbox_accel: it checks which of chatterbox's four model
# classes have their constructor hooked, then builds a ChatterboxTTS with chatterbox's own API
# (a 2-layer T3, so no 2 GB load; S3Gen, voice encoder, tokenizer and voice from the test
# checkpoint) and reports whether the new model came out accelerated.
APP = textwrap.dedent("""
    import sys
    from pathlib import Path
    import chatterbox.tts, chatterbox.mtl_tts, chatterbox.tts_turbo, chatterbox.vc
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_520M_CONFIG_DICT, LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.models.voice_encoder import VoiceEncoder

    classes = (chatterbox.tts.ChatterboxTTS, chatterbox.mtl_tts.ChatterboxMultilingualTTS,
               chatterbox.tts_turbo.ChatterboxTurboTTS, chatterbox.vc.ChatterboxVC)
    hooked = [c.__name__ for c in classes if hasattr(c.__init__, "__wrapped__")]
    LLAMA_CONFIGS["app_2_layers"] = {**LLAMA_520M_CONFIG_DICT, "num_hidden_layers": 2}
    hp = T3Config.english_only()
    hp.llama_config_name = "app_2_layers"
    folder = Path(sys.argv[1])
    model = chatterbox.tts.ChatterboxTTS(
        T3(hp).eval(), S3Gen().eval(), VoiceEncoder().eval(), EnTokenizer(str(folder / "tokenizer.json")),
        "cpu", conds=chatterbox.tts.Conditionals.load(folder / "conds.pt"))
    print("chatterbox_accel" in sys.modules, hooked, "PATCHED" if "inference" in model.t3.__dict__ else "UNPATCHED")
""")
ALL_FOUR = "['ChatterboxTTS', 'ChatterboxMultilingualTTS', 'ChatterboxTurboTTS', 'ChatterboxVC']"


@pytest.mark.parametrize("value,expected", [("1", f"True {ALL_FOUR} PATCHED"), ("0", "False [] UNPATCHED")])
def test_env_toggle_accelerates_an_app_that_never_imports_us(tmp_path, ckpt_dir, value, expected):
    """CHATTERBOX_ACCEL=1: all four families' constructors are hooked and a model the app builds
    comes out accelerated (with CHATTERBOX_ACCEL_OPTIONS read). =0 ("0" rather than unset, so a
    hook reading any non-empty value as "on" fails too): nothing of ours is even imported."""
    app = tmp_path / "app.py"
    app.write_text(APP)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHATTERBOX_ACCEL")}
    # The .pth hook imports chatterbox_accel at start-up: from this working tree, not from a
    # possibly older `pip install .` copy in site-packages.
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, environ.get("PYTHONPATH")]))
    environ.update(CHATTERBOX_ACCEL=value, CHATTERBOX_ACCEL_OPTIONS='{"check_steps": 4}')
    proc = subprocess.run([sys.executable, str(app), str(ckpt_dir)], capture_output=True, text=True,
                          env=environ, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == expected


def test_importing_the_package_patches_nothing():
    code = ("import chatterbox_accel, sys; "
            "print('torch' in sys.modules, 'chatterbox' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_drop_in_class_loads_accelerated_and_generates(ckpt_dir):
    from chatterbox.tts import ChatterboxTTS

    from chatterbox_accel import OptimizedChatterboxTTS, is_accelerated, restore

    model = OptimizedChatterboxTTS.from_local(ckpt_dir, "cpu", optimizations={"check_steps": 4})
    assert isinstance(model, ChatterboxTTS) and is_accelerated(model)
    assert model.accel_report.check.passed, str(model.accel_report)
    torch.manual_seed(0)
    wav = model.generate("Quick check.")
    assert wav.ndim == 2 and wav.shape[0] == 1 and wav.shape[1] > 0 and model.sr == 24000
    restore(model)
    assert not is_accelerated(model)


def test_drop_in_rejects_bad_options_before_loading(tmp_path):
    from chatterbox_accel import OptimizedChatterboxTTS

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['turbo'\]"):
        OptimizedChatterboxTTS.from_local(tmp_path / "missing", "cpu", optimizations={"turbo": True})


def test_checkpoint_layout_and_tokenizer(ckpt_dir):
    from chatterbox.models.tokenizers import EnTokenizer

    assert all((ckpt_dir / name).exists() for name in ENGLISH_FILES)
    tok = EnTokenizer(str(ckpt_dir / "tokenizer.json"))
    vocab = tok.tokenizer.get_vocab()
    assert vocab["[START]"] == 255 and vocab["[STOP]"] == 0 and max(vocab.values()) < 704
    ids = tok.text_to_tokens("Hi there.")[0].tolist()
    assert ids == [english_vocab()[c] if c != " " else 2 for c in "Hi there."]


def test_random_weights_are_seeded():
    a, b, c = tiny_t3(seed=4), tiny_t3(seed=4), tiny_t3(seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["speech_head.weight"], sc["speech_head.weight"])
