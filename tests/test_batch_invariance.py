"""Batch invariance: a row's result does not depend on its batch-mates.

Kernel level: the fused projections (kernels/fused_linear.py) give a row bitwise the same output at M = 2, 6, 38 and
512, each variant, with and without split-K. Engine level (linear_backend="triton", fp32, interpreter on a CPU): a
request's greedy and sampled codes are the same alone (eager) and beside batch-mates that join at other times (graph
replay), and its greedy codes are transformers'."""
import contextlib

import numpy as np
import pytest
import torch

import fastgen
from fastgen.engine.graph_standin import cpu_graphs
from fastgen.kernels import fused_linear as fused_linear_module
from fastgen.kernels.fused_linear import fused_linear, launch_config

from engine_checks import run_schedule
from kernel_checks import DEVICE

ROW_COUNTS = (2, 6, 38, 512)
# fp32 in the interpreter (slow at M = 512: its programs run one by one); the 16-bit types where they compile
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
VARIANTS = {  # the decoder's uses of the kernel
    "norm": {"norm": True},
    "norm-gelu": {"norm": True, "activation": "gelu"},
    "residual": {"accumulate": True},
    "heads": {"norm": True, "out_dtype": torch.float32},
    "int8-residual": {"int8": True, "accumulate": True},
}
# (N, K) by the weight's BLOCK_K family (fp32: 64, 16-bit and int8: 128): one unsplit, one split-K shape
SHAPES = {"fp32": [(40, 24), (17, 300)], "narrow": [(40, 24), (17, 520)]}


def run_rows(x_all, m, weight, spec, residual_all):
    kwargs = dict(spec)
    if kwargs.pop("accumulate", False):
        out = residual_all[:m].clone()
        return fused_linear(x_all[:m], weight, out=out, accumulate=True, **kwargs)
    return fused_linear(x_all[:m], weight, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [0, 1])
def test_kernel_rows_are_bitwise_the_same_at_any_batch_size(dtype, variant, shape):
    n, k = SHAPES["fp32" if dtype == torch.float32 and "int8" not in variant else "narrow"][shape]
    gen = torch.Generator().manual_seed(7 + shape)
    spec = dict(VARIANTS[variant])
    x_all = (2 * torch.randn(max(ROW_COUNTS), k, generator=gen) + 0.5).to(dtype).to(DEVICE)
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    if spec.pop("int8", False):
        scale = weight.abs().amax(1) / 127
        spec["scale"] = scale.to(DEVICE)
        weight = torch.round(weight / scale[:, None]).to(torch.int8)
    else:
        weight = weight.to(dtype)
    weight = weight.to(DEVICE)
    if spec.pop("norm", False):
        spec["norm"] = (torch.randn(k, generator=gen).to(dtype).to(DEVICE),
                        torch.randn(k, generator=gen).to(dtype).to(DEVICE))
    residual_all = torch.randn(max(ROW_COUNTS), n, generator=gen).to(dtype).to(DEVICE)
    outputs = {m: run_rows(x_all, m, weight, spec, residual_all) for m in ROW_COUNTS}
    largest = outputs[max(ROW_COUNTS)]
    for m, out in outputs.items():
        torch.testing.assert_close(out, largest[:m], rtol=0, atol=0, msg=lambda text: f"M={m}: {text}")
    if shape == 1:
        assert launch_config(n, k, weight.dtype).split_k > 1, "this shape is meant to take the split-K path"


