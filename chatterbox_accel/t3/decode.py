"""The T3 model runner: prompt, prefill, the decode step's forward, and the static KV cache.

`T3Runner` is what the engine's decoder (`t3/batch.py`, `SlotDecoder`) runs a T3 through. It
reproduces `T3.inference` (chatterbox 0.1.7) token for token in distribution:
- prompt = conditioning + text (+ text position emb) + BOS@speech-pos 0, then BOS@0 once more
  (the original appends a second BOS embedding; we keep that quirk for parity);
- CFG pair: row 0 conditional, row 1 with the text embedding zeroed (with cfg_weight 0 the
  pair is kept and weighted 0, which the original cannot run);
- the token sampled at step i is fed back at speech position i + 1;
- the output is (1, N) token ids ending with the first EOS, or N = max_new_tokens without one.

The decode step's forward (`slot_logits`) reads per-slot device tensors and writes the cache in
place, so its shapes never change: `t3/graphs.py` may replace `runner.step` with a compiled or
captured version of it. Sampling runs after it, per row (`SlotDecoder`).
"""
from __future__ import annotations

import copy
import logging

import torch

from .alignment import aligned_heads
from .batch import PrefixCache, SlotDecoder, SlotState, T3Request, cfg_combine_pairs, shared_prefix
from .cache import StaticKVCache
from .model import FastLlama
from .patch import FastInference
from .prefill import SharedTextPrefill, round_up
from .sampling import cfg_combine, process_logits

logger = logging.getLogger(__name__)


def max_positions(hp) -> int:
    """Cache positions a T3 prompt plus decode can reach, rounded up to 256: the conditioning
    (speaker, prompt speech tokens, emotion), the text with its start/stop tokens, two BOS and
    every speech token its learned position embedding allows. RoPE tables are built for this
    once, so they never change under a captured graph."""
    cond = 2 + (hp.speech_cond_prompt_len or 0)
    return round_up(cond + hp.max_text_tokens + 2 + 2 + hp.max_speech_tokens + 2, 256)


