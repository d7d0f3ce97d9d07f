"""A Wyoming TTS endpoint (Home Assistant) on the same engine as the HTTP server.

    chatterbox-accel serve --wyoming [--wyoming-uri tcp://127.0.0.1:10200]

Events (the `wyoming` package's types):
- `describe` -> `info`: one TTS program, the engine's voices (Multilingual: its 23 languages),
  `supports_synthesize_streaming: true`.
- `synthesize` -> `audio-start`, `audio-chunk`s (16-bit mono at the model's rate, exactly
  `samples_per_chunk` samples each but the last), `audio-stop`. The voice by name (the default
  voice otherwise). A `seed` field in the event's data (an extension) seeds the request.
- Streaming text in: `synthesize-start`, then `synthesize-chunk`s whose text is split into
  sentences as it arrives, each complete sentence submitted to the engine at once (so audio
  starts before `synthesize-stop`), audio sent in order; the `synthesize` that clients send
  during a stream is ignored; `synthesize-stop` -> the rest, `audio-stop`, `synthesize-stopped`.
- Failures are `error` events (`text`, `code`); a client that disconnects cancels its requests.
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np

from ..engine import AudioChunk as EngineChunk
from ..engine import Done, EngineBusy, Failed, SpeechRequest
from ..engine.split import complete_prefix, sentences
from ..engine.voices import DEFAULT
from .encode import pcm16

logger = logging.getLogger(__name__)

SAMPLES_PER_CHUNK = 2048   # 1024-4096 as Home Assistant's satellites expect; ~85 ms at 24 kHz
MAX_STREAM_TEXT = 16384    # characters buffered in one streamed synthesis


def info_event(engine, version: str = "0.1.0"):
    from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

    languages = ["en"]
    if engine.family == "multilingual":
        from chatterbox.mtl_tts import SUPPORTED_LANGUAGES

        languages = sorted(SUPPORTED_LANGUAGES)
    attribution = Attribution(name="Resemble AI (Chatterbox), chatterbox-accel",
                              url="https://github.com/resemble-ai/chatterbox")
    voices = [TtsVoice(name=name, description=f"Chatterbox {engine.family} voice {name}", attribution=attribution,
                       installed=True, version=version, languages=languages)
              for name in engine.voices.names()]
    program = TtsProgram(name="chatterbox-accel", description=f"Chatterbox {engine.family} on chatterbox-accel",
                         attribution=attribution, installed=True, version=version, voices=voices,
                         supports_synthesize_streaming=True)
    return Info(tts=[program]).event()


class _Sender:
    """Engine events of requests, in submission order -> audio-start, fixed-size chunks, audio-stop."""

    def __init__(self, handler, sample_rate: int, samples_per_chunk: int):
        self.handler, self.rate, self.size = handler, sample_rate, samples_per_chunk
        self.handles: asyncio.Queue = asyncio.Queue()
        self.pending = np.zeros(0, dtype=np.int16)
        self.started = False
        self.failed = False  # an error was sent: later requests are cancelled, not read

    async def _start(self):
        from wyoming.audio import AudioStart

        if not self.started:
            self.started = True
            await self.handler.write_event(AudioStart(rate=self.rate, width=2, channels=1).event())

    async def _send(self, samples: np.ndarray, flush: bool = False):
        from wyoming.audio import AudioChunk

        await self._start()
        self.pending = np.concatenate([self.pending, samples])
        while len(self.pending) >= self.size or (flush and len(self.pending)):
            piece, self.pending = self.pending[:self.size], self.pending[self.size:]
            await self.handler.write_event(AudioChunk(rate=self.rate, width=2, channels=1,
                                                      audio=piece.tobytes()).event())

    async def run(self) -> bool:
        """Send every queued request's audio until a None is queued; False after an error."""
        from wyoming.audio import AudioStop
        from wyoming.error import Error

        while True:
            handle = await self.handles.get()
            if handle is None:
                break
            if isinstance(handle, BaseException):
                self.failed = True
                await self.handler.write_event(Error(text=str(handle).strip("'\""),
                                                     code=type(handle).__name__).event())
                return False
            async for event in handle:
                if isinstance(event, EngineChunk):
                    await self._send(pcm16(event.audio.numpy()))
                elif isinstance(event, Failed):
                    self.failed = True
                    await self.handler.write_event(Error(text=str(event.error).strip("'\""),
                                                         code=type(event.error).__name__).event())
                    return False
                elif isinstance(event, Done):
                    break
        await self._send(np.zeros(0, dtype=np.int16), flush=True)
        await self.handler.write_event(AudioStop().event())
        return True


