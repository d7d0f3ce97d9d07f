"""Batched T3 decoding over slots: many requests in one decode step.

A `SlotDecoder` owns a static KV cache of `slots` request slots, 2 cache rows each (the CFG
pair: conditional, then text-zeroed; a request with cfg_weight 0 keeps both rows and its
combine `cond + 0 * (cond - uncond)` is exactly `cond`). Each slot has its own cache position,
speech position, repetition-presence row, sampling options ((S, 1) device tensors), EOS and
length limit, and (with a seed) a private `torch.Generator` that draws its sampling noise, so
a row's tokens do not depend on its batch-mates.

Requests join and leave at step boundaries: a queued request is prefilled into a free slot
(its own P prompt positions, written through a view of the slot's rows) while the others wait
that step; a row that samples EOS or reaches its `max_new_tokens` is returned and frees its
slot. Every step is one forward over all slots (a free slot's row is computed and ignored: its
position stays 0 and nothing it samples is kept), then one host read of the sampled ids for
the whole batch (and, for Multilingual, of the alignment heads' maps, which upstream's
analyzer reads per row).

Numerics per row are the single-request loop's (`decode.T3Runner`): same prompt, positions,
CFG combine, processors and exponential-race sampling; only the matmul's row count differs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .alignment import AnalyzerFeed, new_analyzer
from .sampling import process_logits, validate

ROW_OPTIONS = ("cfg_weight", "temperature", "repetition_penalty", "min_p", "top_p")


@dataclass
class T3Request:
    """One utterance for the slot decoder: its prompt embeddings and how to sample it."""

    embeds: torch.Tensor                 # (2, P, C): the CFG pair's prompt, as T3Runner.build_prompt makes it
    options: dict                        # ROW_OPTIONS -> float
    max_new_tokens: int
    generator: torch.Generator | None = None  # a private generator (seeded request), else the global RNG
    text_len: int | None = None          # text tokens in the prompt (the multilingual analyzer reads them)
    key: object = None                   # the caller's handle, returned with the tokens

    def __post_init__(self):
        validate(**{k: self.options[k] for k in ("temperature", "repetition_penalty", "min_p", "top_p")})

    @property
    def prompt_len(self) -> int:
        return self.embeds.shape[1]


@dataclass
class RowParams:
    """Sampling options per slot as (S, 1) float32 device tensors (read by `process_logits`)."""

    cfg_weight: torch.Tensor
    temperature: torch.Tensor
    repetition_penalty: torch.Tensor
    min_p: torch.Tensor
    top_p: torch.Tensor
    use_top_p: bool = False

    @classmethod
    def empty(cls, slots: int, device) -> "RowParams":
        return cls(*(torch.ones(slots, 1, dtype=torch.float32, device=device) for _ in ROW_OPTIONS))

    def set(self, slot: int, options: dict) -> None:
        for name in ROW_OPTIONS:
            getattr(self, name)[slot] = float(options[name])

    def refresh(self, active: list[bool]) -> None:
        """The top-p sort runs when any active row filters (top_p 1 filters nothing, so its
        rows are unchanged by it)."""
        top_p = self.top_p[:, 0].tolist()
        self.use_top_p = any(a and p < 1.0 for a, p in zip(active, top_p))

    def rows(self, start: int, stop: int) -> "RowParams":
        return RowParams(*(getattr(self, n)[start:stop] for n in ROW_OPTIONS), use_top_p=self.use_top_p)


def cfg_combine_pairs(logits: torch.Tensor, cfg_weight: torch.Tensor) -> torch.Tensor:
    """(2S, V) rows in CFG pairs -> (S, V): `cond + cfg * (cond - uncond)` per pair, float32."""
    pairs = logits.float().view(-1, 2, logits.shape[-1])
    cond, uncond = pairs[:, 0], pairs[:, 1]
    return cond + cfg_weight * (cond - uncond)


def race(probs: torch.Tensor, generators: list, active: list[bool]) -> torch.Tensor:
    """Exponential-race noise (S, V): each active row from its own generator (None: the global
    RNG), in slot order; an inactive row draws nothing."""
    noise = torch.ones_like(probs)
    for row, (gen, on) in enumerate(zip(generators, active)):
        if on:
            noise[row].exponential_(1, generator=gen)
    return noise


def _shared_prefix(embeds: torch.Tensor) -> int:
    """How many leading positions the CFG pair's two rows have equal (keeping the last one
    out, so the suffix is never empty)."""
    differ = (embeds[0, :-1] != embeds[1, :-1]).any(dim=-1).nonzero()
    return int(differ[0, 0]) if differ.numel() else embeds.shape[1] - 1


class _PrefixCache:
    """Prefix K/V by the prefix's own embeddings (compared exactly), a few voices at a time."""

    def __init__(self, size: int = 8):
        self.entries: list = []
        self.size = size

    def get(self, embeds):
        for key, k, v in self.entries:
            if key.shape == embeds.shape and torch.equal(key, embeds):
                return k, v
        return None, None

    def put(self, embeds, k, v):
        entry = (embeds.clone(), k.clone(), v.clone())
        self.entries = [entry] + self.entries[: self.size - 1]
        return entry[1], entry[2]


