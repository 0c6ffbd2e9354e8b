"""fastgen.kernels.cpu_decoder_layers (every decoder layer of an eager CPU step in one C++ call): against its PyTorch
reference on fresh random weights (bf16, fp32, int8 codes), scattered cache rows and positions, a poisoned cache
that must change only where the step's K/V go; bitwise against the layer-by-layer eager step of a tiny model, in the
decoder and through the engine; and bad arguments refused with the parameter named. Skipped, with the reason, where
the CPU kernels cannot run."""
from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen.kernels import cpu_gemv
from fastgen.kernels.cpu_decoder_layers import cpu_decoder_layers, cpu_decoder_layers_ref, unavailable_reason
from fastgen.model import cpu_paths as linear_module
from fastgen.model.decoder import KVCache
from fastgen.model.ops import TorchOps
from fastgen.model.quantize import quantize_int8

LAYERS, WIDTH, HEADS, HEAD_DIM, FFN = 2, 64, 4, 16, 96
CACHE_ROWS, POSITIONS, TEXT = 7, 40, 5
ROWS = torch.tensor([5, 1, 2])          # out of order, not from 0: the cache is addressed in place
POSITION = torch.tensor([17, 0, 33])    # each row's own position


def needs_kernel(dtype: torch.dtype) -> None:
    reason = unavailable_reason(dtype)
    if reason is not None:
        pytest.skip(reason)


