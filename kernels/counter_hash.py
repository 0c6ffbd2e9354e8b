"""The counter-based random numbers of the sampler: a stateless hash of (seed, position, codebook, token), so a
request's samples depend on nothing else — not its batch neighbours, its row, or how many steps run per graph
replay. The request's 63-bit seed is folded once, on the host, into a 32-bit stream seed (``seed_key``); per step one
lowbias32 round keys the stream of each (position, codebook) and one more draws each token's uniform. The PyTorch
reference (int64 tensors holding uint32 values) and the Triton functions (uint32 arithmetic) give the same bits;
``counter_uniform`` runs the Triton ones elementwise, for tests and tools.

Floor: 4 bytes read per input, 4 written per output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._library import define_kernel_op

MASK32 = 0xFFFFFFFF
CODEBOOK_STRIDE = 16  # the stream counter is position · 16 + codebook (K ≤ 8, positions < 2^27)
HASH_MUL_1 = 0x7FEB352D
HASH_MUL_2 = 0x846CA68B


def mix32_ref(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on uint32 values held in int64 tensors (products wrap mod 2^64; we keep 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * HASH_MUL_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * HASH_MUL_2) & MASK32
    x = x ^ (x >> 16)
    return x


def seed_key(seed: int) -> int:
    """A request's 63-bit seed → its 32-bit stream seed, computed once on the host when the request is admitted
    (the per-step hash then needs one mixing round per (position, codebook) and one per token)."""
    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * HASH_MUL_1) & MASK32
        x ^= x >> 15
        x = (x * HASH_MUL_2) & MASK32
        return x ^ (x >> 16)
    return mix(mix(seed & MASK32) ^ ((seed >> 32) & MASK32))


def stream_key_ref(seed: torch.Tensor, position: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """uint32 key (as int64) of the random stream for one (stream seed, position, codebook); ``seed`` holds
    ``seed_key(request seed)``."""
    counter = position.to(torch.int64) * CODEBOOK_STRIDE + codebook
    return mix32_ref((seed ^ counter) & MASK32)


def counter_uniform_ref(key: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Uniform in the open interval (0, 1), float32, exact: ((bits >> 9) + 0.5) / 2^23.

    23 bits, not 24: (2^24 - 1) + 0.5 is not a float32 and rounds to 2^24, which made u = 1 exactly, a Gumbel
    noise of +inf, and (+inf) + (-inf) = NaN on a filtered token, which argmax would then pick.
    """
    bits = mix32_ref(key ^ token)
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


# Triton: the same hash in uint32 arithmetic (products wrap mod 2^32, shifts are logical)
@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _stream_key(seed, position, codebook):
    """stream seed (int64 holding a uint32), position and codebook int32 → uint32 key; as stream_key_ref."""
    counter = (position * 16 + codebook).to(tl.uint32)
    return _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ counter)


@triton.jit
def _counter_uniform(key, token):
    """uint32 key, int32 token(s) → float32 in (0, 1); bit-identical to counter_uniform_ref."""
    bits = _mix32(key ^ token.to(tl.uint32))
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _counter_uniform_kernel(
    out_ptr,        # [M] fp32
    seed_ptr,       # [M] int64
    position_ptr,   # [M] int32
    codebook_ptr,   # [M] int32
    token_ptr,      # [M] int32
    count,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    seed = tl.load(seed_ptr + offsets, mask=mask, other=0)
    key = _stream_key(seed, tl.load(position_ptr + offsets, mask=mask, other=0),
                      tl.load(codebook_ptr + offsets, mask=mask, other=0))
    tl.store(out_ptr + offsets, _counter_uniform(key, tl.load(token_ptr + offsets, mask=mask, other=0)), mask=mask)


def counter_uniform(seed: torch.Tensor, position: torch.Tensor, codebook: torch.Tensor,
                    token: torch.Tensor) -> torch.Tensor:
    """Elementwise Triton counter_uniform(stream_key(seed, position, codebook), token) (for tests and tools)."""
    assert seed.dtype == torch.int64 and all(t.dtype == torch.int32 for t in (position, codebook, token))
    assert seed.shape == position.shape == codebook.shape == token.shape and seed.dim() == 1
    return _counter_uniform_op(seed.contiguous(), position.contiguous(), codebook.contiguous(), token.contiguous())


def _launch_counter_uniform(seed, position, codebook, token) -> torch.Tensor:
    out = torch.empty(seed.shape, dtype=torch.float32, device=seed.device)
    block = 1024
    _counter_uniform_kernel[(triton.cdiv(seed.numel(), block),)](out, seed, position, codebook, token, seed.numel(),
                                                                  BLOCK=block)
    return out


_counter_uniform_op = define_kernel_op(
    "counter_uniform(Tensor seed, Tensor position, Tensor codebook, Tensor token) -> Tensor", _launch_counter_uniform,
    lambda seed, position, codebook, token: torch.empty(seed.shape, dtype=torch.float32, device=seed.device))
