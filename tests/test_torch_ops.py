"""The torch backend's attention on a CPU reads runs of consecutive cache rows as views instead of gathering them;
it must equal the gathered attention for any set of rows, and rows without text must get exactly 0; with the CPU
attention kernel (fastgen.kernels.cpu_attention) too, which must match the PyTorch expression."""
from __future__ import annotations

import pytest
import torch

from fastgen.kernels.cpu_attention import unavailable_reason
from fastgen.model.ops import MAX_ROW_RUNS, TorchOps, _gathered_attention, _row_runs


def test_row_runs():
    assert _row_runs([3, 9]) == [(0, 3, 1), (1, 9, 1)]  # one request: its cond and uncond rows
    assert _row_runs([0, 1, 2, 5, 6, 7]) == [(0, 0, 3), (3, 5, 3)]  # neighbouring slots
    assert _row_runs([0, 1]) == [(0, 0, 2)]
    assert _row_runs([4, 5, 9, 10], keep=[True, True, False, False]) == [(0, 4, 2)]
    assert _row_runs([2, 3, 9], keep=[True, False, True]) == [(0, 2, 1), (2, 9, 1)]
    assert _row_runs(list(range(0, 2 * (MAX_ROW_RUNS + 1), 2))) is None  # scattered: one gather is cheaper


TOLERANCE = {torch.float32: {"atol": 1e-6, "rtol": 1e-6}, torch.bfloat16: {"atol": 0, "rtol": 0}}
# the kernel's softmax is in fp32 over bf16 scores it never rounds; the expression rounds q·Kᵀ to bf16 first
KERNEL_TOLERANCE = {torch.float32: {"atol": 2e-6, "rtol": 2e-6}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


SCATTERED = [1, 4, 6, 8, 11, 13, 14, 15]


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "cpu-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[3, 9], [0, 1, 2, 5, 6, 7], SCATTERED, [2, 3]])
def test_attention_over_runs_equals_gathered(rows, dtype, kernel):
    gen = torch.Generator().manual_seed(len(rows))
    heads, head_dim, length, span = 3, 16, 40, 32
    ops = TorchOps()
    if kernel:
        ops.choose_cpu_kernels(torch.device("cpu"), dtype, head_dim)
        if not ops.cpu_attention:
            pytest.skip(unavailable_reason(dtype, head_dim))
    k_cache = torch.randn(16, heads, length, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(16, heads, length, head_dim, generator=gen).to(dtype)
    count = len(rows)
    q = torch.randn(count, heads, head_dim, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(count, heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    position = torch.randint(0, span, (count,), generator=gen)
    text_length = torch.tensor([span - 3 * i if i < count // 2 else 0 for i in range(count)], dtype=torch.int32)
    row_tensor = torch.tensor(rows)
    ctx = ops.context(row_tensor, position, text_length, span, span, dtype)
    assert (ctx.self_runs is None) == (rows == SCATTERED or kernel)  # six runs: gathered; the kernel needs none
    expected_cache = (k_cache.clone(), v_cache.clone())
    got = ops.self_attention(ctx, k_cache, v_cache, q, k_new, v_new, 0.25)
    expected_cache[0][row_tensor, :, position] = k_new
    expected_cache[1][row_tensor, :, position] = v_new
    assert torch.equal(k_cache, expected_cache[0]) and torch.equal(v_cache, expected_cache[1])
    expected = _gathered_attention(q, k_cache, v_cache, row_tensor, span, ctx.self_bias, 0.25)
    # fp32 runs through SDPA, whose last bit may depend on how many rows share a call; the kernel's softmax is fp32
    torch.testing.assert_close(got, expected, **(KERNEL_TOLERANCE if kernel else TOLERANCE)[dtype])

    text_less = text_length == 0
    if kernel:  # the engine keeps a text-less row's cross K/V at zero (ModelRunner._write_text); the kernel reads them
        k_cache[row_tensor[text_less]] = 0
        v_cache[row_tensor[text_less]] = 0
    got = ops.cross_attention(ctx, k_cache, v_cache, q, 0.25)
    assert torch.equal(got[text_less], torch.zeros_like(got[text_less]))  # no text: exactly 0, skipped
    expected = _gathered_attention(q, k_cache, v_cache, row_tensor, span, ctx.cross_bias, 0.25)
    torch.testing.assert_close(got[~text_less], expected[~text_less],
                               **(KERNEL_TOLERANCE if kernel else TOLERANCE)[dtype])
