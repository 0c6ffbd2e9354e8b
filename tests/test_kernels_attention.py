"""Split-KV decode attention kernel vs its PyTorch reference (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch

from fastgen.kernels import decode_attention as module
from fastgen.kernels._scratch import device_key
from fastgen.kernels.decode_attention import (
    SPLIT,
    decode_attention,
    decode_attention_append,
    decode_attention_append_ref,
    decode_attention_ref,
)

from kernel_checks import DEVICE, assert_close_report

DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3)]
if DEVICE == "cuda":
    DTYPES.append((torch.bfloat16, 1.6e-2, 1.6e-2))


def make_inputs(rows, heads, head_dim, cache_rows, max_len, lengths, dtype, seed, cache_row=None):
    gen = torch.Generator().manual_seed(seed)
    # q as a strided view of a fused qkv projection, as the model produces it
    qkv = torch.randn(rows, 3, heads, head_dim, generator=gen)
    k_cache = torch.randn(cache_rows, heads, max_len, head_dim, generator=gen)
    v_cache = torch.randn(cache_rows, heads, max_len, head_dim, generator=gen)
    if cache_row is None:
        cache_row = torch.randperm(cache_rows, generator=gen)[:rows]
    q = qkv.to(dtype).to(DEVICE)[:, 0]
    return (q, k_cache.to(dtype).to(DEVICE), v_cache.to(dtype).to(DEVICE),
            torch.as_tensor(cache_row, dtype=torch.int64).to(DEVICE),
            torch.as_tensor(lengths, dtype=torch.int32).to(DEVICE))


CASES = [
    # rows, heads, head_dim, cache rows, L_max, lengths, max_length
    (1, 2, 64, 2, 5, [5], None),                            # B = 1, full tiny cache, direct path
    (3, 2, 16, 4, 40, [1, 0, 37], None),                    # empty row, length 1, odd length
    (5, 3, 16, 6, 600, [600, 0, 257, SPLIT, 513], None),    # split boundaries, full length, empty row
    (3, 2, 64, 3, 300, [299, 1, 131], None),                # Dh = 64 across two splits
    (4, 2, 16, 5, 600, [200, 0, 77, 256], 256),             # max_length bound: one split, written directly
    (3, 2, 16, 4, 600, [590, 420, 3], 430),                 # lengths past max_length are clipped to it
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("rows,heads,head_dim,cache_rows,max_len,lengths,max_length", CASES)
def test_matches_reference(rows, heads, head_dim, cache_rows, max_len, lengths, max_length, dtype, atol, rtol):
    q, k, v, cache_row, length = make_inputs(rows, heads, head_dim, cache_rows, max_len, lengths, dtype,
                                             seed=rows * 1000 + max_len + head_dim)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    decode_attention(q, k, v, cache_row, length, scale, out=out, max_length=max_length)
    want = decode_attention_ref(q, k, v, cache_row, length, scale, max_length=max_length)
    assert_close_report(out, want, atol, rtol)
    empty = (length.clamp(max=max_length or max_len) == 0).cpu()
    assert bool((out.cpu()[empty] == 0).all()), "length-0 rows must be exactly zero"


APPEND_CASES = [
    # rows, heads, head_dim, cache rows, L_max, lengths (new key at length - 1), max_length
    (1, 2, 64, 2, 9, [1], None),                            # the new key alone
    (4, 2, 16, 5, 600, [256, 257, 0, 600], None),           # new key at a split's end / start; empty row; last slot
    (4, 3, 16, 4, 300, [77, 2, 0, 200], 256),               # one split, written directly; empty row
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("rows,heads,head_dim,cache_rows,max_len,lengths,max_length", APPEND_CASES)
def test_append_matches_reference(rows, heads, head_dim, cache_rows, max_len, lengths, max_length, dtype, atol,
                                  rtol):
    """Fused self-attention step: the new key/value land in the cache and take part in the attention."""
    q, k, v, cache_row, length = make_inputs(rows, heads, head_dim, cache_rows, max_len, lengths, dtype,
                                             seed=rows * 77 + max_len)
    gen = torch.Generator().manual_seed(len(lengths))
    new = torch.randn(rows, 2, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_new, v_new = new[:, 0], new[:, 1]  # strided views, as a fused projection gives them
    scale = head_dim ** -0.5
    k_want, v_want = k.clone(), v.clone()
    want = decode_attention_append_ref(q, k_new, v_new, k_want, v_want, cache_row, length, scale,
                                       max_length=max_length)
    out = torch.full_like(q, float("nan"))
    decode_attention_append(q, k_new, v_new, k, v, cache_row, length, scale, out=out, max_length=max_length)
    assert_close_report(out, want, atol, rtol)
    assert torch.equal(k, k_want), "k_cache differs from the reference after the append"
    assert torch.equal(v, v_want), "v_cache differs from the reference after the append"


def test_duplicate_cache_rows_and_returned_out():
    """Padding rows pointing at one dummy cache row (each query row merges its own splits: tickets are per query
    row and head, not per cache row); without `out` the launcher allocates one."""
    for max_len, lengths in ((70, [70, 5, 5, 0]), (600, [600, 300, 300, 0])):
        q, k, v, cache_row, length = make_inputs(4, 2, 16, 3, max_len, lengths, torch.float32, seed=3,
                                                 cache_row=[1, 2, 2, 2])
        got = decode_attention(q, k, v, cache_row, length, 0.3)
        assert_close_report(got, decode_attention_ref(q, k, v, cache_row, length, 0.3), 2e-5, 2e-5)


def test_result_independent_of_batch_and_max_length():
    """Fixed splits: a row's output has the same bits alone, in any batch, and with any grid bound."""
    q, k, v, cache_row, length = make_inputs(4, 2, 16, 5, 600, [180, 555, 0, 256], torch.float32, seed=9)
    scale = 0.25
    full = decode_attention(q, k, v, cache_row, length, scale)
    for r in range(4):
        alone = decode_attention(q[r:r + 1], k, v, cache_row[r:r + 1], length[r:r + 1], scale)
        assert torch.equal(alone, full[r:r + 1]), f"row {r} changed with its batch-mates"
    direct = decode_attention(q[[0, 3]], k, v, cache_row[[0, 3]], length[[0, 3]], scale, max_length=256)
    assert torch.equal(direct, full[[0, 3]]), "one-split direct path must equal the merged path bit for bit"


