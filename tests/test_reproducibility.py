"""Same seed, same music: on one machine, with the same checkpoint and the settings that change numerics (device,
dtype, quantization, backend), a seeded request gives the same codes whatever the process, the thread count, the
entry point and its batch-mates. On the CPU in fp32, bf16, int8 and int4 (int8-dynamic quantises activations over
the whole batch, so it is the documented exception to batch-mates)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastgen

from engine_checks import run_schedule

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "rock beat"
PARAMS = dict(duration=1.0, seed=5, do_sample=True)
VARIANTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
            "bf16+int8": ("bfloat16", "int8"), "int4": ("float32", "int4")}

# one fresh process: each variant's codes for the same seeded request, as hex digests
CHILD = """
import hashlib, json, sys, torch, fastgen
folder, threads, variants = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(threads)
digests = {}
for name, (dtype, quantization) in variants.items():
    model = fastgen.MusicGen.from_pretrained(folder, device="cpu", dtype=getattr(torch, dtype),
                                             quantization=quantization)
    output = model.generate([sys.argv[4]], fastgen.SamplingParams(**json.loads(sys.argv[5])))[0]
    digests[name] = hashlib.sha256(output.codes.tobytes()).hexdigest()
print(json.dumps(digests))
"""


@pytest.mark.slow
def test_fresh_processes_and_thread_counts_give_the_same_codes(tiny_mono_dir):
    """Four fresh processes from the repository root, two with 2 threads and two with 1, two at a time: the same
    codes in every variant (a load-time timing race picked the projections' kernels before, and gave four different
    sequences in five processes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TRITON_INTERPRET")}

    def start(threads: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_mono_dir), str(threads), json.dumps(VARIANTS),
                                 PROMPT, json.dumps(PARAMS)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    results = []
    for pair in ((2, 1), (1, 2)):
        processes = [start(threads) for threads in pair]
        for process in processes:
            out, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    assert set(results[0]) == set(VARIANTS)
    for other in results[1:]:
        assert other == results[0]
    assert len(set(results[0].values())) == len(VARIANTS)  # the variants differ from each other: codes were compared


def engine_codes(folder, dtype, quantization, schedule, slots) -> dict[str, np.ndarray]:
    """Requests joining at given engine steps; codes by request id."""
    engine = fastgen.Engine.from_pretrained(folder, device="cpu", max_slots=slots, dtype=dtype,
                                            quantization=quantization, max_duration_s=1.0)
    return run_schedule(engine, schedule)


@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8", "bf16+int8", "int4"])
def test_batch_mates_do_not_change_a_request(tiny_mono_dir, variant):
    """A sampled and a greedy request alone (one slot, one after the other), then beside batch-mates: the greedy one
    admitted with a longer prompt, the sampled one joining a running batch mid-way. The same codes."""
    dtype, quantization = VARIANTS[variant]
    dtype = getattr(torch, dtype)
    sampled = fastgen.SamplingParams(max_new_tokens=20, seed=11, temperature=0.9, guidance_scale=2.0)
    greedy = fastgen.SamplingParams(max_new_tokens=20, do_sample=False, guidance_scale=3.0)
    mate = fastgen.SamplingParams(max_new_tokens=8, seed=3, guidance_scale=3.0)
    alone = engine_codes(tiny_mono_dir, dtype, quantization,
                         {0: [("sampled", "jazz piano", sampled), ("greedy", "lofi beat", greedy)]}, 1)
    together = engine_codes(tiny_mono_dir, dtype, quantization,
                            {0: [("mate", "a much longer prompt about drums and bass", mate),
                                 ("greedy", "lofi beat", greedy)],
                             3: [("sampled", "jazz piano", sampled), ("late mate", "ambient", mate)]}, 3)
    for request_id in ("sampled", "greedy"):
        np.testing.assert_array_equal(together[request_id], alone[request_id], err_msg=request_id)


def test_python_entry_points_give_the_same_audio(tiny_mono_dir):
    """generate, generate_iter, Engine and AsyncEngine: the same codes and the same audio samples for one seed,
    each beside a different batch-mate (or none)."""
    params = fastgen.SamplingParams(**PARAMS)
    mate = fastgen.SamplingParams(duration=0.6, seed=1)
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, device="cpu")
    reference = model.generate([PROMPT], params)[0]
    outputs = {"generate beside a mate": model.generate([PROMPT, "mate"], [params, mate])[0]}
    outputs["generate_iter"] = dict(model.generate_iter(["mate", PROMPT], [mate, params]))[1]
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, device="cpu", max_slots=3)
    engine.add_request(PROMPT, params, request_id="it")
    engine.add_request("mate", mate)
    while engine.has_unfinished():
        for request in engine.step():
            if request.request_id == "it":
                outputs["Engine"] = request.output
    async_engine = fastgen.AsyncEngine.from_pretrained(tiny_mono_dir, device="cpu", max_slots=2)  # its own threads
    try:
        async_engine.submit("mate", mate)
        outputs["AsyncEngine"] = async_engine.submit(PROMPT, params).result(timeout=300)
    finally:
        async_engine.shutdown_sync()
    for name, output in outputs.items():
        np.testing.assert_array_equal(output.codes, reference.codes, err_msg=name)
        np.testing.assert_array_equal(output.audio, reference.audio, err_msg=name)
