"""S3Gen, incrementally: speech tokens in (block by block), watermarked audio out (chunk by chunk).

Per chunk of a stream (`S3GenStreamer`):
1. S3Gen's flow runs on the voice prompt + up to `context_tokens` earlier tokens + the new ones.
   Its noise is drawn once per stream and indexed by absolute frame, so a frame's noise never
   changes between chunks (and equals the one-shot's under the same seed). Until the last chunk
   the final 3 tokens, whose encoder lookahead is incomplete, give no mel yet (upstream's
   `finalize=False`). New mel frames are appended to a buffer; vocoded frames are never revised.
2. HiFT vocodes the new frames with `VOCODER_CONTEXT` frames of left context, from an excitation
   source continued sample by sample (the sine phase is carried over, one random initial phase
   per stream), so there is no phase jump at chunk joins.
3. Upstream's 40 ms fade-in at the very start.
4. The window's last `HOLD` frames (their right context is not known yet) are held back and
   cross-faded into the next window's recomputation of them. The last chunk flushes everything.
5. The watermark, applied to the new audio behind up to 1 s of the audio already sent.

Fidelity (measured in tests/test_stream.py): S3Gen's flow attends over the whole utterance, so a
mel frame made before the later tokens exist cannot equal the one-shot frame exactly; with the
default context the streamed mel stays close (relative L2 difference stated in the test), and the
stitched audio matches vocoding the streamed mel in one pass to within the cross-faded joins.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .s3gen_batch import flow_mels

SAMPLES_PER_FRAME = 480      # S3Gen: 24 kHz audio, 50 mel frames per second
VOCODER_CONTEXT = 8          # mel frames of left context for each HiFT window
HOLD = 4                     # mel frames held back per chunk and cross-faded into the next
WATERMARK_CONTEXT = 24000    # samples of sent audio the watermarker sees before each new chunk


@dataclass(eq=False)
class Window:
    """One chunk's flow pass: the voice prompt (the streamer's) + `tokens` (context and new), its
    noise, whether it is the stream's last; `skip` leading frames of its mel are already fixed."""

    streamer: "S3GenStreamer"
    final: bool
    tokens: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    skip: int = 0


