"""fastgen.kernels.cpu_attention (the CPU decode attention of the torch backend) against its PyTorch reference: fresh
random inputs, spans around the kernel's 16-key blocks, scattered and repeated cache rows read in place from a
layer's cache, masked keys (the dtype's lowest bias, as TorchOps builds it, including a row with every key masked),
both cache dtypes, NaN in the cache, and the operator inside a torch.compile graph. Skipped, with the reason, on a
CPU without AVX-512 or a C++ toolchain."""
from __future__ import annotations

import pytest
import torch

from fastgen.kernels.cpu_attention import cpu_attention, cpu_attention_ref, unavailable_reason

CACHE_DTYPES = [pytest.param(torch.float32, 2e-6, id="fp32"), pytest.param(torch.bfloat16, 1e-2, id="bf16")]


def needs_kernel(dtype: torch.dtype, head_dim: int = 64) -> None:
    reason = unavailable_reason(dtype, head_dim)
    if reason is not None:
        pytest.skip(reason)


def layer_cache(heads: int, positions: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """One layer's K and V caches: 7 rows, positions beyond any span read, so every stride is a cache's."""
    shape = (7, heads, positions + 9, head_dim)
    return tuple(torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))


ROWS = torch.tensor([5, 1, 2])  # out of order, not from 0: read in place, not as a slice


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
    k_cache, v_cache = layer_cache(heads, span, head_dim, dtype, gen)
    q = torch.randn(len(ROWS), heads, head_dim, generator=gen).to(dtype)
    bias = mask_bias(len(ROWS), span, dtype, gen)
    out = cpu_attention(q, k_cache, v_cache, ROWS, span, bias, head_dim ** -0.5)
    ref = cpu_attention_ref(q, k_cache, v_cache, ROWS, span, bias, head_dim ** -0.5)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_a_row_read_twice_and_every_key_masked():
    """Two query rows may read one cache row; a row with no text (the null condition) has every cross key masked
    by the same lowest bias: its weights are then equal, as in the reference, not NaN."""
    needs_kernel(torch.float32)
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = layer_cache(4, 20, 64, torch.float32, gen)
    q = torch.randn(2, 4, 64, generator=gen)
    rows = torch.tensor([3, 3])
    bias = torch.full((2, 1, 1, 20), torch.finfo(torch.float32).min)
    out = cpu_attention(q, k_cache, v_cache, rows, 20, bias, 0.125)
    torch.testing.assert_close(out, cpu_attention_ref(q, k_cache, v_cache, rows, 20, bias, 0.125), atol=1e-5,
                               rtol=1e-5)
    assert torch.isfinite(out).all()


def test_fp32_bias_over_a_bf16_cache_and_fp32_queries():
    needs_kernel(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache = layer_cache(16, 300, 64, torch.bfloat16, gen)
    q = torch.randn(3, 16, 64, generator=gen)
    bias = mask_bias(3, 300, torch.float32, gen)
    out = cpu_attention(q, k_cache, v_cache, ROWS, 300, bias, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cpu_attention_ref(q, k_cache, v_cache, ROWS, 300, bias, 0.125), atol=1e-5,
                               rtol=1e-5)


def test_a_nan_in_the_cache_reaches_the_output():
    """A fault in one row's cache must show as NaN in that row (the engine fails that request on non-finite
    logits), as torch's softmax shows it, and leave the other rows alone."""
    needs_kernel(torch.float32)
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = layer_cache(4, 40, 64, torch.float32, gen)
    k_cache[5, :, 7] = float("nan")
    q = torch.randn(3, 4, 64, generator=gen)
    out = cpu_attention(q, k_cache, v_cache, ROWS, 40, torch.zeros(3, 1, 1, 40), 0.125)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()


def test_refusals():
    needs_kernel(torch.float32)
    rows = torch.tensor([0, 1])
    cache = torch.randn(3, 4, 10, 24)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_attention(torch.randn(2, 4, 24), cache, cache, rows, 10, torch.zeros(2, 1, 1, 10), 0.2)
    q, cache = torch.randn(2, 4, 32), torch.randn(3, 4, 10, 32)
    with pytest.raises(RuntimeError, match="same strides"):
        cpu_attention(q, cache, torch.randn(3, 4, 12, 32)[:, :, :10], rows, 10, torch.zeros(2, 1, 1, 10), 0.2)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_attention(q, cache, cache, rows, 10, torch.zeros(2, 1, 1, 9), 0.2)
    with pytest.raises(RuntimeError, match="span"):
        cpu_attention(q, cache, cache, rows, 11, torch.zeros(2, 1, 1, 11), 0.2)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_attention(q, cache, cache, torch.tensor([0, 3]), 10, torch.zeros(2, 1, 1, 10), 0.2)
    assert unavailable_reason(torch.float32, 24) is not None


def test_inside_a_compiled_graph():
    needs_kernel(torch.float32)
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(4, 4, 40, 32, generator=gen)
    q, bias, rows = torch.randn(2, 4, 32, generator=gen), torch.zeros(2, 1, 1, 24), torch.tensor([2, 0])

    def f(q, rows, span_bias):
        return cpu_attention(q * 2, cache, cache, rows, 24, span_bias, 0.2) + 1

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, rows, bias), f(q, rows, bias))
