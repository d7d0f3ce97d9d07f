"""The fast T3 decode loop: prefill, `decode_one_token`, and the loop that checks EOS every k steps.

It reproduces `T3.inference` (chatterbox 0.1.7) token for token in distribution:
- prompt = conditioning + text (+ text position emb) + BOS@speech-pos 0, then BOS@0 once more
  (the original appends a second BOS embedding; we keep that quirk for parity);
- CFG batch: row 0 conditional, row 1 with the text embedding zeroed (batch 1 when
  cfg_weight == 0, which the original cannot run);
- the token sampled at step i is fed back at speech position i + 1;
- the output is (1, N) token ids ending with the first EOS, or N = max_new_tokens without one.

Hot-path state is preallocated device tensors updated in place: cache position, speech
position, repetition presence mask, EOS flag. The host reads the EOS flag every
`eos_check_every` steps; the tokens decoded past the EOS are trimmed.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from .alignment import AnalyzerFeed, aligned_heads, new_analyzer
from .cache import StaticKVCache
from .model import FastLlama
from .sampling import SamplingParams, cfg_combine, sample_next

logger = logging.getLogger(__name__)


@dataclass
class DecodeState:
    """Device tensors a decode step reads and updates in place (static for CUDA graphs)."""

    token: torch.Tensor       # (1,) last sampled token
    input_pos: torch.Tensor   # (1,) cache slot / RoPE position of `token`
    speech_pos: torch.Tensor  # (1,) learned speech position of `token`
    presence: torch.Tensor    # (1, V) bool: ids seen so far (repetition penalty)
    done: torch.Tensor        # (1,) bool: EOS sampled
    logits: torch.Tensor      # (2, V): the last step's speech logits (rows of its batch), read by the check


class CachedRunner:
    """The static-cache handling shared by `T3Runner` and Turbo's `TurboRunner`. A subclass
    sets `kv_bucket`, `static_cache` and `cache`, and names its `backbone` (FastLlama or
    FastGPT2), which makes the cache."""

    @property
    def backbone(self):
        raise NotImplementedError

    def get_cache(self, batch: int, length: int) -> StaticKVCache:
        length = _round_up(length, self.kv_bucket or 256)
        device, dtype = self.backbone.device, self.backbone.dtype
        if self.static_cache and self.cache is not None and self.cache.fits(batch, length, dtype, device):
            return self.cache
        self.cache = None  # free the old buffers before allocating larger ones
        invalidate = getattr(getattr(self, "step", None), "invalidate", None)
        if invalidate is not None:  # captured graphs point into the old buffers
            invalidate()
        cache = self.backbone.new_cache(batch, length)
        if self.static_cache:
            self.cache = cache
        return cache

    decode_rows = 2  # rows of a decode-step product: the CFG pair (Turbo: 1)

    def product_modules(self) -> list:
        """Every module a decode step multiplies by: the backbone's projections, the speech head."""
        return self.backbone.linears() + [self.speech_head]

    def use_kernels(self, decode: str, prefill: str):
        """Run the backbone's products through these kernels (names from kernels.KERNELS), on
        private copies prepared now; returns the KernelTable. Raises when they do not work here."""
        from .kernels import KernelTable

        self.backbone.kernels = None
        table = KernelTable(self.product_modules(), decode, prefill, rows=self.decode_rows)
        self.backbone.kernels = table
        return table

    def kv_len_for(self, position: int, cache) -> int:
        """How many cache slots attention reads when the newest token sits at `position`."""
        if self.kv_bucket is None:
            return cache.max_len
        return min(_round_up(position + 1, self.kv_bucket), cache.max_len)


