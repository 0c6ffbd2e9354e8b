"""Long-form generation: a request longer than the window slides over it inside continuous batching.

The tiny model's window is shrunk to 0.5 s (25 frames) through EngineConfig.window_s, with a 0.3 s stride (15 frames,
so 10 are kept), so a request crosses several window boundaries in a few hundred steps; the mechanism is the one a
30 s window with an 18 s stride runs."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import fastgen
from fastgen.engine.longform import plan_windows, window_stream_seed
from fastgen.engine.request import RequestStatus
from fastgen.kernels.counter_hash import seed_key

WINDOW_S, STRIDE_S = 0.5, 0.3
WINDOW, STRIDE = 25, 15        # frames at 50 frames/s
LONG_S = 1.24                  # 62 frames: windows [0, 25) [15, 40) [30, 55) [45, 62), like 75 s over 30 s windows


def long_engine(folder, **options) -> fastgen.Engine:
    return fastgen.Engine.from_pretrained(folder, backend="torch", dtype="float32", window_s=WINDOW_S, **options)


def run_alone(engine: fastgen.Engine, *args, **kwargs) -> np.ndarray:
    request = engine.add_request(*args, **kwargs)
    while engine.has_unfinished():
        engine.step()
    assert request.status == RequestStatus.FINISHED, request.error
    return request.output.codes


def test_windows_follow_audiocraft():
    """audiocraft's _generate_tokens: window i covers frames [i·stride, i·stride + window) capped at the length; each
    window's steps are its frames after its prompt plus the delay pattern's tail."""
    windows = plan_windows(62, 0, WINDOW, STRIDE, 4)
    assert [(w.offset, w.prompt_frames, w.frames) for w in windows] == [(0, 0, 25), (15, 10, 25), (30, 10, 25),
                                                                        (45, 10, 17)]
    assert [w.last_step - w.first_step for w in windows] == [28, 18, 18, 10]
    assert all(a.last_step == b.first_step for a, b in zip(windows, windows[1:]))
    assert plan_windows(20, 5, WINDOW, STRIDE, 4) == plan_windows(20, 5, 20, STRIDE, 4)  # fits: one window
    assert len(plan_windows(20, 5, WINDOW, STRIDE, 4)) == 1
    # a prompt longer than the window continues from its own last kept frames
    first = plan_windows(70, 40, WINDOW, STRIDE, 4)[0]
    assert (first.offset, first.prompt_frames, first.frames) == (30, 10, 25)


def test_window_streams_never_repeat():
    """Positions restart in every window: the window index goes into the stream seed, never twice the same."""
    for seed in (0, 1, 2**63 - 1, 123456789):
        keys = [window_stream_seed(seed, i) for i in range(5000)]
        assert keys[0] == seed_key(seed)
        assert len(set(keys)) == len(keys)


def reference_windows(reference, inputs: dict, total: int, guidance: float, channel_codebooks: int,
                      stereo: bool) -> np.ndarray:
    """The sliding window as a loop of transformers generate calls: each given the previous window's last
    window − stride codes as decoder_input_ids (transformers prepends BOS and builds the delay pattern itself)."""
    pieces, kept, offset = [], None, 0
    while True:
        frames = min(WINDOW, total - offset)
        prompt = 0 if kept is None else kept.shape[1]
        captured = []
        original = reference.audio_encoder.decode

        def spy(audio_codes, *args, **kw):
            captured.append(audio_codes[0, 0].clone())
            return original(audio_codes, *args, **kw)

        reference.audio_encoder.decode = spy
        try:
            extra = {} if kept is None else {"decoder_input_ids": torch.from_numpy(kept)}
            with torch.no_grad():
                reference.generate(**inputs, **extra, do_sample=False, guidance_scale=guidance,
                                   max_new_tokens=frames - prompt + channel_codebooks - 1)
        finally:
            reference.audio_encoder.decode = original
        codes = captured[0] if not stereo else torch.stack(captured, dim=1).flatten(0, 1)  # l0 r0 l1 r1 …
        codes = codes.numpy()
        assert codes.shape[1] == frames
        pieces.append(codes[:, prompt:])
        if offset + frames >= total:
            return np.concatenate(pieces, axis=1)
        kept = codes[:, STRIDE:]
        offset += STRIDE


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_greedy_long_request_matches_transformers_window_loop(tiny_mono_dir, tiny_stereo_dir, layout):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    folder = tiny_stereo_dir if layout == "stereo" else tiny_mono_dir
    reference = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    inputs = dict(AutoTokenizer.from_pretrained(folder)(["a slow blues"], return_tensors="pt"))
    engine = long_engine(folder, max_slots=2)
    total = round(LONG_S * engine.frame_rate)
    expected = reference_windows(reference, inputs, total, 3.0, engine.model.config.decoder.channel_codebooks,
                                 layout == "stereo")
    params = fastgen.SamplingParams(duration=LONG_S, extend_stride=STRIDE_S, do_sample=False, guidance_scale=3.0)
    codes = run_alone(engine, "a slow blues", params)
    assert codes.shape == expected.shape == (engine.model.config.decoder.num_codebooks, total)
    np.testing.assert_array_equal(codes, expected)


def test_sampled_long_request_is_its_windows_chained_through_codes_prompt(tiny_mono_dir):
    """Seeded sampling: window i runs the stream of seed ^ (i << 32); the long request equals a chain of ordinary
    requests, each continuing the previous one's last kept codes through codes_prompt."""
    engine = long_engine(tiny_mono_dir, max_slots=3)
    seed, total = 77, round(LONG_S * engine.frame_rate)
    sampling = dict(top_k=20, temperature=1.3, guidance_scale=2.0)
    long_codes = run_alone(engine, "lofi", fastgen.SamplingParams(duration=LONG_S, extend_stride=STRIDE_S, seed=seed,
                                                                  **sampling))
    chained = run_alone(engine, "lofi", fastgen.SamplingParams(duration=WINDOW_S, seed=seed, **sampling))
    window = 1
    while chained.shape[1] < total:
        kept = chained[:, -(WINDOW - STRIDE):]
        new = min(STRIDE, total - chained.shape[1])
        piece = run_alone(engine, "lofi", fastgen.SamplingParams(duration=new / 50, seed=seed ^ (window << 32),
                                                                  **sampling), codes_prompt=kept)
        chained = np.concatenate([chained, piece[:, kept.shape[1]:]], axis=1)
        window += 1
    assert window == 4
    np.testing.assert_array_equal(long_codes, chained)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_mixed_long_and_short_workload_is_batch_independent(tiny_mono_dir, tiny_stereo_dir, layout):
    """Long and short requests share the batch, join mid-way and leave; each one's codes equal its codes alone, also
    with several steps per call (window ends inside a call), so re-prefills never disturb batch-mates."""
    folder = tiny_stereo_dir if layout == "stereo" else tiny_mono_dir
    rng = np.random.default_rng(5)
    channels = 2 if layout == "stereo" else 1
    audio = (0.3 * rng.standard_normal((channels, 640 * 7))).astype(np.float32)
    work = [
        ("long sampled", fastgen.SamplingParams(duration=LONG_S, extend_stride=STRIDE_S, seed=3, top_k=10), None),
        ("short", fastgen.SamplingParams(duration=0.2, seed=4), None),
        (None, fastgen.SamplingParams(duration=0.9, extend_stride=0.2, do_sample=False), None),  # long, greedy
        ("long with audio", fastgen.SamplingParams(duration=0.8, extend_stride=STRIDE_S, seed=5, top_p=0.9),
         (audio, 32000)),
        ("late short", fastgen.SamplingParams(duration=0.3, seed=6), None),
        ("late long", fastgen.SamplingParams(duration=1.0, extend_stride=0.25, seed=7, guidance_scale=1.0), None),
    ]
    alone = long_engine(folder, max_slots=1)
    expected = [run_alone(alone, prompt, params, audio_prompt) for prompt, params, audio_prompt in work]
    for steps_per_call in (1, 3):
        engine = long_engine(folder, max_slots=3, steps_per_call=steps_per_call)
        requests = [engine.add_request(*item) for item in work[:4]]
        for _ in range(7):
            engine.step()
        requests += [engine.add_request(*item) for item in work[4:]]
        progress = []
        engine.listeners.append(lambda r, kind, payload: progress.append(payload) if kind == "progress" and
                                r is requests[0] else None)
        while engine.has_unfinished():
            engine.step()
        for request, codes in zip(requests, expected):
            assert request.status == RequestStatus.FINISHED, request.error
            np.testing.assert_array_equal(request.output.codes, codes, err_msg=request.prompt)
        done = [d for d, _ in progress]
        assert done == sorted(done) and progress[-1][0] == progress[-1][1] == requests[0].steps_total
    assert expected[3].shape[1] == 7 + 40  # the audio prompt's frames, then the new ones


