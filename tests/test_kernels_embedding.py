"""Fused multi-codebook embedding kernel vs its PyTorch reference (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch

from fastgen.kernels.codebook_embedding import StepRows, codebook_embedding, codebook_embedding_ref

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


ROW_CASES = [
    # slots S, codebooks K, width D, copies, slots of the rows (the last slot is the dummy padding points at)
    (2, 4, 16, 2, [0]),                          # B = 1
    (6, 4, 40, 2, [3, 1, 5, 5, 5]),              # odd B, three padding rows on the dummy, width not a multiple of 16
    (9, 8, 600, 2, [8, 7, 2, 0, 4, 5, 6]),       # stereo K, two column blocks (only the first writes the rows)
    (5, 4, 24, 3, [1, 4, 4]),                    # more than two copies: only the first attends to text
]


@pytest.mark.parametrize("slots_total,codebooks,dim,copies,slots", ROW_CASES)
def test_step_rows_match_reference(slots_total, codebooks, dim, copies, slots):
    """The decode step's bookkeeping, written by the embedding launch: cache rows s + c·offset, self lengths
    position + 1 for every copy, text lengths for the first copy and 0 after; poisoned outputs all overwritten."""
    dtype = torch.float32
    tokens, position, slot_ids, tables, sinusoid = make_inputs(slots_total, codebooks, 20, dim, 50, slots, dtype,
                                                               None, seed=slots_total * 7 + dim)
    gen = torch.Generator().manual_seed(dim)
    text_length = torch.randint(0, 30, (slots_total,), generator=gen, dtype=torch.int32).to(DEVICE)
    rows_count = copies * len(slots)
    got, want = (StepRows.allocate(text_length, slots_total + 1, rows_count) for _ in range(2))
    for tensor in (got.cache_row, got.self_length, got.cross_length):
        tensor.fill_(-99)  # poison
    out = torch.full((rows_count, dim), float("nan"), dtype=dtype, device=DEVICE)
    codebook_embedding(tokens, position, slot_ids, tables, sinusoid, out, got)
    expected = codebook_embedding_ref(tokens, position, slot_ids, tables, sinusoid, torch.empty_like(out), want)
    assert_close_report(out, expected, 1e-6, 1e-6)
    for name in ("cache_row", "self_length", "cross_length"):
        assert torch.equal(getattr(got, name), getattr(want, name)), \
            f"{name}: got {getattr(got, name).tolist()}, want {getattr(want, name).tolist()}"
    # the reference spelled out for one row and its copies
    b, slot = len(slots) - 1, slots[-1]
    rows = [c * len(slots) + b for c in range(copies)]
    assert got.cache_row[rows].tolist() == [slot + c * (slots_total + 1) for c in range(copies)]
    assert got.self_length[rows].tolist() == [int(position[slot]) + 1] * copies
    assert got.cross_length[rows].tolist() == [int(text_length[slot])] + [0] * (copies - 1)


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
    rows = StepRows.allocate(torch.zeros(3, dtype=torch.int32, device=DEVICE), 3, 4)
    with pytest.raises(AssertionError, match="rows.self_length"):
        codebook_embedding(tokens, position, slots, tables, sinusoid, out,
                           StepRows(rows.text_length, 3, rows.cache_row, rows.self_length.long(), rows.cross_length))
    with pytest.raises(AssertionError, match="rows.text_length"):
        codebook_embedding(tokens, position, slots, tables, sinusoid, out,
                           StepRows(rows.text_length[:2], 3, rows.cache_row, rows.self_length, rows.cross_length))
