"""Random-weight Chatterbox checkpoints in the official file layout, for offline tests and benchmarks.

No weights can be downloaded here, and none are needed to measure speed (a random model does
exactly the real model's compute) or to prove parity (fast vs original on the same weights).
`write_english_checkpoint(folder)` writes what `ChatterboxTTS.from_local(folder, device)` reads:
`ve.safetensors`, `t3_cfg.safetensors`, `s3gen.safetensors`, `tokenizer.json`, `conds.pt`.
Everything is seeded: the same seed gives byte-identical weights.

`tiny_t3()` builds a small T3 (2 layers, same widths and vocabularies) for fast tests.
"""
from __future__ import annotations

import copy
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
    return _fill_unused(vocab, TEXT_VOCAB)


def _fill_unused(vocab: dict, size: int) -> dict:
    """Give every id below `size` a token: tokenizers warns about (and may mangle) sparse ids."""
    used = set(vocab.values())
    for i in range(size):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    return vocab


def _save_char_tokenizer(path: Path, vocab: dict, specials: list) -> None:
    """A merge-free BPE (one token per character) with `specials` matched whole first."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.add_special_tokens(specials)
    tok.save(str(path))


def write_tokenizer(path: Path) -> None:
    _save_char_tokenizer(path, english_vocab(), list(SPECIAL_TOKENS))


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def tiny_t3(seed: int = 0, layers: int = 2, stop_after: int | None = None, multilingual: bool = False,
            intermediate_size: int | None = None, realistic: float | None = None):
    """A T3 with a `layers`-deep Llama backbone (registered under TINY_LLAMA), random weights.
    multilingual: the multilingual text vocabulary (its alignment analyzer reads layers 9, 12
    and 13, so give it at least 14 layers). intermediate_size: a narrower MLP, for speed.
    realistic: peaked logits of this mean entropy (nats) and outlier channels (realistic.py)."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_520M_CONFIG_DICT, LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config

    width = intermediate_size or LLAMA_520M_CONFIG_DICT["intermediate_size"]
    name = f"{TINY_LLAMA}_{layers}" + (f"_mlp{width}" if intermediate_size else "")
    LLAMA_CONFIGS.setdefault(name, {**LLAMA_520M_CONFIG_DICT, "num_hidden_layers": layers,
                                    "intermediate_size": width})
    hp = T3Config.multilingual() if multilingual else T3Config.english_only()
    hp.llama_config_name = name
    return _realistic(_shape_speech_head(_seeded(seed, lambda: T3(hp)).eval(), stop_after), realistic)