class CachedRunner:
    """What `T3Runner` (Llama) and Turbo's `TurboRunner` (GPT-2) share: the KV cache, the
    engine's decoders over it, prefix-shared prefill, and one request decoded in blocks.

    A subclass names its `backbone` (FastLlama or FastGPT2: `forward`, `new_cache`, kernels) and
    what differs per model (the decoder calls these): `rows_per_slot` (2: the CFG pair; 1),
    `row_options` (the sampling options kept per slot), `slot_logits` (the decode step's forward),
    `combine` (rows -> one row per slot), `scores` (the logits processors), `finished` (the stop
    rule), `first_presence_only` (Turbo's penalty list is BOS for the first token only).
    """

    rows_per_slot = 2
    row_options: tuple = ()
    first_presence_only = False
    heads: list = []  # multilingual: the alignment analyzer's (layer, head) pairs

    @property
    def backbone(self):
        raise NotImplementedError

    def _init_cache(self, kv_bucket, static_cache, sync_every=1):
        self.kv_bucket, self.static_cache, self.sync_every = kv_bucket, static_cache, sync_every
        self.cache: StaticKVCache | None = None  # rows_per_slot rows per slot, for the most slots asked for
        self._views: dict[int, StaticKVCache] = {}  # slots -> the cache's first rows
        self._decoders: dict[int, SlotDecoder] = {}
        self.prefixes = PrefixCache()  # conditioning-prefix K/V per voice, across calls
        self._owner = None  # the decode that owns the cache now (see claim)
        self.events: list[str] = []  # run-time fallbacks, as the model's report lists them
        self.step = self.slot_logits  # graphs.py may replace it with a compiled/captured step

    @property
    def decode_rows(self) -> int:
        """Rows of a single request's decode-step product (the kernel table is measured there)."""
        return self.rows_per_slot

    def product_modules(self) -> list:
        """Every module a decode step multiplies by: the backbone's projections, the speech head."""
        return self.backbone.linears() + [self.speech_head]

    def use_kernels(self, decode: str, prefill: str, single: str | None = None):
        """Run the backbone's products through these kernels (names from kernels.KERNELS), on
        private copies prepared now; returns the KernelTable. Raises when they do not work here."""
        from .kernels import KernelTable

        self.backbone.kernels = None
        self.prefixes.clear()  # voice prefixes computed through the old kernels are not this table's
        table = KernelTable(self.product_modules(), decode, prefill, rows=self.decode_rows, single=single)
        self.backbone.kernels = table
        return table

    def kv_len_for(self, position: int, cache) -> int:
        """How many cache slots attention reads when the newest token sits at `position`."""
        if self.kv_bucket is None:
            return cache.max_len
        return min(round_up(position + 1, self.kv_bucket), cache.max_len)

    def head_logits(self, hidden) -> torch.Tensor:
        """Final hidden (B, S, C) -> speech logits of the last position (B, V)."""
        return self.backbone.linear(self.speech_head, hidden[:, -1])

    # ---- prefill --------------------------------------------------------------------------------
    def prefill_slot(self, request: T3Request, cache, s: int) -> torch.Tensor:
        """Prefill slot `s` (its rows of `cache`) with the request's prompt; last-position logits
        (rows_per_slot, V).

        The prompt's first `request.prefix_len` positions are the voice's conditioning (speaker,
        prompt speech tokens, emotion), the same in every row of the slot and for every request
        with that voice. That prefix runs once per voice, on one row, and its K/V is copied into
        the slot's rows; then the rows' own positions run together. Every request takes this
        same path, cached prefix or not, so its numbers do not depend on which requests came
        before it."""
        backbone, embeds = self.backbone, request.embeds
        R, P, n = self.rows_per_slot, embeds.shape[1], request.prefix_len
        rows = cache.rows(R * s, R * s + R)
        cache.ensure(P)
        if n:
            kv = self.prefixes.get(embeds[0, :n])
            if kv is None:
                backbone.forward(embeds[:1, :n].to(backbone.dtype), torch.arange(n, device=embeds.device),
                                 cache.rows(R * s, R * s + 1), n)
                kv = self.prefixes.put(embeds[0, :n], (cache.k[:, R * s, :, :n].clone(),
                                                       cache.v[:, R * s, :, :n].clone()))
            k, v = kv
            for r in range(R * s, R * s + R):
                cache.k[:, r, :, :n].copy_(k)
                cache.v[:, r, :, :n].copy_(v)
        hidden = backbone.forward(embeds[:, n:].to(backbone.dtype), torch.arange(n, P, device=embeds.device), rows, P)
        return self.head_logits(hidden)

    def prefill_slots(self, admitted: list, cache) -> list:
        """Prefill `(slot, request)` pairs admitted in one step, one after another (T3Runner
        runs them together); each one's last-position logits (rows_per_slot, V)."""
        return [self.prefill_slot(request, cache, s) for s, request in admitted]

    # ---- cache and decoders -------------------------------------------------------------------
    @torch.inference_mode()
    def slot_cache(self, slots: int, length: int) -> StaticKVCache:
        """A cache of `slots` slots for `length` positions: a view of the runner's one cache,
        allocated for the most slots and the longest length asked for so far (rounded up to
        256), kept across calls (static_cache=False: a new one per call)."""
        length = round_up(length, 256)
        R, backbone = self.rows_per_slot, self.backbone
        if not self.static_cache:
            return backbone.new_cache(R * slots, length, lazy=True)
        cache = self.cache
        if cache is None or not (cache.batch >= R * slots and cache.max_len >= length
                                 and cache.k.dtype == backbone.dtype
                                 and cache.k.device == torch.device(backbone.device)):
            rows = max(R * slots, cache.batch if cache is not None else 0)
            length = max(length, cache.max_len if cache is not None else 0)
            self.cache, self._views = None, {}  # free the old buffers before allocating larger ones
            self.invalidate_graphs()  # captured graphs point into the old buffers
            for decoder in self._decoders.values():  # their rows lived in the old buffers
                decoder.drop_cache()
            cache = self.cache = backbone.new_cache(rows, length, lazy=True)
        view = self._views.get(slots)
        if view is None:
            view = self._views[slots] = cache.rows(0, R * slots)
        return view

    def invalidate_graphs(self) -> None:
        """Drop every captured graph (they read buffers that are being replaced)."""
        invalidate = getattr(self.step, "invalidate", None)
        if invalidate is not None:
            invalidate()

    def decoder(self, slots: int) -> SlotDecoder:
        """The runner's decoder of `slots` slots (one per count: its state tensors are what a
        captured step was captured on)."""
        decoder = self._decoders.get(slots)
        if decoder is None:
            decoder = self._decoders[slots] = SlotDecoder(self, slots, sync_every=self.sync_every)
        return decoder

    @torch.inference_mode()
    def warm(self, slots: int, length: int) -> SlotDecoder:
        """The decoder of `slots` slots, its cache allocated for `length` positions; where the
        installed step captures CUDA graphs, every kv bucket of that decoder is captured now,
        largest first, not in the middle of a request."""
        decoder = self.decoder(slots)
        cache = self.slot_cache(slots, length)
        capture_all = getattr(self.step, "capture_all", None)
        if capture_all is not None and self.kv_bucket is not None:
            buckets = range(self.kv_bucket, cache.max_len + self.kv_bucket, self.kv_bucket)
            capture_all(decoder.state, cache, [min(b, cache.max_len) for b in buckets])
        return decoder

    def slots_for(self, requests: int, max_batch: int) -> int:
        """Slots for a batch: as many as requests (up to max_batch); with captured graphs, the
        next power of two (a few batch buckets, each captured once; free slots are padding)."""
        slots = min(requests, max_batch)
        if getattr(self.step, "can_capture", False):
            slots = min(1 << (slots - 1).bit_length(), max_batch)
        return slots

    def claim(self) -> object:
        """Start a decode that owns the cache: requests of any other decode in flight on this
        runner (a paused stream) are dropped, and that decode raises when it resumes."""
        owner = self._owner = object()
        for decoder in self._decoders.values():
            decoder.reset()
            decoder.prefill_budget = None  # an owner's admission policy is its own (the engine sets one after claiming)
        return owner

    def owns(self, owner) -> bool:
        return self._owner is owner

    # ---- one request, in blocks (generate(), generate_stream()) ---------------------------------
    def token_blocks(self, request: T3Request, first_block: int | None = None, block: int | None = None):
        """Decode one request on the one-slot decoder, yielding `(new ids (1-D), finished)` every
        `block` tokens (`first_block` for the first yield); without sizes, one yield at the end.
        The ids end at the first EOS, if any.

        A generator holds the runner's cache between yields: a second decode on the same runner
        while one is paused (another `generate()`, an interleaved stream, a batch) takes the cache
        over, and the paused one raises instead of continuing on a foreign cache."""
        owner = self.claim()
        with torch.inference_mode():
            blocks = self.decoder(1).blocks(request, first_block, block)
            item = next(blocks)
        while True:
            yield item
            if item[1]:
                return
            if not self.owns(owner):
                raise RuntimeError("another generation ran on this model's T3 while this one was "
                                   "paused; finish or close a stream before starting the next")
            with torch.inference_mode():
                item = next(blocks)

    def generate(self, request: T3Request) -> torch.Tensor:
        """(1, N) ids for one request, as `token_blocks` gives them."""
        return torch.cat([ids for ids, _ in self.token_blocks(request)])[None]


