"""The engine-level checks that matter, on every device present: the CPU always, CUDA when there is one.

- greedy codes of every decode path agree with transformers' in fp32, mono and stereo: the torch backend, the Triton
  kernels run eagerly (compiled on CUDA, under TRITON_INTERPRET=1 on a CPU) and CUDA-graph replay;
- several decode steps per call give one step per call's codes;
- the AsyncEngine with T5/EnCodec on the stage worker (its own CUDA stream on a GPU) and an abort;
- bf16 runs finite.

Sizes are tiny: on a CPU the interpreter is slow, and the whole file must stay a small part of CI."""
from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

import fastgen
from fastgen.engine.graph_standin import cpu_graphs
from fastgen.engine.request import RequestStatus

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = ["80s pop track with bassy drums", "lofi"]  # different lengths: the text batch is padded
STEPS = 8


@pytest.fixture(params=DEVICES)
def on(request) -> torch.device:
    return torch.device(request.param)


def graph_context(device: torch.device):
    """CUDA graphs replay on CUDA; on a CPU the stand-in for torch.cuda.CUDAGraph (fastgen.engine.graph_standin)
    captures and replays the same DecodeGraphs, with what a graph freezes frozen."""
    return contextlib.nullcontext() if device.type == "cuda" else cpu_graphs()


def folder_of(layout, tiny_mono_dir, tiny_stereo_dir):
    return tiny_mono_dir if layout == "mono" else tiny_stereo_dir


def transformers_codes(folder, device: torch.device) -> list[np.ndarray]:
    """transformers' greedy codes, fp32, guidance 3, per prompt [K, frames] (captured where they enter EnCodec)."""
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    model = MusicgenForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    inputs = AutoTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt").to(device)
    captured = []
    original = model.audio_encoder.decode

    def spy(audio_codes, *args, **kwargs):
        captured.append(audio_codes[0].cpu())
        return original(audio_codes, *args, **kwargs)

    model.audio_encoder.decode = spy
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=STEPS, guidance_scale=3.0)
    codes = captured[0] if len(captured) == 1 else torch.stack(captured, dim=2).flatten(1, 2)  # stereo: l0 r0 l1 …
    return list(codes.numpy())


PATHS = {  # decode path → engine options
    "torch": {"backend": "torch", "enforce_eager": True},
    "triton-eager": {"backend": "triton", "enforce_eager": True},
    "graph-replay": {"backend": "triton", "enforce_eager": False},
}


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_every_decode_path_gives_transformers_greedy_codes(tiny_mono_dir, tiny_stereo_dir, on, layout):
    folder = folder_of(layout, tiny_mono_dir, tiny_stereo_dir)
    expected = transformers_codes(folder, on)
    params = fastgen.SamplingParams(max_new_tokens=STEPS, do_sample=False, guidance_scale=3.0)
    ran = []
    for path, options in PATHS.items():
        with graph_context(on) if path == "graph-replay" else contextlib.nullcontext():
            model = fastgen.MusicGen.from_pretrained(folder, device=on, dtype=torch.float32, max_slots=2,
                                                     max_duration_s=1.0, **options)
            assert (model.engine.runner.graphs is not None) == (path == "graph-replay")
            outputs = model.generate(PROMPTS, params)
        for i, (out, ref) in enumerate(zip(outputs, expected)):
            np.testing.assert_array_equal(out.codes, ref, err_msg=f"{path} on {on}, prompt {i}")
        ran.append(path)
    assert ran == list(PATHS)


def default_engine(folder, device: torch.device, **options) -> fastgen.Engine:
    """The device's own engine: Triton kernels and CUDA graphs on a GPU, the torch backend on a CPU."""
    return fastgen.Engine.from_pretrained(folder, device=device, dtype=torch.float32, max_slots=3,
                                          max_duration_s=1.0, **options)


def test_several_steps_per_call_give_one_step_per_calls_codes(tiny_mono_dir, on):
    """Requests join between calls and finish inside one; on CUDA the call is one replay of a 4-step graph."""
    codes = {}
    for steps_per_call in (1, 4):
        engine = default_engine(tiny_mono_dir, on, steps_per_call=steps_per_call)
        first = [engine.add_request(p, fastgen.SamplingParams(max_new_tokens=9 + 6 * i, seed=i, top_k=5))
                 for i, p in enumerate(PROMPTS)]
        engine.step()
        engine.step()
        late = [engine.add_request(None, fastgen.SamplingParams(max_new_tokens=7, do_sample=False))]
        while engine.has_unfinished():
            engine.step()
        engine.close()
        assert all(r.status == RequestStatus.FINISHED for r in first + late), [r.error for r in first + late]
        codes[steps_per_call] = [r.output.codes for r in first + late]
    for one, four in zip(codes[1], codes[4]):
        np.testing.assert_array_equal(one, four)


def test_async_engine_with_stages_on_the_worker_and_an_abort(tiny_mono_dir, on):
    """T5 (one batch for the prompts queued together) and EnCodec on the stage worker, on its own CUDA stream on a
    GPU: the outputs equal the inline synchronous engine's, and an abort mid-way fails only the aborted request."""
    params = [fastgen.SamplingParams(max_new_tokens=12 + 3 * i, seed=i, guidance_scale=3.0, top_k=8)
              for i in range(3)]
    inline = default_engine(tiny_mono_dir, on, overlap_stages=False)
    expected = [r.output.codes for r in inline.run([inline.make_request(f"p{i}", p) for i, p in enumerate(params)])]
    engine = fastgen.AsyncEngine(default_engine(tiny_mono_dir, on, overlap_stages=True))

    async def abort_once_running(handle) -> list[str]:
        kinds = []
        async for event in handle:
            kinds.append(event.kind)
            if event.kind == "progress" and len(kinds) == 3:  # queued, started, first progress
                engine.abort(handle.request_id)
        return kinds

    try:
        handles = [engine.submit(f"p{i}", p) for i, p in enumerate(params)]
        doomed = engine.submit("aborted", fastgen.SamplingParams(max_new_tokens=45, seed=9))
        kinds = asyncio.run(asyncio.wait_for(abort_once_running(doomed), 120))
        assert kinds[-1] == "aborted" and "finished" not in kinds
        with pytest.raises(fastgen.RequestAborted):
            doomed.result(timeout=1)
        outputs = [h.result(timeout=120) for h in handles]
    finally:
        engine.shutdown_sync()
    for out, ref in zip(outputs, expected):
        np.testing.assert_array_equal(out.codes, ref)


def test_bf16_runs_finite(tiny_stereo_dir, on):
    """bf16 weights and cache (the CUDA default), sampling with guidance: every request finishes with codes in the
    codebook range and finite audio."""
    model = fastgen.MusicGen.from_pretrained(tiny_stereo_dir, device=on, dtype=torch.bfloat16, max_slots=2,
                                             max_duration_s=1.0)
    assert model.engine.model.decoder.dtype == torch.bfloat16
    vocab = model.engine.model.config.decoder.vocab_size
    params = fastgen.SamplingParams(max_new_tokens=STEPS, seed=3, guidance_scale=3.0, top_k=20)
    for out in model.generate(PROMPTS + [None], params):
        assert out.codes.shape == (8, STEPS + 1 - 4)
        assert 0 <= out.codes.min() and out.codes.max() < vocab
        assert np.isfinite(out.audio).all() and out.audio.any()