def full_t3(seed: int = 0, stop_after: int | None = None, multilingual: bool = False,
            realistic: float | None = None):
    """A full-size random T3; realistic: as tiny_t3's."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config.multilingual() if multilingual else T3Config.english_only()
    return _realistic(_shape_speech_head(_seeded(seed, lambda: T3(hp)).eval(), stop_after), realistic)


def _realistic(t3, entropy: float | None):
    """`realistic.make_realistic` at this entropy (None: the flat random head, unchanged)."""
    if entropy is not None:
        from .realistic import make_realistic

        make_realistic(t3, entropy=entropy)
    return t3


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
                             stop_after: int | None = None, voice_seconds: float = 10.0,
                             realistic: float | None = None) -> Path:
    """Write a full-size random English checkpoint into `folder`; return the folder.
    `stop_after`: make T3 stop after about that many speech tokens (see _shape_speech_head).
    `voice_seconds`: length of the built-in voice; S3Gen re-processes it on every call, so
    short ones make fast tests (benchmarks keep chatterbox's 10 s). `realistic`: a T3 with
    peaked logits of that mean entropy (nats) and outlier channels (realistic.py), for
    reduced-precision work; None: the flat random head."""
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.voice_encoder import VoiceEncoder

    folder = Path(folder)
    meta = {"family": "english", "seed": seed, "random_weights": True, "stop_after": stop_after,
            "voice_seconds": voice_seconds}
    if realistic is not None:
        meta["realistic_entropy"] = realistic
    meta_file = folder / "chatterbox_accel.json"
    if not overwrite and is_complete(folder):
        if json.loads(meta_file.read_text()) == meta:
            return folder  # already written with these settings
    folder.mkdir(parents=True, exist_ok=True)
    ve = _seeded(seed + 1, VoiceEncoder).eval()
    t3 = full_t3(seed, stop_after, realistic=realistic)
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


def tiny_english_model(folder, device="cpu", seed: int = 0, layers: int = 2, stop_after: int | None = 12,
                       estimator_blocks: tuple[int, int] | None = None):
    """A ChatterboxTTS with a tiny T3 and the VE, S3Gen, tokenizer and voice of the full
    checkpoint in `folder` (any complete one; written with defaults if missing). Loads the parts the way
    `ChatterboxTTS.from_local` does, skipping its 2 GB T3.

    estimator_blocks=(n_blocks, num_mid_blocks): S3Gen's CFM estimator rebuilt smaller (upstream's
    `ConditionalDecoder` with those block counts instead of 4 and 12; random weights, seeded):
    for tests, where S3Gen's compute is not the subject (its flow runs ~5x faster). Speed
    figures use the full estimator (the default)."""
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
    template = _s3gen_template(folder, S3Gen, load_file)
    if estimator_blocks is None:
        s3gen = copy.deepcopy(template)  # a fresh, independent copy
    else:
        cfm, full = template.flow.decoder, template.flow.decoder.estimator
        cfm.estimator = None  # not copied: replaced below
        try:
            s3gen = copy.deepcopy(template)
        finally:
            cfm.estimator = full
        s3gen.flow.decoder.estimator = _seeded(seed + 3, lambda: small_estimator(*estimator_blocks)).eval()
    conds = Conditionals.load(folder / "conds.pt").to(device)
    return ChatterboxTTS(tiny_t3(seed, layers, stop_after).to(device), s3gen.to(device).eval(), ve.to(device).eval(),
                         EnTokenizer(str(folder / "tokenizer.json")), device, conds=conds)


def small_estimator(n_blocks: int = 1, num_mid_blocks: int = 1):
    """Upstream's S3Gen CFM estimator (English/Multilingual: as `S3Gen.__init__` builds it) with
    fewer transformer blocks."""
    from chatterbox.models.s3gen.decoder import ConditionalDecoder

    return ConditionalDecoder(in_channels=320, out_channels=80, causal=True, channels=[256], dropout=0.0,
                              attention_head_dim=64, n_blocks=n_blocks, num_mid_blocks=num_mid_blocks, num_heads=8,
                              act_fn="gelu")


TEST_ESTIMATOR = (1, 1)  # the test models' S3Gen estimator blocks (tiny_english_test_model, tests' fixtures)


def tiny_english_server_model(folder, device="cpu", estimator_blocks: tuple[int, int] | None = None):
    """`tiny_english_model` for a process that builds one model (the Ray replicas, `--tiny`
    benchmarks): the S3Gen template, kept for the next tiny model, is let go (~1 GB per process)."""
    model = tiny_english_model(folder, device, estimator_blocks=estimator_blocks)
    _S3GEN_TEMPLATES.clear()
    return model


def tiny_english_test_model(folder, device="cpu"):
    """`tiny_english_server_model` with the small S3Gen estimator (TEST_ESTIMATOR): the test
    servers' model (API, streaming and scheduling are their subject, not S3Gen's compute)."""
    return tiny_english_server_model(folder, device, estimator_blocks=TEST_ESTIMATOR)


_S3GEN_TEMPLATES: dict = {}


def _s3gen_template(folder: Path, S3Gen, load_file):
    """The checkpoint's S3Gen, built and loaded once per process and never run (building one
    takes ~3 s of random initialisation; a deep copy ~0.7 s): every tiny model gets a copy."""
    key = (str(folder.resolve()), (folder / "s3gen.safetensors").stat().st_mtime_ns)
    if key not in _S3GEN_TEMPLATES:
        s3gen = S3Gen()
        s3gen.load_state_dict(load_file(folder / "s3gen.safetensors"), strict=False)
        _S3GEN_TEMPLATES.clear()  # one checkpoint's at a time: ~1 GB each
        _S3GEN_TEMPLATES[key] = s3gen.eval()
    return _S3GEN_TEMPLATES[key]


# ---- the other model families of chatterbox-tts 0.1.7 ----------------------------------------
# File lists as the upstream loaders read them (`from_local`) and fetch them (`from_pretrained`).
MULTILINGUAL_HUB_REPO = "ResembleAI/chatterbox"  # chatterbox.mtl_tts.REPO_ID
MULTILINGUAL_FILES = ("ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt",
                      "grapheme_mtl_merged_expanded_v1.json", "conds.pt", "Cangjie5_TC.json")
TURBO_HUB_REPO = "ResembleAI/chatterbox-turbo"  # chatterbox.tts_turbo.REPO_ID
TURBO_ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.pt", "*.model")  # its snapshot_download
TURBO_FILES = ("ve.safetensors", "t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors",
               "tokenizer.json", "tokenizer_config.json", "conds.pt")  # what we write; AutoTokenizer reads the two json
VC_HUB_REPO = "ResembleAI/chatterbox"  # chatterbox.vc.REPO_ID
VC_FILES = ("s3gen.safetensors", "conds.pt")  # a subset of the English files: VC reads conds.pt's "gen" only
MULTILINGUAL_TEXT_VOCAB = 2454  # T3Config.multilingual().text_tokens_dict_size
TURBO_TEXT_VOCAB = 50276  # Turbo's T3Config(text_tokens_dict_size=50276); from_local warns on another length
TURBO_PROMPT_TOKENS = 375  # Turbo's speech_cond_prompt_len: a reference of 15 s or more fills it


def _reusable(folder: Path, files, meta: dict, overwrite: bool) -> bool:
    """True when `folder` already holds `files` and a metadata file equal to `meta`."""
    meta_file = folder / "chatterbox_accel.json"
    if overwrite or not meta_file.exists() or not all((folder / f).exists() for f in files):
        return False
    return json.loads(meta_file.read_text()) == meta


def _finish(folder: Path, meta: dict, family: str) -> Path:
    (folder / "chatterbox_accel.json").write_text(json.dumps(meta, indent=1))  # last: marks it complete
    logger.info("wrote random-weight %s checkpoint to %s", family, folder)
    return folder


def _as_family_conds(conds, module: str):
    """`conds` rebuilt with the Conditionals class of chatterbox's `module` (same fields)."""
    import importlib

    cls = importlib.import_module(module).Conditionals
    return cls(conds.t3, conds.gen)