class T3Runner(SharedTextPrefill, CachedRunner):
    """Fast decoding for one `T3` instance (English or Multilingual). Owns the KV cache, the
    installed decode step and one `SlotDecoder` per slot count."""

    wrapper = FastInference  # what replaces `T3.inference`

    def __init__(self, t3, *, attention, dtype=None, sync_every=1, kv_bucket: int | None = 64,
                 static_cache=True):
        """sync_every: decode steps between host reads of the sampled ids (EOS checks).
        kv_bucket: attention reads the cache up to the next multiple of this past the newest
        token (a few shapes: one CUDA graph each; a compiled step compiles once for all of them,
        graphs.py). None: always the whole cache."""
        self.t3 = t3
        self.hp = t3.hp
        self.tfmr, self.speech_head = t3.tfmr, t3.speech_head
        if dtype is not None and dtype != t3.speech_head.weight.dtype:
            # Reduced precision runs on a private copy: the user's model is never cast.
            self.tfmr = copy.deepcopy(t3.tfmr).to(dtype)
            self.speech_head = copy.deepcopy(t3.speech_head).to(dtype)
        self.llama = FastLlama(self.tfmr, attention, max_positions=max_positions(self.hp))
        self.llama.on_rope_change = self.invalidate_graphs
        self.heads = aligned_heads() if self.hp.is_multilingual else []
        if self.heads:  # multilingual: the alignment analyzer reads these heads every step
            self.llama.spy_heads(self.heads)
        self.bos, self.eos = self.hp.start_speech_token, self.hp.stop_speech_token
        self._init_cache(kv_bucket, static_cache, sync_every)

    @property
    def backbone(self):
        return self.llama

    # ---- prompt -------------------------------------------------------------------------------
    def build_prompt(self, t3_cond, text_tokens, cfg_weight: float) -> torch.Tensor:
        """Prefill embeddings (B, P, C), exactly as `T3.inference` builds them (B = 2 with CFG;
        the decoder always takes the pair: pass cfg_weight > 0 to build it)."""
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

    def request(self, t3_cond, text_tokens, options: dict, max_new_tokens: int, generator=None,
                key=None) -> T3Request:
        """A decoder request for one text (text_tokens as `T3.inference` takes them)."""
        text_tokens = torch.atleast_2d(text_tokens)
        cfg = float(options["cfg_weight"])
        embeds = self.build_prompt(t3_cond, text_tokens[:1], 1.0 if cfg == 0.0 else cfg)
        return T3Request(embeds, {k: options[k] for k in self.row_options}, int(max_new_tokens), generator,
                         text_len=text_tokens.shape[-1], key=key, prefix_len=shared_prefix(embeds))

    # ---- the decoder's hooks (see CachedRunner) -------------------------------------------------
    row_options = ("cfg_weight", "temperature", "repetition_penalty", "min_p", "top_p")

    @staticmethod
    def combine(logits, params) -> torch.Tensor:
        """(2S, V) CFG pairs -> (S, V) float32: `cond + cfg * (cond - uncond)` per slot."""
        return cfg_combine_pairs(logits, params.cfg_weight)

    @staticmethod
    def scores(combined, presence, params) -> torch.Tensor:
        return process_logits(combined, presence, params)

    def finished(self, tokens: list, max_new_tokens: int) -> bool:
        return tokens[-1] == self.eos or len(tokens) >= max_new_tokens

    # ---- compute ------------------------------------------------------------------------------
    def prefill(self, embeds, cache) -> torch.Tensor:
        """Run the prompt; return the last position's speech logits (B, V)."""
        P = embeds.shape[1]
        input_pos = torch.arange(P, device=embeds.device)
        cache.ensure(P)
        hidden = self.llama.forward(embeds.to(self.llama.dtype), input_pos, cache, P)
        return self.llama.linear(self.speech_head, hidden[:, -1])

    def slot_logits(self, state: SlotState, cache, kv_len: int) -> torch.Tensor:
        """The decode step's forward: each slot's `state.token` at its own positions, both CFG
        rows; speech logits (2S, V). Attention reads `kv_len` cache slots, each row masked past
        its own position. No host sync: this is what a compiled or captured step runs."""
        t3, llama = self.t3, self.llama
        emb = t3.speech_emb(state.token) + t3.speech_pos_emb.emb(state.speech_pos)  # (S, C)
        x = emb.repeat_interleave(2, dim=0)[:, None].to(llama.dtype)  # (2S, 1, C): both CFG rows
        input_pos = state.pos.repeat_interleave(2)[:, None]  # (2S, 1)
        llama.spy_rows = True  # spied maps (multilingual): every row's, (2S, 1, kv_len)
        try:
            hidden = llama.forward(x, input_pos, cache, kv_len)
        finally:
            llama.spy_rows = False
        return llama.linear(self.speech_head, hidden[:, -1])

    @torch.inference_mode()
    def step_forced_logits(self, embeds, forced: torch.Tensor, cfg_weight: float) -> torch.Tensor:
        """CFG-combined logits (N+1, V) after the prompt (the CFG pair `embeds`, as `build_prompt`
        makes it) and after each forced token: the prefill decoding uses (voice prefix and
        unconditional text table), then each step through the INSTALLED step (compiled,
        captured or eager), on the one-slot decoder decoding uses."""
        self.claim()
        options = dict(cfg_weight=cfg_weight, temperature=1.0, repetition_penalty=1.0, min_p=0.0, top_p=1.0)
        request = T3Request(embeds, options, max(1, forced.numel()), prefix_len=shared_prefix(embeds))
        return self.decoder(1).teacher_forced_logits([request], [forced.view(-1)])[0]

    @torch.inference_mode()
    def teacher_forced_logits(self, embeds, forced: torch.Tensor, cfg_weight: float,
                              maps: dict | None = None) -> torch.Tensor:
        """The eager forward (no installed step, no decoder), for parity tests and the
        multilingual check: CFG-combined logits (N+1, V) after the prompt and after each forced
        token (N,). `maps` (multilingual): filled with {layer: (P+N, P+N)} attention maps of the
        heads the alignment analyzer reads, row by row as the decode produced them."""
        self.claim()
        B, P, _ = embeds.shape
        total = P + forced.numel()
        cache = self.llama.new_cache(B, round_up(total + 1, 256))
        cfg = torch.tensor(float(cfg_weight), device=embeds.device)
        rows = {layer: [] for layer, _ in self.heads}

        def keep_maps():
            for layer in rows:
                m = self.llama.spied[layer][:, :total].float()  # masked columns are 0
                rows[layer].append(torch.nn.functional.pad(m, (0, total - m.shape[1])))

        out = [cfg_combine(self.prefill(embeds, cache), cfg)]
        keep_maps()
        pos = torch.tensor([P], device=embeds.device)
        speech_pos = torch.ones(1, dtype=torch.long, device=embeds.device)
        for n, token in enumerate(forced.view(-1)):
            emb = self.t3.speech_emb(token.view(1)) + self.t3.speech_pos_emb.emb(speech_pos)  # (1, C)
            x = emb[None].expand(B, 1, -1).to(self.llama.dtype)
            kv_len = self.kv_len_for(P + n, cache)
            cache.ensure(kv_len)
            hidden = self.llama.forward(x, pos, cache, kv_len)
            out.append(cfg_combine(self.llama.linear(self.speech_head, hidden[:, -1]), cfg))
            keep_maps()
            pos.add_(1)
            speech_pos.add_(1)
        if maps is not None:
            maps.update({layer: torch.cat(r) for layer, r in rows.items()})
        return torch.cat(out, dim=0)

