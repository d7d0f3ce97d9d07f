"""`generate_batch()`: many utterances in one call, batched through T3 and S3Gen.

    results = chatterbox_accel.generate_batch(model, ["Hello.", "How are you?"], seed=[1, 2])
    results[0].wav  # (1, samples) watermarked, as model.generate() returns

The pipeline per request is upstream's `generate()`: voice conditionals -> text tokens -> T3 ->
speech tokens -> S3Gen flow -> HiFT -> trim fade -> watermark. What changes is that requests
share the work:
- T3 (English, Multilingual): the runner's `t3.batch.SlotDecoder` (the one `generate()` and
  `generate_stream()` decode through, with one slot), `max_batch` requests decoding at once in
  slots they join and leave at step boundaries (more texts than slots keep the slots full).
  Turbo's T3 the same way with one row per slot (its GPT-2 step, t3/turbo.py).
- S3Gen: `s3gen_batch.flow_mels`, up to `max_batch` rows per flow call (`CPU_FLOW_GROUP` on a
  CPU where the packed products run: `packed_flow`), each with its own voice, tokens and noise; HiFT and
  the watermark per row.
- Randomness: a request with a `seed` owns a `torch.Generator`: its T3 sampling, its CFM noise
  and its vocoder draws come from it, so its output does not depend on its batch-mates (the
  same text, voice, options and seed give the same tokens alone or in any batch). Requests
  without a seed draw from the global RNG. A single request without a seed (and without a
  `max_new_tokens`) is simply `model.generate()`, so it keeps that path's guarantees (upstream's
  audio bit for bit under the same global seed on CPU).

Every input is checked before any work: a bad text, option, list length or reference file
raises `ValueError` naming it. `model.conds` is left as it was.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..families import FAMILIES, REQUIRED, family_of, generate_options
from ..patching import shadowed
from ..s3gen_batch import flow_mels, on_device, row_noise, vocode
from ..s3gen_kernels import batch_products, prepare_batch
from ..s3gen_fast import modes_of
from ..stream import SPEECH_VOCAB, _check_language, text_tokens_for, with_exaggeration
from ..t3.patch import check_lengths
from ..t3.sampling import validate

logger = logging.getLogger(__name__)

BATCH_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.batches)
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_NEW_TOKENS = 1000  # what generate() hard-codes (English, Multilingual; Turbo's max_gen_len)
_private_runners: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # T3 -> T3Runner (not accelerated)


@dataclass
class RowMetrics:
    """What one request cost. Stage seconds are the wall time of the batched stage the row was
    part of (shared with its batch-mates), except the vocoder and watermark, which are its own."""

    index: int
    seed: int | None
    speech_tokens: int
    audio_seconds: float
    t3_seconds: float
    s3gen_seconds: float
    vocoder_seconds: float
    watermark_seconds: float


@dataclass
class Result:
    wav: torch.Tensor            # (1, samples) float32, watermarked, on the CPU (as generate() returns)
    speech_tokens: torch.Tensor  # 1-D: the tokens S3Gen synthesized
    sample_rate: int
    metrics: RowMetrics


@dataclass
class BatchMetrics:
    """Stage wall times of one generate_batch() call, and what they produced."""

    requests: int
    max_batch: int
    path: str                    # "batch" or "generate" (a single unseeded request)
    t3_seconds: float = 0.0
    t3_tokens: int = 0
    t3_steps: int = 0            # batched decode steps (English / Multilingual)
    s3gen_seconds: float = 0.0
    vocoder_seconds: float = 0.0
    watermark_seconds: float = 0.0
    other_seconds: float = 0.0   # voices, text, prompts
    total_seconds: float = 0.0
    audio_seconds: float = 0.0
    kv_cache_bytes: int = 0

    @property
    def t3_tokens_per_second(self) -> float:
        return self.t3_tokens / self.t3_seconds if self.t3_seconds else 0.0

    @property
    def audio_per_wall(self) -> float:
        """Audio seconds produced per wall second (above 1: faster than real time)."""
        return self.audio_seconds / self.total_seconds if self.total_seconds else 0.0


class BatchResults(list):
    """The results, in the order of `texts`; `.metrics` is the call's BatchMetrics."""

    metrics: BatchMetrics


@dataclass
class _Row:
    index: int
    text: str
    options: dict
    seed: int | None
    path: str | None
    generator: torch.Generator | None = None
    conds: object = None
    tokens: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