def handler_factory(engine, samples_per_chunk: int = SAMPLES_PER_CHUNK):
    from wyoming.server import AsyncEventHandler

    class Handler(AsyncEventHandler):
        def __init__(self, reader, writer):
            super().__init__(reader, writer)
            self.tasks: set = set()
            self.live: list = []        # engine handles of this connection (cancelled on disconnect)
            self.stream = None          # (sender, task, voice, seed, buffer) while text streams in

        async def handle_event(self, event) -> bool:
            from wyoming.info import Describe
            from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

            if Describe.is_type(event.type):
                await self.write_event(info_event(engine))
            elif Synthesize.is_type(event.type):
                if self.stream is None:  # during a stream it is the duplicate clients send: ignored
                    synth = Synthesize.from_event(event)
                    sender = _Sender(self, engine.model.sr, samples_per_chunk)
                    self._submit(sender, synth.text, _voice(synth.voice), event.data.get("seed"))
                    sender.handles.put_nowait(None)
                    self._spawn(sender.run())
            elif SynthesizeStart.is_type(event.type):
                start = SynthesizeStart.from_event(event)
                sender = _Sender(self, engine.model.sr, samples_per_chunk)
                self.stream = {"sender": sender, "task": self._spawn(sender.run()), "voice": _voice(start.voice),
                               "seed": event.data.get("seed"), "buffer": "", "pieces": 0}
            elif SynthesizeChunk.is_type(event.type) and self.stream is not None:
                self.stream["buffer"] += SynthesizeChunk.from_event(event).text
                if len(self.stream["buffer"]) > MAX_STREAM_TEXT:
                    self._submit(self.stream["sender"], None, None, None,
                                 error=ValueError(f"over {MAX_STREAM_TEXT} characters of text buffered"))
                else:
                    self._flush(final=False)
            elif SynthesizeStop.is_type(event.type) and self.stream is not None:
                from wyoming.tts import SynthesizeStopped

                self._flush(final=True)
                stream, self.stream = self.stream, None
                stream["sender"].handles.put_nowait(None)
                await stream["task"]
                await self.write_event(SynthesizeStopped().event())
            return True

        def _flush(self, final: bool) -> None:
            """Submit the buffer's complete sentences (all of it when final)."""
            stream = self.stream
            text = stream["buffer"]
            cut = len(text) if final else complete_prefix(text)
            stream["buffer"] = text[cut:]   # the sentence still being written, if any
            for sentence in sentences(text[:cut]):
                seed = None if stream["seed"] is None else stream["seed"] + stream["pieces"]
                stream["pieces"] += 1
                self._submit(stream["sender"], sentence, stream["voice"], seed)

        def _submit(self, sender, text, voice, seed, error=None) -> None:
            if sender.failed:
                return
            if error is None:
                try:
                    if voice not in engine.voices:
                        raise KeyError(f"unknown voice {voice!r}; this server has {', '.join(engine.voices.names())}")
                    handle = engine.submit(SpeechRequest(text, voice=voice, seed=seed))
                    self.live.append(handle)
                    sender.handles.put_nowait(handle)
                    return
                except (ValueError, KeyError, TypeError, EngineBusy) as exc:
                    error = exc
            sender.handles.put_nowait(error)

        def _spawn(self, coroutine):
            task = asyncio.get_running_loop().create_task(self._guard(coroutine))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return task

        async def _guard(self, coroutine):
            try:
                return await coroutine
            except (ConnectionError, asyncio.CancelledError):
                self._cancel()
            except Exception:
                logger.exception("wyoming: sending audio failed")
                self._cancel()

        def _cancel(self) -> None:
            for handle in self.live:
                handle.cancel()
            self.live.clear()

        async def disconnect(self) -> None:
            self._cancel()
            for task in list(self.tasks):
                task.cancel()

    return Handler


def _voice(voice) -> str:
    return voice.name if voice is not None and voice.name else DEFAULT


async def start_wyoming(engine, uri: str):
    """Start the listener on the running loop; returns the server (await .stop() to end it)."""
    from wyoming.server import AsyncServer

    server = AsyncServer.from_uri(uri)
    await server.start(handler_factory(engine))
    return server
