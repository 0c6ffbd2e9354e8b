"""The three custom ops of a decode step, from a backend: "torch" (the plain-PyTorch references) or "triton"."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastgen.kernels.codebook_embedding import codebook_embedding_ref
from fastgen.kernels.decode_attention import decode_attention_ref
from fastgen.kernels.sampling import sample_next_tokens_ref


@dataclass(frozen=True)
class Ops:
    name: str
    embed: Callable
    attention: Callable
    sample: Callable


def get_ops(backend: str) -> Ops:
    if backend == "torch":
        return Ops("torch", codebook_embedding_ref, decode_attention_ref, sample_next_tokens_ref)
    if backend == "triton":
        # imported here: the kernels need triton's JIT (or TRITON_INTERPRET=1 on a CPU)
        from fastgen.kernels.codebook_embedding import codebook_embedding
        from fastgen.kernels.decode_attention import decode_attention
        from fastgen.kernels.sampling import sample_next_tokens
        return Ops("triton", codebook_embedding, decode_attention, sample_next_tokens)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