def multilingual_vocab() -> dict:
    """A grapheme vocabulary shaped like `grapheme_mtl_merged_expanded_v1.json`: chatterbox's
    special tokens at the English ids, one `[xx]` token per supported language, lowercase
    graphemes of the supported scripts (NFKD: base letters plus combining marks), Cangjie
    code tokens `[cj_a]`...; every id < 2454 is used."""
    from chatterbox.mtl_tts import SUPPORTED_LANGUAGES

    vocab = dict(SPECIAL_TOKENS)
    symbols = [f"[{code}]" for code in sorted(SUPPORTED_LANGUAGES)]
    symbols += [f"[cj_{c}]" for c in "abcdefghijklmnopqrstuvwxyz."]
    ranges = [(0x21, 0x7F), (0x300, 0x370), (0x3B1, 0x3CA), (0x430, 0x460), (0x5D0, 0x5EB),
              (0x621, 0x64B), (0x900, 0x97F), (0x3041, 0x3097), (0x30A1, 0x30FB), (0x1100, 0x1200),
              (0x3001, 0x3003), (0xFF01, 0xFF20)]
    symbols += [chr(c) for lo, hi in ranges for c in range(lo, hi) if not chr(c).isupper()]
    next_id = 7
    for sym in symbols:
        while next_id in vocab.values():
            next_id += 1
        if next_id >= MULTILINGUAL_TEXT_VOCAB:
            break
        vocab.setdefault(sym, next_id)
        next_id += 1
    return _fill_unused(vocab, MULTILINGUAL_TEXT_VOCAB)


