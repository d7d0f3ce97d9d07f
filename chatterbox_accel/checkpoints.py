"""Random-weight Chatterbox checkpoints in the official file layout, for offline tests and benchmarks.

No weights can be downloaded here, and none are needed to measure speed (a random model does
exactly the real model's compute) or to prove parity (fast vs original on the same weights).
`write_english_checkpoint(folder)` writes what `ChatterboxTTS.from_local(folder, device)` reads:
`ve.safetensors`, `t3_cfg.safetensors`, `s3gen.safetensors`, `tokenizer.json`, `conds.pt`.
Everything is seeded: the same seed gives byte-identical weights.

`tiny_t3()` builds a small T3 (2 layers, same widths and vocabularies) for fast tests.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENGLISH_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
HUB_REPO = "ResembleAI/chatterbox"  # chatterbox.tts.REPO_ID in chatterbox-tts 0.1.7 (a test pins it)
TINY_LLAMA = "chatterbox_accel_tiny"
SPECIAL_TOKENS = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[PAD]": 3, "[SEP]": 4, "[CLS]": 5,
                  "[MASK]": 6, "[START]": 255}
TEXT_VOCAB = 704


def english_vocab() -> dict:
    """Character vocabulary with chatterbox's special tokens at the ids T3Config expects."""
    vocab = dict(SPECIAL_TOKENS)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-()&%$#@:;/"
    next_id = 7
    for ch in chars:
        vocab[ch] = next_id
        next_id += 1
    used = set(vocab.values())
    for i in range(TEXT_VOCAB):  # no holes: tokenizers warns about (and may mangle) sparse ids
        if i not in used:
            vocab[f"<unused{i}>"] = i
    return vocab


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    vocab = english_vocab()
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path))


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def tiny_t3(seed: int = 0, layers: int = 2, stop_after: int | None = None):
    """A T3 with a `layers`-deep Llama backbone (registered under TINY_LLAMA), random weights."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_520M_CONFIG_DICT, LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config

    name = f"{TINY_LLAMA}_{layers}"
    LLAMA_CONFIGS.setdefault(name, {**LLAMA_520M_CONFIG_DICT, "num_hidden_layers": layers})
    hp = T3Config.english_only()
    hp.llama_config_name = name
    return _shape_speech_head(_seeded(seed, lambda: T3(hp)).eval(), stop_after)


def full_t3(seed: int = 0, stop_after: int | None = None):
    from chatterbox.models.t3 import T3

    return _shape_speech_head(_seeded(seed, T3).eval(), stop_after)


@torch.no_grad()
def _shape_speech_head(t3, stop_after: int | None = None):
    """Make a random T3 behave like a trained one where it matters for timing.

    Random heads emit start/stop/pad ids (>= 6561) ~20 % of the time; a trained T3 emits them
    only to stop. Those rows are scaled down, so the model runs to max_new_tokens.
    With `stop_after=N`, it stops like a trained one instead: speech positions >= N carry a
    large component along one direction d of the residual stream, and the EOS row of the head
    reads d, so EOS wins from about the N-th token on. `generate()` (which hard-codes
    max_new_tokens=1000) then yields ~N tokens, and the original and the fast path stop alike.
    """
    t3.speech_head.weight[6561:] *= 0.05
    if stop_after is not None:
        g = torch.Generator().manual_seed(99)
        d = torch.randn(t3.dim, generator=g)
        d = d / d.norm()
        t3.speech_pos_emb.emb.weight[stop_after:] += 100.0 * d
        # Before position N, d.h ~ N(0, 1): the EOS logit stays ~0.3, below the usual maximum
        # (~2); after it, h is almost parallel to d (d.h ~ 30) and the EOS logit is ~9.
        t3.speech_head.weight[t3.hp.stop_speech_token] = 0.3 * d
    return t3


def synthetic_voice(seconds: float = 10.0, sr: int = 24000, seed: int = 0) -> torch.Tensor:
    """A deterministic voice-like signal: a gliding harmonic tone with a syllable envelope."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    wav = sum(torch.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + torch.sin(2 * math.pi * 4 * t)).clamp(min=0.05)
    wav = wav * envelope + 0.01 * torch.randn(t.shape, generator=g)
    return (0.3 * wav / wav.abs().max()).float()


