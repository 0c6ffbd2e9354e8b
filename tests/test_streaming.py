"""Streamed audio: windows of the growing codes, decoded with left context, crossfaded, the last to the end. The
concatenated stream matches the one-shot decode of the same codes, its chunking does not depend on batch-mates,
same-step windows share a codec call, the first chunk comes early, and the async API streams, aborts and fails."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import fastgen
from fastgen.engine.async_engine import AsyncEngine
from fastgen.engine.streaming import StreamConfig

@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small for OpenMP: a second thread only adds contention on a loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GREEDY = fastgen.SamplingParams(max_new_tokens=80, do_sample=False, guidance_scale=3.0)
HOP = 640
# A tiny first chunk and short interval, so an 80-step request makes several chunks.
SMALL = StreamConfig(first_chunk_s=0.1, interval_s=0.3)


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((estimate - reference) ** 2), 1e-30)))


def stream_alone(folder, prompt, params, config=SMALL, **options):
    engine = fastgen.Engine.from_pretrained(folder, **{"max_slots": 1, "backend": "torch", **options})
    request = engine.add_request(prompt, params)
    chunks = list(engine.stream_audio(request, config))
    one_shot = engine.runner.decode_audio([torch.from_numpy(request.output.codes)])[0]
    return chunks, request.output, one_shot


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_stream_matches_one_shot_decode(tiny_mono_dir, tiny_stereo_dir, layout):
    folder = tiny_mono_dir if layout == "mono" else tiny_stereo_dir
    chunks, out, one_shot = stream_alone(folder, "a stream", GREEDY)
    stream = np.concatenate(chunks, axis=-1)
    assert np.array_equal(out.audio, stream)  # a streamed request's output is its stream
    assert stream.dtype == np.float32 and stream.shape == one_shot.shape  # the last chunk decodes to the end
    assert len(chunks) >= 4
    frames = out.codes.shape[-1]
    # first chunk 5 frames, then 15-frame chunks, the rest in the last one
    assert [c.shape[-1] for c in chunks[:-1]] == [5 * HOP] + [15 * HOP] * (len(chunks) - 2)
    assert sum(c.shape[-1] for c in chunks) == frames * HOP
    print(f"{layout}: seam SNR {snr_db(one_shot, stream):.1f} dB, max error {np.abs(stream - one_shot).max():.2e}")
    assert snr_db(one_shot, stream) > 60  # 84 dB measured; the README states the musicgen-size codec figure
    assert np.abs(stream - one_shot).max() < 1e-3


def test_no_left_context_no_lookahead_is_worse(tiny_mono_dir):
    """The measured knobs matter: without context or look-ahead the seams are clearly wrong (so the tolerance in
    the test above is a real bound, not slack)."""
    good, _, one_shot = stream_alone(tiny_mono_dir, "a stream", GREEDY)
    bare = StreamConfig(first_chunk_s=0.1, interval_s=0.3, left_context_frames=0, lookahead_frames=0,
                        crossfade_frames=0)
    bad, _, _ = stream_alone(tiny_mono_dir, "a stream", GREEDY, bare)
    good_snr = snr_db(one_shot, np.concatenate(good, -1))
    bad_snr = snr_db(one_shot, np.concatenate(bad, -1))
    assert good_snr > bad_snr + 6


def test_chunking_independent_of_batch_mates_and_batched_codec_calls(tiny_mono_dir):
    alone, _, _ = stream_alone(tiny_mono_dir, "the one", GREEDY, max_slots=1)
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=4, backend="torch")
    mates = [engine.add_request("mate", fastgen.SamplingParams(max_new_tokens=80, seed=5)),
             engine.add_request(None, fastgen.SamplingParams(max_new_tokens=33, seed=6))]
    for mate in mates:
        assert engine.stream(mate.request_id, SMALL)
    for _ in range(9):  # join mid-way
        engine.step()
    one = engine.add_request("the one", GREEDY)
    chunks = list(engine.stream_audio(one, SMALL))
    assert [c.shape for c in chunks] == [c.shape for c in alone]
    for got, want in zip(chunks, alone):
        np.testing.assert_allclose(got, want, atol=1e-5)
    while engine.has_unfinished():
        engine.step()

    # two equal requests started together reach each boundary in the same step: one codec call per chunk for both
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=2, backend="torch")
    pair = [engine.add_request(p, GREEDY) for p in ("left", "right")]
    engine.stream(pair[0].request_id, SMALL)
    streamed = list(engine.stream_audio(pair[1], SMALL))
    assert engine.stages.completed["stream"] == len(streamed) and engine.stages.completed["decode"] == 0


def test_first_chunk_arrives_early(tiny_mono_dir):
    """Time to first audio in steps: first chunk (5 frames) + look-ahead + crossfade + the delay pattern's K − 1."""
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=1, backend="torch")
    request = engine.add_request("early", GREEDY)
    seen = []
    engine.listeners.append(lambda r, kind, payload: seen.append(r.steps_done) if kind == "audio" else None)
    chunks = list(engine.stream_audio(request, SMALL))
    config = SMALL
    assert seen[0] == 5 + config.lookahead_frames + config.crossfade_frames + 3
    assert len(seen) == len(chunks) and seen[0] < request.steps_total / 4