class S3GenStreamer:
    """Speech tokens in (block by block), watermarked audio out (chunk by chunk)."""

    def __init__(self, s3gen, ref: dict, max_tokens: int, *, context_tokens: int | None = 100,
                 watermarker=None, sample_rate: int = 24000, noise: torch.Tensor | None = None,
                 modes=None, generator: torch.Generator | None = None):
        """modes: the S3Gen fast modes in force (s3gen_fast.S3GenModes; CFG-off and bf16 act
        through the patched solver and estimator, the step count and prompt cap here).
        generator: the stream's own (a seeded request: noise and vocoder draws from it)."""
        from .s3gen_fast import S3GenModes

        modes = modes or S3GenModes()
        ref = modes.cap(ref)
        self.s3gen, self.flow, self.hift = s3gen, s3gen.flow, s3gen.mel2wav
        device, dtype = s3gen.device, s3gen.dtype
        self.ref = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in ref.items()}
        self.ref = {k: (v.to(device=device, dtype=dtype) if torch.is_tensor(v) and v.is_floating_point()
                        else v.to(device) if torch.is_tensor(v) else v) for k, v in self.ref.items()}
        self.prompt_frames = self.ref["prompt_feat"].shape[1]
        self.ratio = self.flow.token_mel_ratio
        self.lookahead = self.flow.pre_lookahead_len
        self.meanflow = bool(getattr(s3gen, "meanflow", False))
        self.n_timesteps = modes.steps_for(2 if self.meanflow else 10)
        frames = self.prompt_frames + self.ratio * max_tokens
        # A private generator, seeded from the global RNG's state without drawing from it: the
        # same torch.manual_seed gives the same stream, and T3's sampling (global RNG) sees the
        # same random numbers as in generate(), so both decode the same tokens.
        if generator is not None:
            self.rng = generator
        else:
            seed = zlib.crc32(torch.random.get_rng_state().numpy().tobytes())
            self.rng = torch.Generator(device=device).manual_seed(seed)
        self.noise = noise if noise is not None else torch.randn(
            1, 80, frames, device=device, dtype=dtype, generator=self.rng)
        self.context_tokens = context_tokens
        self.watermarker, self.sample_rate = watermarker, sample_rate
        self.tokens = torch.zeros(0, dtype=torch.long, device=device)
        self.mel = torch.zeros(1, 80, 0, device=device, dtype=dtype)  # fixed frames
        self.source = torch.zeros(1, 1, 0, device=device, dtype=dtype)  # committed excitation
        sine = self.hift.m_source.l_sin_gen
        self.harmonics = torch.arange(1, sine.harmonic_num + 2, device=device, dtype=dtype).view(1, -1, 1)
        self.phase_vec = (torch.rand(1, sine.harmonic_num + 1, 1, device=device, dtype=dtype,
                                     generator=self.rng) * 2 - 1) * math.pi
        self.phase_vec[:, 0] = 0  # as SineGen: the fundamental starts at phase 0
        self.phase_acc = torch.zeros(1, sine.harmonic_num + 1, 1, device=device, dtype=torch.float64)
        self.committed = 0  # frames whose audio has been emitted
        self.tail = torch.zeros(0, device=device, dtype=dtype)  # held samples after `committed`
        self.sent = self.tail  # the last WATERMARK_CONTEXT samples sent, before watermarking

    @torch.inference_mode()
    def push(self, ids: torch.Tensor, final: bool) -> torch.Tensor:
        """Add speech token ids (1-D, valid ids only); return the audio that became ready."""
        window = self.plan(ids, final)
        return self.accept(window, None if window.tokens is None else _flow([(0, window)])[0])

    def plan(self, ids: torch.Tensor, final: bool) -> "Window":
        """Add speech token ids; the flow pass this chunk needs (`Window.tokens` is None when the
        new tokens give no new frame yet). Its mel goes back through `accept`."""
        self.tokens = torch.cat([self.tokens, ids.to(self.tokens.device).long().view(-1)])
        n = self.tokens.numel()
        usable = n if final else n - self.lookahead
        done_tokens = self.mel.shape[2] // self.ratio
        if usable <= done_tokens:
            return Window(self, final)
        w0 = 0 if self.context_tokens is None else max(0, done_tokens - self.context_tokens)
        P, r = self.prompt_frames, self.ratio
        noise = torch.cat([self.noise[:, :, :P], self.noise[:, :, P + r * w0 : P + r * n]], dim=2)
        return Window(self, final, self.tokens[w0:n], noise, r * (done_tokens - w0))

    @torch.inference_mode()
    def accept(self, window: "Window", mel: torch.Tensor | None) -> torch.Tensor:
        """The window's mel (None when it had no tokens): new frames, vocoded and watermarked."""
        if mel is not None:
            self.mel = torch.cat([self.mel, mel[:, :, window.skip:].to(self.mel.dtype)], dim=2)
        audio = self._vocode(window.final)
        if self.watermarker is None or not audio.numel():
            return audio
        # The watermark network needs context: mark the new audio behind up to 1 s of the audio
        # already sent (unmarked), and send only the new part.
        marked = torch.cat([self.sent, audio])
        self.sent = marked[-WATERMARK_CONTEXT:]
        return self._watermark(marked)[-audio.numel():]

    def _excitation(self, f0_frames: torch.Tensor):
        """HiFT's source (SineGen + merge) for the frames after the committed ones, continuing
        the committed source's phase. f0_frames: (1, frames) in Hz. Returns (source, phase steps)."""
        sine = self.hift.m_source.l_sin_gen
        f0 = f0_frames[:, None].repeat_interleave(SAMPLES_PER_FRAME, dim=2)  # (1, 1, L)
        steps = f0 * self.harmonics / sine.sampling_rate
        theta = 2 * math.pi * ((torch.cumsum(steps.double(), dim=-1) + self.phase_acc) % 1)
        waves = sine.sine_amp * torch.sin(theta.to(f0.dtype) + self.phase_vec)
        uv = (f0 > sine.voiced_threshold).to(f0.dtype)
        noise_amp = uv * sine.noise_std + (1 - uv) * sine.sine_amp / 3
        noise = torch.randn(waves.shape, device=waves.device, dtype=waves.dtype, generator=self.rng)
        waves = waves * uv + noise_amp * noise
        m = self.hift.m_source
        return m.l_tanh(m.l_linear(waves.transpose(1, 2))).transpose(1, 2), steps

    def _vocode(self, final: bool) -> torch.Tensor:
        total = self.mel.shape[2]
        end = total if final else total - HOLD
        C = self.committed
        if end <= C and not final:
            return self.tail[:0]
        v0 = max(0, C - VOCODER_CONTEXT)
        mel = self.mel[:, :, v0:total]
        f0 = self.hift.f0_predictor(mel)  # (1, frames)
        new_source, steps = self._excitation(f0[:, C - v0:])
        source = torch.cat([self.source[:, :, v0 * SAMPLES_PER_FRAME:], new_source], dim=2)
        wav = self.hift.decode(x=mel, s=source)[0]  # samples for frames [v0, total)
        trim = self.s3gen.trim_fade
        if v0 * SAMPLES_PER_FRAME < trim.numel():  # upstream fades in the first 40 ms
            n = trim.numel() - v0 * SAMPLES_PER_FRAME
            wav[:n] = wav[:n] * trim[v0 * SAMPLES_PER_FRAME:][: wav[:n].numel()]
        # commit [C, end): cross-fade the held tail into its recomputation
        a, b = (C - v0) * SAMPLES_PER_FRAME, (max(end, C) - v0) * SAMPLES_PER_FRAME
        out = wav[a:b].clone()
        k = min(self.tail.numel(), out.numel())
        if k:
            fade = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, k, device=out.device, dtype=out.dtype))
            out[:k] = self.tail[:k] * (1 - fade) + out[:k] * fade
        self.tail = wav[b:].clone()
        committed = max(end, C) - C
        self.source = torch.cat([self.source, new_source[:, :, : committed * SAMPLES_PER_FRAME]], dim=2)
        if committed:
            self.phase_acc = (self.phase_acc + steps[:, :, : committed * SAMPLES_PER_FRAME].double()
                              .sum(-1, keepdim=True)) % 1
        self.committed = max(end, C)
        return out

    def _watermark(self, wav: torch.Tensor) -> torch.Tensor:
        marked = self.watermarker.apply_watermark(wav.detach().cpu().numpy(), sample_rate=self.sample_rate)
        marked = torch.as_tensor(np.asarray(marked, dtype=np.float32), device=wav.device, dtype=wav.dtype)
        if marked.numel() >= wav.numel():
            return marked[: wav.numel()]
        return torch.cat([marked, wav[marked.numel():]])  # a resampler may drop a sample or two


