"""fastgen.kernels.cpu_attention (the CPU decode attention of the torch backend) against its PyTorch reference: fresh
random inputs, spans around the kernel's 16-wide softmax chunks, strided views of a cache, masked keys (the
dtype's lowest bias, as TorchOps builds it, including a row with every key masked), both cache dtypes, and the
operator inside a torch.compile graph. Skipped, with the reason, on a CPU without AVX-512 or a C++ toolchain."""
from __future__ import annotations

import pytest
import torch

from fastgen.kernels.cpu_attention import cpu_attention, cpu_attention_ref, unavailable_reason

CACHE_DTYPES = [pytest.param(torch.float32, 2e-6, id="fp32"), pytest.param(torch.bfloat16, 1e-2, id="bf16")]


def needs_kernel(dtype: torch.dtype, head_dim: int = 64) -> None:
    reason = unavailable_reason(dtype, head_dim)
    if reason is not None:
        pytest.skip(reason)


def cache_views(rows: int, heads: int, span: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """K and V as the engine reads them: rows 1.. of a cache longer than the span, so every stride is a cache's."""
    shape = (rows + 2, heads, span + 9, head_dim)
    k, v = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))
    return k[1:1 + rows, :, :span], v[1:1 + rows, :, :span]


def mask_bias(rows: int, span: int, dtype: torch.dtype, gen: torch.Generator, keep: float = 0.7) -> torch.Tensor:
    keys = torch.rand(rows, 1, 1, span, generator=gen) < keep
    keys[..., 0] = True
    return torch.where(keys, 0.0, torch.finfo(dtype).min).to(dtype)


@pytest.mark.parametrize("dtype,tol", CACHE_DTYPES)
@pytest.mark.parametrize("span", [1, 15, 16, 17, 250, 1537])
@pytest.mark.parametrize("heads,head_dim", [(16, 64), (3, 16), (2, 128)])
def test_matches_reference(dtype, tol, span, heads, head_dim):
    needs_kernel(dtype, head_dim)
    gen = torch.Generator().manual_seed(span * 10 + heads)
    rows = 3
    keys, values = cache_views(rows, heads, span, head_dim, dtype, gen)
    q = torch.randn(rows, heads, head_dim, generator=gen).to(dtype)
    bias = mask_bias(rows, span, dtype, gen)
    out = cpu_attention(q, keys, values, bias, head_dim ** -0.5)
    ref = cpu_attention_ref(q, keys, values, bias, head_dim ** -0.5)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_every_key_masked_averages_the_values():
    """A row with no text (the null condition) has every cross key masked by the same lowest bias: its weights
    are then equal, as in the reference, not NaN."""
    needs_kernel(torch.float32)
    gen = torch.Generator().manual_seed(1)
    keys, values = cache_views(2, 4, 20, 64, torch.float32, gen)
    q = torch.randn(2, 4, 64, generator=gen)
    bias = torch.full((2, 1, 1, 20), torch.finfo(torch.float32).min)
    out = cpu_attention(q, keys, values, bias, 0.125)
    torch.testing.assert_close(out, cpu_attention_ref(q, keys, values, bias, 0.125), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_fp32_bias_over_a_bf16_cache_and_fp32_queries():
    needs_kernel(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    keys, values = cache_views(2, 16, 300, 64, torch.bfloat16, gen)
    q = torch.randn(2, 16, 64, generator=gen)
    bias = mask_bias(2, 300, torch.float32, gen)
    out = cpu_attention(q, keys, values, bias, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cpu_attention_ref(q, keys, values, bias, 0.125), atol=1e-5, rtol=1e-5)


def test_a_nan_in_the_cache_reaches_the_output():
    """A fault in one row's cache must show as NaN in that row (the engine fails that request on non-finite
    logits), as torch's softmax shows it, and leave the other rows alone."""
    needs_kernel(torch.float32)
    gen = torch.Generator().manual_seed(4)
    keys, values = cache_views(2, 4, 40, 64, torch.float32, gen)
    keys[0, :, 7] = float("nan")
    q = torch.randn(2, 4, 64, generator=gen)
    out = cpu_attention(q, keys, values, torch.zeros(2, 1, 1, 40), 0.125)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def test_refusals():
    needs_kernel(torch.float32)
    q, keys = torch.randn(2, 4, 24), torch.randn(2, 4, 10, 24)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_attention(q, keys, keys, torch.zeros(2, 1, 1, 10), 0.2)
    q, keys = torch.randn(2, 4, 32), torch.randn(2, 4, 10, 32)
    with pytest.raises(RuntimeError, match="same strides"):
        cpu_attention(q, keys, torch.randn(2, 4, 12, 32)[:, :, :10], torch.zeros(2, 1, 1, 10), 0.2)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_attention(q, keys, keys, torch.zeros(2, 1, 1, 9), 0.2)
    assert unavailable_reason(torch.float32, 24) is not None


def test_inside_a_compiled_graph():
    needs_kernel(torch.float32)
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(4, 4, 40, 32, generator=gen)
    q, bias = torch.randn(2, 4, 32, generator=gen), torch.zeros(2, 1, 1, 24)

    def f(q, span_bias):
        return cpu_attention(q * 2, cache[1:3, :, :24], cache[1:3, :, :24], span_bias, 0.2) + 1

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, bias), f(q, bias))