def test_async_stream_audio_threaded_stage_worker_and_abort(tiny_stereo_dir):
    engine = AsyncEngine.from_pretrained(tiny_stereo_dir, max_slots=2, backend="torch", overlap_stages=True)
    try:
        async def main():
            handle = engine.submit("streamed", GREEDY)
            chunks = [c async for c in handle.stream_audio(SMALL)]
            out = await handle
            again = [c async for c in handle.stream_audio()]  # after the end: the same chunks again
            victim = engine.submit("victim", fastgen.SamplingParams(max_new_tokens=400, seed=1))
            got = 0
            with pytest.raises(fastgen.RequestAborted):
                async for chunk in victim.stream_audio(SMALL):
                    got += 1
                    engine.abort(victim.request_id)
            plain = engine.submit("not streamed", fastgen.SamplingParams(max_new_tokens=20, seed=2))
            plain_out = await plain
            whole = [c async for c in plain.stream_audio()]  # never streamed: the whole clip at once
            return chunks, out, again, got, whole, plain_out
        chunks, out, again, got, whole, plain_out = asyncio.run(main())
        assert all(c.shape[0] == 2 and c.dtype == np.float32 for c in chunks) and len(chunks) >= 4
        stream = np.concatenate(chunks, axis=-1)
        assert np.array_equal(stream, out.audio)
        one_shot = engine.engine.runner.decode_audio([torch.from_numpy(out.codes)])[0]
        assert stream.shape == one_shot.shape and snr_db(one_shot, stream) > 60
        assert len(again) == len(chunks) and all(np.array_equal(a, c) for a, c in zip(again, chunks))
        assert len(whole) == 1 and np.array_equal(whole[0], plain_out.audio)
        assert 1 <= got <= 2
    finally:
        engine.shutdown_sync()


def test_stream_config_validation():
    with pytest.raises(ValueError, match="first_chunk_s"):
        StreamConfig(first_chunk_s=0)
    with pytest.raises(ValueError, match="crossfade_frames"):
        StreamConfig(crossfade_frames=-1)


# Long-form (fastgen/engine/longform.py): a 0.5 s window (25 frames) with a 0.3 s stride (10 frames kept), so a 1.24 s
# request (62 frames: windows [0, 25) [15, 40) [30, 55) [45, 62)) crosses three window boundaries in 74 steps.
LONG = fastgen.SamplingParams(duration=1.24, extend_stride=0.3, do_sample=False, guidance_scale=3.0)
LONG_ENGINE = dict(backend="torch", dtype="float32", window_s=0.5)


def assert_stream_is_its_codes(engine, chunks, out, expected_codes):
    """The stream of a long request: its codes those of the same request not streamed, the concatenated chunks its
    output audio, as long as the one-shot decode of its codes and within the seam tolerance of a short one."""
    np.testing.assert_array_equal(out.codes, expected_codes)
    stream = np.concatenate(chunks, axis=-1)
    assert np.array_equal(out.audio, stream)
    one_shot = engine.runner.decode_audio([torch.from_numpy(out.codes)])[0]
    assert stream.shape == one_shot.shape == (one_shot.shape[0], out.codes.shape[1] * HOP)
    assert snr_db(one_shot, stream) > 60 and np.abs(stream - one_shot).max() < 1e-3


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_stream_crosses_long_form_window_boundaries(tiny_mono_dir, tiny_stereo_dir, layout):
    """Absolute frame f of a long request lives in the slot at f − the window's offset, or on the host once it left
    the slot; the chunks follow it across every boundary, also a stream turned on after the first boundary (its
    first chunk reaches back into the frames that left the slot)."""
    folder = tiny_mono_dir if layout == "mono" else tiny_stereo_dir
    engine = fastgen.Engine.from_pretrained(folder, max_slots=2, **LONG_ENGINE)
    plain = engine.add_request("a long stream", LONG)
    while engine.has_unfinished():
        engine.step()
    assert len(plain.windows) == 4 and plain.output.codes.shape[1] == 62

    streamed = engine.add_request("a long stream", LONG)
    chunks = list(engine.stream_audio(streamed, SMALL))
    assert len(chunks) >= 5
    assert_stream_is_its_codes(engine, chunks, streamed.output, plain.output.codes)

    late = engine.add_request("a long stream", LONG)
    while late.window_index < 2:  # two boundaries crossed: frames [0, 30) have left the slot
        engine.step()
    chunks = list(engine.stream_audio(late, SMALL))
    assert chunks[0].shape[-1] > 30 * HOP
    assert_stream_is_its_codes(engine, chunks, late.output, plain.output.codes)


def test_async_stream_crosses_long_form_window_boundaries(tiny_stereo_dir):
    """The same through the AsyncEngine, its stage worker on a thread (windows decoded after the slot moved on), with
    3 steps per call (window ends inside a call)."""
    engine = AsyncEngine.from_pretrained(tiny_stereo_dir, max_slots=2, overlap_stages=True, steps_per_call=3,
                                         **LONG_ENGINE)
    try:
        async def main():
            plain = await engine.submit("a long stream", LONG)
            handle = engine.submit("a long stream", LONG)
            chunks = [c async for c in handle.stream_audio(SMALL)]
            return plain, chunks, await handle
        plain, chunks, out = asyncio.run(main())
        assert engine.engine.stages.threaded and len(chunks) >= 5
        assert_stream_is_its_codes(engine.engine, chunks, out, plain.codes)
    finally:
        engine.shutdown_sync()
