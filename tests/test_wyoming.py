"""The Wyoming TTS endpoint (server/wyoming.py) as Home Assistant meets it: `wyoming.client.AsyncTcpClient`
against the listener on 127.0.0.1, in the same process and on the same engine as the HTTP server."""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

wyoming = pytest.importorskip("wyoming", reason="the Wyoming tests need the serve extra: pip install '.[serve]'")

from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop,  # noqa: E402
                         SynthesizeStopped, SynthesizeVoice)

from server_support import assert_pcm_close, metric  # noqa: E402

SAMPLES_PER_CHUNK = 2048


def http_pcm(server, text, voice="default", seed=None):
    body = {"input": text, "voice": voice, "response_format": "pcm"}
    if seed is not None:
        body["seed"] = seed
    r = httpx.post(f"{server.url}/v1/audio/speech", json=body, headers=server.auth, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


async def events_until(client, stop_types, timeout=120):
    events = []
    while True:
        event = await asyncio.wait_for(client.read_event(), timeout)
        assert event is not None, "the server closed the connection"
        events.append(event)
        if any(t.is_type(event.type) for t in stop_types):
            return events


def run(coroutine):
    return asyncio.run(coroutine)


def client_for(server):
    return AsyncTcpClient("127.0.0.1", server.wyoming_port)


def test_describe_lists_the_voices_and_streaming(server):
    async def go():
        async with client_for(server) as client:
            await client.write_event(Describe().event())
            return Info.from_event(await asyncio.wait_for(client.read_event(), 30))

    info = run(go())
    program = info.tts[0]
    assert program.supports_synthesize_streaming
    assert {"default", "sample"} <= {v.name for v in program.voices}
    assert all(v.languages == ["en"] for v in program.voices)


def test_synthesize_gives_the_http_routes_audio_in_fixed_chunks(server):
    async def go():
        async with client_for(server) as client:
            event = Synthesize(text="Hello there.", voice=SynthesizeVoice(name="sample")).event()
            await client.write_event(Event(event.type, {**event.data, "seed": 5}))
            return await events_until(client, [AudioStop, Error])

    events = run(go())
    assert AudioStart.is_type(events[0].type) and AudioStop.is_type(events[-1].type)
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    chunks = [AudioChunk.from_event(e).audio for e in events[1:-1]]
    assert chunks and all(len(c) == 2 * SAMPLES_PER_CHUNK for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 4096
    assert b"".join(chunks) == http_pcm(server, "Hello there.", "sample", seed=5)


def test_streamed_text_starts_audio_before_the_stop_and_keeps_order(server):
    sentences = ["Hello there.", "This is the second sentence.", "And the end."]

    async def go():
        async with client_for(server) as client:
            start = SynthesizeStart(voice=SynthesizeVoice(name="default")).event()
            await client.write_event(Event(start.type, {**start.data, "seed": 9}))
            await client.write_event(SynthesizeChunk(text="Hello there. This is ").event())
            await client.write_event(Synthesize(text="ignored duplicate").event())  # as clients send
            first = await events_until(client, [AudioChunk, Error])  # before the rest of the text exists
            await client.write_event(SynthesizeChunk(text="the second sentence. And").event())
            await client.write_event(SynthesizeChunk(text=" the end.").event())
            await client.write_event(SynthesizeStop().event())
            rest = await events_until(client, [SynthesizeStopped, Error])
            return first + rest

    events = run(go())
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types[1] == "audio-chunk"
    assert types[-2:] == ["audio-stop", "synthesize-stopped"] and "error" not in types
    audio = b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))
    with ThreadPoolExecutor(len(sentences)) as pool:  # at once: the engine batches them, as alone within rounding
        expected = b"".join(pool.map(lambda i: http_pcm(server, sentences[i], seed=9 + i), range(len(sentences))))
    assert_pcm_close(audio, expected)  # each sentence as the HTTP route gives it (seed + its index), in order


def test_an_unknown_voice_is_an_error_event(server):
    async def go():
        async with client_for(server) as client:
            await client.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")).event())
            return await events_until(client, [Error, AudioStop], timeout=30)

    events = run(go())
    error = Error.from_event(events[-1])
    assert "unknown voice" in error.text and error.code == "KeyError"


def test_a_disconnect_frees_the_slots(server):
    text = " ".join(f"This is sentence {i}, which is about sixty characters long." for i in range(7))

    async def go():
        client = client_for(server)
        await client.connect()
        await client.write_event(Synthesize(text=text).event())
        await events_until(client, [AudioChunk])
        await client.disconnect()

    run(go())
    deadline = time.time() + 30
    while time.time() < deadline and metric(server, "chatterbox_running_requests"):
        time.sleep(0.2)
    assert metric(server, "chatterbox_running_requests") == 0 and metric(server, "chatterbox_queue_depth") == 0
