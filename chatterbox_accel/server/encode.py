"""Incremental audio encoders: float32 chunks in, bytes of a streamable file out, chunk by chunk.

    encoder = Encoder("mp3", 24000)       # speed=1.25: time-stretched first (pitch kept)
    for chunk in chunks:                 # 1-D float32 numpy arrays at 24 kHz
        send(encoder.encode(chunk))      # may be b"" while the codec buffers
    send(encoder.close())                # what the codec and the container still hold

Formats (OpenAI's `response_format`), each a format a player can start on before the end:
- mp3: MPEG audio frames, LAME at 64 kb/s mono, no Xing/LAME header (it would be a seek-back
  patch at the end, which a stream cannot do);
- opus: Ogg pages of Opus at 32 kb/s; aac: ADTS frames of AAC-LC at 64 kb/s;
- flac: a FLAC stream (its STREAMINFO left without the totals, as for any streamed FLAC);
- wav: a RIFF header whose size fields say "unknown" (0xFFFFFFFF, as streaming servers write
  them), then 16-bit PCM; pcm: headerless 16-bit little-endian mono PCM.
The compressed ones go through PyAV (FFmpeg with LAME, libopus and its AAC encoder, bundled in
its wheels: no system ffmpeg needed); wav and pcm are written here (a header and a cast).
"""
from __future__ import annotations

import struct

import numpy as np

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}
# format -> (container, codec, bitrate or None, container options)
_PYAV = {"mp3": ("mp3", "libmp3lame", 64_000, {"write_xing": "0", "id3v2_version": "0"}),
         "opus": ("ogg", "libopus", 32_000, {}),
         "aac": ("adts", "aac", 64_000, {}),
         "flac": ("flac", "flac", None, {})}


class _Sink:
    """A write-only file for PyAV's muxer: what it writes is collected until taken. No seek, so
    the muxers write streamable output (no seek-back header patches)."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 samples -> 16-bit little-endian PCM (clipped to [-1, 1])."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


def wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (both sizes 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", unknown))


class Tempo:
    """Speed without a pitch change, streaming: FFmpeg's `atempo` (WSOLA time-stretch) in a PyAV
    filter graph, chained where the speed is outside one stage's 0.5-2.0 (0.25 = 0.5 x 0.5).
    float32 mono chunks in, float32 mono chunks out (about len / speed samples in all)."""

    def __init__(self, speed: float, sample_rate: int):
        import av

        if not 0.25 <= speed <= 4.0:
            raise ValueError(f"speed {speed} is out of range; use 0.25 to 4.0")
        self.sample_rate, self._pts = sample_rate, 0
        stages, rest = [], float(speed)
        while rest < 0.5:
            stages.append(0.5)
            rest /= 0.5
        while rest > 2.0:
            stages.append(2.0)
            rest /= 2.0
        stages.append(rest)
        self._graph = av.filter.Graph()
        node = self._graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono")
        for stage in stages:
            following = self._graph.add("atempo", f"{stage:.6f}")
            node.link_to(following)
            node = following
        node.link_to(self._graph.add("abuffersink"))
        self._graph.configure()

    def _drain(self) -> np.ndarray:
        import av

        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError, EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def process(self, samples: np.ndarray) -> np.ndarray:
        import av

        if not samples.size:
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate, frame.pts = self.sample_rate, self._pts
        self._pts += samples.size
        self._graph.push(frame)
        return self._drain()

    def flush(self) -> np.ndarray:
        self._graph.push(None)
        return self._drain()


class Encoder:
    def __init__(self, fmt: str, sample_rate: int, speed: float = 1.0):
        if fmt not in FORMATS:
            raise ValueError(f"response_format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
        self.format, self.sample_rate = fmt, sample_rate
        self._tempo = Tempo(speed, sample_rate) if speed != 1.0 else None
        self.media_type = MEDIA_TYPES[fmt]
        self._header = wav_header(sample_rate) if fmt == "wav" else b""
        self._container = None
        self._closed = False
        if fmt in _PYAV:
            self._open_pyav()

    def _open_pyav(self) -> None:
        import av

        container_name, codec, bitrate, options = _PYAV[self.format]
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=container_name, options=options)
        stream = self._container.add_stream(codec, rate=self.sample_rate)
        stream.layout = "mono"
        if bitrate:
            stream.bit_rate = bitrate
        self._stream = stream
        stream.codec_context.open()  # now its sample format and frame size are known
        ctx = stream.codec_context
        # frames of exactly the codec's size (AAC 1024, Opus 20 ms, ...): the resampler's fifo
        self._resampler = av.AudioResampler(format=ctx.format.name, layout="mono", rate=self.sample_rate,
                                            frame_size=ctx.frame_size or None)
        self._pts = 0

    def _frames(self, samples: np.ndarray | None):
        """PyAV frames in the codec's sample format and frame size (None: flush the fifo)."""
        import av

        if samples is None:
            return self._resampler.resample(None)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._resampler.resample(frame)

    def _mux(self, frames) -> None:
        for frame in frames:
            frame.pts = self._pts
            self._pts += frame.samples
            for packet in self._stream.encode(frame):
                self._container.mux(packet)

    def encode(self, samples) -> bytes:
        """Bytes for one chunk of float32 mono samples (may be b"" while the codec buffers)."""
        if self._closed:
            raise RuntimeError("the encoder is closed")
        samples = np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1))
        if self._tempo is not None:
            samples = self._tempo.process(samples)
        return self._encode(samples)

    def _encode(self, samples: np.ndarray) -> bytes:
        header, self._header = self._header, b""
        if self._container is None:
            return header + pcm16(samples).tobytes()
        if samples.size:
            self._mux(self._frames(samples))
        return header + self._sink.take()

    def close(self) -> bytes:
        """The rest: the codec's buffered frames, then the container's trailer."""
        if self._closed:
            return b""
        tail = self._encode(self._tempo.flush()) if self._tempo is not None else b""
        self._closed = True
        header, self._header = tail + self._header, b""
        if self._container is None:
            return header
        self._mux(self._frames(None))   # the resampler's partial last frame (padded by the codec)
        for packet in self._stream.encode(None):  # the encoder's delayed frames
            self._container.mux(packet)
        self._container.close()         # the trailer (Ogg's last page, ...)
        return header + self._sink.take()