def random_layers(dtype: torch.dtype, int8: bool, gen: torch.Generator):
    """(norms, packed, scales, plain weights) of LAYERS random layers."""
    shapes = [(3 * WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (FFN, WIDTH), (WIDTH, FFN)]
    norms, packed, scales, plain = [], [], [], []
    for _ in range(LAYERS):
        for _ in range(3):
            norms += [(1 + 0.1 * torch.randn(WIDTH, generator=gen)).to(dtype),
                      (0.1 * torch.randn(WIDTH, generator=gen)).to(dtype)]
        for n, k in shapes:
            weight = torch.randn(n, k, generator=gen) / k ** 0.5
            if int8:
                q, scale = quantize_int8(weight)
                packed.append(cpu_gemv.pack(q))
                scales.append(scale.float())
                plain.append(q)
            else:
                packed.append(cpu_gemv.pack(weight.to(dtype)))
                scales.append(None)
                plain.append(weight.to(dtype))
    return norms, packed, scales, plain


def step_inputs(dtype: torch.dtype, gen: torch.Generator):
    """hidden, the four caches (random everywhere: whatever the step does not write must stay as it was), the
    biases as TorchOps builds them (one row with no text: every cross key masked)."""
    hidden = torch.randn(len(ROWS), WIDTH, generator=gen).to(dtype)
    self_shape = (LAYERS, CACHE_ROWS, HEADS, POSITIONS, HEAD_DIM)
    text_shape = (LAYERS, CACHE_ROWS, HEADS, TEXT, HEAD_DIM)
    caches = [torch.randn(*shape, generator=gen).to(dtype) for shape in (self_shape, self_shape, text_shape,
                                                                         text_shape)]
    ops = TorchOps()
    ctx = ops.context(ROWS, POSITION, torch.tensor([3, 5, 0], dtype=torch.int32), 36, TEXT, dtype)
    return hidden, caches, ctx


@pytest.mark.parametrize("dtype,int8,tol", [(torch.bfloat16, False, 3e-2), (torch.float32, False, 1e-4),
                                            (torch.float32, True, 1e-4), (torch.bfloat16, True, 3e-2)],
                         ids=["bf16", "fp32", "int8-fp32", "int8-bf16"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
def test_matches_reference(dtype, int8, tol, activation):
    needs_kernel(dtype)
    gen = torch.Generator().manual_seed(sum(map(ord, f"{dtype}{int8}{activation}")))  # a seed per case
    norms, packed, scales, plain = random_layers(dtype, int8, gen)
    hidden, caches, ctx = step_inputs(dtype, gen)
    before = [c.clone() for c in caches]
    expected_caches = [c.clone() for c in caches]
    args = (ROWS, POSITION, ctx.kv_span, ctx.self_bias, TEXT, ctx.cross_bias, HEAD_DIM ** -0.5, 1e-5, activation)
    out = cpu_decoder_layers(hidden, norms, packed, scales, *caches, *args)
    expected = cpu_decoder_layers_ref(hidden, norms, plain, scales, *expected_caches, *args)
    assert out.dtype == dtype and out.shape == hidden.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=tol * 4, rtol=tol)
    written = torch.zeros(CACHE_ROWS, POSITIONS, dtype=torch.bool)
    written[ROWS, POSITION] = True
    for cache, was, ref in zip(caches[:2], before[:2], expected_caches[:2]):
        untouched = ~written.view(1, CACHE_ROWS, 1, POSITIONS, 1).expand_as(cache)
        assert torch.equal(cache[untouched], was[untouched])  # nothing but the new K/V changed
        torch.testing.assert_close(cache[~untouched].float(), ref[~untouched].float(), atol=tol * 4, rtol=tol)
        assert not torch.equal(cache[~untouched], was[~untouched])
    assert torch.equal(caches[2], before[2]) and torch.equal(caches[3], before[3])  # the text K/V are only read


def test_bad_arguments_are_refused():
    needs_kernel(torch.float32)
    gen = torch.Generator().manual_seed(0)
    norms, packed, scales, _ = random_layers(torch.float32, False, gen)
    hidden, caches, ctx = step_inputs(torch.float32, gen)
    before = [cache.clone() for cache in caches]

    def call(**changes):
        given = dict(hidden=hidden, norms=norms, packed=packed, scales=scales, self_k=caches[0], self_v=caches[1],
                     cross_k=caches[2], cross_v=caches[3], rows=ROWS, position=POSITION, kv_span=ctx.kv_span,
                     self_bias=ctx.self_bias, text_span=TEXT, cross_bias=ctx.cross_bias, scale=0.25, eps=1e-5,
                     activation="gelu")
        given.update(changes)
        return cpu_decoder_layers(*given.values())

    with pytest.raises(RuntimeError, match="activation must be gelu, gelu_new, relu or silu, got swish"):
        call(activation="swish")
    with pytest.raises(RuntimeError, match="6 packed weights, 6 scales and 6 norm tensors per layer"):
        call(packed=packed[:-1])
    with pytest.raises(RuntimeError, match="position 40 out of range \\[0, 40\\)"):
        call(position=torch.tensor([17, 40, 3]))
    with pytest.raises(RuntimeError, match="cache row -1 out of range \\[0, 7\\)"):
        call(rows=torch.tensor([5, -1, 2]))
    with pytest.raises(RuntimeError, match="caches must be .* in hidden's dtype"):
        call(hidden=hidden.bfloat16())
    with pytest.raises(RuntimeError, match="rows and position must be \\[R\\] int64"):
        call(position=POSITION.int())
    with pytest.raises(RuntimeError, match="weight 11 is not in the packed GEMV layout"):
        call(packed=packed[:-1] + [packed[-1].reshape(WIDTH, FFN)])
    assert all(torch.equal(cache, was) for cache, was in zip(caches, before))  # refused before any work


@pytest.fixture
def on_gemv(monkeypatch):
    """Every projection of models loaded in the test on fastgen's GEMV (the path the operator runs)."""
    monkeypatch.setattr(linear_module, "CPU_PATHS", ("gemv",))
    monkeypatch.setattr(linear_module, "INT8_CPU_PATHS", ("int8-gemv",))
    monkeypatch.setattr(linear_module, "_CHOSEN", {})


@pytest.mark.parametrize("dtype,quantization", [(torch.bfloat16, None), (torch.float32, None),
                                                (torch.float32, "int8"), (torch.bfloat16, "int8")],
                         ids=["bf16", "fp32", "int8-fp32", "int8-bf16"])
def test_decoder_step_is_bitwise_the_layer_by_layer_step(tiny_mono_dir, on_gemv, dtype, quantization):
    needs_kernel(dtype)
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, dtype=dtype, backend="torch", quantization=quantization)
    decoder = model.engine.model.decoder
    c = decoder.config
    ops = TorchOps()
    ops.choose_cpu_kernels(decoder.device, dtype, c.head_dim)
    gen = torch.Generator().manual_seed(1)
    rows = torch.tensor([2, 0, 3, 1])  # two requests' cond and uncond rows, scattered
    text_length = torch.tensor([4, 6, 0, 0], dtype=torch.int32)
    inputs = [torch.randn(4, c.hidden_size, generator=gen).to(dtype) for _ in range(20)]
    runs = {}
    for fused in (True, False):
        decoder.cpu_layers_op = fused
        cache = KVCache.allocate(c, 2, 32, 6, dtype, decoder.device)
        cache.cross_k.copy_(torch.randn(cache.cross_k.shape, generator=torch.Generator().manual_seed(2)))
        cache.cross_v.copy_(torch.randn(cache.cross_v.shape, generator=torch.Generator().manual_seed(3)))
        logits = []
        with torch.inference_mode():
            for t, hidden in enumerate(inputs):
                position = torch.full((4,), t, dtype=torch.int64)
                ctx = ops.context(rows, position, text_length, -(-(t + 1) // 16) * 16, 6, dtype)
                assert (decoder._cpu_layers(ops, hidden, cache) is not None) == fused
                logits.append(decoder.decode(ops, hidden, cache, ctx))
        runs[fused] = (torch.stack(logits), cache)
    (fused_logits, fused_cache), (eager_logits, eager_cache) = runs[True], runs[False]
    assert torch.equal(fused_logits, eager_logits)
    assert torch.equal(fused_cache.self_k, eager_cache.self_k) and torch.equal(fused_cache.self_v,
                                                                                eager_cache.self_v)
    assert fused_cache.self_k[:, :, :, :20].abs().amax(dim=(0, 2, 3, 4)).gt(0).all()  # every row's K written
    assert not fused_cache.self_k[:, :, :, 20:].any()


def test_engine_codes_are_those_of_the_layer_by_layer_step(tiny_mono_dir, on_gemv):
    needs_kernel(torch.bfloat16)
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, dtype=torch.bfloat16, max_slots=2, backend="torch",
                                             quantization="int8")
    decoder = model.engine.model.decoder
    params = [fastgen.SamplingParams(max_new_tokens=16, guidance_scale=3.0, seed=5, top_k=20),
              fastgen.SamplingParams(max_new_tokens=12, guidance_scale=1.0, seed=6, do_sample=False)]
    fused = model.generate(["lofi beat", None], params)
    assert isinstance(decoder._cpu_layers_args, tuple)  # the engine's steps ran through the operator
    decoder.cpu_layers_op = False
    eager = model.generate(["lofi beat", None], params)
    for a, b in zip(fused, eager):
        assert torch.equal(torch.as_tensor(a.codes), torch.as_tensor(b.codes))


def test_not_used_off_the_gemv_or_under_other_backends(tiny_mono_dir, monkeypatch):
    """A projection on another path (aten here) leaves the step layer by layer."""
    needs_kernel(torch.float32)
    monkeypatch.setattr(linear_module, "CPU_PATHS", ("aten",))
    monkeypatch.setattr(linear_module, "_CHOSEN", {})
    model = fastgen.MusicGen.from_pretrained(tiny_mono_dir, dtype=torch.float32, backend="torch")
    decoder = model.engine.model.decoder
    ops = TorchOps()
    ops.choose_cpu_kernels(decoder.device, torch.float32, decoder.config.head_dim)
    cache = KVCache.allocate(decoder.config, 1, 8, 4, torch.float32, decoder.device)
    assert decoder._cpu_layers(ops, torch.zeros(2, decoder.config.hidden_size), cache) is None