def test_five_minute_equivalent_request_fits_one_slot(tiny_mono_dir):
    """Ten windows' worth (5 minutes over 30 s windows; 16 windows at a 60 % stride) in one slot: the KV cache and
    the codes buffer keep their size and place, and the codes come out full length."""
    engine = long_engine(tiny_mono_dir, max_slots=1)
    cache, state = engine.runner.cache, engine.runner.state
    tensors = lambda: [(t.data_ptr(), t.shape) for t in (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v,
                                                        state.codes)]  # noqa: E731
    before = tensors()
    assert engine.slot_frames == engine.window_frames == WINDOW and engine.max_frames == 300 * 50
    assert cache.self_k.shape[-2] == WINDOW + 4  # one window's positions (+ the delay pattern's tail)
    request = engine.add_request("endless ambient", fastgen.SamplingParams(duration=10 * WINDOW_S, seed=1))
    assert len(request.windows) == 16  # default stride: 60 % of the window (18 s of a 30 s one)
    while engine.has_unfinished():
        engine.step()
    assert request.status == RequestStatus.FINISHED, request.error
    assert request.output.codes.shape == (4, 10 * WINDOW)
    assert request.output.audio.shape == (1, 10 * WINDOW * 640)
    assert tensors() == before


def test_limits_are_the_engines(tiny_mono_dir):
    engine = long_engine(tiny_mono_dir, max_slots=1, max_duration_s=2.0)
    assert engine.max_frames == 100 and engine.slot_frames == WINDOW
    with pytest.raises(fastgen.RequestError, match=r"limit of 2\.00 s"):
        engine.make_request("a", fastgen.SamplingParams(duration=2.1))
    for bad in (0.5, 0.6, 0.01):  # the window itself, past it, under one frame
        with pytest.raises(fastgen.RequestError, match=r"extend_stride must be in \(0, 0\.50\) s"):
            engine.make_request("a", fastgen.SamplingParams(duration=1.0, extend_stride=bad))
    for bad in (0, -1.0, float("nan"), "18"):
        with pytest.raises(fastgen.RequestError, match="extend_stride"):
            fastgen.SamplingParams(extend_stride=bad)
    for bad in (0, 3601, float("inf")):
        with pytest.raises(ValueError, match="max_duration_s"):
            fastgen.EngineConfig(max_duration_s=bad)
    for bad in (0, 31, float("nan")):
        with pytest.raises(ValueError, match="window_s"):
            fastgen.EngineConfig(window_s=bad)
    short = fastgen.Engine.from_pretrained(tiny_mono_dir, backend="torch", dtype="float32", max_slots=1,
                                           max_duration_s=2.0)
    assert short.slot_frames == 100 < short.window_frames  # a limit under the window sizes the slot, as before