# --------------------------------------------------------------------------------------------------- decoder
def test_decoder_logits_are_bitwise_the_same_at_any_batch_size(tiny_mono_dir):
    """One fused decode step (attention kernels, fused projections, LM heads) over a cache of random keys and values
    at random positions and text lengths: rows' logits at 2, 6 and 38 rows are identical bit for bit (512 rows of
    the whole decoder are too slow for the interpreter; the kernels are checked there above)."""
    from fastgen.model.decoder import KVCache
    from fastgen.model.musicgen import MusicgenModel
    from fastgen.model.ops import TritonOps

    decoder = MusicgenModel.load(tiny_mono_dir, device=DEVICE, dtype=torch.float32).decoder
    decoder.set_linear_backend("triton")
    rows = 38
    gen = torch.Generator().manual_seed(5)
    cache = KVCache.allocate(decoder.config, rows // 2, 16, 6, torch.float32, torch.device(DEVICE))
    for tensor in (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v):
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
    hidden = torch.randn(rows, decoder.config.hidden_size, generator=gen).to(DEVICE)
    cache_rows = torch.randperm(rows, generator=gen).to(DEVICE)
    position = torch.randint(0, 15, (rows,), generator=gen).to(DEVICE)
    text_length = torch.randint(0, 7, (rows,), generator=gen).to(torch.int32).to(DEVICE)
    logits, ops = {}, TritonOps()
    for m in (rows, 2, 6):  # the step appends each row's K/V: the same values whichever call writes them
        ctx = ops.context(cache_rows[:m], position[:m], text_length[:m])
        logits[m] = decoder.decode(ops, hidden=hidden[:m].clone(), cache=cache, ctx=ctx)
    assert logits[rows].dtype == torch.float32 and logits[rows].isfinite().all()
    for m in (2, 6):
        torch.testing.assert_close(logits[m], logits[rows][:m], rtol=0, atol=0, msg=lambda text: f"M={m}: {text}")


# ---------------------------------------------------------------------------------------------------- engine
def codes_of(folder, schedule, max_slots, graphs=False):
    """Run requests that join at given engine steps; codes by request id. ``graphs``: CUDA-graph replay (on a CPU
    the stand-in of fastgen.engine.graph_standin, which replays exactly the operators a capture recorded)."""
    with cpu_graphs() if graphs and DEVICE == "cpu" else contextlib.nullcontext():
        engine = fastgen.Engine.from_pretrained(folder, device=DEVICE, max_slots=max_slots, backend="triton",
                                                linear_backend="triton", dtype=torch.float32, max_duration_s=1.0,
                                                enforce_eager=not graphs)
    assert engine.model.decoder.linear_backend == "triton"
    assert (engine.runner.graphs is not None) == graphs
    scratch = fused_linear_module._SCRATCH.current(DEVICE)  # reserved
    codes = run_schedule(engine, schedule)
    assert fused_linear_module._SCRATCH.current(DEVICE) is scratch, \
        "the split-K scratch grew after the engine reserved it (a captured graph would keep the old one)"
    return codes


@pytest.mark.slow
def test_engine_codes_do_not_depend_on_batch_mates(tiny_mono_dir):
    """A greedy and a seeded sampled request, each alone (one slot: they run one after the other, eagerly), then
    in two slots under graph replay: the greedy one beside a batch-mate with a longer prompt, the sampled one queued
    and joining the greedy one mid-way when the mate ends. The same codes: the fused step is batch-invariant and its
    graphs replay what it runs eagerly; and the greedy codes are transformers'."""
    greedy = fastgen.SamplingParams(max_new_tokens=6, do_sample=False, guidance_scale=3.0)  # ≥ 6: see below
    sampled = fastgen.SamplingParams(max_new_tokens=4, seed=11, temperature=0.9, guidance_scale=2.0)
    alone = codes_of(tiny_mono_dir, {0: [("greedy", "lofi beat", greedy), ("sampled", "jazz piano", sampled)]}, 1)
    mates = fastgen.SamplingParams(max_new_tokens=4, seed=3, guidance_scale=3.0)
    together = codes_of(tiny_mono_dir, {0: [("mate", "a much longer prompt about drums", mates),
                                            ("greedy", "lofi beat", greedy)],
                                        1: [("sampled", "jazz piano", sampled)]}, 2, graphs=True)
    for request_id in ("greedy", "sampled"):
        np.testing.assert_array_equal(together[request_id], alone[request_id], err_msg=request_id)
    np.testing.assert_array_equal(alone["greedy"], transformers_greedy_codes(tiny_mono_dir, "lofi beat", greedy))


@pytest.mark.parametrize("linear_backend,expected", [("triton", [1, 1]),
                                                    ("torch", [1, 1] if DEVICE == "cpu" else [2])])
def test_prompts_are_encoded_alone_on_the_invariant_path(tiny_mono_dir, linear_backend, expected):
    """Two prompts admitted together: on the batch-invariant paths (the fused projections, every CPU path) T5 sees
    each alone, so its GEMMs never depend on the other prompt; the torch path on CUDA keeps one padded batch."""
    engine = fastgen.Engine.from_pretrained(tiny_mono_dir, device=DEVICE, max_slots=2, backend="triton",
                                            linear_backend=linear_backend, dtype=torch.float32, max_duration_s=1.0,
                                            enforce_eager=True, overlap_stages=False)
    batches = []
    encode = engine.model.text_encoder.encode
    engine.model.text_encoder.encode = lambda token_ids: batches.append(len(token_ids)) or encode(token_ids)
    params = fastgen.SamplingParams(max_new_tokens=4, do_sample=False)
    for prompt in ("lofi beat", "a much longer prompt about drums"):
        engine.add_request(prompt, params)
    engine.step()
    assert batches == expected


def transformers_greedy_codes(folder, prompt, params) -> np.ndarray:
    """transformers' greedy codes [K, frames] for one prompt, fp32 (captured where they enter EnCodec). Below 6 new
    tokens transformers returns more frames than max_new_tokens − (K − 1) on this model, so compare from 6."""
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    model = MusicgenForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = AutoTokenizer.from_pretrained(folder)([prompt], return_tensors="pt")
    captured = []
    original = model.audio_encoder.decode

    def spy(audio_codes, *args, **kwargs):
        captured.append(audio_codes[0, 0])
        return original(audio_codes, *args, **kwargs)

    model.audio_encoder.decode = spy
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=params.max_new_tokens,
                       guidance_scale=params.guidance_scale)
    return captured[0].numpy()