@dataclass
class _Slot:
    request: T3Request
    tokens: list = field(default_factory=list)
    feed: AnalyzerFeed | None = None


class SlotDecoder:
    """Batched decoding for one `T3Runner` (its backbone, kernels, speech head and prompt)."""

    def __init__(self, runner, slots: int):
        if slots < 1:
            raise ValueError(f"max_batch must be >= 1, got {slots}")
        self.runner, self.slots = runner, slots
        self.eos = runner.hp.stop_speech_token
        self.bos = runner.hp.start_speech_token
        self.steps = 0  # decode steps run (for metrics)

    def cache_for(self, slots: int, length: int):
        """The runner's batch cache (2 rows per slot), allocated once and reused while it fits."""
        runner = self.runner
        length = -(-length // 256) * 256
        cache = getattr(runner, "batch_cache", None)
        llama = runner.llama
        if cache is None or not cache.fits(2 * slots, length, llama.dtype, llama.device):
            runner.batch_cache = None  # free the old buffers first
            cache = runner.batch_cache = llama.new_cache(2 * slots, length)
        return cache

    def run(self, requests, progress=None):
        """Decode every request; yields `(request, tokens)` as each finishes (1-D ids ending
        at the first EOS if any, as `T3Runner.generate` gives them). `progress()` is called
        once per finished request."""
        requests = list(requests)
        if not requests:
            return
        runner, llama, t3 = self.runner, self.runner.llama, self.runner.t3
        device = llama.device
        S = min(self.slots, len(requests))
        cache = self.cache_for(S, max(r.prompt_len + r.max_new_tokens for r in requests))
        V = runner.hp.speech_tokens_dict_size
        long = dict(dtype=torch.long, device=device)
        token, pos, speech_pos = (torch.zeros(S, **long) for _ in range(3))
        presence = torch.zeros(S, V, dtype=torch.bool, device=device)
        params = RowParams.empty(S, device)
        slots: list[_Slot | None] = [None] * S
        queue = deque(requests)
        multilingual = bool(runner.heads)

        prefixes = _PrefixCache()

        def admit(s: int, request: T3Request):
            if request.embeds.shape[0] != 2:
                raise ValueError("a T3Request's embeds must be the CFG pair (2, P, C)")
            P = request.prompt_len
            logits = self._prefill(request.embeds, cache, s, prefixes)  # (2, V)
            slot = slots[s] = _Slot(request)
            if multilingual:
                end = P - 2  # the prompt is conditioning + text + BOS + BOS (see T3Runner.analyzer_feed)
                slot.feed = AnalyzerFeed(new_analyzer(t3, (end - request.text_len, end)), llama,
                                         runner.heads, first_token=self.bos)
            presence[s].zero_()
            presence[s, self.bos] = True
            params.set(s, request.options)
            params.refresh([x is not None for x in slots])
            combined = cfg_combine_pairs(logits, params.cfg_weight[s : s + 1])
            if slot.feed is not None:
                combined = slot.feed(combined)
            first = self._sample(combined, presence[s : s + 1], params.rows(s, s + 1),
                                 [request.generator], [True])
            token[s] = first[0]
            pos[s], speech_pos[s] = P, 1
            slot.tokens.append(int(first[0]))

        def finished(s: int) -> bool:
            slot = slots[s]
            return slot.tokens[-1] == self.eos or len(slot.tokens) >= slot.request.max_new_tokens

        with torch.inference_mode():
            while queue or any(x is not None for x in slots):
                for s in range(S):  # join: a free slot takes the next request (the others wait a step)
                    while slots[s] is None and queue:
                        admit(s, queue.popleft())
                        if finished(s):  # one token (EOS first, or max_new_tokens 1)
                            yield self._retire(slots, s, progress)
                active = [x is not None for x in slots]
                if not any(active):
                    continue
                params.refresh(active)
                newest = max(x.request.prompt_len + len(x.tokens) - 1 for x in slots if x is not None)
                logits = self._decode_logits(token, pos, speech_pos, cache, runner.kv_len_for(newest, cache))
                combined = cfg_combine_pairs(logits, params.cfg_weight)
                if multilingual:
                    combined = self._analyze(combined, slots, active)
                gens = [x.request.generator if x is not None else None for x in slots]
                nxt = self._sample(combined, presence, params, gens, active)
                self.steps += 1
                ids = nxt.tolist()  # the step's one host read
                on = torch.tensor(active, device=device)
                token.copy_(torch.where(on, nxt, token))
                pos.add_(on.long())
                speech_pos.add_(on.long())
                for s in range(S):  # leave: a finished row frees its slot
                    if slots[s] is not None:
                        slots[s].tokens.append(ids[s])
                        if finished(s):
                            yield self._retire(slots, s, progress)
                            pos[s] = 0  # a free slot computes at position 0 of its own rows

    def _prefill(self, embeds, cache, s: int, prefixes: "_PrefixCache"):
        """Prefill slot `s` with the CFG pair `embeds` (2, P, C); last-position logits (2, V).

        The two rows share their first positions (the conditioning: speaker, prompt speech
        tokens, emotion; the text, zeroed in the second row, is where they part), and requests
        with the same voice share them too. That prefix runs once per voice, on one row, and its
        K/V is copied into both rows of every slot that uses it; then both rows' own positions
        run together. Every request takes this same path, cached prefix or not, so its numbers
        do not depend on which requests came before it. (Multilingual: the spied maps are the
        suffix's rows; the analyzer reads the text columns of the last rows only.)"""
        llama = self.runner.llama
        P = embeds.shape[1]
        n = _shared_prefix(embeds)
        if self.runner.heads or n == 0:  # multilingual: its analyzer reads the whole prefill's maps
            return self.runner.prefill(embeds, cache.rows(2 * s, 2 * s + 2))
        k, v = prefixes.get(embeds[0, :n])
        if k is None:
            row = cache.rows(2 * s, 2 * s + 1)
            llama.forward(embeds[:1, :n].to(llama.dtype), torch.arange(n, device=embeds.device), row, n)
            k, v = prefixes.put(embeds[0, :n], cache.k[:, 2 * s, :, :n], cache.v[:, 2 * s, :, :n])
        for r in (2 * s, 2 * s + 1):
            cache.k[:, r, :, :n].copy_(k)
            cache.v[:, r, :, :n].copy_(v)
        hidden = llama.forward(embeds[:, n:].to(llama.dtype), torch.arange(n, P, device=embeds.device),
                               cache.rows(2 * s, 2 * s + 2), P)
        return llama.linear(self.runner.speech_head, hidden[:, -1])

    def _retire(self, slots, s, progress):
        slot, slots[s] = slots[s], None
        if progress is not None:
            progress()
        return slot.request, torch.tensor(slot.tokens, dtype=torch.long)

    def _decode_logits(self, token, pos, speech_pos, cache, kv_len: int):
        """Feed each slot's last token at its own positions; speech logits (2S, V). Attention
        reads `kv_len` slots (the newest active position's bucket); each row masks past its own."""
        runner, llama, t3 = self.runner, self.runner.llama, self.runner.t3
        emb = t3.speech_emb(token) + t3.speech_pos_emb.emb(speech_pos)  # (S, C)
        x = emb.repeat_interleave(2, dim=0)[:, None].to(llama.dtype)  # (2S, 1, C): both CFG rows
        input_pos = pos.repeat_interleave(2)[:, None]  # (2S, 1)
        llama.spy_rows = True  # spied maps (multilingual): every row's, (2S, 1, kv_len)
        try:
            hidden = llama.forward(x, input_pos, cache, kv_len)
        finally:
            llama.spy_rows = False
        return llama.linear(runner.speech_head, hidden[:, -1])

    def _analyze(self, combined, slots, active):
        """Multilingual: each active row's upstream analyzer on its own maps (one host copy of
        the spied maps for the whole batch), between CFG and the processors, as T3.inference."""
        llama, heads = self.runner.llama, self.runner.heads
        maps = torch.stack([llama.spied[layer][0::2] for layer, _ in heads]).cpu()  # (3, S, 1, kv)
        rows = []
        for s, on in enumerate(active):
            row = combined[s : s + 1]
            if on:
                feed = slots[s].feed
                feed.analyzer.last_aligned_attns = [m[s] for m in maps]
                row = feed.analyzer.step(row, next_token=slots[s].tokens[-1])
            rows.append(row)
        return torch.cat(rows)

    @staticmethod
    def _sample(combined, presence, params: RowParams, generators, active):
        scores = process_logits(combined, presence, params)
        probs = torch.softmax(scores, dim=-1)
        nxt = torch.argmax(probs / race(probs, generators, active), dim=-1)  # (S,)
        presence[torch.arange(len(active), device=combined.device), nxt] = True  # a free row's is reset on admit
        return nxt

    @torch.inference_mode()
    def teacher_forced_logits(self, requests, forced: list[torch.Tensor]) -> list[torch.Tensor]:
        """All requests in one batch (one slot each), each fed its `forced` tokens: the
        CFG-combined logits (N_i + 1, V) after its prompt and after each forced token."""
        runner, llama = self.runner, self.runner.llama
        S, device = len(requests), llama.device
        steps = max(f.numel() for f in forced)
        cache = self.cache_for(S, max(r.prompt_len for r in requests) + steps + 1)
        cfg = torch.tensor([[float(r.options["cfg_weight"])] for r in requests], device=device)
        outs, prefixes = [], _PrefixCache()
        for s, r in enumerate(requests):
            logits = self._prefill(r.embeds, cache, s, prefixes)  # the prefill run() uses
            outs.append([cfg_combine_pairs(logits, cfg[s : s + 1])])
        pos = torch.tensor([r.prompt_len for r in requests], device=device)
        speech_pos = torch.ones(S, dtype=torch.long, device=device)
        for n in range(steps):
            token = torch.tensor([int(f[n]) if n < f.numel() else 0 for f in forced], device=device)
            kv_len = runner.kv_len_for(int(pos.max()), cache)
            combined = cfg_combine_pairs(self._decode_logits(token, pos, speech_pos, cache, kv_len), cfg)
            for s, f in enumerate(forced):
                if n < f.numel():
                    outs[s].append(combined[s : s + 1])
            pos.add_(1)
            speech_pos.add_(1)
        return [torch.cat(o) for o in outs]