# ---- input ------------------------------------------------------------------------------------
def _per_row(name, value, n):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} texts; pass one value, or a list "
                             f"with one per text")
        return list(value)
    return [value] * n


def _rows(model, texts, audio_prompt_path, seed, options) -> list[_Row]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings; for one text pass [text] (or call generate())")
    texts = list(texts) if texts is not None else []
    if not texts:
        raise ValueError("texts is empty; pass at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"texts[{i}] is {text!r}; every text must be a non-empty string")
    n = len(texts)
    defaults = {k: v for k, v in generate_options(model).items() if k != "audio_prompt_path"}
    defaults.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown options {unknown} for {type(model).__name__}.generate_batch; "
                         f"known: {sorted(defaults)}")
    columns = {k: _per_row(k, options.get(k, v), n) for k, v in defaults.items()}
    paths, seeds = _per_row("audio_prompt_path", audio_prompt_path, n), _per_row("seed", seed, n)
    rows = []
    for i, text in enumerate(texts):
        opts = {k: col[i] for k, col in columns.items()}
        missing = [k for k, v in opts.items() if v is REQUIRED]
        if missing:
            raise ValueError(f"generate_batch needs {missing} (generate() has no default for them)")
        if seeds[i] is not None and (isinstance(seeds[i], bool) or not isinstance(seeds[i], int)):
            raise ValueError(f"seed[{i}] is {seeds[i]!r}; a seed is an int or None")
        rows.append(_Row(i, text, opts, seeds[i], paths[i]))
    _check_rows(model, rows)
    return rows


def _check_rows(model, rows):
    from ..voice import check_reference_audio

    hp = model.t3.hp
    for row in rows:
        o = row.options
        if family_of(model) != "turbo":
            validate(temperature=o["temperature"], repetition_penalty=o["repetition_penalty"],
                     min_p=o["min_p"], top_p=o["top_p"])
        try:
            check_lengths(hp, None, o["max_new_tokens"])
        except ValueError as exc:
            raise ValueError(f"texts[{row.index}]: {exc}") from None
        _check_language(model, o.get("language_id"))
        if row.path:
            try:
                check_reference_audio(row.path, model)
            except (OSError, ValueError) as exc:
                raise ValueError(f"audio_prompt_path for texts[{row.index}]: {exc}") from None
        elif getattr(model, "conds", None) is None:
            raise ValueError(f"texts[{row.index}] has no audio_prompt_path and the model has no voice; pass "
                             "audio_prompt_path or call model.prepare_conditionals() first")


