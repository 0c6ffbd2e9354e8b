"""The sampler's PyTorch reference: classifier-free guidance, temperature, top-k / top-p, the counter-hash Gumbel
draw and the delay pattern, as kernels/sampling.py's docstring states them. It is the engine's torch backend and the
reference both kernels are tested against (the Triton sampler beside it, the CPU operator)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .counter_hash import counter_uniform_ref, stream_key_ref


def guided_logits_ref(logits: torch.Tensor, guidance_scale: torch.Tensor) -> torch.Tensor:
    """[2B, K, V] cond-then-uncond rows → [B, K, V] fp32 guided logits; guidance_scale is per row [B]."""
    batch = logits.shape[0] // 2
    cond = logits[:batch].float()
    uncond = logits[batch:].float()
    scale = guidance_scale.float().view(-1, 1, 1)
    guided = uncond + scale * (cond - uncond)
    return torch.where(scale == 1.0, cond, guided)


def filter_logits_ref(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, *, max_top_k: int = -1,
                      apply_top_p: bool = True) -> torch.Tensor:
    """Top-k then top-p on [B, K, V] temperature-scaled scores (per-row k and p); removed tokens become -inf.
    ``max_top_k`` (host-known largest k in the batch; 0 = no row uses top-k, -1 = unknown) and ``apply_top_p``
    only let the eager path skip work."""
    vocab = scores.shape[-1]
    if max_top_k != 0:
        largest = min(vocab, max_top_k) if max_top_k > 0 else vocab
        top_values = scores.topk(largest, dim=-1).values  # sorted, descending
        k = top_k.to(torch.int64).clamp(0, largest).view(-1, 1, 1).expand(-1, scores.shape[1], 1)
        kth = top_values.gather(-1, (k - 1).clamp(min=0))
        kth = torch.where(k > 0, kth, -float("inf"))
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if not apply_top_p:
        return scores

    probs = scores.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Softmax mass strictly above each sorted token's value: tied tokens share the mass above their group, so the
    # result does not depend on how the sort orders ties.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_scores = scores.gather(-1, order)
    index = torch.arange(vocab, device=scores.device).expand_as(sorted_scores)
    starts_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    starts_group[..., 1:] = sorted_scores[..., 1:] != sorted_scores[..., :-1]
    group_start = torch.where(starts_group, index, torch.zeros_like(index)).cummax(dim=-1).values
    mass_above = mass_before.gather(-1, group_start)
    p = top_p.float().view(-1, 1, 1)
    remove_sorted = (mass_above >= p) & (p < 1.0)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


@dataclass(frozen=True)
class RowParams:
    """Per-row values gathered from the per-slot tensors, shaped to broadcast. They change only when the batch's
    membership does, so the engine's torch path gathers them once per batch instead of once per step."""
    guidance_scale: torch.Tensor  # [B, 1, 1] float32
    temperature: torch.Tensor     # [B, 1, 1] float32
    top_k: torch.Tensor           # [B] int32
    top_p: torch.Tensor           # [B] float32
    seed: torch.Tensor            # [B, 1] int64
    num_frames: torch.Tensor      # [B, 1] int32
    prompt_frames: torch.Tensor   # [B, 1] int32

    @classmethod
    def gather(cls, slots, guidance_scale, temperature, top_k, top_p, seed, num_frames, prompt_frames) -> "RowParams":
        return cls(guidance_scale[slots].view(-1, 1, 1), temperature[slots].view(-1, 1, 1), top_k[slots],
                   top_p[slots], seed[slots].view(-1, 1), num_frames[slots].view(-1, 1),
                   prompt_frames[slots].view(-1, 1))


def advance_positions_ref(position: torch.Tensor, slots: torch.Tensor, dummy_slot: int) -> None:
    """The step's position advance as the torch backend does it after sampling: position + 1 for every row's slot,
    then 0 from the dummy slot on (graph padding rows point at it and may have bumped it)."""
    position.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
    position[dummy_slot:].zero_()


def sample_next_tokens_ref(
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
    any_sampling: bool = True,     # hints: host-known facts about the batch that let this eager path skip work;
    any_guidance: bool = True,     # they never change the result when true of the batch
    max_top_k: int = -1,
    any_top_p: bool = True,
    rows: RowParams | None = None,  # the per-row gather of the [S] parameters above, if already made
    step_length: torch.Tensor | None = None,  # [≥ B] int32: the step's position + 1 of row b; given, the positions
    dummy_slot: int = -1,                     # are read from it and advanced (the dummy slot back to 0)
) -> None:
    # Written for few operator calls (on a CPU the step's cost is mostly per-call overhead): per-row values are
    # gathered once, and work the hints rule out is skipped.
    if rows is None:
        rows = RowParams.gather(slots, guidance_scale, temperature, top_k, top_p, seed, num_frames, prompt_frames)
    batch, codebooks, vocab = logits.shape[0] // 2, logits.shape[1], logits.shape[2]
    device = logits.device
    cond, uncond = logits[:batch], logits[batch:]
    if logits.dtype != torch.float32:
        cond, uncond = cond.float(), uncond.float()
    guided = cond
    if any_guidance:
        scale = rows.guidance_scale
        guided = torch.where(scale == 1.0, cond, uncond + scale * (cond - uncond))
    token = guided.argmax(dim=-1)
    position_b = (position[slots] if step_length is None else step_length[:batch] - 1).view(-1, 1)
    codebook_ids = torch.arange(codebooks, device=device)
    if any_sampling:
        temp = rows.temperature
        greedy = temp == 0
        scores = guided / torch.where(greedy, 1.0, temp)
        if max_top_k != 0 or any_top_p:
            scores = filter_logits_ref(scores, rows.top_k, rows.top_p, max_top_k=max_top_k,
                                       apply_top_p=any_top_p)
        key = stream_key_ref(rows.seed, position_b, codebook_ids)
        uniform = counter_uniform_ref(key.unsqueeze(-1), torch.arange(vocab, device=device))
        sampled = (scores - torch.log(-torch.log(uniform))).argmax(dim=-1)  # Gumbel-max
        token = torch.where(greedy.view(-1, 1), token, sampled)

    channel_codebook = codebook_ids if audio_channels == 1 else codebook_ids // 2
    frame = position_b - channel_codebook  # [B, K]
    in_range = (frame >= 0) & (frame < rows.num_frames)
    from_prompt = frame < rows.prompt_frames
    slot_k = (slots.view(-1, 1), codebook_ids, frame.clamp(0, codes.shape[-1] - 1))
    current = codes[slot_k]
    token = torch.where(in_range, torch.where(from_prompt, current, token), pad_id)
    codes[slot_k] = torch.where(in_range, token, current)
    tokens[slots] = token
    # a sum is non-finite iff some element is (finite logits cannot overflow float32 in a 2048-wide sum)
    bad = torch.isfinite(guided.sum(dim=(1, 2))).logical_not_().to(nonfinite.dtype)
    nonfinite.scatter_reduce_(0, slots, bad, reduce="amax")
    if step_length is not None:
        position[slots] = torch.where(slots == dummy_slot, 0, step_length[:batch])