def write_multilingual_tokenizer(path: Path) -> None:
    vocab = multilingual_vocab()
    # Language and Cangjie tokens are matched whole, before the per-character model.
    _save_char_tokenizer(path, vocab, [t for t in vocab if t.startswith("[")])


def write_cangjie_table(path: Path) -> None:
    """A few entries in the format of `Cangjie5_TC.json` ("glyph\\tcode" strings)."""
    path.write_text(json.dumps(["日\ta", "月\tb", "金\tc", "木\td", "水\te", "火\tf", "土\tg"],
                               ensure_ascii=False))


@torch.no_grad()
def _shape_multilingual_head(t3, stop_after: int | None = None):
    """`_shape_speech_head`, plus: the 6561 speech-token rows are scaled up (x3), so that at
    multilingual `generate()`'s default min_p=0.05 the rows >= 6561 (start, stop, and the 1631
    unused ids up to 8193) always fall below the cut. Multilingual `generate()`, unlike the
    English one, does not drop ids >= 6561 before S3Gen (whose embedding has 6561 rows), so a
    random head that emits them makes it fail with an IndexError; a trained head never does.
    The EOS row is doubled to stay on top of the larger logits once position N is reached."""
    _shape_speech_head(t3, stop_after)
    t3.speech_head.weight[:6561] *= 3.0
    if stop_after is not None:
        t3.speech_head.weight[t3.hp.stop_speech_token] *= 2.0
    return t3


def write_multilingual_checkpoint(folder, seed: int = 0, overwrite: bool = False,
                                  stop_after: int | None = None, voice_seconds: float = 10.0) -> Path:
    """Write a full-size random checkpoint that `ChatterboxMultilingualTTS.from_local(folder,
    device)` loads: `ve.pt` and `s3gen.pt` (torch state dicts, loaded strictly),
    `t3_mtl23ls_v2.safetensors` (T3(T3Config.multilingual()): Llama 520M, 2454 text ids), the
    grapheme tokenizer json, `Cangjie5_TC.json` and `conds.pt`. Same seed offsets as
    `write_english_checkpoint`, so the voice encoder and S3Gen equal the English ones.
    `stop_after`: T3 stops after about that many speech tokens, as for English (multilingual
    `generate()` also runs chatterbox's alignment analyzer, which may hold EOS back a few steps
    while it thinks the text is unfinished, or force it earlier)."""
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.voice_encoder import VoiceEncoder

    folder = Path(folder)
    meta = {"family": "multilingual", "seed": seed, "random_weights": True, "stop_after": stop_after,
            "voice_seconds": voice_seconds}
    if _reusable(folder, MULTILINGUAL_FILES, meta, overwrite):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    ve = _seeded(seed + 1, VoiceEncoder).eval()
    t3 = _shape_multilingual_head(_seeded(seed, lambda: T3(T3Config.multilingual())).eval(), stop_after)
    s3gen = _seeded(seed + 2, S3Gen).eval()
    torch.save({k: v.detach().clone() for k, v in ve.state_dict().items()}, folder / "ve.pt")
    _save_safetensors(t3, folder / "t3_mtl23ls_v2.safetensors")
    torch.save({k: v.detach().clone() for k, v in s3gen.state_dict().items()}, folder / "s3gen.pt")
    write_multilingual_tokenizer(folder / "grapheme_mtl_merged_expanded_v1.json")
    write_cangjie_table(folder / "Cangjie5_TC.json")
    conds = english_conds(s3gen, t3, seed, voice_seconds)  # same prompt length (150) and fields
    _as_family_conds(conds, "chatterbox.mtl_tts").save(folder / "conds.pt")
    return _finish(folder, meta, "multilingual")