@torch.inference_mode()
def push_many(items: list, max_frames: int | None = None, stats: dict | None = None) -> list:
    """`S3GenStreamer.push` for many streams of one S3Gen at once: [(streamer, ids, final)] ->
    per item its audio, or the exception its own chunk raised. The windows that need the flow go
    through `flow_mels` together, as many per call as fit `max_frames` mel frames (at least one;
    None: all in one call); each row is computed under
    its own mask, noise and finalize, so its mel equals its single-row pass within float32
    rounding (tests/test_stream.py). HiFT and the watermark then run per row: the vocoder's
    excitation is each stream's own state, and its random draws its own generator's. A flow call
    that raises is retried row by row, so a bad row fails alone. `stats` (a dict) counts
    "flow_calls" and "flow_rows" (the batched calls) and "flow_retries" (rows retried alone)."""
    if len({id(streamer.flow) for streamer, _, _ in items}) > 1:
        raise ValueError("push_many takes the streams of one S3Gen")
    out: list = [None] * len(items)
    windows = []
    for i, (streamer, ids, final) in enumerate(items):
        try:
            windows.append((i, streamer.plan(ids, final)))
        except Exception as exc:
            out[i] = exc
    mels = {}
    for part in _calls([(i, w) for i, w in windows if w.tokens is not None], max_frames):
        _count(stats, flow_calls=1, flow_rows=len(part))
        try:
            mels.update(zip([i for i, _ in part], _flow(part)))
        except Exception as exc:
            if len(part) == 1:
                out[part[0][0]] = exc
                continue
            for i, w in part:  # one bad row must not fail its batch-mates
                _count(stats, flow_retries=1)
                try:
                    mels[i] = _flow([(i, w)])[0]
                except Exception as row_exc:
                    out[i] = row_exc
    for i, w in windows:
        if out[i] is not None:
            continue
        try:
            out[i] = w.streamer.accept(w, mels.get(i))
        except Exception as exc:
            out[i] = exc
    return out


def _count(stats: dict | None, **counts: int) -> None:
    if stats is not None:
        for key, n in counts.items():
            stats[key] = stats.get(key, 0) + n


def _calls(flowing: list, max_frames: int | None) -> list:
    """The windows cut into flow calls of at most `max_frames` frames each (at least one window)."""
    calls, frames = [], 0
    for i, w in flowing:
        n = w.noise.shape[2]
        if not calls or (max_frames is not None and frames + n > max_frames):
            calls.append([])
            frames = 0
        calls[-1].append((i, w))
        frames += n
    return calls


def _flow(part: list) -> list:
    first = part[0][1].streamer
    return flow_mels(first.flow, [w.tokens for _, w in part], [w.streamer.ref for _, w in part],
                     [w.noise for _, w in part], first.n_timesteps, first.meanflow, [w.final for _, w in part])
