"""Bad input at the API: every invalid request raises fastgen.RequestError (a ValueError) naming the parameter and
what is allowed, before any work starts, leaves nothing queued, and the engine keeps serving afterwards."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastgen
from fastgen import RequestError, SamplingParams

MAX_TEXT_TOKENS = 16


@pytest.fixture(scope="module")
def model(tiny_mono_dir) -> fastgen.MusicGen:
    return fastgen.MusicGen.from_pretrained(tiny_mono_dir, device="cpu", dtype=torch.float32, max_slots=2,
                                            max_text_tokens=MAX_TEXT_TOKENS)


@pytest.fixture
def idle_model(model):
    """The shared model, checked to be idle after the test: a refused request must leave nothing behind."""
    assert not model.engine.has_unfinished()
    yield model
    assert not model.engine.has_unfinished()
    assert not model.engine.scheduler.running


def test_request_error_is_a_value_error():
    assert issubclass(RequestError, ValueError) and issubclass(RequestError, fastgen.FastgenError)


# (fields, words the message must hold: the parameter and the allowed range)
BAD_PARAMS = {
    "duration-zero": (dict(duration=0), ["duration", "positive"]),
    "duration-negative": (dict(duration=-1.0), ["duration", "positive"]),
    "duration-nan": (dict(duration=math.nan), ["duration", "positive"]),
    "duration-inf": (dict(duration=math.inf), ["duration", "positive"]),
    "duration-string": (dict(duration="5"), ["duration"]),
    "duration-and-max-new-tokens": (dict(duration=1.0, max_new_tokens=10), ["duration", "max_new_tokens"]),
    "max-new-tokens-zero": (dict(max_new_tokens=0), ["max_new_tokens", "≥ 1"]),
    "max-new-tokens-float": (dict(max_new_tokens=10.5), ["max_new_tokens", "integer"]),
    "temperature-zero": (dict(temperature=0.0), ["temperature", "(0, 100]"]),
    "temperature-negative": (dict(temperature=-0.5), ["temperature", "(0, 100]"]),
    "temperature-nan": (dict(temperature=math.nan), ["temperature", "(0, 100]"]),
    "top-k-negative": (dict(top_k=-1), ["top_k", "[0, 2**31 - 1]"]),
    "top-k-float": (dict(top_k=2.5), ["top_k", "integer"]),
    "top-k-bool": (dict(top_k=True), ["top_k", "integer"]),
    "top-p-above-one": (dict(top_p=1.5), ["top_p", "[0, 1]"]),
    "top-p-negative": (dict(top_p=-0.1), ["top_p", "[0, 1]"]),
    "seed-negative": (dict(seed=-1), ["seed", "[0, 2**63 - 1]"]),
    "seed-too-big": (dict(seed=2**63), ["seed", "[0, 2**63 - 1]"]),
    "seed-bool": (dict(seed=True), ["seed", "integer"]),
    "seed-float": (dict(seed=1.0), ["seed", "integer"]),
    "guidance-negative": (dict(guidance_scale=-1.0), ["guidance_scale", "[0, 100]"]),
    "guidance-nan": (dict(guidance_scale=math.nan), ["guidance_scale", "[0, 100]"]),
    "do-sample-int": (dict(do_sample=1), ["do_sample", "True or False"]),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_sampling_params_validation(case):
    fields, words = BAD_PARAMS[case]
    with pytest.raises(RequestError) as info:
        SamplingParams(**fields)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("fields", [dict(duration=0.5, seed=0), dict(max_new_tokens=4), dict(seed=2**63 - 1),
                                    dict(top_p=0.0), dict(top_p=1.0), dict(top_k=0), dict(guidance_scale=0.0),
                                    dict(temperature=100.0), dict(do_sample=False)])
def test_sampling_params_edges_are_accepted(fields):
    SamplingParams(**fields)


def wave(n=3200, channels=None, value=0.1):
    shape = (n,) if channels is None else (channels, n)
    return np.full(shape, value, dtype=np.float32)


# (generate kwargs, words the message must hold)
BAD_REQUESTS = {
    "prompt-not-string": (dict(prompts=[42]), ["prompts[0]", "string"]),
    "second-prompt-not-string": (dict(prompts=["lofi", b"bytes"]), ["prompts[1]", "string"]),
    "prompts-bare-string": (dict(prompts="lofi beat"), ["prompts", "list"]),
    "prompts-not-sequence": (dict(prompts=42), ["prompts", "list"]),
    "params-list-too-short": (dict(prompts=["a", "b"], params=[SamplingParams()]), ["params", "one entry per prompt"]),
    "params-list-too-long": (dict(prompts=["a"], params=[SamplingParams()] * 2), ["params", "one entry per prompt"]),
    "params-wrong-type": (dict(prompts=["a"], params=[{"duration": 1.0}]), ["params", "SamplingParams"]),
    "audio-prompts-wrong-length": (dict(prompts=["a", "b"], audio_prompts=[(wave(), 32000)]),
                                   ["audio_prompts", "one entry per prompt"]),
    "audio-not-a-tuple": (dict(prompts=["a"], audio_prompts=[wave()]), ["audio_prompt", "(waveform, sample_rate)"]),
    "audio-tuple-of-one": (dict(prompts=["a"], audio_prompts=[(wave(),)]), ["audio_prompt", "(waveform, sample_rate)"]),
    "audio-tuple-of-three": (dict(prompts=["a"], audio_prompts=[(wave(), 32000, 1)]), ["audio_prompt"]),
    "audio-empty": (dict(prompts=["a"], audio_prompts=[(np.zeros(0, np.float32), 32000)]), ["audio_prompt", "empty"]),
    "audio-nan": (dict(prompts=["a"], audio_prompts=[(wave(value=math.nan), 32000)]), ["audio_prompt", "NaN"]),
    "audio-3d": (dict(prompts=["a"], audio_prompts=[(np.zeros((1, 1, 3200), np.float32), 32000)]),
                 ["audio_prompt", "2-D"]),
    "audio-too-many-channels": (dict(prompts=["a"], audio_prompts=[(wave(channels=3), 32000)]),
                                ["audio_prompt", "channels"]),
    "audio-samples-first": (dict(prompts=["a"], audio_prompts=[(np.zeros((3200, 2), np.float32), 32000)]),
                            ["audio_prompt", "waveform.T"]),
    "audio-sample-rate-zero": (dict(prompts=["a"], audio_prompts=[(wave(), 0)]), ["sample rate", "[1000, 768000]"]),
    "audio-strings": (dict(prompts=["a"], audio_prompts=[(np.array(["x", "y"]), 32000)]), ["audio_prompt"]),
    "too-long": (dict(prompts=["a"], params=SamplingParams(duration=400.0)), ["400.00 s", "limit"]),
    "too-long-with-audio-prompt": (dict(prompts=["a"], params=SamplingParams(duration=299.5),
                                        audio_prompts=[(wave(n=32000), 32000)]), ["limit", "audio prompt"]),
    "max-new-tokens-below-codebooks": (dict(prompts=["a"], params=SamplingParams(max_new_tokens=2)),
                                       ["max_new_tokens", "≥ 4"]),
    "prompt-too-many-tokens": (dict(prompts=["lofi " * (MAX_TEXT_TOKENS + 1)]),
                               ["prompts[0]", f"max_text_tokens={MAX_TEXT_TOKENS}"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_before_any_work(idle_model, case):
    kwargs, words = BAD_REQUESTS[case]
    with pytest.raises(RequestError) as info:
        idle_model.generate(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_too_long_names_the_engine_limit(idle_model):
    engine = idle_model.engine
    limit_s = engine.max_frames / engine.frame_rate
    with pytest.raises(RequestError, match=f"limit of {limit_s:.2f} s"):
        idle_model.generate(["a"], SamplingParams(duration=limit_s + 1))
    r = engine.make_request("a", SamplingParams(max_new_tokens=engine.max_frames + 3))  # exactly at the limit
    assert r.resolved.new_frames == engine.max_frames


def test_one_bad_prompt_refuses_the_whole_batch(idle_model):
    with pytest.raises(RequestError, match=r"prompts\[3\]"):
        idle_model.generate(["lofi", "jazz", None, 3], SamplingParams(duration=0.1))


def test_engine_add_request_refusal_queues_nothing(idle_model):
    engine = idle_model.engine
    for bad in [dict(prompt=7), dict(prompt="a", params="fast"),
                dict(prompt="a", params=SamplingParams(duration=600.0)), dict(prompt="a", audio_prompt=[1, 2])]:
        with pytest.raises(RequestError):
            engine.add_request(**bad)
        assert not engine.has_unfinished()


def test_engine_serves_good_requests_after_refusals(idle_model):
    for case in ("prompt-not-string", "too-long", "audio-not-a-tuple", "prompt-too-many-tokens"):
        with pytest.raises(RequestError):
            idle_model.generate(**BAD_REQUESTS[case][0])
    params = SamplingParams(duration=0.2, do_sample=False)
    outputs = idle_model.generate(["lofi beat", None], params,
                                  audio_prompts=[None, (wave(n=3200, value=0.05), 16000)])
    assert [o.codes.shape for o in outputs] == [(4, 10), (4, 10 + 10)]  # 0.2 s prompt at 16 kHz → 10 frames
    assert all(np.isfinite(o.audio).all() for o in outputs)
    assert outputs[0].audio.shape == (1, 10 * 640)