# ---------------------------------------------------------------------------------------------------- the option
@pytest.mark.parametrize("options,message", [
    ({"linear_backend": "cublas"}, "linear_backend must be None, 'triton' or 'torch', got 'cublas'"),
    ({"linear_backend": "triton", "backend": "torch"}, "linear_backend='triton' needs backend='triton'"),
    ({"linear_backend": "triton", "quantization": "int8-dynamic"}, "not 'int8-dynamic'"),
    ({"linear_backend": "triton", "quantization": "int4"}, "not 'int4'"),
])
def test_bad_linear_backend_is_a_clear_error_before_loading(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        fastgen.EngineConfig(**options)
    with pytest.raises(ValueError, match=message):  # before any weights are read: the folder is empty
        fastgen.MusicGen.from_pretrained(tmp_path, **options)


def test_linear_backend_defaults_and_plumbing(tiny_mono_dir):
    """None resolves to "triton" on CUDA and to "torch" on a CPU (where the interpreter runs the fused kernels only
    when asked), and "auto" on a CPU is the torch backend, where "triton" projections are refused; the option
    reaches the decoder through MusicGen.from_pretrained and the AsyncEngine as backend does."""
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, device=DEVICE, dtype=torch.float32, max_slots=1,
                                             backend="triton", enforce_eager=True)
    assert model.engine.model.decoder.linear_backend == ("triton" if DEVICE == "cuda" else "torch")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="backend resolved to 'torch'"):
            fastgen.Engine.from_pretrained(tiny_mono_dir, dtype=torch.float32, max_slots=1, linear_backend="triton")
    engine = fastgen.AsyncEngine.from_pretrained(tiny_mono_dir, device=DEVICE, dtype=torch.float32, max_slots=1,
                                                 backend="triton", linear_backend="triton", enforce_eager=True)
    try:
        assert engine.engine.model.decoder.linear_backend == "triton"
    finally:
        engine.shutdown_sync()
