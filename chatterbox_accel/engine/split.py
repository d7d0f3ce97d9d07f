"""Long text, split for the engine: pieces T3 speaks well, decoded in parallel, streamed in order.

    pieces = split_text(text)                  # ["First sentence.", "The next two. Are here.", ...]

Chatterbox's T3 garbles past ~300 characters (resemble-ai/chatterbox #60, #424) and stops at its
token limit, so a long request is cut into pieces at sentence boundaries (periods, ! ?, CJK 。！？,
line breaks, bullets and headings; not after common abbreviations, initials or inside numbers
such as 3.14), a sentence too long by itself at clause marks (, ; :), then between words.
Consecutive short sentences are packed into one piece up to `max_chars`; the first piece is kept
under `first_chars` so that its audio starts early. Bracketed tags (Turbo's `[laugh]`) are never
cut: a tag contains no boundary this splitter cuts at.

`JoinedHandle` reads the pieces' handles in order and presents one request's events: the
audio chunks of piece 1, a short pause, piece 2, ...; then one Done with the usage summed.
"""
from __future__ import annotations

import re
import time

import torch

from .requests import AudioChunk, Done, Failed, Handle, Usage

MAX_CHARS = 250       # one piece: well under the ~300 characters where T3 output degrades
FIRST_CHARS = 120     # the first piece: short, so the first audio comes early
PAUSE_SECONDS = 0.15  # silence between pieces
FADE_SECONDS = 0.01   # fade-out at the end of a piece (its last chunk) so the pause starts clean

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig",
                  "inc", "ltd", "co", "mt", "approx", "dept", "est", "vol", "jan", "feb", "mar", "apr", "jun",
                  "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "a.m", "p.m"}
_END_MARKS = ".!?…"
_CJK_END_MARKS = "。！？"
_CLOSERS = "\"'”’)]"
# a sentence ends at . ! ? … (then closing quotes/brackets) followed by space, or at CJK 。！？
_SENTENCE_END = re.compile(rf"(?<=[{_END_MARKS}][{re.escape(_CLOSERS)}])\s+|(?<=[{_END_MARKS}])\s+|(?<=[{_CJK_END_MARKS}])")
_LINE = re.compile(r"\s*\n\s*")
_BULLET = re.compile(r"^(?:[-*•#]+|\d+[.)])\s+")
_CLAUSE = re.compile(r"(?<=[,;:，；：、—])\s*")


def _ends_with_abbreviation(sentence: str) -> bool:
    word = sentence.rstrip().rstrip(".").rsplit(None, 1)[-1].lower() if sentence.strip() else ""
    word = word.lstrip("(\"'“‘")
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())  # "J. Smith"


def _is_boundary(text: str, at: int) -> bool:
    """Is a sentence-end match before `at` a real end (not "Dr." or the "J." of "J. Smith")?"""
    before = text[:at].rstrip()
    return not (before.endswith(".") and _ends_with_abbreviation(before))


def complete_prefix(text: str) -> int:
    """How much of a text still being written holds only complete sentences: the index just past
    its last sentence end or line break (0: none yet). For text that streams in (Wyoming)."""
    end = 0
    for match in _SENTENCE_END.finditer(text):
        if _is_boundary(text, match.start()):
            end = match.end()
    newline = text.rfind("\n")
    return max(end, newline + 1)


def sentences(text: str) -> list[str]:
    """The text's sentences, in order (lines, bullets and headings are boundaries too)."""
    out = []
    for line in _LINE.split(text.strip()):
        line = _BULLET.sub("", line).strip()
        if not line:
            continue
        parts = [p for p in _SENTENCE_END.split(line) if p and p.strip()]
        merged: list[str] = []
        for part in parts:
            if merged and not _is_boundary(merged[-1], len(merged[-1])):
                merged[-1] = f"{merged[-1]} {part.strip()}"
            else:
                merged.append(part.strip())
        out += merged
    return out


def _cut(sentence: str, limit: int) -> list[str]:
    """A sentence longer than `limit`: clauses, then words, packed up to the limit."""
    if len(sentence) <= limit:
        return [sentence]
    pieces = []
    for clause in (c for c in _CLAUSE.split(sentence) if c.strip()):
        words = clause.split() if len(clause) > limit else [clause]
        for word in words:
            while len(word) > limit:  # one "word" longer than the limit: no better place to cut
                pieces.append(word[:limit])
                word = word[limit:]
            if pieces and len(pieces[-1]) + 1 + len(word) <= limit:
                pieces[-1] = f"{pieces[-1]} {word}"
            else:
                pieces.append(word)
    return pieces