def write_turbo_tokenizer(folder: Path) -> None:
    """A GPT-2 style byte-level BPE tokenizer with Turbo's 50276 entries, built offline:
    the 256 byte symbols, 50000 two-byte merges, `<|endoftext|>` (50256) and 19 added tokens
    (stand-ins for Turbo's own added tokens). Saved with `save_pretrained`, so the
    `AutoTokenizer.from_pretrained(folder)` of `ChatterboxTurboTTS.from_local` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= 50256:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    vocab["<|endoftext|>"] = 50256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                               eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf_tok.add_tokens([f"<|chatterbox_accel_added_{i}|>" for i in range(TURBO_TEXT_VOCAB - 50257)])
    assert len(hf_tok) == TURBO_TEXT_VOCAB, len(hf_tok)
    hf_tok.save_pretrained(str(folder))


def turbo_t3_config():
    """Turbo's T3 hyper-parameters, exactly as `ChatterboxTurboTTS.from_local` sets them."""
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config(text_tokens_dict_size=TURBO_TEXT_VOCAB)
    hp.llama_config_name = "GPT2_medium"
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return hp


def tiny_turbo_t3(seed: int = 0, layers: int = 2, stop_after: int | None = None,
                  prompt_tokens: int = TURBO_PROMPT_TOKENS):
    """A Turbo T3 with a `layers`-deep GPT-2 (full width), random weights, shaped as
    `_shape_turbo_head` shapes the full-size one. `layers=24` is the full-size model."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS

    hp = turbo_t3_config()
    if layers != GPT2_MEDIUM_CONFIG["n_layer"]:
        hp.llama_config_name = f"{TINY_LLAMA}_gpt2_{layers}"
        LLAMA_CONFIGS.setdefault(hp.llama_config_name, {**GPT2_MEDIUM_CONFIG, "n_layer": layers})
    t3 = _seeded(seed, lambda: T3(hp)).eval()
    del t3.tfmr.wte  # as ChatterboxTurboTTS.from_local does
    return _shape_turbo_head(t3, stop_after, prompt_tokens)


@torch.no_grad()
def _shape_turbo_head(t3, stop_after: int | None = None, prompt_tokens: int = TURBO_PROMPT_TOKENS):
    """Turbo's counterpart of `_shape_speech_head` (GPT-2 backbone, `inference_turbo`).

    Rows >= 6561 (start/stop) are scaled down, so a random model runs to `max_gen_len`.
    GPT-2 has only absolute positions (its own `wpe`; T3 adds none), so a random Turbo T3 can
    only stop at a fixed position of the whole sequence: speaker (1) + voice prompt tokens +
    text + speech. `stop_after=N`: positions from 1 + `prompt_tokens` + N on carry a large
    component along a zero-mean direction d, and the EOS row of the head reads d. With a voice
    prompt of `prompt_tokens` tokens (the built-in voice is written with that many; a reference
    of s seconds gives min(25 * s, 375)), T3 stops once text + speech tokens reach about N; a
    longer prompt stops it sooner (possibly at once), a shorter one later.
    """
    t3.speech_head.weight[6561:] *= 0.05
    if stop_after is not None:
        g = torch.Generator().manual_seed(99)
        d = torch.randn(t3.dim, generator=g)
        d = d - d.mean()  # GPT-2's final LayerNorm removes the mean
        d = d / d.norm()
        t3.tfmr.wpe.weight[1 + prompt_tokens + stop_after:] += 100.0 * d
        t3.speech_head.weight[t3.hp.stop_speech_token] = 0.3 * d
        t3.speech_head.bias[t3.hp.stop_speech_token] = 0.0
    return t3


def turbo_conds(s3gen, hp, seed: int = 0, voice_seconds: float = 10.0, prompt_tokens: int = TURBO_PROMPT_TOKENS):
    """Built-in Turbo voice: like `english_conds`, but the synthetic voice is loudness-normalised
    to -27 LUFS first (as Turbo's prepare_conditionals does) and the T3 prompt has
    `prompt_tokens` tokens (375, as a reference of 15 s or more gives)."""
    import numpy as np
    import pyloudnorm

    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts_turbo import Conditionals

    wav = synthetic_voice(voice_seconds, seed=seed).numpy().astype(np.float64)
    gain = 10.0 ** ((-27.0 - pyloudnorm.Meter(24000).integrated_loudness(wav)) / 20.0)
    with torch.inference_mode():
        gen = s3gen.embed_ref(torch.from_numpy(wav * gain).float(), 24000, device="cpu")
    g = torch.Generator().manual_seed(seed)
    speaker = torch.randn(1, hp.speaker_embed_size, generator=g)
    t3_cond = T3Cond(
        speaker_emb=speaker / speaker.norm(),
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, prompt_tokens), generator=g),
        emotion_adv=0.5 * torch.ones(1, 1, 1),
    )
    return Conditionals(t3_cond, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in gen.items()})


def write_turbo_checkpoint(folder, seed: int = 0, overwrite: bool = False, stop_after: int | None = None,
                           voice_seconds: float = 10.0, prompt_tokens: int = TURBO_PROMPT_TOKENS) -> Path:
    """Write a full-size random checkpoint that `ChatterboxTurboTTS.from_local(folder, device)`
    loads: `ve.safetensors`, `t3_turbo_v1.safetensors` (GPT-2 medium T3, including the `wte`
    from_local deletes after loading), `s3gen_meanflow.safetensors` (S3Gen(meanflow=True),
    loaded strictly), a GPT-2 style tokenizer (`tokenizer.json`, `tokenizer_config.json`) and
    `conds.pt`. `stop_after`: see `_shape_turbo_head`: it counts text tokens too, and holds
    for voice prompts of `prompt_tokens` tokens (the built-in voice has that many; 375 = a
    reference of 15 s or more, 150 = a 6 s one)."""
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.voice_encoder import VoiceEncoder

    folder = Path(folder)
    meta = {"family": "turbo", "seed": seed, "random_weights": True, "stop_after": stop_after,
            "voice_seconds": voice_seconds, "prompt_tokens": prompt_tokens}
    if _reusable(folder, TURBO_FILES, meta, overwrite):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    hp = turbo_t3_config()
    ve = _seeded(seed + 1, VoiceEncoder).eval()
    t3 = _shape_turbo_head(_seeded(seed, lambda: T3(hp)).eval(), stop_after, prompt_tokens)
    s3gen = _seeded(seed + 2, lambda: S3Gen(meanflow=True)).eval()
    _save_safetensors(ve, folder / "ve.safetensors")
    _save_safetensors(t3, folder / "t3_turbo_v1.safetensors")
    _save_safetensors(s3gen, folder / "s3gen_meanflow.safetensors")
    write_turbo_tokenizer(folder)
    turbo_conds(s3gen, hp, seed, voice_seconds, prompt_tokens).save(folder / "conds.pt")
    return _finish(folder, meta, "turbo")


def write_vc_checkpoint(folder, seed: int = 0, overwrite: bool = False, voice_seconds: float = 10.0) -> Path:
    """Write what `ChatterboxVC.from_local(folder, device)` reads: `s3gen.safetensors` and
    `conds.pt` (it uses the "gen" part: the target voice). These are the English files of the
    same seed, byte for byte, so a complete English checkpoint folder loads as VC too."""
    import types

    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3.modules.t3_config import T3Config

    folder = Path(folder)
    meta = {"family": "vc", "seed": seed, "random_weights": True, "voice_seconds": voice_seconds}
    if _reusable(folder, VC_FILES, meta, overwrite):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    s3gen = _seeded(seed + 2, S3Gen).eval()
    _save_safetensors(s3gen, folder / "s3gen.safetensors")
    # english_conds reads only T3's prompt sizes; no 2 GB T3 is built for them.
    english_conds(s3gen, types.SimpleNamespace(hp=T3Config.english_only()), seed, voice_seconds).save(
        folder / "conds.pt")
    return _finish(folder, meta, "vc")
