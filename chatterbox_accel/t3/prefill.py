"""The English/Multilingual prefill of requests admitted together (`T3Runner`'s, through this
mixin): the voice's conditioning prefix and the unconditional CFG row's text shared per voice,
the conditional rows' texts and every row's BOS positions run together for consecutive slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import T3Request
from .cache import StaticKVCache

TEXT_BLOCK = 64  # positions of the unconditional text table computed per forward (T3Runner.prefill_slot)


@dataclass
class _VoiceRows:
    """One voice's conditioning prefix and unconditional text table: K/V in a one-row cache of
    the positions computed so far (it grows, by a copy, when a longer text needs more blocks)."""

    rows: StaticKVCache
    upto: int  # positions computed: the prefix, then the table up to here


class SharedTextPrefill:
    """T3Runner's prefill (a mixin over `CachedRunner`: reads `llama`, `t3`, `hp`, `heads`,
    `prefixes`, `prefill`, `head_logits`)."""

    def prefill_slot(self, request: T3Request, cache, s: int) -> torch.Tensor:
        """As `CachedRunner.prefill_slot`, with the unconditional row's text shared too
        (`prefill_slots` with one request)."""
        return self.prefill_slots([(s, request)], cache)[0]

    def prefill_slots(self, admitted: list, cache) -> list:
        """Prefill `(slot, request)` pairs admitted in one step; each one's last-position logits
        (2, V).

        The CFG pair's second row has its text embedding zeroed: at text position i it holds
        only the learned position embedding of i, whatever the text. So its K/V over the text
        depend on the voice and the position alone, and one table per voice serves every
        request: it is computed in fixed blocks of TEXT_BLOCK positions, in order, as longer
        texts need them (every request reads the same numbers, whichever came first), and
        copied into the slot's second row. Per request, the conditional row runs its text, then
        both rows run the two BOS positions: about half the prefill of running both rows.
        Requests admitted together in consecutive slots run those two forwards together, each
        row at its own positions (texts padded to the longest by repeating their last position's
        embedding: the padding lands past the row's prompt, where decoding overwrites it before
        anything reads it): a few requests' products at once instead of one after another.
        Multilingual runs its prompt whole (its analyzer reads the whole prefill's attention
        maps); a prompt not built the way `build_prompt` builds it takes the plain prefix path."""
        out, run = {}, []
        for s, request in sorted(admitted, key=lambda pair: pair[0]):
            if self.heads:
                out[s] = self.prefill(request.embeds, cache.rows(2 * s, 2 * s + 2))
            elif not self._copy_shared(request, cache, s):
                out[s] = super().prefill_slot(request, cache, s)  # CachedRunner: the plain prefix path
            else:
                if run and run[-1][0] != s - 1:
                    out.update(self._prefill_run(run, cache))
                    run = []
                run.append((s, request))
        if run:
            out.update(self._prefill_run(run, cache))
        return [out[s] for s, _ in admitted]

    def _copy_shared(self, request: T3Request, cache, s: int) -> bool:
        """Copy the voice prefix's and the unconditional text table's K/V into slot `s`'s rows
        (computing what the voice lacks); False when the prompt is not `build_prompt`'s."""
        embeds, n = request.embeds, request.prefix_len
        P = embeds.shape[1]
        T = P - n - 2  # text positions (the prompt ends with BOS, BOS)
        table = self._uncond_text(T)
        if (T < 1 or table is None or not torch.equal(embeds[1, n : n + T], table[:T])
                or not torch.equal(embeds[0, P - 2 :], embeds[1, P - 2 :])):
            return False
        llama, device = self.llama, embeds.device
        voice = self.prefixes.get(embeds[0, :n])
        need = n + min(round_up(T, TEXT_BLOCK), table.shape[0])  # the prefix and the table's blocks up to T
        if voice is None:
            rows = llama.new_cache(1, need, lazy=True)
            rows.ensure(n)
            llama.forward(embeds[:1, :n].to(llama.dtype), torch.arange(n, device=device), rows, n)
            voice = self.prefixes.put(embeds[0, :n], _VoiceRows(rows, n))
        elif voice.rows.max_len < need:  # a longer text than this voice has seen: the rows grow
            voice.rows = grown(llama, voice.rows, voice.upto, need)
            self.prefixes.fit()
        while voice.upto < n + T:  # the next block of the unconditional text table
            a = voice.upto - n
            b = min(a + TEXT_BLOCK, table.shape[0])
            voice.rows.ensure(n + b)
            llama.forward(table[None, a:b].to(llama.dtype), torch.arange(n + a, n + b, device=device),
                          voice.rows, n + b)
            voice.upto = n + b
        cache.ensure(P)
        for row, length in ((2 * s, n), (2 * s + 1, n + T)):
            cache.k[:, row, :, :length].copy_(voice.rows.k[:, 0, :, :length])
            cache.v[:, row, :, :length].copy_(voice.rows.v[:, 0, :, :length])
        return True

    def _prefill_run(self, run: list, cache) -> dict:
        """The conditional rows' texts, then both rows' BOS positions, of requests in
        consecutive slots `run[0][0]...`: two forwards for all of them. {slot: logits (2, V)}."""
        llama, first, k = self.llama, run[0][0], len(run)
        device = run[0][1].embeds.device
        starts = [r.prefix_len for _, r in run]
        ends = [r.prompt_len - 2 for _, r in run]  # each text is [start, end)
        width = max(e - a for a, e in zip(starts, ends))
        texts = []
        for (_, r), a, e in zip(run, starts, ends):
            text = r.embeds[0, a:e]
            texts.append(torch.cat([text, text[-1:].expand(width - (e - a), -1)]))
        text_pos = torch.stack([torch.arange(a, a + width, device=device) for a in starts])
        cache.ensure(max(starts) + width)
        llama.forward(torch.stack(texts).to(llama.dtype), text_pos, cache.rows(2 * first, 2 * (first + k), 2),
                      max(starts) + width)
        bos = torch.cat([r.embeds[:, e:] for (_, r), e in zip(run, ends)])  # (2k, 2, C)
        bos_pos = torch.stack([torch.arange(e, e + 2, device=device) for e in ends]).repeat_interleave(2, 0)
        hidden = llama.forward(bos.to(llama.dtype), bos_pos, cache.rows(2 * first, 2 * (first + k)),
                               max(ends) + 2)
        logits = self.head_logits(hidden)
        return {s: logits[2 * j : 2 * j + 2] for j, (s, _) in enumerate(run)}

    def _uncond_text(self, length: int) -> torch.Tensor | None:
        """The unconditional row's text embeddings for every text position (at least `length`),
        as `T3.prepare_input_embeds` makes them: zero text embedding + learned position."""
        if self.hp.input_pos_emb != "learned" or self.t3.text_pos_emb is None:
            return None
        weight = self.t3.text_pos_emb.emb.weight
        if weight.shape[0] < length:
            return None
        cached = getattr(self, "_uncond_table", None)
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            with torch.inference_mode():
                cached = self._uncond_table = (weight, weight._version, torch.zeros_like(weight) + weight)
        return cached[2]


def grown(llama, rows, upto: int, max_len: int):
    """A one-row cache of `max_len` positions holding `rows`' first `upto`."""
    new = llama.new_cache(1, max_len, lazy=True)
    new.k[:, :, :, :upto].copy_(rows.k[:, :, :, :upto])
    new.v[:, :, :, :upto].copy_(rows.v[:, :, :, :upto])
    new.ready = upto
    return new


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