# ---- the pipeline -----------------------------------------------------------------------------
def reserve_batch(model, max_batch: int = DEFAULT_MAX_BATCH, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  prompt_len: int = 512) -> int:
    """Allocate, and touch, the T3 KV cache `generate_batch(..., max_batch=max_batch)` decodes in,
    for prompts up to `prompt_len` positions and `max_new_tokens` new tokens; returns its bytes.

    For a service at start-up: the first batch of a size otherwise pays the allocation (on a CPU
    the first touch of each page: ~1 s per GB measured on a 2-core EPYC) inside its latency,
    and a cache too large for the machine fails here rather than mid-request. Where the T3
    step is captured (CUDA graphs), that batch size's graphs are captured now too."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if family_of(model) not in BATCH_FAMILIES:
        raise ValueError(f"reserve_batch serves {', '.join(BATCH_FAMILIES)} models, not {type(model).__name__}")
    check_lengths(model.t3.hp, None, max_new_tokens)
    runner = _runner(model)
    length = prompt_len + max_new_tokens
    slots = runner.slots_for(max_batch, max_batch)
    runner.warm(slots, length)
    cache = runner.slot_cache(slots, length)
    cache.ensure(cache.max_len)
    prepare_batch(model)  # s3gen_kernel="batch": S3Gen's packed products, now rather than at the first batch
    return runner.cache.nbytes


def generate_batch(model, texts, audio_prompt_path=None, seed=None, *, max_batch: int = DEFAULT_MAX_BATCH,
                   progress: bool | None = None, **options) -> BatchResults:
    """Synthesize `texts` (a list of strings); one `Result` per text, in order.

    `audio_prompt_path`, `seed` and each option (the model's `generate()` options, plus
    `max_new_tokens`) take one value for all texts or a list with one per text. `max_batch`:
    requests decoded (and rows synthesized) at once. `progress`: a tqdm bar (None: when on a
    terminal and TQDM_DISABLE is unset)."""
    family = family_of(model)
    if family not in BATCH_FAMILIES:
        raise ValueError(f"generate_batch serves {', '.join(BATCH_FAMILIES)} models, not "
                         f"{type(model).__name__} ({family or 'unknown family'})")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    rows = _rows(model, texts, audio_prompt_path, seed, options)
    metrics = BatchMetrics(requests=len(rows), max_batch=max_batch, path="batch")
    start = time.perf_counter()
    if len(rows) == 1 and rows[0].seed is None and "max_new_tokens" not in options:
        results = _generate_alone(model, rows[0], metrics)
    else:
        results = _run(model, family, rows, max_batch, metrics, progress)
    metrics.total_seconds = time.perf_counter() - start
    metrics.audio_seconds = sum(r.metrics.audio_seconds for r in results)
    metrics.other_seconds = max(0.0, metrics.total_seconds - metrics.t3_seconds - metrics.s3gen_seconds
                                - metrics.vocoder_seconds - metrics.watermark_seconds)
    out = BatchResults(results)
    out.metrics = metrics
    return out


def _generate_alone(model, row: _Row, metrics: BatchMetrics) -> list[Result]:
    """One unseeded request: the model's own generate() (patched or not), its tokens recorded."""
    metrics.path = "generate"
    s3gen, seen = model.s3gen, {}
    original = s3gen.inference

    def recording(*args, **kwargs):
        seen["tokens"] = kwargs.get("speech_tokens", args[0] if args else None)
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seen["s3gen"] = time.perf_counter() - t

    opts = {k: v for k, v in row.options.items() if k != "max_new_tokens"}
    with shadowed(s3gen, "inference", recording):
        wav = model.generate(row.text, audio_prompt_path=row.path, **opts)
    tokens = torch.atleast_1d(seen["tokens"].detach().view(-1).cpu())
    metrics.s3gen_seconds = seen.get("s3gen", 0.0)
    metrics.t3_tokens = tokens.numel()
    m = RowMetrics(row.index, None, tokens.numel(), wav.shape[-1] / model.sr, 0.0, metrics.s3gen_seconds, 0.0, 0.0)
    return [Result(wav, tokens, model.sr, m)]


def _run(model, family, rows, max_batch, metrics, progress) -> list[Result]:
    from tqdm.auto import tqdm

    device = model.device if hasattr(model, "device") else model.t3.device
    saved_conds = model.conds
    try:
        for row in rows:
            if row.seed is not None:
                row.generator = torch.Generator(device=device).manual_seed(row.seed)
        with tqdm(total=2 * len(rows), desc="generate_batch", unit="stage", disable=_bar_off(progress)) as bar:
            _voices(model, family, rows)
            t = time.perf_counter()
            if family == "turbo":
                _turbo_tokens(model, rows, max_batch, metrics, bar)
            else:
                _llama_tokens(model, family, rows, max_batch, metrics, bar)
            metrics.t3_seconds = time.perf_counter() - t
            metrics.t3_tokens = sum(r.extras["t3_tokens"] for r in rows)
            return _synthesize(model, rows, max_batch, metrics, bar)
    finally:
        model.conds = saved_conds


def _bar_off(progress):
    import os

    if progress is None:
        return None if not os.environ.get("TQDM_DISABLE") else True  # None: tqdm's own TTY test
    return not progress


def _voices(model, family, rows):
    """Each row's conditionals: its reference's (prepared once per file and exaggeration, through
    the voice cache when accelerated) or the model's, with its exaggeration applied."""
    base, prepared = model.conds, {}
    for row in rows:
        o = row.options
        if row.path:
            key = (str(row.path), o.get("exaggeration"), o.get("norm_loudness"))
            if key not in prepared:
                kwargs = {"exaggeration": o["exaggeration"]} if "exaggeration" in o else {}
                if "norm_loudness" in o:
                    kwargs["norm_loudness"] = o["norm_loudness"]
                model.prepare_conditionals(row.path, **kwargs)
                prepared[key] = model.conds
            conds = prepared[key]
        else:
            conds = base
        if family != "turbo":
            conds = type(conds)(t3=with_exaggeration(model, conds.t3, o["exaggeration"]), gen=conds.gen)
        row.conds = conds
    model.conds = base