class T3Runner(CachedRunner):
    """Fast decoding for one `T3` instance. Owns the static KV cache."""

    def __init__(self, t3, *, attention, dtype=None, eos_check_every=1, kv_bucket: int | None = 64,
                 static_cache=True):
        """kv_bucket: attention reads the cache up to the next multiple of this past the newest
        token (a few shapes: one CUDA graph each). None: always the whole cache (one shape,
        for torch.compile, which would otherwise recompile per bucket)."""
        self.t3 = t3
        self.hp = t3.hp
        self.tfmr, self.speech_head = t3.tfmr, t3.speech_head
        if dtype is not None and dtype != t3.speech_head.weight.dtype:
            # Reduced precision runs on a private copy: the user's model is never cast.
            self.tfmr = copy.deepcopy(t3.tfmr).to(dtype)
            self.speech_head = copy.deepcopy(t3.speech_head).to(dtype)
        self.llama = FastLlama(self.tfmr, attention)
        self.heads = aligned_heads() if self.hp.is_multilingual else []
        if self.heads:  # multilingual: the alignment analyzer reads these heads every step
            self.llama.spy_heads(self.heads)
        self.eos_check_every = eos_check_every
        self.kv_bucket = kv_bucket
        self.static_cache = static_cache
        self.cache: StaticKVCache | None = None
        self._state: DecodeState | None = None  # reused across calls: stable addresses for graphs
        self._params: SamplingParams | None = None
        self._owner = None  # the decode that owns the cache now (see token_blocks)
        self.events: list[str] = []  # run-time fallbacks, as the model's report lists them
        self.step = self.decode_one_token  # graphs.py may replace it with a compiled/captured step

    @property
    def backbone(self):
        return self.llama

    # ---- prompt -------------------------------------------------------------------------------
    def build_prompt(self, t3_cond, text_tokens, cfg_weight: float) -> torch.Tensor:
        """Prefill embeddings (B, P, C), exactly as `T3.inference` builds them."""
        t3, device = self.t3, self.t3.device
        text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=device)
        batch = 2 if cfg_weight > 0.0 else 1
        text_tokens = text_tokens[:1].expand(batch, -1) if text_tokens.size(0) != batch else text_tokens
        bos = torch.full((batch, 1), self.hp.start_speech_token, dtype=torch.long, device=device)
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=t3_cond, text_tokens=text_tokens, speech_tokens=bos, cfg_weight=cfg_weight
        )
        bos_embed = t3.speech_emb(bos[:1]) + t3.speech_pos_emb.get_fixed_embedding(0)  # (1, 1, C)
        return torch.cat([embeds, bos_embed.expand(batch, -1, -1)], dim=1)

    # ---- compute ------------------------------------------------------------------------------
    def prefill(self, embeds, cache) -> torch.Tensor:
        """Run the prompt; return the last position's speech logits (B, V)."""
        P = embeds.shape[1]
        input_pos = torch.arange(P, device=embeds.device)
        hidden = self.llama.forward(embeds.to(self.llama.dtype), input_pos, cache, P)
        return self.llama.linear(self.speech_head, hidden[:, -1])

    def decode_logits(self, state: DecodeState, cache, kv_len: int) -> torch.Tensor:
        """Feed `state.token` at its positions; return speech logits (B, V)."""
        t3 = self.t3
        emb = t3.speech_emb(state.token) + t3.speech_pos_emb.emb(state.speech_pos)  # (1, C)
        x = emb[None].expand(cache.batch, 1, -1).to(self.llama.dtype)  # (B, 1, C)
        hidden = self.llama.forward(x, state.input_pos, cache, kv_len)
        return self.llama.linear(self.speech_head, hidden[:, -1])

    def decode_one_token(self, state: DecodeState, params: SamplingParams, cache, kv_len: int,
                         adjust=None):
        """One step: logits -> sample -> update state in place (no host sync unless `adjust`,
        the alignment analyzer, needs one)."""
        logits = self.decode_logits(state, cache, kv_len)
        state.logits[: logits.shape[0]].copy_(logits)
        token = sample_next(logits, state.presence, params, adjust)
        state.token.copy_(token)
        state.done.logical_or_(token == self.hp.stop_speech_token)
        state.input_pos.add_(1)
        state.speech_pos.add_(1)
        return token

    # ---- loops --------------------------------------------------------------------------------
    def new_state(self, prompt_len: int, device) -> DecodeState:
        """The decode state for a fresh call, reset in place when one already exists."""
        state = self._state
        if state is None or state.token.device != device:
            V = self.hp.speech_tokens_dict_size
            long = dict(dtype=torch.long, device=device)
            state = self._state = DecodeState(
                token=torch.zeros(1, **long), input_pos=torch.zeros(1, **long),
                speech_pos=torch.zeros(1, **long),
                presence=torch.zeros(1, V, dtype=torch.bool, device=device),
                done=torch.zeros(1, dtype=torch.bool, device=device),
                logits=torch.zeros(2, V, dtype=self.llama.dtype, device=device),
            )
        state.token.zero_()
        state.input_pos.fill_(prompt_len)
        state.speech_pos.fill_(1)
        state.presence.zero_()
        state.presence[0, self.hp.start_speech_token] = True  # the original's id list starts with BOS
        state.done.zero_()
        return state

    def static_params(self, params: SamplingParams) -> SamplingParams:
        """Copy `params` into the runner's persistent parameter tensors."""
        if self._params is None or self._params.temperature.device != params.temperature.device:
            self._params = params
        else:
            self._params.copy_(params)
        return self._params

    def generate(self, embeds, params: SamplingParams, max_new_tokens: int, text_len: int | None = None):
        """Sample up to `max_new_tokens` ids; returns (1, N), ending at the first EOS if any."""
        blocks = self.token_blocks(embeds, params, max_new_tokens, text_len=text_len)
        return torch.cat([ids for ids, _ in blocks])[None]

    def analyzer_feed(self, embeds, text_len: int | None) -> AnalyzerFeed | None:
        """Multilingual: a fresh upstream alignment analyzer for this decode (None otherwise).
        The prompt is conditioning + text (`text_len` tokens) + BOS + BOS, so the text sits at
        [P - text_len - 2, P - 2), the slice `T3.inference` gives the analyzer."""
        if not self.heads:
            return None
        if text_len is None:
            raise ValueError("a multilingual T3 decode needs text_len (its alignment analyzer reads it)")
        end = embeds.shape[1] - 2
        analyzer = new_analyzer(self.t3, (end - text_len, end))
        return AnalyzerFeed(analyzer, self.llama, self.heads, first_token=self.hp.start_speech_token)

    def token_blocks(self, embeds, params: SamplingParams, max_new_tokens: int,
                     first_block: int | None = None, block: int | None = None,
                     text_len: int | None = None):
        """Decode, yielding `(new ids (1-D), finished)` every `block` tokens (`first_block` for
        the first yield); without sizes, one yield at the end. The ids end at the first EOS, if any.
        `text_len` (text tokens in the prompt) is needed by the multilingual alignment analyzer.

        A generator holds the runner's static cache between yields: a second decode on the same
        runner while one is paused (another `generate()`, an interleaved stream) takes the cache
        over, and the paused one raises instead of continuing on a foreign cache.
        """
        owner = self._owner = object()
        with torch.inference_mode():
            B, P, _ = embeds.shape
            cache = self.get_cache(B, P + max_new_tokens)
            state = self.new_state(P, embeds.device)
            params = self.static_params(params)
            feed = self.analyzer_feed(embeds, text_len)
            tokens = torch.empty(max_new_tokens, dtype=torch.long, device=embeds.device)
            first = sample_next(self.prefill(embeds, cache), state.presence, params, feed)
            state.token.copy_(first)
            state.done.copy_(first == self.hp.stop_speech_token)
            tokens[0:1].copy_(first)
        n, emitted, target = 1, 0, first_block or max_new_tokens
        while True:
            finished = n >= max_new_tokens or (n % self.eos_check_every == 0 and bool(state.done))
            if finished or n - emitted >= target:
                out = tokens[emitted:n]
                if finished or bool(state.done):
                    out = trim_at_eos(out, self.hp.stop_speech_token)
                    finished = True
                yield (out.clone() if block else out), finished
                if finished:
                    return
                if self._owner is not owner:
                    raise RuntimeError("another generation ran on this model's T3 while this one was "
                                       "paused; finish or close a stream before starting the next")
                emitted, target = n, block or max_new_tokens
            with torch.inference_mode():
                kv_len = self.kv_len_for(P + n - 1, cache)
                if feed is None:
                    tokens[n : n + 1].copy_(self.step(state, params, cache, kv_len))
                else:  # the analyzer's host logic sits between forward and sampling
                    feed.last_token = int(tokens[n - 1])
                    tokens[n : n + 1].copy_(self.decode_one_token(state, params, cache, kv_len, feed))
            n += 1

    @torch.inference_mode()
    def step_forced_logits(self, embeds, forced: torch.Tensor, cfg_weight: float) -> torch.Tensor:
        """As `teacher_forced_logits`, but each decode step runs through the INSTALLED step
        (`self.step`: compiled, captured or eager, whatever generate() uses), which leaves its
        logits in the state; the forced token is written over the one it sampled."""
        B, P, _ = embeds.shape
        cache = self.get_cache(B, P + forced.numel() + 1)
        state = self.new_state(P, embeds.device)
        params = self.static_params(SamplingParams.make(
            embeds.device, cfg_weight=cfg_weight, temperature=1.0, repetition_penalty=1.0, min_p=0.0, top_p=1.0))
        out = [cfg_combine(self.prefill(embeds, cache), params.cfg_weight)]
        for n, token in enumerate(forced.view(-1)):
            state.token.copy_(token.view(1))
            self.step(state, params, cache, self.kv_len_for(P + n, cache))
            out.append(cfg_combine(state.logits[:B], params.cfg_weight))
        return torch.cat(out, dim=0)

    @torch.inference_mode()
    def teacher_forced_logits(self, embeds, forced: torch.Tensor, cfg_weight: float,
                              maps: dict | None = None) -> torch.Tensor:
        """CFG-combined logits (N+1, V) after the prompt and after each forced token (N,).
        `maps` (multilingual): filled with {layer: (P+N, P+N)} attention maps of the heads the
        alignment analyzer reads, row by row as the decode produced them."""
        B, P, _ = embeds.shape
        total = P + forced.numel()
        cache = self.get_cache(B, total + 1)
        state = self.new_state(P, embeds.device)
        cfg = torch.tensor(float(cfg_weight), device=embeds.device)
        rows = {layer: [] for layer, _ in self.heads}

        def keep_maps():
            for layer in rows:
                m = self.llama.spied[layer][:, :total].float()  # masked columns are 0
                rows[layer].append(torch.nn.functional.pad(m, (0, total - m.shape[1])))

        out = [cfg_combine(self.prefill(embeds, cache), cfg)]
        keep_maps()
        for n, token in enumerate(forced.view(-1)):
            state.token.copy_(token.view(1))
            out.append(cfg_combine(self.decode_logits(state, cache, self.kv_len_for(P + n, cache)), cfg))
            keep_maps()
            state.input_pos.add_(1)
            state.speech_pos.add_(1)
        if maps is not None:
            maps.update({layer: torch.cat(r) for layer, r in rows.items()})
        return torch.cat(out, dim=0)


def trim_at_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    hits = (tokens == eos).nonzero()
    return tokens[: int(hits[0, 0]) + 1] if hits.numel() else tokens


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
