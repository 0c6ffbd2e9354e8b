"""The decode step must be capturable as a CUDA graph: no host syncs, no data-dependent shapes, no tensors made from
host data. CUDA graphs cannot run here, so a TorchDispatchMode watches every operator the step runs on the CPU."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgen
from fastgen.model.ops import SamplerHints

# operators that read device data on the host, or whose output shape depends on data
FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
             "_unique2", "unique_consecutive", "unique_dim", "multinomial", "equal", "is_nonzero", "repeat_interleave",
             "bincount", "histc", "_assert_async", "lift_fresh", "lift_fresh_copy"}


class GraphSafetyMode(TorchDispatchMode):
    """Records (operator, output shapes) and fails on any forbidden operator."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in FORBIDDEN:
            raise AssertionError(f"decode step ran {func}: it syncs with the host or has a data-dependent shape")
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        shapes = tuple(tuple(o.shape) for o in outputs if isinstance(o, torch.Tensor))
        self.trace.append((name, shapes))
        return out


def running_engine(folder, backend: str, prompts, params, device: torch.device) -> fastgen.Engine:
    # on the test device (Triton: compiled kernels on CUDA, the interpreter on a CPU); eager: the step is checked
    engine = fastgen.Engine.from_pretrained(folder, device=device, dtype=torch.float32, max_slots=4, backend=backend,
                                            enforce_eager=True)
    for prompt, p in zip(prompts, params):
        engine.add_request(prompt, p)
    engine.step()  # admit + first step
    return engine


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_step_is_sync_free_and_shape_static(tiny_mono_dir, backend, device):
    mixed = [fastgen.SamplingParams(max_new_tokens=30, seed=1, top_k=5, top_p=0.9, guidance_scale=3.0),
             fastgen.SamplingParams(max_new_tokens=30, do_sample=False, guidance_scale=1.0),
             fastgen.SamplingParams(max_new_tokens=30, seed=2, temperature=0.5)]
    engine = running_engine(tiny_mono_dir, backend, ["lofi beat", None, "a long prompt with many words"], mixed,
                            device)
    runner = engine.runner
    slot_ids = torch.tensor(engine.scheduler.running_slots() + [runner.dummy_slot], device=runner.device)  # + padding
    spans = (64, 8) if backend == "torch" else (None, None)
    runner.decode_step(slot_ids, SamplerHints(), *spans)  # warm-up: launchers may allocate scratch once, as before capture
    traces = []
    for _ in range(2):  # two steps at different positions must run the same operators on the same shapes
        with GraphSafetyMode() as mode:
            runner.decode_step(slot_ids, SamplerHints(), *spans)
        traces.append(mode.trace)
    assert traces[0] == traces[1]
    assert len(traces[0]) > 20
