"""Codes in and out: continuing from codes (codes_prompts), and the codec exposed as decode_codes / encode_audio."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastgen

WINDOW_S = 0.5


@pytest.fixture(scope="module")
def models(tiny_mono_dir, tiny_stereo_dir):
    return {layout: fastgen.MusicGen.from_pretrained(folder, backend="torch", dtype="float32", max_slots=2,
                                                       window_s=WINDOW_S)
            for layout, folder in (("mono", tiny_mono_dir), ("stereo", tiny_stereo_dir))}


def noise(channels: int, frames: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((channels, 640 * frames))).astype(np.float32)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_codes_prompt_continues_like_the_audio_it_encodes(models, layout):
    model = models[layout]
    channels = 2 if layout == "stereo" else 1
    wave = noise(channels, 9)
    codes = model.encode_audio(wave, 32000)
    assert codes.dtype == np.int64 and codes.shape == (4 * channels, 9)
    params = fastgen.SamplingParams(duration=0.3, seed=11, top_k=8)
    from_audio, from_codes, from_tensor = model.generate(
        ["jazz", "jazz", "jazz"], params, audio_prompts=[(wave, 32000), None, None],
        codes_prompts=[None, codes, torch.from_numpy(codes)])
    np.testing.assert_array_equal(from_audio.codes[:, :9], codes)  # the output starts with the prompt's codes
    np.testing.assert_array_equal(from_codes.codes, from_audio.codes)
    np.testing.assert_array_equal(from_tensor.codes, from_audio.codes)
    assert from_codes.prompt_frames == 9
    np.testing.assert_array_equal(from_codes.audio, from_audio.audio)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_decode_codes_is_what_generate_decodes(models, layout):
    model = models[layout]
    out = model.generate([None], fastgen.SamplingParams(duration=0.2, seed=2))[0]
    audio = model.decode_codes(out.codes)
    assert audio.dtype == np.float32 and audio.shape == out.audio.shape == (2 if layout == "stereo" else 1, 10 * 640)
    np.testing.assert_array_equal(audio, out.audio)
    # and transformers' EnCodec agrees (the tiny checkpoint's own audio_encoder)
    from transformers import MusicgenForConditionalGeneration
    reference = MusicgenForConditionalGeneration.from_pretrained(model.engine.model.folder).eval()
    codes = torch.from_numpy(out.codes)
    halves = [codes] if layout == "mono" else [codes[0::2], codes[1::2]]
    with torch.no_grad():
        expected = torch.cat([reference.audio_encoder.decode(h[None, None], [None]).audio_values[0] for h in halves])
    np.testing.assert_allclose(audio, expected.numpy(), atol=1e-5, rtol=0)


def test_long_codes_prompt_continues_from_its_last_window(models):
    """Codes longer than the window (a saved long output): the window restarts from their last window − stride
    frames, as if they had been generated; the output holds the whole prompt, then the continuation."""
    model = models["mono"]
    first = model.generate(["drone"], fastgen.SamplingParams(duration=1.0, extend_stride=0.3, seed=9))[0]
    assert first.codes.shape == (4, 50)
    params = fastgen.SamplingParams(duration=0.3, extend_stride=0.3, seed=10)
    long_prompt, = model.generate(["drone"], params, codes_prompts=[first.codes])
    tail, = model.generate(["drone"], params, codes_prompts=[first.codes[:, -10:]])
    assert long_prompt.codes.shape == (4, 65) and long_prompt.prompt_frames == 50
    np.testing.assert_array_equal(long_prompt.codes[:, :50], first.codes)
    np.testing.assert_array_equal(long_prompt.codes[:, 50:], tail.codes[:, 10:])


BAD_CODES = {
    "float": (np.zeros((4, 5), np.float32), ["codes_prompt", "integers"]),
    "three-codebooks": (np.zeros((3, 5), np.int64), ["codes_prompt", "num_codebooks=4"]),
    "1-d": (np.zeros(5, np.int64), ["codes_prompt", "shape"]),
    "empty": (np.zeros((4, 0), np.int64), ["codes_prompt", "frames ≥ 1"]),
    "negative": (np.full((4, 5), -1, np.int64), ["codes_prompt", "[0, 63]"]),
    "past-vocab": (np.full((4, 5), 64, np.int64), ["codes_prompt", "[0, 63]"]),
    "list": ([[1, 2]] * 4, ["codes_prompt", "numpy array or torch tensor"]),
    "bool-tensor": (torch.zeros((4, 5), dtype=torch.bool), ["codes_prompt", "integers"]),
}


@pytest.mark.parametrize("case", list(BAD_CODES))
def test_bad_codes_prompt_is_refused_before_any_work(models, case):
    model = models["mono"]
    codes, words = BAD_CODES[case]
    with pytest.raises(fastgen.RequestError) as info:
        model.generate(["a"], fastgen.SamplingParams(duration=0.1), codes_prompts=[codes])
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not model.engine.has_unfinished()


def test_codec_methods_validate(models):
    model = models["mono"]
    with pytest.raises(fastgen.RequestError, match=r"both"):
        model.generate(["a"], fastgen.SamplingParams(duration=0.1), audio_prompts=[(noise(1, 2), 32000)],
                       codes_prompts=[np.zeros((4, 2), np.int64)])
    with pytest.raises(fastgen.RequestError, match=r"codes values must be codebook entries"):
        model.decode_codes(np.full((4, 3), 99))
    with pytest.raises(fastgen.RequestError, match=r"waveform"):
        model.encode_audio(np.zeros(0, np.float32), 32000)
    with pytest.raises(fastgen.RequestError, match=r"codes_prompts must be a single value or a list"):
        model.generate(["a", "b"], fastgen.SamplingParams(duration=0.1), codes_prompts=[np.zeros((4, 2), np.int64)])
