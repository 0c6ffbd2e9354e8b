"""What an Engine decides once, at construction: which kernels run the step and how many slots the cache holds."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastgen.config import EngineConfig
from fastgen.model.decoder import KVCache, MusicgenDecoder
from fastgen.model.ops import Ops, get_ops

CPU_CACHE_BUDGET = 2 << 30
CUDA_CACHE_SHARE = 0.75  # of the memory free after loading the weights; the rest: graphs, EnCodec, T5
MAX_SLOTS = 256


@dataclass(frozen=True)
class Backends:
    ops: Ops  # attention, sampling and embedding kernels
    linear: str  # "torch" or "triton": who runs the projections


def resolve_backends(config: EngineConfig, decoder: MusicgenDecoder) -> Backends:
    """``auto`` → Triton on CUDA, torch elsewhere; refuses combinations that cannot run here, naming the option."""
    device = decoder.device
    backend = config.backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU "
                         "interpreter, for testing); use backend='torch' or 'auto' on a CPU")
    if backend == "triton" and device.type != "cuda" and decoder.dtype != torch.float32:
        raise ValueError(f"backend='triton' on a CPU runs Triton's interpreter, which computes "
                         f"{str(decoder.dtype).removeprefix('torch.')} wrongly; load with dtype=float32")
    linear = config.linear_backend
    if linear is None:
        linear = "triton" if backend == "triton" and device.type == "cuda" else "torch"
    if linear == "triton" and backend != "triton":
        raise ValueError(f"linear_backend='triton' needs backend='triton', but backend resolved to {backend!r} "
                         f"on {device.type}: the fused projections are Triton kernels")
    if config.compile_step and backend != "torch":
        raise ValueError(f"compile_step applies to the torch backend (the CPU default), not {backend!r}: the "
                         "Triton kernels are compiled already and run as CUDA graphs")
    return Backends(get_ops(backend), linear)


def plan_slots(config: EngineConfig, decoder: MusicgenDecoder, slot_frames: int) -> int:
    """As many slots as the KV-cache budget holds, each sized for one window (or the longest request allowed)."""
    positions = (decoder.prefix_positions(config.max_text_tokens) + slot_frames
                 + decoder.config.channel_codebooks + config.steps_per_call - 1)
    cross_tokens = config.max_text_tokens if decoder.cross_attention else 0
    per_slot = KVCache.bytes_per_slot(decoder.config, positions, cross_tokens, decoder.dtype)
    budget = config.kv_cache_memory_bytes
    if budget is None:
        if decoder.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(decoder.device)
            budget = int(free * CUDA_CACHE_SHARE)
        else:
            budget = CPU_CACHE_BUDGET
    fits = budget // per_slot - 1  # one slot's worth goes to the padding dummy
    cap = config.max_slots or MAX_SLOTS
    if fits < 1:
        raise ValueError(f"the KV-cache budget ({budget / 2**30:.2f} GiB) cannot hold one slot of "
                         f"{per_slot / 2**30:.2f} GiB; lower window_s, max_duration_s or max_text_tokens, or raise "
                         "kv_cache_memory_bytes")
    return int(min(cap, fits))
