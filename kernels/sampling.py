"""Fused classifier-free guidance + sampling over K codebooks, with the delay pattern applied.

For each active row b (slot s = slots[b]) and codebook k:
    l     = cond            if guidance_scale[s] == 1   (exact: no rounding through the formula)
          = uncond + g·(cond − uncond)                  otherwise
    greedy (temperature[s] == 0):  token = argmax(l)        (first index on ties, like torch.argmax)
    else:  l' = l / T;  keep tokens with l' ≥ k-th largest (ties kept; top_k 0 = off);
           keep tokens whose softmax mass strictly above them is < top_p (top_p 1 = off);
           token = argmax over kept tokens of (l' + Gumbel(u)),  u = counter_uniform(seed, t, k, token)
The delay pattern: codebook k belongs to channel codebook c = k (mono) or k // 2 (stereo); the token predicted at
delayed position t + 1 (t = position[s], the position of the current input token) is frame f = t − c:
    f < 0 or f ≥ num_frames[s]     → pad id
    f < prompt_frames[s]           → the prompt's code, read from codes[s, k, f]
    otherwise                      → the sampled token, also written to codes[s, k, f]
The token goes to tokens[s, k] (next decode input). nonfinite[s] is set to 1 when any guided logit is NaN/±inf.

As the last kernel of a decode step it also advances each row's position (the dummy slot back to 0). Randomness is
fastgen.kernels.counter_hash: a stateless hash of (seed, position, codebook, token). Floor: reads 2·B·K·V logits,
writes B·K tokens. How the kernel finds the top-k / top-p thresholds exactly (bisection on order-preserving keys) and
where its top-p mass may differ from the reference's by an ulp: docs/kernels.md, "Sampling kernel".
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from ._configs import KernelConfig, make_config
from ._library import define_kernel_op
from .counter_hash import _counter_uniform, _stream_key

# ----------------------------------------------------------------------------------------------------------------
# Triton: guidance + filters + Gumbel-max + delay pattern, one program per (row, codebook)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _order_key(x):
    """float32 → int32 with the same order (−0 is mapped to +0 first so that it ties like the float compare)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit(do_not_specialize=["dummy_slot"])  # one compiled variant whatever the slot count
