"""Admission's conditioning: what a request's text (and melody) put into its slot before its first step.

- A text MusicGen attends to T5's states through cross-attention: their K/V go to the slot's cross cache once; the
  null condition (guidance's uncond row, unconditional requests) has text length 0 and attends to nothing.
- A MusicGen-Melody decoder has no cross-attention: the chroma and the text form a prefix of its self-attention
  sequence (fastgen.model.melody), prefilled into positions 0 … L − 1 of the slot's two rows, each row its own prefix
  (cond: the melody and text; uncond: the null chroma and zeros). The slot's steps then run at positions offset by L
  (SlotState.prefix_length; the sampler's delay pattern and random stream still count from the first audio token).

One engine, the variant chosen at load: the runner holds one SlotConditioning and calls write() for every
admission; everything after admission is the same for both."""
from __future__ import annotations

import torch

from fastgen.engine.request import Request


class SlotConditioning:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.decoder, self.text_encoder = runner.decoder, runner.text_encoder
        self.device = runner.device
        self.melody = runner.melody  # the model's MelodyPrefix, for a melody decoder (None: cross-attention)

    @property
    def text_alone(self) -> bool:
        """Whether each prompt is T5-encoded (and projected) on its own rather than in one padded batch with the
        prompts admitted beside it: on the batch-invariant paths (the fused projections, and every CPU path), whose
        promise is that a request's codes depend only on its prompt, parameters and seed. A GEMM library picks
        algorithms by row count, and padding changes the attention's row lengths, so a batched T5 could move a
        prompt's last bits with its fellow prompts. Costs one T5 call a prompt."""
        return self.decoder.linear_backend == "triton" or self.device.type == "cpu"

    @torch.inference_mode()
    def encode_text(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """T5 + projection (prompts encoded ahead of admission, or alone: text_alone): decoder-width states [T, D]
        per prompt."""
        if self.text_alone and len(token_ids) > 1:
            return [states for ids in token_ids for states in self.encode_text([ids])]
        states, mask = self.text_encoder.encode(token_ids)
        projected = self.decoder.project_text(states, mask)
        return [projected[i, :len(ids)] for i, ids in enumerate(token_ids)]

    def write(self, requests: list[Request]) -> None:
        if self.decoder.cross_attention:
            self._write_cross(requests)
        else:
            self._write_prefix(requests)

    def _prefetched(self, request: Request) -> torch.Tensor:
        """Text states the stage worker encoded ahead of admission, ready for this stream (taken off the request)."""
        states = request.text_states
        if request.text_ready is not None:  # made on the worker's CUDA stream
            torch.cuda.current_stream().wait_event(request.text_ready)
            states.record_stream(torch.cuda.current_stream())
        request.text_states, request.text_ready = None, None
        return states

    def _write_cross(self, requests: list[Request]) -> None:
        """T5-encode the admitted prompts (alone, or as one padded batch); their cross-attention K/V go to the cond
        rows. The null condition (uncond rows, unconditional requests) has text length 0: those rows are never
        read."""
        runner = self.runner
        cache, state = runner.cache, runner.state
        lengths = [len(r.text_ids) if r.text_ids is not None else 0 for r in requests]
        slot_ids = torch.tensor([r.slot for r in requests], device=self.device)
        state.text_length[slot_ids] = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        unconditioned = [r.slot for r in requests if r.text_ids is None]
        if unconditioned:  # the torch path averages a text-less row's cross K/V: they must be zero, not stale
            rows = torch.tensor(unconditioned, device=self.device)
            cache.cross_k[:, rows] = 0
            cache.cross_v[:, rows] = 0
        conditioned = [r for r in requests if r.text_ids is not None and r.text_states is None]
        if conditioned and self.text_alone:
            for r, states in zip(conditioned, self.encode_text([r.text_ids for r in conditioned])):
                self.decoder.write_cross_kv(cache, torch.tensor([r.slot], device=self.device), states[None])
        elif conditioned:
            states, mask = self.text_encoder.encode([r.text_ids for r in conditioned])
            projected = self.decoder.project_text(states, mask)
            rows = torch.tensor([r.slot for r in conditioned], device=self.device)
            self.decoder.write_cross_kv(cache, rows, projected)
        for r in requests:  # text states the stage worker encoded ahead of admission
            if r.text_states is not None:
                states = self._prefetched(r)
                self.decoder.write_cross_kv(cache, torch.tensor([r.slot], device=self.device), states[None])

    def _write_prefix(self, requests: list[Request]) -> None:
        """A melody decoder: each request's prefix (chroma, then text) prefilled into its two rows, alone (a
        request's prefix depends on nothing else: the same codes whatever it is admitted with)."""
        runner = self.runner
        state = runner.state
        pending = [r for r in requests if r.text_ids is not None and r.text_states is None]
        encoded = dict(zip((r.request_id for r in pending),
                           self.encode_text([r.text_ids for r in pending]) if pending else []))
        for r in requests:
            text = self._prefetched(r) if r.text_states is not None else encoded.get(r.request_id)
            prefix = self.melody.states(self.decoder, r.chroma, text)  # [2, L, D]
            rows = torch.tensor([r.slot, runner.total_slots + r.slot], device=self.device)
            self.decoder.prefill_prefix(runner.cache, rows, prefix)
            r.prefix_length = prefix.shape[1]
            state.prefix_length[r.slot] = r.prefix_length
            state.text_length[r.slot] = 0  # no cross-attention to read
