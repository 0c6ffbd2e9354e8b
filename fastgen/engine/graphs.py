"""CUDA graphs for the decode step: one graph per batch-size bucket, captured at start-up into one shared memory pool,
replayed with the batch padded up to its bucket (padding rows point at the runner's dummy slot). A graph holds the
runner's ``steps_per_call`` consecutive steps.

The step reads everything from device tensors indexed by slot, so a graph stays valid while requests come and go:
only the static slot-id buffer changes, and only when the batch's membership does."""
from __future__ import annotations

import torch

from fastgen.model.ops import SamplerHints

BUCKET_STEP = 16


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_batch (as nano-vllm does), always ending at max_batch."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch]
    buckets += list(range(BUCKET_STEP, max_batch, BUCKET_STEP))
    return sorted(set(buckets + [max_batch]))


class DecodeGraphs:
    def __init__(self, runner, max_batch: int) -> None:
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        device = runner.device
        self.slot_ids = torch.full((self.buckets[-1],), runner.dummy_slot, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hints = SamplerHints()  # the kernels take no hints; the captured step serves any batch

    def bucket_for(self, batch: int) -> int:
        for bucket in self.buckets:
            if bucket >= batch:
                return bucket
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up every bucket eagerly (Triton compiles its specialisations), then capture largest first so the
        smaller graphs reuse the pool."""
        from fastgen.kernels.decode_attention import reserve_decode_scratch
        runner = self.runner
        reserve_decode_scratch(2 * self.buckets[-1], runner.config.num_heads,
                               max(runner.cache_positions, runner.max_text_tokens), runner.device,
                               runner.config.head_dim)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in self.buckets:
                for _ in range(2):
                    self._step(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        pool = None
        for bucket in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(bucket)
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def _step(self, bucket: int) -> None:
        for _ in range(self.runner.steps_per_call):  # one replay, several steps: one launch, one host round
            self.runner.decode_step(self.slot_ids[:bucket], self.hints, None, None)

    def set_batch(self, slots: list[int]) -> int:
        """Load the batch's slots into the static buffer (padding with the dummy slot); returns the bucket."""
        bucket = self.bucket_for(len(slots))
        padded = slots + [self.runner.dummy_slot] * (self.slot_ids.shape[0] - len(slots))
        self.slot_ids.copy_(torch.tensor(padded, dtype=torch.int64))  # pageable source: the host waits for it
        return bucket

    def replay(self, bucket: int) -> None:
        self.graphs[bucket].replay()