def split_text(text: str, max_chars: int = MAX_CHARS, first_chars: int = FIRST_CHARS) -> list[str]:
    """`text` in pieces of at most `max_chars` (the first at most `first_chars`), at the best
    boundaries available."""
    if max_chars < 20 or first_chars < 20:
        raise ValueError("max_chars and first_chars must be >= 20 characters")
    text = text.strip()
    pieces: list[str] = []
    for sentence in sentences(text):
        for part in _cut(sentence, first_chars if not pieces else max_chars):
            limit = first_chars if len(pieces) == 1 else max_chars  # the last piece's own limit
            if pieces and len(pieces[-1]) + 2 + len(part) <= limit:
                pieces[-1] = _join(pieces[-1], part)
            else:
                pieces.append(part)
    return pieces


def _join(left: str, right: str) -> str:
    """Two sentences in one piece: a line without an end mark (a heading, a bullet) gets a
    period, so T3 pauses there; CJK sentences join without a space."""
    if left[-1] in _CJK_END_MARKS:
        return left + right
    if left[-1] not in _END_MARKS + _CLOSERS + ":;":
        left += "."
    return f"{left} {right}"


class JoinedHandle(Handle):
    """One request's events over the handles of its pieces (submitted together, read in order)."""

    def __init__(self, engine, request, parts: list[Handle], later: list, sample_rate: int):
        """parts: the handles of the pieces submitted; later: the requests of the pieces to
        submit as earlier ones are read (one per piece read)."""
        super().__init__(engine, request)
        self.parts, self.later, self.sample_rate = list(parts), list(later), sample_rate
        self.total = len(self.parts) + len(self.later)
        self.submitted = time.perf_counter()
        self._part = 0
        self._index = 0
        self._samples = 0
        self._first: float | None = None
        self._usage = [0, 0]  # text tokens, speech tokens
        self._speech: list = []

    def _translate(self, event) -> list:
        last = self._part == self.total - 1
        now = time.perf_counter() - self.submitted
        if isinstance(event, AudioChunk):
            audio = event.audio
            if event.final and not last:
                audio = _fade_out(audio, int(FADE_SECONDS * self.sample_rate))
                audio = torch.cat([audio, torch.zeros(int(PAUSE_SECONDS * self.sample_rate), dtype=audio.dtype)])
            return [self._chunk(audio, now, event.final and last)]
        if isinstance(event, Failed):
            for part in self.parts[self._part + 1:]:
                part.cancel()
            self.later.clear()
            self._part = self.total
            return [event]
        # Done
        self._usage[0] += event.usage.text_tokens
        self._usage[1] += event.usage.speech_tokens
        self._speech += event.speech_tokens
        self._part += 1
        if not last:
            if self.later:  # keep the lookahead: the next piece goes in as this one leaves
                part = Handle(self.engine, self.later.pop(0))
                try:
                    self.engine._enqueue([part], bounded=False)
                except Exception as exc:  # the engine closed meanwhile
                    self._part = self.total
                    return [Failed(exc)]
                self.parts.append(part)
            return []
        usage = Usage(self._usage[0], self._usage[1], self._samples / self.sample_rate,
                      self._first if self._first is not None else now, now)
        return [Done(usage, self._speech)]

    def _chunk(self, audio, now: float, final: bool) -> AudioChunk:
        self._first = now if self._first is None else self._first
        self._samples += audio.numel()
        chunk = AudioChunk(audio, self._index, self._samples, self.sample_rate, now, final)
        self._index += 1
        return chunk

    def _deliver(self, events: list) -> None:
        for event in events:
            self.put(event)

    def get(self, timeout: float | None = None):
        while not self._events and self._part < self.total:
            self._deliver(self._translate(self.parts[self._part].get(timeout)))
        return super().get(0 if self.finished else timeout)

    async def aget(self):
        while not self._events and self._part < self.total:
            self._deliver(self._translate(await self.parts[self._part].aget()))
        return await super().aget()

    def cancel(self) -> None:
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.later.clear()
            for part in self.parts:
                part.cancel()


def _fade_out(audio: torch.Tensor, samples: int) -> torch.Tensor:
    samples = min(samples, audio.numel())
    if samples <= 0:
        return audio
    audio = audio.clone()
    audio[-samples:] *= torch.linspace(1.0, 0.0, samples, dtype=audio.dtype)
    return audio