def test_reprefill_under_graph_replay_matches_eager(tiny_mono_dir):
    """Graph mode (the CPU stand-in records and replays the captured step's operators on the same tensors): a
    re-prefilled slot just continues under replay, window ends inside 3-step calls, beside a short batch-mate."""
    from fastgen.engine.graph_standin import cpu_graphs
    work = [("long", fastgen.SamplingParams(duration=0.6, extend_stride=0.2, seed=8, top_k=10)),
            ("short", fastgen.SamplingParams(duration=0.2, do_sample=False))]
    results = []
    for backend, graphs in (("torch", False), ("triton", True)):
        with cpu_graphs() if graphs else contextlib.nullcontext():
            engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=2, backend=backend, window_s=0.3,
                                                    dtype="float32",
                                                    max_duration_s=1.0, steps_per_call=3, enforce_eager=not graphs)
        assert (engine.runner.graphs is not None) == graphs
        requests = [engine.add_request(*item) for item in work]
        while engine.has_unfinished():
            engine.step()
        assert all(r.status == RequestStatus.FINISHED for r in requests), [r.error for r in requests]
        assert len(requests[0].windows) == 3
        results.append([r.output.codes for r in requests])
    for eager, replayed in zip(*results):
        np.testing.assert_array_equal(eager, replayed)