def _runner(model):
    """The accelerated model's T3 runner, or a private one (the model is not patched)."""
    from ..patching import state_of
    from ..t3.model import sdpa_attention

    fast = state_of(model, "t3_inference")
    if fast is not None and fast.disabled is None:
        return state_of(model, "t3_runner")
    runner = _private_runners.get(model.t3)
    if runner is None:
        if getattr(model.t3, "is_gpt", False):
            from ..t3.turbo import TurboRunner as Runner
        else:
            from ..t3.decode import T3Runner as Runner
        runner = _private_runners[model.t3] = Runner(model.t3, attention=sdpa_attention)
    return runner


def _decode(runner, requests, max_batch, metrics, bar):
    """Every request through the runner's decoder (min(max_batch, N) slots; with captured graphs,
    the power-of-two bucket, captured before it runs); yields (request, tokens) as each finishes."""
    runner.claim()  # a paused stream on this model's T3 loses its slot (it raises if resumed)
    decoder = runner.warm(runner.slots_for(len(requests), max_batch), max(r.max_len for r in requests))
    steps = decoder.steps
    yield from decoder.run(requests, progress=bar.update)
    metrics.t3_steps = decoder.steps - steps
    metrics.kv_cache_bytes = runner.cache.nbytes


def _llama_tokens(model, family, rows, max_batch, metrics, bar):
    from chatterbox.models.s3tokenizer import drop_invalid_tokens

    runner = _runner(model)
    requests = []
    with torch.inference_mode():
        for row in rows:
            o = row.options
            text_tokens = text_tokens_for(model, row.text, float(o["cfg_weight"]), o.get("language_id"))
            check_lengths(model.t3.hp, text_tokens, o["max_new_tokens"])
            max_new = o["max_new_tokens"] if family == "english" else min(o["max_new_tokens"],
                                                                          FAMILIES[family].t3_max_new_tokens)
            # Always the CFG pair: with cfg_weight 0 the unconditional row is computed and weighted 0.
            requests.append(runner.request(row.conds.t3, text_tokens, o, int(max_new), row.generator, key=row))
    for request, tokens in _decode(runner, requests, max_batch, metrics, bar):
        row = request.key
        row.extras["t3_tokens"] = tokens.numel()
        speech = drop_invalid_tokens(tokens)
        if family == "english":
            speech = speech[speech < SPEECH_VOCAB]
        row.tokens = speech


def _turbo_tokens(model, rows, max_batch, metrics, bar):
    """Turbo: `ChatterboxTurboTTS.generate` up to S3Gen for every row, T3 batched (one row per
    slot): text tokens as its tokenizer makes them, `inference_turbo`'s sampling (max_new_tokens
    is its max_gen_len: it samples one token more), the trailing EOS dropped, ids >= 6561
    removed, 3 silence tokens appended."""
    from chatterbox.models.s3gen.const import S3GEN_SIL
    from chatterbox.tts_turbo import punc_norm

    from ..t3.turbo import TurboParams

    runner = _runner(model)
    requests = []
    if any(r.options["cfg_weight"] > 0.0 or r.options["exaggeration"] > 0.0 or r.options["min_p"] > 0.0
           for r in rows):
        logger.warning("CFG, min_p and exaggeration are not supported by Turbo version and will be ignored.")
    with torch.inference_mode():
        for row in rows:
            o = row.options
            text = model.tokenizer(punc_norm(row.text), return_tensors="pt", padding=True, truncation=True)
            params = TurboParams.make(temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                                      repetition_penalty=o["repetition_penalty"])
            max_gen_len = min(int(o["max_new_tokens"]), FAMILIES["turbo"].t3_max_new_tokens)
            requests.append(runner.request(row.conds.t3, text.input_ids.to(model.device), params, max_gen_len,
                                           row.generator, key=row))
    silence = torch.tensor([S3GEN_SIL] * 3, dtype=torch.long)
    for request, tokens in _decode(runner, requests, max_batch, metrics, bar):
        row = request.key
        if tokens.numel() and int(tokens[-1]) == runner.eos:  # inference_turbo drops a trailing EOS
            tokens = tokens[:-1]
        row.extras["t3_tokens"] = tokens.numel()  # as inference_turbo returns them (what its timer counts)
        row.tokens = torch.cat([tokens[tokens < SPEECH_VOCAB], silence])


