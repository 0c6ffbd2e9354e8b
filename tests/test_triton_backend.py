"""The engine on the Triton kernels (compiled on a GPU, under TRITON_INTERPRET=1 on a CPU) produces the same codes as on
the torch backend, both on the test device: greedy, and seeded sampling (both backends share the counter-based random
stream), mono and stereo, text and audio prompts, in one mixed batch. Eager steps (no CUDA graphs) here;
tests/test_on_device.py compares graph replay."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastgen

STEPS = 10


def batch(channels: int):
    rng = np.random.default_rng(5)
    audio = (0.3 * rng.standard_normal((channels, 640 * 4))).astype(np.float32)
    prompts = ["lofi beat", "a longer prompt about jazz", None]
    params = [fastgen.SamplingParams(max_new_tokens=STEPS, do_sample=False, guidance_scale=3.0),
              fastgen.SamplingParams(max_new_tokens=STEPS + 3, seed=7, top_k=6, top_p=0.9, guidance_scale=2.0),
              fastgen.SamplingParams(max_new_tokens=STEPS, do_sample=False, guidance_scale=1.0)]
    audio_prompts = [None, (audio, 32000), None]
    return prompts, params, audio_prompts


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_triton_backend_matches_torch_backend(tiny_mono_dir, tiny_stereo_dir, layout, device):
    folder = tiny_mono_dir if layout == "mono" else tiny_stereo_dir
    prompts, params, audio = batch(2 if layout == "stereo" else 1)
    outputs = {}
    for backend in ("torch", "triton"):
        model = fastgen.MusicGen.from_pretrained(folder, device=device, dtype=torch.float32, max_slots=3,
                                                 backend=backend, max_duration_s=2.0, enforce_eager=True)
        outputs[backend] = model.generate(prompts, params, audio_prompts=audio)
    for i, (ours, ref) in enumerate(zip(outputs["triton"], outputs["torch"])):
        np.testing.assert_array_equal(ours.codes, ref.codes, err_msg=f"item {i}")
        np.testing.assert_allclose(ours.audio, ref.audio, atol=1e-4, err_msg=f"item {i}")


def test_triton_backend_several_steps_per_call(tiny_mono_dir, device):
    """Multi-step calls on the kernels (the CUDA-graph path replays this: the kernels run on past a finished request's
    end within a call) give the torch backend's one-step-per-call codes."""
    prompts, params, audio = batch(1)
    outputs = {}
    for backend, steps_per_call in (("torch", 1), ("triton", 3)):
        model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, device=device, dtype=torch.float32, max_slots=3,
                                                 backend=backend, max_duration_s=2.0, steps_per_call=steps_per_call,
                                                 enforce_eager=True)
        outputs[backend] = model.generate(prompts, params, audio_prompts=audio)
    for i, (ours, ref) in enumerate(zip(outputs["triton"], outputs["torch"])):
        np.testing.assert_array_equal(ours.codes, ref.codes, err_msg=f"item {i}")