def english_conds(s3gen, t3, seed: int = 0, voice_seconds: float = 10.0):
    """Built-in voice conditionals (conds.pt): S3Gen reference from a synthetic voice (10 s,
    as chatterbox's own prompt length), a fixed speaker embedding and prompt tokens for T3."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        gen = s3gen.embed_ref(synthetic_voice(voice_seconds, seed=seed), 24000, device="cpu")
    speaker = torch.randn(1, t3.hp.speaker_embed_size, generator=g)
    t3_cond = T3Cond(
        speaker_emb=speaker / speaker.norm(),
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, t3.hp.speech_cond_prompt_len), generator=g),
        emotion_adv=0.5 * torch.ones(1, 1, 1),
    )
    return Conditionals(t3_cond, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in gen.items()})


def _save_safetensors(module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def write_english_checkpoint(folder, seed: int = 0, overwrite: bool = False,
                             stop_after: int | None = None, voice_seconds: float = 10.0) -> Path:
    """Write a full-size random English checkpoint into `folder`; return the folder.
    `stop_after`: make T3 stop after about that many speech tokens (see _shape_speech_head).
    `voice_seconds`: length of the built-in voice; S3Gen re-processes it on every call, so
    short ones make fast tests (benchmarks keep chatterbox's 10 s)."""
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.voice_encoder import VoiceEncoder

    folder = Path(folder)
    meta = {"family": "english", "seed": seed, "random_weights": True, "stop_after": stop_after,
            "voice_seconds": voice_seconds}
    meta_file = folder / "chatterbox_accel.json"
    if not overwrite and is_complete(folder):
        if json.loads(meta_file.read_text()) == meta:
            return folder  # already written with these settings
    folder.mkdir(parents=True, exist_ok=True)
    ve = _seeded(seed + 1, VoiceEncoder).eval()
    t3 = full_t3(seed, stop_after)
    s3gen = _seeded(seed + 2, S3Gen).eval()
    _save_safetensors(ve, folder / "ve.safetensors")
    _save_safetensors(t3, folder / "t3_cfg.safetensors")
    _save_safetensors(s3gen, folder / "s3gen.safetensors")
    write_tokenizer(folder / "tokenizer.json")
    english_conds(s3gen, t3, seed, voice_seconds).save(folder / "conds.pt")
    meta_file.write_text(json.dumps(meta, indent=1))  # last: marks the folder complete
    logger.info("wrote random-weight English checkpoint to %s", folder)
    return folder


def download_english() -> Path:
    """The official English files, from the Hugging Face hub or its local cache, fetched as
    `ChatterboxTTS.from_pretrained` fetches them; returns their folder."""
    from huggingface_hub import hf_hub_download

    paths = [hf_hub_download(repo_id=HUB_REPO, filename=name) for name in ENGLISH_FILES]
    return Path(paths[-1]).parent


def is_complete(folder) -> bool:
    """True when `folder` holds a finished checkpoint (the metadata file is written last)."""
    folder = Path(folder)
    return all((folder / f).exists() for f in ENGLISH_FILES) and (folder / "chatterbox_accel.json").exists()


def tiny_english_model(folder, device="cpu", seed: int = 0, layers: int = 2, stop_after: int | None = 12):
    """A ChatterboxTTS with a tiny T3 and the VE, S3Gen, tokenizer and voice of the full
    checkpoint in `folder` (any complete one; written with defaults if missing). Loads the parts the way
    `ChatterboxTTS.from_local` does, skipping its 2 GB T3."""
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.tts import ChatterboxTTS, Conditionals
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_complete(folder):
        write_english_checkpoint(folder, seed=seed)
    ve = VoiceEncoder()
    ve.load_state_dict(load_file(folder / "ve.safetensors"))
    s3gen = S3Gen()
    s3gen.load_state_dict(load_file(folder / "s3gen.safetensors"), strict=False)
    conds = Conditionals.load(folder / "conds.pt").to(device)
    return ChatterboxTTS(tiny_t3(seed, layers, stop_after).to(device), s3gen.to(device).eval(), ve.to(device).eval(),
                         EnTokenizer(str(folder / "tokenizer.json")), device, conds=conds)