def _sample_next_tokens_kernel(
    logits_ptr,         # [2B, K, V], last dim contiguous: rows [0, B) cond, [B, 2B) uncond
    slots_ptr,          # [B] int64
    guidance_ptr,       # [S] fp32
    temperature_ptr,    # [S] fp32
    top_k_ptr,          # [S] int32
    top_p_ptr,          # [S] fp32
    seed_ptr,           # [S] int64
    position_ptr,       # [S] int32 (ADVANCE: out)
    num_frames_ptr,     # [S] int32
    prompt_frames_ptr,  # [S] int32
    tokens_ptr,         # [S, K] int64 out, last dim contiguous
    codes_ptr,          # [S, K, F_max] int64 in/out, last dim contiguous
    nonfinite_ptr,      # [S] int32 out
    step_length_ptr,    # [≥ B] int32 (read only when ADVANCE): the step's position + 1 of each row
    batch,
    vocab,
    max_frames,
    pad_id,
    dummy_slot,
    stride_logits_row,
    stride_logits_k,
    stride_tokens,
    stride_codes_s,
    stride_codes_k,
    CHANNEL_SHIFT: tl.constexpr,  # codebook → channel codebook: k >> 0 (mono) or k >> 1 (stereo)
    BLOCK_V: tl.constexpr,
    PRECISE_EXP: tl.constexpr,    # libdevice expf (compiled); False under the interpreter, which lacks libdevice
    ADVANCE: tl.constexpr,        # read positions from step_length, then advance them (the module docstring)
):
    row = tl.program_id(0)
    codebook = tl.program_id(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab
    cond_ptr = logits_ptr + row.to(tl.int64) * stride_logits_row + codebook * stride_logits_k
    # (row + batch), not batch.to(): the JIT passes batch = 1 as a constexpr, which has no .to()
    uncond_ptr = logits_ptr + (row + batch).to(tl.int64) * stride_logits_row + codebook * stride_logits_k
    cond = tl.load(cond_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
    uncond = tl.load(uncond_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
    scale = tl.load(guidance_ptr + slot)
    guided = tl.where(scale == 1.0, cond, uncond + scale * (cond - uncond))
    finite = tl.abs(guided) < float("inf")  # false for ±inf and NaN
    # A count, not tl.max of an int flag: the max form leaves an 8-byte stack frame in the sm_90 cubin.
    bad = tl.sum(tl.where(in_vocab & (finite == 0), 1, 0), axis=0) > 0
    if bad:
        tl.store(nonfinite_ptr + slot, 1)
    guided = tl.where(in_vocab, guided, -float("inf"))

    # Delay pattern: which frame this (step, codebook) predicts, and whether it is pad, prompt or sampled.
    if ADVANCE:
        position = tl.load(step_length_ptr + row) - 1
    else:
        position = tl.load(position_ptr + slot)
    frame = position.to(tl.int64) - (codebook >> CHANNEL_SHIFT)
    in_range = (frame >= 0) & (frame < tl.load(num_frames_ptr + slot))
    from_prompt = frame < tl.load(prompt_frames_ptr + slot)
    frame_index = tl.minimum(tl.maximum(frame, 0), max_frames - 1)
    code_ptr = codes_ptr + slot * stride_codes_s + codebook * stride_codes_k + frame_index
    token = slot * 0 + pad_id  # int64 (pad_id may arrive as a constexpr)
    if in_range:
        if from_prompt:
            token = tl.load(code_ptr)
        else:
            temperature = tl.load(temperature_ptr + slot)
            if temperature == 0.0:
                token = tl.argmax(guided, axis=0).to(tl.int64)
            else:
                scores = tl.math.div_rn(guided, tl.where(in_vocab, temperature, 1.0))
                keys = _order_key(scores)
                top_k = tl.minimum(tl.load(top_k_ptr + slot), vocab)
                if (top_k > 0) & (top_k < vocab):
                    # Largest key t with #(keys ≥ t) ≥ k: the k-th largest score (ties with it kept).
                    lo = tl.min(tl.where(in_vocab, keys, 2147483647), axis=0).to(tl.int64)  # count(≥ lo) ≥ k
                    hi = tl.max(tl.where(in_vocab, keys, -2147483647 - 1), axis=0).to(tl.int64) + 1  # count = 0
                    for _ in range(32):
                        mid = (lo + hi) >> 1
                        count = tl.sum(tl.where(in_vocab & (keys >= mid.to(tl.int32)), 1, 0), axis=0)
                        enough = count >= top_k
                        lo = tl.where(enough, mid, lo)
                        hi = tl.where(enough, hi, mid)
                    scores = tl.where(keys >= lo.to(tl.int32), scores, -float("inf"))
                top_p = tl.load(top_p_ptr + slot)
                if top_p < 1.0:
                    # Smallest key t with mass(keys > t) < p: keep exactly the tokens whose mass above is < p.
                    shifted = scores - tl.max(scores, axis=0)
                    if PRECISE_EXP:
                        weights = libdevice.exp(shifted)
                    else:
                        weights = tl.exp(shifted)
                    probs = tl.math.div_rn(weights, tl.sum(weights, axis=0))
                    lo = tl.min(tl.where(in_vocab, keys, 2147483647), axis=0).to(tl.int64) - 1
                    hi = tl.max(tl.where(in_vocab, keys, -2147483647 - 1), axis=0).to(tl.int64)  # mass above = 0
                    for _ in range(32):
                        mid = (lo + hi) >> 1
                        above = tl.sum(tl.where(keys > mid.to(tl.int32), probs, 0.0), axis=0)
                        small = above < top_p
                        hi = tl.where(small, mid, hi)
                        lo = tl.where(small, lo, mid)
                    scores = tl.where(keys >= hi.to(tl.int32), scores, -float("inf"))
                key = _stream_key(tl.load(seed_ptr + slot), position, codebook)
                gumbel = -tl.log(-tl.log(_counter_uniform(key, cols)))
                token = tl.argmax(scores + gumbel, axis=0).to(tl.int64)
            tl.store(code_ptr, token)
    tl.store(tokens_ptr + slot * stride_tokens + codebook, token)
    if ADVANCE:
        if codebook == 0:
            tl.store(position_ptr + slot, tl.where(slot == dummy_slot, 0, position + 1))


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): the whole row in one block; 4 warps (16 values per thread) at V = 2048."""
    block = triton.next_power_of_2(vocab)
    return block, max(1, min(8, block // 512))


def sample_next_tokens(
    logits: torch.Tensor,          # [2B, K, V]: rows [0, B) cond, [B, 2B) uncond, row b ↔ slots[b]
    slots: torch.Tensor,           # [B] int64 slot of each row
    guidance_scale: torch.Tensor,  # [S] float32
    temperature: torch.Tensor,     # [S] float32, 0 = greedy
    top_k: torch.Tensor,           # [S] int32, 0 = off
    top_p: torch.Tensor,           # [S] float32, 1 = off
    seed: torch.Tensor,            # [S] int64: stream seed, seed_key(request seed)
    position: torch.Tensor,        # [S] int32, position of the current input token
    num_frames: torch.Tensor,      # [S] int32
    prompt_frames: torch.Tensor,   # [S] int32
    tokens: torch.Tensor,          # [S, K] int64 out: next decode input
    codes: torch.Tensor,           # [S, K, F_max] int64 in (prompt codes) / out (sampled codes)
    nonfinite: torch.Tensor,       # [S] int32 out: set to 1 where a guided logit is not finite
    pad_id: int,
    audio_channels: int,
    *,
    any_sampling: bool = True,     # the reference's eager-path hints: accepted so the two are interchangeable, and
    any_guidance: bool = True,     # ignored (the kernel branches per row on the device)
    max_top_k: int = -1,
    any_top_p: bool = True,
    step_length: torch.Tensor | None = None,  # [≥ B] int32: the step's position + 1 of row b; given, the positions
    dummy_slot: int = -1,                     # are read from it and advanced (the dummy slot back to 0)
) -> None:
    assert logits.dim() == 3 and logits.shape[0] % 2 == 0 and logits.stride(2) == 1 \
        and logits.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"logits must be float [2B, K, V] with a contiguous last dim, got {logits.dtype} {tuple(logits.shape)}"
    batch, codebooks = logits.shape[0] // 2, logits.shape[1]
    assert slots.dtype == torch.int64 and slots.shape == (batch,), \
        f"slots must be int64 [{batch}], got {slots.dtype} {tuple(slots.shape)}"
    num_slots = tokens.shape[0]
    for name, tensor, dtype in (("guidance_scale", guidance_scale, torch.float32),
                                ("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                                ("top_p", top_p, torch.float32), ("seed", seed, torch.int64),
                                ("position", position, torch.int32), ("num_frames", num_frames, torch.int32),
                                ("prompt_frames", prompt_frames, torch.int32), ("nonfinite", nonfinite, torch.int32)):
        assert tensor.dtype == dtype and tensor.shape == (num_slots,), \
            f"{name} must be {dtype} [{num_slots}], got {tensor.dtype} {tuple(tensor.shape)}"
    assert tokens.dtype == torch.int64 and tokens.shape == (num_slots, codebooks) and tokens.stride(1) == 1, \
        f"tokens must be int64 [S, {codebooks}] with a contiguous last dim, got {tokens.dtype} {tuple(tokens.shape)}"
    assert codes.dtype == torch.int64 and codes.dim() == 3 and codes.shape[:2] == (num_slots, codebooks) \
        and codes.stride(2) == 1 and codes.shape[2] > 0, \
        f"codes must be int64 [S, {codebooks}, F_max] with a contiguous last dim, got {tuple(codes.shape)}"
    assert audio_channels in (1, 2) and codebooks % audio_channels == 0, \
        f"audio_channels must be 1 or 2 and divide K = {codebooks}, got {audio_channels}"
    tensors = [logits, slots, guidance_scale, temperature, top_k, top_p, seed, position, num_frames, prompt_frames,
               tokens, codes, nonfinite]
    if step_length is not None:
        assert step_length.dtype == torch.int32 and step_length.dim() == 1 and step_length.shape[0] >= batch \
            and step_length.is_contiguous(), \
            f"step_length must be contiguous int32 [>= {batch}], got {step_length.dtype} {tuple(step_length.shape)}"
        assert 0 <= dummy_slot < num_slots, f"dummy_slot must be a slot in [0, {num_slots}), got {dummy_slot}"
        tensors.append(step_length)
    devices = {t.device for t in tensors}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    if batch == 0:
        return
    _sample_op(logits, slots, guidance_scale, temperature, top_k, top_p, seed, position, num_frames, prompt_frames,
               tokens, codes, nonfinite, pad_id, audio_channels, step_length, dummy_slot)


def _launch(logits, slots, guidance_scale, temperature, top_k, top_p, seed, position, num_frames, prompt_frames,
            tokens, codes, nonfinite, pad_id, audio_channels, step_length, dummy_slot) -> None:
    batch, codebooks, vocab = logits.shape[0] // 2, logits.shape[1], logits.shape[2]
    block, warps = launch_config(vocab)
    advance = step_length is not None
    _sample_next_tokens_kernel[(batch, codebooks)](
        logits, slots, guidance_scale, temperature, top_k, top_p, seed, position, num_frames, prompt_frames,
        tokens, codes, nonfinite, step_length if advance else position, batch, vocab, codes.shape[2], pad_id,
        dummy_slot, logits.stride(0), logits.stride(1), tokens.stride(0), codes.stride(0), codes.stride(1),
        CHANNEL_SHIFT=audio_channels - 1, BLOCK_V=block, PRECISE_EXP=_COMPILED, ADVANCE=advance, num_warps=warps,
        enable_fp_fusion=False,  # uncond + g·(cond − uncond) rounded like the reference, not fused into an FMA
    )


_COMPILED = not isinstance(_sample_next_tokens_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 at import or not
# position is declared written: the step's call (step_length given) advances it
_sample_op = define_kernel_op(
    "sample_next_tokens(Tensor logits, Tensor slots, Tensor guidance_scale, Tensor temperature, Tensor top_k, "
    "Tensor top_p, Tensor seed, Tensor(a!) position, Tensor num_frames, Tensor prompt_frames, Tensor(b!) tokens, "
    "Tensor(c!) codes, Tensor(d!) nonfinite, int pad_id, int audio_channels, Tensor? step_length, "
    "int dummy_slot) -> ()", _launch)


def _engine_configs() -> list[KernelConfig]:
    configs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for vocab in (2048, 48):  # MusicGen's codebook size, and the tests' tiny vocabulary
            block, warps = launch_config(vocab)
            # the engine's step advances (ADVANCE); one mono variant without, for callers outside the engine.
            # The JIT turns an integer argument equal to 1 into a constexpr: batch = 1 is its own variant.
            for channels, batch_one, advance in ((1, False, True), (2, False, True), (1, True, True),
                                                 (1, False, False)):
                configs.append(make_config(
                    f"sampling {dtype} BLOCK_V={block} channels={channels}" + (" B=1" if batch_one else "")
                    + (" advance" if advance else ""),
                    _sample_next_tokens_kernel,
                    {"logits_ptr": f"*{dtype}", "slots_ptr": "*i64", "guidance_ptr": "*fp32",
                     "temperature_ptr": "*fp32", "top_k_ptr": "*i32", "top_p_ptr": "*fp32", "seed_ptr": "*i64",
                     "position_ptr": "*i32", "num_frames_ptr": "*i32", "prompt_frames_ptr": "*i32",
                     "tokens_ptr": "*i64", "codes_ptr": "*i64", "nonfinite_ptr": "*i32", "step_length_ptr": "*i32",
                     "batch": "i32", "vocab": "i32", "max_frames": "i32", "pad_id": "i32", "dummy_slot": "i32",
                     "stride_logits_row": "i32", "stride_logits_k": "i32", "stride_tokens": "i32",
                     "stride_codes_s": "i32", "stride_codes_k": "i32"},
                    {"CHANNEL_SHIFT": channels - 1, "BLOCK_V": block, "PRECISE_EXP": True, "ADVANCE": advance}
                    | ({"batch": 1} if batch_one else {}),
                    aligned=("logits_ptr", "slots_ptr", "guidance_ptr", "temperature_ptr", "top_k_ptr", "top_p_ptr",
                             "seed_ptr", "position_ptr", "num_frames_ptr", "prompt_frames_ptr", "tokens_ptr",
                             "codes_ptr", "nonfinite_ptr", "step_length_ptr", "stride_logits_row",
                             "stride_logits_k")
                    + (("vocab",) if vocab % 16 == 0 else ()),
                    num_warps=warps, num_stages=1, enable_fp_fusion=False))
    return configs


ENGINE_CONFIGS: list[KernelConfig] = _engine_configs()
