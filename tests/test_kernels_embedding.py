"""Fused multi-codebook embedding kernel vs its PyTorch reference (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch

from fastgen.kernels.codebook_embedding import codebook_embedding, codebook_embedding_ref

from kernel_checks import DEVICE, assert_close_report

DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.float16, 1e-3, 1e-3)]
if DEVICE == "cuda":
    DTYPES.append((torch.bfloat16, 8e-3, 8e-3))


def make_inputs(slots_total, codebooks, vocab, dim, positions, slots, dtype, sinusoid_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab + 1, (slots_total, codebooks), generator=gen)  # vocab = the pad/BOS row
    tokens[0, :] = vocab
    position = torch.randint(0, positions, (slots_total,), generator=gen, dtype=torch.int32)
    tables = torch.randn(codebooks, vocab + 1, dim, generator=gen)
    sinusoid = torch.randn(positions, dim, generator=gen)
    return (tokens.to(DEVICE), position.to(DEVICE), torch.as_tensor(slots, dtype=torch.int64).to(DEVICE),
            tables.to(dtype).to(DEVICE), sinusoid.to(sinusoid_dtype or dtype).to(DEVICE))


CASES = [
    # slots S, codebooks K, vocab V, width D, copies, slots of the rows
    (1, 4, 16, 16, 1, [0]),                    # B = 1, no CFG
    (4, 4, 31, 40, 2, [3, 1, 0]),              # odd B, odd vocab, width not a multiple of 16, CFG copies
    (7, 8, 48, 48, 2, [6, 2, 4, 5, 0]),        # stereo K = 8
    (6, 8, 32, 600, 2, [1, 5, 5, 5]),          # padding rows pointing at a dummy slot; two column blocks
    (9, 4, 20, 24, 3, [8, 7, 6, 5, 4, 3, 2]),  # more than two copies
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("sinusoid_fp32", [False, True])
@pytest.mark.parametrize("slots_total,codebooks,vocab,dim,copies,slots", CASES)
def test_matches_reference(slots_total, codebooks, vocab, dim, copies, slots, sinusoid_fp32, dtype, atol, rtol):
    inputs = make_inputs(slots_total, codebooks, vocab, dim, 50, slots, dtype,
                         torch.float32 if sinusoid_fp32 else None, seed=slots_total * 100 + dim)
    batch = len(slots)
    out = torch.full((copies * batch, dim), float("nan"), dtype=dtype, device=DEVICE)  # poison
    codebook_embedding(*inputs, out)
    want = codebook_embedding_ref(*inputs, torch.empty_like(out))
    assert_close_report(out, want, atol, rtol)
    for c in range(1, copies):
        assert torch.equal(out[c * batch:(c + 1) * batch], out[:batch]), f"copy {c} differs from copy 0"


def test_writes_only_its_rows_of_a_strided_out():
    """`out` may be a view into a wider buffer (row stride > D): nothing outside the view is touched."""
    inputs = make_inputs(5, 4, 16, 32, 20, [4, 0, 2], torch.float32, None, seed=4)
    buffer = torch.full((6, 48), -7.0, device=DEVICE)
    out = buffer[:, 8:40]
    codebook_embedding(*inputs, out)
    assert_close_report(out, codebook_embedding_ref(*inputs, torch.empty(6, 32, device=DEVICE)), 1e-6, 1e-6)
    assert bool((buffer[:, :8] == -7).all() and (buffer[:, 40:] == -7).all())


def test_launcher_rejects_bad_inputs():
    tokens, position, slots, tables, sinusoid = make_inputs(3, 4, 16, 16, 20, [0, 1], torch.float32, None, seed=1)
    out = torch.empty(4, 16, device=DEVICE)
    with pytest.raises(AssertionError, match="tokens"):
        codebook_embedding(tokens.int(), position, slots, tables, sinusoid, out)
    with pytest.raises(AssertionError, match="position"):
        codebook_embedding(tokens, position.long(), slots, tables, sinusoid, out)
    with pytest.raises(AssertionError, match="out"):
        codebook_embedding(tokens, position, slots, tables, sinusoid, torch.empty(3, 16, device=DEVICE))