# Utterances per flow call on a CPU where S3Gen's packed (oneDNN) products run: large calls ran
# slower there: 8 utterances of 3 s (3 s voice) took 38.4-41.2 s in calls of 8 and 29.9 / 30.6 /
# 32.5 s in calls of 2 / 4 / 1 with s3gen_kernel="onednn" (oneDNN is less efficient at 4800-row
# products than at 1200; 2-core AMD EPYC Zen 5, torch 2.6.0). On F.linear (MKL) larger calls do
# not lose: 44.5-47.2 s either way on that CPU, and on a 2-core AVX2 EPYC the flows of 4 stream
# windows took 28.6 / 23.6 / 23.3 s in calls of 1 / 2 / 4 (first chunks, 174 frames each) and
# 35.5 / 31.6 / 32.5 s (second chunks, 224 frames): scripts/bench_flow_group.py,
# bench/results/flow_group_english_epyc_avx2.json. Each row is computed
# under its own mask and noise, so a row's mel differs between groupings by float32 rounding only
# (test_batch and test_stream compare rows with single runs).
CPU_FLOW_GROUP = 2
PACKED_FLOW_FRAMES = 1200  # the engine's stream windows per flow call where the packed products run


def packed_flow(model) -> bool:
    """Whether S3Gen's packed products run in the batched flow calls (on a CPU, where the gate
    measured them faster: call after `prepare_batch`)."""
    from ..patching import state_of

    return next(model.s3gen.parameters()).device.type == "cpu" and state_of(model, "s3gen_kernels") is not None


def flow_frames(model) -> int | None:
    """The engine's mel frames per S3Gen flow call: no bound (None) on a GPU and on F.linear,
    PACKED_FLOW_FRAMES (2400 CFG rows, as two of generate_batch's utterances) where the packed
    products run."""
    return PACKED_FLOW_FRAMES if packed_flow(model) else None


def _synthesize(model, rows, max_batch, metrics, bar) -> list[Result]:
    s3gen = model.s3gen
    modes = modes_of(model)
    meanflow = bool(getattr(s3gen, "meanflow", False))
    steps = modes.steps_for(2 if meanflow else 10)
    flow, ratio = s3gen.flow, s3gen.flow.token_mel_ratio
    results = [None] * len(rows)
    order = sorted(rows, key=lambda r: r.tokens.numel())  # similar lengths share a flow call
    prepare_batch(model)  # whether the packed products run decides the group
    group_size = min(max_batch, CPU_FLOW_GROUP) if packed_flow(model) else max_batch
    for i in range(0, len(order), group_size):
        group = order[i : i + group_size]
        t = time.perf_counter()
        refs = [on_device(modes.cap(r.conds.gen), s3gen.device, s3gen.dtype) for r in group]
        noises = [row_noise(ref, r.tokens.numel(), ratio, meanflow, r.generator, s3gen.device, s3gen.dtype)
                  for ref, r in zip(refs, group)]
        with batch_products(model):  # s3gen_kernel="batch": this flow's products on oneDNN
            mels = flow_mels(flow, [r.tokens.to(s3gen.device) for r in group], refs, noises, steps, meanflow)
        if mels[0].is_cuda:
            torch.cuda.synchronize()  # the stage's time is its own, not the vocoder's
        flow_seconds = time.perf_counter() - t
        metrics.s3gen_seconds += flow_seconds
        for row, mel in zip(group, mels):
            t = time.perf_counter()
            wav = vocode(s3gen, mel, row.generator).squeeze(0).detach().cpu().numpy()
            t_voc = time.perf_counter() - t
            wav = model.watermarker.apply_watermark(wav, sample_rate=model.sr)
            t_wm = time.perf_counter() - t - t_voc
            metrics.vocoder_seconds += t_voc
            metrics.watermark_seconds += t_wm
            wav = torch.from_numpy(wav).unsqueeze(0)
            m = RowMetrics(row.index, row.seed, row.tokens.numel(), wav.shape[-1] / model.sr,
                           metrics.t3_seconds, flow_seconds, t_voc, t_wm)
            results[row.index] = Result(wav, row.tokens.detach().cpu(), model.sr, m)
            bar.update()
    return results
