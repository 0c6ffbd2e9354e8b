"""MusicGen-Melody: greedy codes equal transformers' MusicgenMelodyForConditionalGeneration token for token given the
same chroma (with and without a melody, text or unconditional, guidance 1 and 3, mono and stereo), the melody
matters (the regression transformers had), batch-mates do not, and the engine's other paths (codes prompts, long
form, steps per call, the Triton backend and graph replay, streaming, the async engine) serve a melody model too."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from melody_reference import MELODY_RATE, melodies, reference_codes

import fastgen
from fastgen.model.chroma import melody_chroma

PROMPT = "lofi beat with a slow bass"
STEPS = 14


@pytest.fixture(scope="module")
def models(tiny_melody_mono_dir, tiny_melody_stereo_dir):
    from transformers import AutoTokenizer, MusicgenMelodyForConditionalGeneration
    loaded = {}
    for name, folder in (("mono", tiny_melody_mono_dir), ("stereo", tiny_melody_stereo_dir)):
        reference = MusicgenMelodyForConditionalGeneration.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ours = fastgen.MusicGen.from_pretrained(folder, max_slots=4, backend="torch", dtype=torch.float32,
                                                max_duration_s=2.0)
        loaded[name] = (reference, tokenizer, ours)
    return loaded


def greedy(guidance: float, steps: int = STEPS, **kw) -> fastgen.SamplingParams:
    return fastgen.SamplingParams(max_new_tokens=steps, do_sample=False, guidance_scale=guidance, **kw)


def chroma_of(ours, name: str | None) -> torch.Tensor | None:
    return None if name is None else melody_chroma(melodies()[name], MELODY_RATE, ours.engine.model.chroma)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("melody", [None, "short", "long"])
def test_greedy_codes_match_transformers(models, layout, guidance, melody):
    reference, tokenizer, ours = models[layout]
    expected = reference_codes(reference, tokenizer, PROMPT, chroma_of(ours, melody), guidance, STEPS)
    given = None if melody is None else (melodies()[melody], MELODY_RATE)
    out = ours.generate([PROMPT], greedy(guidance), melodies=[given])[0]
    np.testing.assert_array_equal(out.codes, expected)


@pytest.mark.parametrize("layout", ["mono", "stereo"])
@pytest.mark.parametrize("melody", [None, "short"])
def test_unconditional_matches_transformers_null_text(models, layout, melody):
    """prompt None: the text of MusicgenMelodyProcessor.get_unconditional_inputs (T5 of "" masked to zeros)."""
    reference, tokenizer, ours = models[layout]
    expected = reference_codes(reference, tokenizer, None, chroma_of(ours, melody), 3.0, STEPS)
    given = None if melody is None else (melodies()[melody], MELODY_RATE)
    np.testing.assert_array_equal(ours.generate([None], greedy(3.0), melodies=[given])[0].codes, expected)


def test_codes_prompt_with_melody_matches_transformers(models):
    """A prompt continues after the prefix (prefilled at positions L …): transformers given decoder_input_ids."""
    reference, tokenizer, ours = models["mono"]
    rng = np.random.default_rng(5)
    prompt_codes = rng.integers(0, 64, size=(4, 7)).astype(np.int64)
    expected = reference_codes(reference, tokenizer, PROMPT, chroma_of(ours, "short"), 3.0, STEPS,
                               decoder_input_ids=prompt_codes)
    out = ours.generate([PROMPT], greedy(3.0), codes_prompts=[prompt_codes],
                        melodies=[(melodies()["short"], MELODY_RATE)])[0]
    np.testing.assert_array_equal(out.codes, expected)


def test_melody_text_and_guidance_each_change_the_codes(models):
    """The regression transformers had (melody, text and guidance silently ignored): each must matter."""
    _, _, ours = models["mono"]
    tunes = melodies()
    runs = {
        "melody A": ours.generate([PROMPT], greedy(3.0), melodies=[(tunes["short"], MELODY_RATE)]),
        "melody B": ours.generate([PROMPT], greedy(3.0), melodies=[(tunes["long"], MELODY_RATE)]),
        "no melody": ours.generate([PROMPT], greedy(3.0)),
        "other text": ours.generate(["heavy metal drums"], greedy(3.0), melodies=[(tunes["short"], MELODY_RATE)]),
        "guidance 1": ours.generate([PROMPT], greedy(1.0), melodies=[(tunes["short"], MELODY_RATE)]),
    }
    codes = {name: out[0].codes for name, out in runs.items()}
    names = list(codes)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not np.array_equal(codes[first], codes[second]), f"{first} and {second} gave the same codes"


def test_batch_with_different_melodies_equals_each_alone(models):
    _, _, ours = models["stereo"]
    tunes = melodies()
    prompts = [PROMPT, PROMPT, "jazz piano", None]
    given = [(tunes["short"], MELODY_RATE), (tunes["long"], MELODY_RATE), None, (tunes["long"], MELODY_RATE)]
    params = [greedy(3.0), fastgen.SamplingParams(max_new_tokens=STEPS, seed=4, temperature=0.9, top_k=20),
              greedy(1.0), fastgen.SamplingParams(max_new_tokens=STEPS - 3, seed=9, guidance_scale=2.0)]
    together = ours.generate(prompts, params, melodies=given)
    for i in range(len(prompts)):
        alone = ours.generate([prompts[i]], params[i], melodies=[given[i]])[0]
        np.testing.assert_array_equal(together[i].codes, alone.codes, err_msg=f"request {i}")
        np.testing.assert_array_equal(together[i].audio, alone.audio)


def test_long_form_with_melody_matches_transformers_window_loop(tiny_melody_mono_dir, models):
    """Past the window a melody request slides as a text one does, each window behind the same prefix: transformers
    run window by window, each given the previous window's kept codes and the same melody and text."""
    reference, tokenizer, _ = models["mono"]
    window, stride, total = 25, 15, 55
    ours = fastgen.MusicGen.from_pretrained(tiny_melody_mono_dir, backend="torch", dtype=torch.float32, max_slots=2,
                                            window_s=window / 50, max_duration_s=2.0)
    chroma = chroma_of(ours, "short")
    pieces, kept, offset = [], None, 0
    while True:
        frames = min(window, total - offset)
        prompt = 0 if kept is None else kept.shape[1]
        codes = reference_codes(reference, tokenizer, PROMPT, chroma, 3.0, frames - prompt + 3, kept)
        pieces.append(codes[:, prompt:])
        if offset + frames >= total:
            break
        kept, offset = codes[:, stride:], offset + stride
    out = ours.generate([PROMPT], fastgen.SamplingParams(duration=total / 50, do_sample=False, guidance_scale=3.0,
                                                         extend_stride=stride / 50),
                        melodies=[(melodies()["short"], MELODY_RATE)])[0]
    np.testing.assert_array_equal(out.codes, np.concatenate(pieces, axis=1))


