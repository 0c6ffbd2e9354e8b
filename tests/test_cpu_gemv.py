"""fastgen.kernels.cpu_gemv (the AVX-512 GEMV behind the CPU "gemv" linear path) against its PyTorch reference:
fresh random inputs, every row-group remainder, odd widths, a residual, mixed activation dtypes, and the operator
inside a torch.compile graph. Skipped, with the reason, on a CPU without the instructions or a C++ toolchain."""
from __future__ import annotations

import pytest
import torch

from fastgen.kernels.cpu_gemv import cpu_gemv, cpu_gemv_ref, pack, unavailable_reason, unpack

WEIGHT_DTYPES = [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.bfloat16, 1e-2, id="bf16")]


def needs_kernel(dtype: torch.dtype) -> None:
    reason = unavailable_reason(dtype)
    if reason is not None:
        pytest.skip(reason)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Within tol of the largest output (accumulation order differs), in the reference's dtype and shape."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = ref.float().abs().max().clamp_min(1e-6)
    assert ((out.float() - ref.float()).abs().max() / scale).item() <= tol


@pytest.mark.parametrize("dtype,tol", WEIGHT_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize("n,k", [(16, 2), (48, 6), (64, 34), (32, 1030), (1040, 256)])
def test_matches_reference(dtype, tol, rows, n, k):
    needs_kernel(dtype)
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    residual = torch.randn(rows, n, generator=gen).to(dtype)
    packed = pack(weight)
    close(cpu_gemv(x, packed, n), cpu_gemv_ref(x, weight), tol)
    close(cpu_gemv(x, packed, n, residual), cpu_gemv_ref(x, weight, residual), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_round_trip_and_refusals(dtype):
    weight = torch.randn(48, 10).to(dtype)
    packed = pack(weight)
    assert packed.is_contiguous() and packed.numel() == weight.numel()
    assert torch.equal(unpack(packed), weight)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(torch.randn(40, 10).to(dtype))
    if dtype == torch.bfloat16:
        with pytest.raises(ValueError, match="K even"):
            pack(torch.randn(48, 9).to(dtype))


def test_activations_in_another_dtype():
    """fp32 activations against bf16 weights are rounded to bf16 first (as oneDNN's bf16 path does); the output
    keeps the activations' dtype."""
    needs_kernel(torch.bfloat16)
    weight = torch.randn(64, 96).to(torch.bfloat16)
    x = torch.randn(2, 96)
    out = cpu_gemv(x, pack(weight), 64)
    close(out, cpu_gemv_ref(x.to(torch.bfloat16), weight).float(), 1e-2)


def test_wrong_widths_are_refused():
    needs_kernel(torch.float32)
    packed = pack(torch.randn(32, 24))
    with pytest.raises(RuntimeError, match="width"):
        cpu_gemv(torch.randn(2, 20), packed, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        cpu_gemv(torch.randn(2, 24), packed, 48)
    with pytest.raises(RuntimeError, match="residual"):
        cpu_gemv(torch.randn(2, 24), packed, 32, torch.randn(3, 32))


def test_rows_are_independent_of_their_batch():
    """Each row's result is the same whatever rows share the call: the kernel never mixes rows' sums."""
    needs_kernel(torch.bfloat16)
    weight = torch.randn(96, 128).to(torch.bfloat16)
    packed = pack(weight)
    rows = torch.randn(9, 128).to(torch.bfloat16)
    alone = torch.cat([cpu_gemv(rows[i:i + 1], packed, 96) for i in range(9)])
    assert torch.equal(cpu_gemv(rows, packed, 96), alone)


def test_inside_a_compiled_graph():
    needs_kernel(torch.float32)
    weight = torch.randn(64, 32)
    packed = pack(weight)

    def f(x, residual):
        return cpu_gemv(torch.relu(x), packed, 64, residual) * 2

    x, residual = torch.randn(2, 32), torch.randn(2, 64)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, residual), f(x, residual))