def test_scratch_grows_and_is_reused():
    small = make_inputs(1, 2, 16, 2, 300, [290], torch.float32, seed=21)
    large = make_inputs(6, 2, 16, 6, 600, [600, 1, 300, 599, 0, 257], torch.float32, seed=22)
    for q, k, v, cache_row, length in (small, large, small):
        got = decode_attention(q, k, v, cache_row, length, 0.2)
        assert_close_report(got, decode_attention_ref(q, k, v, cache_row, length, 0.2), 2e-5, 2e-5)
    buffer = module.scratch_buffer(DEVICE)
    buffer.fill_(float("nan"))  # splits a row does not reach must never be read back by the merge
    q, k, v, cache_row, length = large
    got = decode_attention(q, k, v, cache_row, length, 0.2)
    assert_close_report(got, decode_attention_ref(q, k, v, cache_row, length, 0.2), 2e-5, 2e-5)
    tickets = module._SCRATCH.current(DEVICE)[1]
    assert bool((tickets == 0).all()), "the merging programs must leave every ticket at 0 for the next launch"
    module.reserve_decode_scratch(1, 2, 300, DEVICE, head_dim=16)
    assert module.scratch_buffer(DEVICE) is buffer, "a smaller reservation must not reallocate"


def test_reservation_is_the_buffer_launches_use():
    """Reserved under the device's plain name ("cuda", as the engine's config gives it), found by launches on
    tensors whose device carries its index ("cuda:0"): one key, so no regrowth after the reservation."""
    q, k, v, cache_row, length = make_inputs(2, 2, 16, 2, 600, [600, 3], torch.float32, seed=23)
    module.reserve_decode_scratch(64, 2, 4096, DEVICE, head_dim=16)
    reserved = module.scratch_buffer(DEVICE)
    assert q.device.type != "cuda" or q.device.index is not None
    decode_attention(q, k, v, cache_row, length, 0.2)
    assert module.scratch_buffer(q.device) is reserved
    assert device_key(DEVICE) == q.device


def test_launcher_rejects_bad_inputs():
    q, k, v, cache_row, length = make_inputs(2, 2, 16, 2, 8, [3, 4], torch.float32, seed=5)
    with pytest.raises(AssertionError, match="length"):
        decode_attention(q, k, v, cache_row, length.long(), 0.5)
    with pytest.raises(AssertionError, match="cache_row"):
        decode_attention(q, k, v, cache_row.int(), length, 0.5)
    with pytest.raises(AssertionError, match="dtype"):
        decode_attention(q.half(), k, v, cache_row, length, 0.5)