def test_slot_layout(models):
    """A melody slot reserves chroma_length + max_text_tokens positions for its prefix and no cross-attention cache."""
    _, _, ours = models["mono"]
    runner = ours.engine.runner
    assert runner.prefix_positions == 40 + ours.engine.config.max_text_tokens
    assert runner.cache.cross_k.shape[3] == 0
    assert runner.cache.self_k.shape[3] == runner.cache_positions
    assert runner.decoder.sinusoid.shape[0] >= runner.cache_positions


def test_streaming_and_async_engine_serve_melody(tiny_melody_mono_dir, models):
    _, _, ours = models["mono"]
    tune = (melodies()["short"], MELODY_RATE)
    params = fastgen.SamplingParams(duration=0.8, seed=3, guidance_scale=3.0)
    expected = ours.generate([PROMPT], params, melodies=[tune])[0]
    engine = ours.engine
    request = engine.add_request(PROMPT, params, melody=tune)
    chunks = list(engine.stream_audio(request, fastgen.StreamConfig(first_chunk_s=0.2, interval_s=0.2)))
    np.testing.assert_array_equal(request.output.codes, expected.codes)
    assert sum(chunk.shape[-1] for chunk in chunks) == expected.audio.shape[-1]

    async def submit() -> fastgen.GenerationOutput:
        async_engine = fastgen.AsyncEngine(fastgen.Engine(engine.model, engine.config))
        try:
            return await async_engine.submit(PROMPT, params, melody=tune)
        finally:
            await async_engine.shutdown()
    np.testing.assert_array_equal(asyncio.run(submit()).codes, expected.codes)


def test_melody_errors(models, tiny_mono_dir):
    _, _, ours = models["mono"]
    bad = {
        "NaN": ((np.full(3200, np.nan, np.float32), MELODY_RATE), "finite"),
        "empty": ((np.zeros(0, np.float32), MELODY_RATE), "empty"),
        "rate": ((np.zeros(3200, np.float32), 10), "sample rate"),
        "channels": ((np.zeros((3, 3200), np.float32), MELODY_RATE), "channels"),
        "not a pair": (np.zeros(3200, np.float32), "(waveform, sample_rate)"),
    }
    for name, (melody, message) in bad.items():
        with pytest.raises(fastgen.RequestError, match="melody") as caught:
            ours.generate([PROMPT], greedy(3.0), melodies=[melody])
        assert message in str(caught.value), (name, str(caught.value))
    with pytest.raises(fastgen.RequestError, match="melodies must be"):
        ours.generate([PROMPT, PROMPT], greedy(3.0), melodies=[None])
    text_model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, max_slots=1, dtype=torch.float32)
    with pytest.raises(fastgen.RequestError, match="MusicGen-Melody checkpoint"):
        text_model.generate([PROMPT], greedy(3.0), melodies=[(melodies()["short"], MELODY_RATE)])
    with pytest.raises(fastgen.RequestError, match="MusicGen-Melody checkpoint"):
        text_model.engine.add_request(PROMPT, greedy(3.0), melody=(melodies()["short"], MELODY_RATE))
